"""
Checks of the recipe and the pipeline around a DSnoTModifier, as plain functions
over the recipe's modifiers (and the model's target layers), so that they can be
tested without an llm-compressor session. Each raises
:class:`~dsnot_modifier.errors.DSnoTConfigError` naming the fix.

- :func:`check_targets`: the targets match Linear layers;
- :func:`check_recipe`: a pruner before DSnoT (or ``initial``, and then no pruner),
  the same ``mask_structure``, no GPTQ after DSnoT, a warning for a quantizer before;
- :func:`check_same_pass`: the pruner calibrates in DSnoT's pass (sequential pipeline);
- :func:`check_distributed_pruners`: no pruner under torchrun;
- :func:`check_settings`: the modifier's own fields agree (``initial``,
  ``sparsity``, ``mask_structure``).

(That disk-offloaded target layers can be written is checked by
:func:`dsnot_modifier.offload.check_offload_writable`.)
"""

from __future__ import annotations

from typing import Sequence

from loguru import logger

from dsnot_modifier.errors import FIX_DISTRIBUTED, FIX_ORDER, DSnoTConfigError
from dsnot_modifier.masks import MaskStructureError, parse_mask_structure

__all__ = [
    "check_targets",
    "check_recipe",
    "check_same_pass",
    "check_distributed_pruners",
    "check_settings",
]


def _names(modifiers) -> list[str]:
    return [type(m).__name__ for m in modifiers]


def check_targets(names: dict, targets, ignore):
    """``names`` (module -> name) holds the Linear layers that ``targets`` matched."""
    if not names:
        raise DSnoTConfigError(
            f"DSnoTModifier targets {targets} (ignore {ignore}) match no "
            "Linear layer of the model; set targets to layer classes or names of it, "
            "such as ['Linear'] or ['re:.*self_attn.*']"
        )


def check_recipe(dsnot, modifiers: Sequence) -> list:
    """
    Check ``dsnot``'s place among the recipe's ``modifiers`` (``dsnot`` among them).

    :return: the pruners (Wanda, SparseGPT) that come before ``dsnot``
    """
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
    from llmcompressor.modifiers.quantization import QuantizationMixin

    modifiers = list(modifiers)
    here = next((i for i, m in enumerate(modifiers) if m is dsnot), len(modifiers))
    before, after = modifiers[:here], modifiers[here + 1 :]
    pruners = [m for m in before if isinstance(m, SparsityModifierBase)]
    later = _names(m for m in after if isinstance(m, SparsityModifierBase))
    if dsnot.initial is not None and (pruners or later):
        raise DSnoTConfigError(
            f"DSnoTModifier has initial: {dsnot.initial}, so it prunes by itself, but the "
            f"recipe also prunes with {_names(pruners) + later}. Remove `initial` and "
            "`sparsity` to refine that pruner's masks, or remove the pruner"
        )
    if dsnot.initial is None and not pruners:
        where = f"it comes before {later}" if later else "no pruner comes before it"
        raise DSnoTConfigError(
            f"DSnoTModifier refines the masks of an earlier pruner, but {where}: {FIX_ORDER}"
        )
    if dsnot.mask_structure is not None:
        ours = parse_mask_structure(dsnot.mask_structure)
        for pruner in pruners:
            if parse_mask_structure(getattr(pruner, "mask_structure", None)) != ours:
                raise DSnoTConfigError(
                    f"DSnoTModifier has mask_structure {dsnot.mask_structure!r} but "
                    f"{type(pruner).__name__} prunes with {pruner.mask_structure!r}; "
                    "make them agree, or leave DSnoTModifier's unset to read it from "
                    "the zeros"
                )
    # quantizers: every modifier acts on a layer at its own step of the layer's epoch
    # end, in recipe order. GPTQ after DSnoT spreads each column's rounding error
    # over the later columns, pruned weights included: DSnoT's zeros would not survive
    gptq = _names(m for m in after if isinstance(m, GPTQModifier))
    if gptq:
        raise DSnoTConfigError(
            f"{gptq[0]} comes after DSnoTModifier, but GPTQ in llm-compressor does not "
            "keep zero weights zero (its error feedback rewrites pruned weights), so "
            "the sparsity DSnoT leaves would be lost. Quantize with QuantizationModifier "
            "instead (e.g. scheme: W8A8, FP8_DYNAMIC or W4A16; it rounds each weight "
            "alone and keeps zeros), after DSnoTModifier"
        )
    early = _names(m for m in before if isinstance(m, QuantizationMixin))
    if early:
        logger.warning(
            f"{early} comes before DSnoTModifier in the recipe: its weight scales (and "
            "GPTQ's rounding) are fixed before DSnoT swaps weights, so the weights DSnoT "
            "regrows are quantized with scales that never saw them. Put "
            "QuantizationModifier after DSnoTModifier"
        )
    return pruners


def check_same_pass(dsnot, running: Sequence):
    """``dsnot`` calibrates in the same pass as the ``running`` modifiers."""
    if not any(m is dsnot for m in running):
        raise DSnoTConfigError(
            f"{_names(running)} calibrates in a pass of its own (oneshot's default pipeline, "
            "'independent'): it would prune the whole model before DSnoTModifier "
            "sees a layer, and the dense weights DSnoT needs would be gone. Run "
            "oneshot with pipeline='sequential'"
        )


def check_distributed_pruners(pruners: Sequence, ranks: int):
    """No pruner before DSnoT when the run spans ``ranks`` > 1 processes."""
    if ranks < 2 or not pruners:
        return
    raise DSnoTConfigError(
        f"{sorted(set(_names(pruners)))} prune each rank's layers from that rank's share "
        "of the calibration data only: llm-compressor 0.14 does not synchronise them "
        f"across ranks, so under torchrun ({ranks} ranks) their masks would differ between "
        "ranks (and, the model being in memory shared by the ranks, the ranks would "
        f"overwrite each other's masks) before DSnoT sees them. Instead, {FIX_DISTRIBUTED}"
    )


def check_settings(
    initial: str | None, sparsity: float | None, mask_structure: str | None,
    objective: str = "gram", gram_dtype: str = "auto", update_weights: bool = False,
) -> tuple[tuple[int, int] | None, str | None]:
    """
    Check that DSnoTModifier's ``initial``, ``sparsity`` and ``mask_structure`` agree,
    and that ``gram_dtype`` is left unset unless a Gram matrix is gathered (objective
    ``gram``, or ``update_weights``).

    :return: the parsed N:M (None for unstructured) and the ``mask_structure`` to
        keep (``"0:0"`` for a standalone unstructured run that left it unset)
    :raises ValueError: naming the fix (pydantic reports it as a validation error)
    """
    if objective != "gram" and not update_weights and gram_dtype not in ("auto", "float32"):
        raise ValueError(f"gram_dtype: {gram_dtype} applies to objective: gram (or "
                         "update_weights) only; remove gram_dtype or use objective: gram")
    if sparsity is not None and not 0 < sparsity < 1:
        raise ValueError(f"sparsity must lie strictly between 0 and 1 (e.g. 0.5), got {sparsity}")
    try:
        nm = parse_mask_structure(mask_structure)
    except MaskStructureError as err:
        raise ValueError(str(err)) from None
    if initial is None:
        if sparsity is not None:
            raise ValueError(
                "sparsity is only used with `initial` (standalone DSnoT); after a "
                "pruner DSnoT keeps the pruner's sparsity. Remove sparsity, or set "
                "initial: wanda"
            )
        return nm, mask_structure
    if nm is None:
        if sparsity is None:
            raise ValueError(
                f"initial: {initial} needs a sparsity (e.g. sparsity: 0.5) or an "
                "N:M mask_structure (e.g. '2:4')"
            )
        return nm, "0:0" if mask_structure is None else mask_structure
    if sparsity is not None and abs(sparsity - nm[0] / nm[1]) > 1e-9:
        raise ValueError(
            f"sparsity {sparsity} contradicts mask_structure "
            f"{mask_structure!r} ({nm[0] / nm[1]}); remove sparsity"
        )
    return nm, mask_structure
