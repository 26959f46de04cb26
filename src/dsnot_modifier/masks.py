"""
Mask structures: parsing ``mask_structure``, reading the structure from a pruned
weight's zeros, and making an initial mask (Wanda or magnitude) for standalone use.

Plain torch; nothing here imports llm-compressor.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

import torch

__all__ = [
    "MaskStructureError",
    "parse_mask_structure",
    "parse_sparsity",
    "format_structure",
    "block_zero_counts",
    "infer_structure",
    "check_structure",
    "initial_mask",
    "Initial",
    "INITIAL_KINDS",
    "check_blocks",
    "check_refined",
    "check_same_mask",
    "RefinedStructureError",
    "INFER_BLOCK_SIZES",
]

#: block sizes tried, smallest first, when the structure is read from the zeros
INFER_BLOCK_SIZES = (4, 8, 16, 32)

#: how standalone DSnoT makes its initial mask, see :func:`initial_mask`
Initial = Literal["wanda", "magnitude"]
INITIAL_KINDS: tuple[str, ...] = get_args(Initial)


class MaskStructureError(ValueError):
    """A mask structure that is malformed, impossible, or contradicts the zeros."""


class RefinedStructureError(RuntimeError):
    """A refined weight whose zeros break the structure (never written back)."""


def parse_mask_structure(value: str | None) -> tuple[int, int] | None:
    """
    Parse ``"N:M"`` (N zeros in every block of M consecutive input columns).

    :return: ``None`` for unstructured (``"0:0"`` or ``"unstructured"``), else
        ``(N, M)`` with ``0 < N < M``; ``None`` given, ``None`` returned
    :raises MaskStructureError: if the text is not of that form or N:M is impossible
    """
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("0:0", "unstructured"):
        return None
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match:
        raise MaskStructureError(
            f"mask_structure {value!r} is not of the form 'N:M' (N zeros in every block "
            "of M input columns): use '2:4', '4:8', or '0:0' for unstructured"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise MaskStructureError(
            f"mask_structure {value!r} is impossible: it needs 0 < N < M "
            "(for example '2:4' or '4:8'), or '0:0' for unstructured"
        )
    return n, m


def parse_sparsity(text: str) -> tuple[float, tuple[int, int] | None]:
    """
    A sparsity as a fraction or as N:M: ``"0.6"`` -> ``(0.6, None)``, ``"2:4"`` ->
    ``(0.5, (2, 4))``.

    :raises MaskStructureError: (a ValueError) if it is neither
    """
    text = str(text).strip()
    if ":" in text:
        nm = parse_mask_structure(text)
        if nm is None:
            raise MaskStructureError(f"sparsity {text!r}: N:M needs 0 < N < M, e.g. 2:4")
        return nm[0] / nm[1], nm
    try:
        value = float(text)
    except ValueError:
        raise MaskStructureError(
            f"sparsity {text!r}: give a fraction such as 0.6 or N:M such as 2:4"
        ) from None
    if not 0 < value < 1:
        raise MaskStructureError(f"sparsity {text!r}: a fraction must lie strictly between 0 and 1")
    return value, None


def format_structure(nm: tuple[int, int] | None) -> str:
    return "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"


def block_zero_counts(zero: torch.Tensor, m: int) -> torch.Tensor:
    """The number of True entries of every block of ``m`` columns of ``zero``: ``[rows, cols/m]``."""
    rows, cols = zero.shape
    return zero.reshape(rows, cols // m, m).sum(-1)


def infer_structure(
    current: torch.Tensor, dense: torch.Tensor | None = None
) -> tuple[int, int] | None:
    """
    Read the mask structure from the zeros of a pruned weight ``[rows, cols]``.

    N:M is found when, for the smallest block size M tried (4, 8, 16, 32) that
    divides ``cols``, every block holds the same number N >= 1 of zeros; a block
    may hold more only where the dense weight itself had that many exact zeros
    (real checkpoints have a few). Anything else is unstructured.
    """
    zero = current == 0
    dense_zero = (dense == 0) if dense is not None else torch.zeros_like(zero)
    cols = zero.shape[1]
    for m in INFER_BLOCK_SIZES:
        if cols % m:
            continue
        counts = block_zero_counts(zero, m)
        n = int(counts.min())
        if n < 1 or n >= m:
            continue
        extra = counts > n
        if extra.any():
            dense_counts = block_zero_counts(dense_zero, m)
            if not bool((counts[extra] <= dense_counts[extra]).all()):
                continue
        return n, m
    return None


def check_structure(
    current: torch.Tensor,
    nm: tuple[int, int] | None,
    dense: torch.Tensor | None = None,
    name: str = "layer",
):
    """
    Check that the zeros of ``current`` satisfy the declared structure.

    :raises MaskStructureError: naming the fix, if they do not
    """
    found = infer_structure(current, dense)
    if nm is None:
        if found is not None:
            raise MaskStructureError(
                f"{name}: mask_structure is unstructured but the earlier pruner left "
                f"{format_structure(found)} zeros; unstructured refinement would break "
                f"them. Set mask_structure: '{format_structure(found)}' or leave it unset "
                "to read it from the zeros"
            )
        return
    n, m = nm
    cols = current.shape[1]
    if cols % m:
        raise MaskStructureError(
            f"{name}: mask_structure '{n}:{m}' needs the number of input columns "
            f"({cols}) to be a multiple of {m}; use another N:M or '0:0'"
        )
    counts = block_zero_counts(current == 0, m)
    if not bool((counts >= n).all()):
        raise MaskStructureError(
            f"{name}: mask_structure '{n}:{m}' contradicts the zeros left by the earlier "
            f"pruner ({format_structure(found)}); set mask_structure to what the pruner "
            "used, or leave it unset to read it from the zeros"
        )


def check_blocks(current: torch.Tensor, nm: tuple[int, int], name: str, pruner: str):
    """
    Check that every block of M input columns of ``current`` holds at least N zeros
    (more are allowed: SparseGPT zeroes the input columns calibration never
    activates, so some blocks hold more than N).

    :raises MaskStructureError: naming the layer, if a block holds fewer
    """
    n, m = nm
    rows, cols = current.shape
    if cols % m:
        raise MaskStructureError(
            f"{name}: {pruner} was given mask_structure '{n}:{m}' but the layer has {cols} "
            f"input columns, not a multiple of {m}; ignore this layer in the pruner or use "
            "another N:M"
        )
    counts = block_zero_counts(current == 0, m)
    short = int((counts < n).sum())
    if short:
        raise MaskStructureError(
            f"{name}: {pruner} was given mask_structure '{n}:{m}' but {short} of the "
            f"layer's {counts.numel()} blocks of {m} hold fewer than {n} zeros before DSnoT; "
            "another modifier between the pruner and DSnoTModifier changed the weights: "
            "move DSnoTModifier right after the pruner"
        )


def check_refined(
    before: torch.Tensor, after: torch.Tensor, nm: tuple[int, int] | None, name: str
):
    """
    Check a refined weight before it is written back: every row keeps its number of
    zeros (unstructured), every block of M columns keeps its number of zeros, at
    least N (N:M; blocks with extra zeros keep them).

    :raises RefinedStructureError: if not (a defect of DSnoT: nothing is written)
    """
    zb, za = before == 0, after == 0
    if nm is None:
        bad = int(((zb.sum(1) != za.sum(1))).sum())
        what = "rows whose number of zeros changed"
    else:
        n, m = nm
        cb, ca = block_zero_counts(zb, m), block_zero_counts(za, m)
        bad = int(((cb != ca) | (ca < n)).sum())
        what = f"blocks of {m} whose number of zeros changed or is below {n}"
    if bad:
        raise RefinedStructureError(
            f"{name}: DSnoT's refined weight has {bad} {what} ({format_structure(nm)}); it "
            "was not written, the layer is as the pruner left it. This is a defect of "
            "dsnot-modifier: please report it with the recipe and the model"
        )


def check_same_mask(before: torch.Tensor, after: torch.Tensor, name: str):
    """
    Check that a weight update kept the mask: zeros exactly where they were.

    :raises RefinedStructureError: if not (a defect of DSnoT: nothing is written)
    """
    moved = int(((before == 0) != (after == 0)).sum())
    if moved:
        raise RefinedStructureError(
            f"{name}: DSnoT's weight update moved {moved} zeros of the refined mask; the "
            "layer was not written. This is a defect of dsnot-modifier: please report it "
            "with the recipe and the model"
        )


def initial_mask(
    weight: torch.Tensor,
    sparsity: float | None,
    nm: tuple[int, int] | None,
    kind: str,
    sqnorm: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Make an initial mask (True where pruned) for standalone DSnoT.

    - ``wanda``: score ``|W| * sqrt(sqnorm)``; unstructured prunes the
      ``int(cols * sparsity)`` lowest of every row, as llm-compressor's Wanda does.
    - ``magnitude``: score ``|W|``; unstructured prunes the ``int(numel * sparsity)``
      lowest of the whole layer (so rows differ), as plain magnitude pruning does.
    - N:M (either kind): the N lowest scores of every block of M columns.

    Ties are broken by column order (stable sort), so the mask is deterministic.
    """
    w = weight.float().abs()
    if kind == "wanda":
        if sqnorm is None:
            raise ValueError("initial='wanda' needs the inputs' mean squares")
        score = w * sqnorm.float().clamp_min(0).sqrt().unsqueeze(0)
    elif kind == "magnitude":
        score = w
    else:
        raise ValueError(f"initial must be one of {INITIAL_KINDS}, not {kind!r}")
    rows, cols = score.shape
    mask = torch.zeros_like(score, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        blocks = score.reshape(rows, cols // m, m)
        order = torch.sort(blocks, dim=-1, stable=True).indices[..., :n]
        mask.view(rows, cols // m, m).scatter_(-1, order, True)
        return mask
    if kind == "wanda":
        k = int(cols * sparsity)
        order = torch.sort(score, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, order, True)
        return mask
    k = int(score.numel() * sparsity)
    order = torch.sort(score.flatten(), stable=True).indices[:k]
    mask.view(-1)[order] = True
    return mask
