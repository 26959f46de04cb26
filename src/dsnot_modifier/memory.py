"""
The peak memory of refining one layer (or one stack of layers that share their inputs'
statistics) from its shape alone: every full-size temporary that DSnoT makes, phase by phase,
as the code makes them. What a GPU needs beyond the model: :func:`estimate_peak_bytes`.

Symbols below: ``N`` weights of the layer (or stack), ``C`` its columns, ``s`` the bytes of
the weight's dtype (2 for bfloat16), ``f`` those of the compute dtype (4: float32; 8 for
float64 weights). Counted are tensors, as an allocator hands them out; a caching allocator
(CUDA's) may hold more than that in freed blocks of other sizes.

Plain torch; nothing here imports llm-compressor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from dsnot_modifier.swaps import (
    _WORKING_MEMORY,
    _bins,
    _check_segments,
    _chunks,
    chunk_bytes_per_row,
    chunk_rows_for,
)

__all__ = ["MemoryEstimate", "estimate_peak_bytes", "MERGED_GRAM_BUFFERS", "SORT_WORKSPACE"]

#: ``gram``, stacked layers only: a bin of small chunks (:func:`.swaps._bins`) is merged by
#: concatenating its parts' 7 row fields, and giving it 2 new scratch buffers, while the parts
#: (9 buffers each: w, wc, e, 2·u, e·diag(H), two penalties, two scratch buffers) are alive
MERGED_GRAM_BUFFERS = 18

#: on an accelerator, torch's stable sort of rows longer than 4096 (or of a whole layer)
#: runs CUB's radix sort beside its outputs: an int64 index array and CUB's alternate
#: buffers of the keys and indices (8 + 4 + 8 bytes an element); 2 to 127 rows are sorted
#: as one array by (row, key): two index-and-row arrays, a copy of the keys and CUB's
#: buffers (32 at most). Shorter rows are sorted in place (none). On CPU, rows need none,
#: a whole layer (one 1-D sort) its int64 indices (8)
SORT_WORKSPACE = 20
_FEW_ROWS_SORT_WORKSPACE = 32
_SMALL_SORT = 4096
_CPU_FLAT_SORT = 8


def _sort_workspace(rows: int, length: int, device: str, flat: bool = False) -> int:
    """Bytes per element a stable sort of ``rows`` rows of ``length`` (``flat``: one 1-D
    tensor) needs beside its outputs."""
    if device == "cpu":
        return _CPU_FLAT_SORT if flat else 0
    if length <= _SMALL_SORT:
        return 0
    return SORT_WORKSPACE if rows == 1 or rows >= 128 else _FEW_ROWS_SORT_WORKSPACE


#: per column: the statistics' vectors in the compute dtype (mean, variance, their
#: quotient, the Wanda score's square roots, the Gram's diagonal), rounded up
_COLUMN_BYTES = 64

#: per row of the layer: the result's counts and errors (int64, 2 float64), the rows'
#: indices and the vectors of a cycle (``mean``'s ``r``, pointers and candidates; ``gram``'s
#: loss, its N:M block candidates [rows, M]), rounded up
_ROW_BYTES = 512

#: a sum of bools (the zeros counted per row or per block) first casts them to int64:
#: 8 bytes a weight, beside the bools and the counts (int64, 2 bytes a weight per block of 4)
_BOOL_SUM = 8

#: the structure's checks of a pruned layer, at worst: the zeros of both weights (2), a
#: sum's int64 copy, the block counts of both (2 + 2), their comparison
_STRUCTURE_BYTES = 2 + _BOOL_SUM + 4 + 1

#: ``check_refined``, at worst (N:M, M=4): the zeros of both weights (2), the block counts
#: of one (2), then the other's int64 copy and counts
_CHECK_REFINED_BYTES = 2 + 2 + _BOOL_SUM + 2

#: ``check_same_mask`` after the update: the zeros compared (a bool) and its sum's copy
_CHECK_SAME_MASK_BYTES = 1 + _BOOL_SUM

#: the ``cg`` weight update's own [rows, cols] buffers at its peak: the mask (as numbers),
#: its result, x, e, e·H, r, z, p and q, plus new x, r, z, p and mask while the rows that
#: converged are dropped
_CG_BUFFERS = 14


@dataclass(frozen=True)
class MemoryEstimate:
    """
    :param resident: bytes held before DSnoT refines the layer, and after: the weight, its
        dense snapshot and its inputs' statistics (the Gram matrix, float32 ``C×C``)
    :param phases: each phase's most bytes held at once beyond ``resident``
    :param chunk_rows: rows refined at once
    """

    resident: int
    phases: dict[str, int] = field(default_factory=dict)
    chunk_rows: int = 0

    @property
    def peak(self) -> int:
        """The most bytes held at once beyond ``resident``."""
        return max(self.phases.values())

    @property
    def phase(self) -> str:
        """The phase of the peak."""
        return max(self.phases, key=self.phases.get)

    @property
    def total(self) -> int:
        return self.resident + self.peak


def _mean_list_bytes(cols: int, nm, sign_check: bool, max_cycles: int, f: int) -> int:
    """Bytes per row of ``mean``'s candidate lists, held from their chunk to the cycles' end."""
    k = max(1, min(max_cycles, cols))
    width = k if sign_check else 2 * k
    grow = width * (1 + 8 + f)  # valid, column, weight
    if nm is None:
        prune = width * (1 + 8 + f)
    else:  # the blocks of the grow candidates: index, Wanda scores and weights of their M
        prune = width * 8 + 2 * width * nm[1] * f
    return grow + prune + (8 if sign_check else 32) + 8 + f  # pointers, rows, r


def _initial_mask_bytes(rows: int, cols: int, nm, initial: str, device: str) -> int:
    """``initial_mask``: the float32 score(s), the mask, and a full stable sort (int64)."""
    n = rows * cols
    scores = 8 if initial == "wanda" else 4  # |W| (and the Wanda score)
    if nm is not None:
        workspace = _sort_workspace(n // nm[1], nm[1], device)
    elif initial == "wanda":
        workspace = _sort_workspace(rows, cols, device)
    else:  # magnitude: one sort of the whole layer
        workspace = _sort_workspace(1, n, device, flat=True)
    return max(8 * n, (scores + 1 + 4 + 8 + workspace) * n) + _COLUMN_BYTES * cols


def _update_bytes(rows: int, cols: int, s: int, f: int) -> int:
    """
    The ``cg`` weight update of one layer (:func:`.update.update_weights`, every row at
    once): the dense weight in the compute dtype (its finiteness is read from the extremes,
    :func:`._kernels.all_finite`), ``row_errors`` (before and after: the Gram and the rows in
    float64, made for each call and freed, not held through the solve), the start, the mask, the result
    and the solver's buffers, the candidate weight and its fixes.
    """
    n, gram = rows * cols, cols * cols
    errors = 8 * gram + 24 * n  # h in float64; two float64 copies and e, then e·H and e ⊙ e·H
    held = 3 * f * n + n  # dense, start, result; mask
    copy = f * gram if f != 4 else 0  # the Gram in a float64 compute dtype
    return copy + max(
        f * n + errors,  # the errors before
        held + _CG_BUFFERS * f * n,  # the solver
        held + 3 * s * n + 2 * n,  # the candidate's fixes (kept weights non-zero, pruned zero)
        held + s * n + errors,  # the errors after
    )


def estimate_peak_bytes(
    rows: int,
    cols: int,
    *,
    objective: str = "gram",
    nm: tuple[int, int] | None = None,
    initial: str | None = None,
    update: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    chunk_rows: int | None = None,
    segments: Sequence[int] | None = None,
    max_cycles: int = 50,
    sign_check: bool | None = None,
) -> MemoryEstimate:
    """
    The memory of refining one layer ``[rows, cols]`` (or a stack of layers of ``segments``
    rows, as :func:`.stacking.refine_stack` refines q/k/v or gate/up together) as the modifier
    does, phase by phase, beyond what is resident (its weight, dense snapshot, statistics):

    - ``prepare``: the checks of a pruned layer (``((Wc == 0) & (W != 0)).any()``, its
      structure) or, standalone (``initial``), ``initial_mask``'s float32 scores, mask and
      full stable sort with int64 indices (plus the sort's workspace on an accelerator), then
      its masked copy (the current weight, held to the end);
    - ``refine``: the stack's concatenated dense and current weights (stacked only), the
      result (a copy of the current weight), per-row vectors, and the chunks: ``gram``: each
      bin's working memory (:func:`.swaps.chunk_bytes_per_row`; a bin merged from several
      chunks: ``MERGED_GRAM_BUFFERS``), ``mean``: each chunk's working memory (plus the
      sort workspace of :func:`.swaps.fix_ties`'s worst case on an accelerator) with the
      candidate lists of the chunks before, then the lists of all the rows concatenated
      beside them (and, on CPU, its reused buffers);
    - ``check``: ``check_refined`` of each layer (a sum of bools casts them to int64);
    - ``update`` (``update``): :func:`.update.update_weights` (``cg``) of each layer in turn,
      and ``check_same_mask``, the layers updated before it held.

    The Gram matrix is the statistics' own (``InputStats.gram`` divides it in place), so it
    is resident, not counted again; its float64 copies in the update are.

    :param initial: None (a pruner's mask), ``"wanda"`` or ``"magnitude"`` (standalone)
    :param dtype: the weights' dtype
    :param device: ``"cpu"`` or an accelerator's type: its chunking (unless ``chunk_rows``)
        and sort workspace
    :param chunk_rows: rows refined at once (default: :func:`.swaps.chunk_rows_for`)
    :param segments: the rows of each stacked layer (summing to ``rows``), or None: one layer
    """
    if objective not in _WORKING_MEMORY:
        raise ValueError(f"objective must be one of {tuple(_WORKING_MEMORY)}, not {objective!r}")
    spans = _check_segments(segments, rows)
    stacked = segments is not None and len(spans) > 1
    s = torch.empty((), dtype=dtype).element_size()
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    f = torch.empty((), dtype=compute).element_size()
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(objective, rows, cols, device, compute)
    n = rows * cols
    sizes = [(stop - start) * cols for start, stop in spans]
    with_gram = objective == "gram" or update
    gram = 4 * cols * cols if with_gram else 0
    resident = 2 * s * n + gram + (0 if objective == "gram" else 24 * cols)

    # prepare, layer by layer: the Gram's check (once), then the mask's checks or the initial
    # mask and its masked copy (a standalone layer's current weight, held from then on)
    prepare, standalone = 0, 0
    for k, ((start, stop), size) in enumerate(zip(spans, sizes)):
        finite = 0  # InputStats.check_finite reads the extremes: no C×C temporary
        if initial is None:
            work = max(finite, 3 * size, _STRUCTURE_BYTES * size)
        else:
            work = max(finite, _initial_mask_bytes(stop - start, cols, nm, initial, device),
                       size + s * size)
        prepare = max(prepare, standalone + work)
        standalone += s * size if initial else 0

    # refine: the result, the stack's copies, per-row vectors, the statistics in f
    base = standalone + s * n + (2 * s * n if stacked else 0) + _ROW_BYTES * rows
    base += (f * cols * cols if objective == "gram" and f != 4 else 0) + _COLUMN_BYTES * cols
    per_row = chunk_bytes_per_row(objective, cols, compute)
    chunks = _chunks(spans, chunk_rows)
    if objective == "gram":
        work = 0
        for group in _bins(chunks, chunk_rows):
            bin_rows = sum(stop - start for _, start, stop in group)
            if len(group) == 1:
                work = max(work, per_row * bin_rows)
            else:
                work = max(work, MERGED_GRAM_BUFFERS * f * bin_rows * cols)
    else:
        check = (nm is not None) if sign_check is None else bool(sign_check)
        lists = _mean_list_bytes(cols, nm, check, max_cycles, f)
        work, made, widest = 0, 0, 0
        for _, start, stop in chunks:
            made += stop - start
            widest = max(widest, stop - start)
            sort = _sort_workspace(stop - start, cols, device)
            work = max(work, lists * made + (per_row + sort * cols) * (stop - start))
        # the lists of every row, concatenated beside the chunks' (several chunks only); on
        # CPU the chunks' reused buffers (6 of f, one bool) are held to the end
        reused = (6 * f + 1) * widest * cols if device == "cpu" else 0
        work = max(work, lists * rows * (2 if len(chunks) > 1 else 1) + reused)
    phases = {"prepare": prepare, "refine": base + work}
    after = standalone + s * n + _ROW_BYTES * rows  # the result, the rows' vectors
    phases["check"] = after + _CHECK_REFINED_BYTES * max(sizes)
    if update:
        worst, done = 0, 0
        for (start, stop), size in zip(spans, sizes):
            worst = max(worst, done + _update_bytes(stop - start, cols, s, f),
                        done + (s + _CHECK_SAME_MASK_BYTES) * size)
            done += s * size
        phases["update"] = after + worst
    return MemoryEstimate(resident=resident, phases=phases, chunk_rows=chunk_rows)
