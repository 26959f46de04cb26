"""
Which target layers DSnoT refines, and which it leaves alone and why: the
structure each pruner was asked for (:func:`pruner_targets`,
:func:`layer_structure`), MoE experts that are not Linear layers and calibration
data with padding (:func:`check_model_inputs`), and the layers left alone, listed
in the report and warned about at the end of calibration (:func:`close_report`).
Small functions, called by the modifier.
"""

from __future__ import annotations

import torch
from loguru import logger

from dsnot_modifier.errors import FIX_ORDER, DSnoTConfigError
from dsnot_modifier.masks import (
    MaskStructureError,
    check_blocks,
    check_structure,
    infer_structure,
    parse_mask_structure,
)
from dsnot_modifier.report import DSnoTReport, SkippedLayer
from dsnot_modifier.upstream import pruned_modules

__all__ = [
    "PrunerTarget",
    "pruner_targets",
    "layer_structure",
    "check_model_inputs",
    "close_report",
    "unlinearized_experts",
    "padded_calibration",
    "name_a_few",
    "FIX_UNLINEARIZED",
    "FIX_FEW_TOKENS",
    "FIX_PADDING",
]

FIX_UNLINEARIZED = (
    "their 3D expert weights are not Linear layers, so neither the pruner nor DSnoT "
    "prunes or refines them. Linearize the experts (one Linear per expert) before "
    "oneshot: load the model inside `with llmcompressor.modeling.moe.linearize."
    "load_quantizable_moe(): model = AutoModelForCausalLM.from_pretrained(...)`, or call "
    "`llmcompressor.modeling.moe.linearize.linearize_moe(model)` (register the expert "
    "class with LinearExperts2D if llm-compressor does not know it)"
)

FIX_FEW_TOKENS = (
    "calibrate every expert on every token (oneshot's default, "
    "moe_calibrate_all_experts=True), or give more calibration samples, or lower "
    "DSnoTModifier's min_tokens"
)

FIX_PADDING = (
    "padded positions would enter DSnoT's statistics (a Linear layer's input does not "
    "carry the attention mask). Calibrate without padding: batch_size=1 with samples "
    "tokenized without padding (oneshot's default, pad_to_max_length=False), or samples "
    "of equal length (e.g. concatenated text cut into max_seq_length windows)"
)


class PrunerTarget:
    """What the pruner that prunes a layer was asked for."""

    def __init__(self, pruner: str, mask_structure: str, nm: tuple[int, int] | None):
        self.pruner, self.mask_structure, self.nm = pruner, mask_structure, nm


def pruner_targets(pruners: list, names: dict) -> dict[torch.nn.Module, PrunerTarget] | None:
    """
    The layers among ``names`` (module -> name) that the pruners will prune, each
    with the ``mask_structure`` its pruner was given (not read from the zeros: an
    N:M pruner may leave blocks with more than N zeros, e.g. SparseGPT zeroes the
    input columns calibration never activates). Read from the modules each pruner
    registered at its calibration start (:func:`.upstream.pruned_modules`);
    ``None`` without pruners (standalone) or if a pruner does not expose them
    (then every target counts, its structure read from the zeros).

    :raises DSnoTConfigError: if a pruner's mask_structure is malformed
    """
    if not pruners:
        return None
    targets: dict[torch.nn.Module, PrunerTarget] = {}
    for pruner in pruners:
        modules = pruned_modules(pruner)
        if modules is None:
            return None
        structure = str(getattr(pruner, "mask_structure", "0:0"))
        try:
            nm = parse_mask_structure(structure)
        except MaskStructureError as err:
            raise DSnoTConfigError(str(err)) from None
        for module in modules:
            if module in names:
                # a later pruner prunes the layer again: its structure is the last word
                targets[module] = PrunerTarget(type(pruner).__name__, structure, nm)
    return targets


def layer_structure(
    name: str,
    current: torch.Tensor,
    dense: torch.Tensor,
    asked: PrunerTarget | None,
    declared: str | None,
    nm: tuple[int, int] | None,
) -> tuple[int, int] | None:
    """
    The structure DSnoT keeps in a layer the pruner pruned: the ``mask_structure``
    the layer's pruner was given (``asked``; every block must hold at least N zeros,
    more are kept), else DSnoT's own (``declared``, parsed ``nm``; checked against
    the zeros), else the structure read from the zeros.

    :raises DSnoTConfigError: naming the layer and the fix, if the zeros disagree
    """
    if asked is None and declared is None:
        return infer_structure(current, dense)
    try:
        if asked is None:
            check_structure(current, nm, dense, name)
            return nm
        if asked.nm is not None:
            check_blocks(current, asked.nm, name, asked.pruner)
        return asked.nm
    except MaskStructureError as err:
        raise DSnoTConfigError(str(err)) from None


def check_model_inputs(model: torch.nn.Module, dataloader):
    """
    Before calibration: warn once about MoE experts that are not Linear layers (not
    refined, with how to linearize them), and refuse padded calibration batches.

    :raises DSnoTConfigError: if the calibration batches hold padding
    """
    fused = unlinearized_experts(model)
    if fused:
        logger.warning(
            f"DSnoT: {name_a_few(fused, 3)} module(s) hold MoE experts that are not "
            f"refined: {FIX_UNLINEARIZED}"
        )
    padded = padded_calibration(dataloader)
    if padded:
        raise DSnoTConfigError(f"DSnoT: {padded}; {FIX_PADDING}")


def close_report(report: DSnoTReport, names: dict, min_tokens: int):
    """
    At the end of calibration: list the targets that never ran a forward (every
    other target is refined or listed already), warn once per kind of layer left
    alone, and log the summary.

    :param names: module -> name of every target layer
    :raises DSnoTConfigError: if no layer was refined, naming why and the fix
    """
    listed = {layer.name for layer in report.layers} | {s.name for s in report.skipped}
    for name in names.values():
        if name not in listed:
            report.skipped.append(
                SkippedLayer(name, "never called", None, "no forward during calibration")
            )
    alone = [s.name for s in report.skipped if s.reason in ("never called", "not pruned")]
    if alone:
        never = report.skipped_names("never called")
        logger.warning(
            f"DSnoT left {name_a_few(alone)} target layer(s) as they are "
            f"({len(never)} never ran a forward in calibration, {len(alone) - len(never)} "
            "were not pruned by the pruner); they are listed in the report's `skipped`"
        )
    few = report.skipped_names("few tokens")
    if few:
        logger.warning(
            f"DSnoT left {name_a_few(few)} layer(s) exactly as the pruner left them: "
            f"each saw fewer than min_tokens={min_tokens} calibration tokens (MoE "
            f"experts under routed calibration). To refine them, {FIX_FEW_TOKENS}"
        )
    not_updated = [layer for layer in report.layers if layer.update_reason is not None]
    if not_updated:
        logger.warning(
            f"DSnoT's weight update left {name_a_few([layer.name for layer in not_updated])} "
            f"layer(s) as the swaps left them (e.g. {not_updated[0].update_reason}); each is "
            "listed with its reason in the report (update_reason)"
        )
    if not report.layers and few:
        raise DSnoTConfigError(
            f"DSnoTModifier refined no layer: the {len(few)} pruned layers each saw fewer "
            f"than min_tokens={min_tokens} calibration tokens; give more calibration "
            "samples (or lower min_tokens)"
        )
    if not report.layers:
        raise DSnoTConfigError(
            "DSnoTModifier refined no layer: none of its target layers was pruned by "
            f"an earlier modifier during calibration; {FIX_ORDER}"
        )
    logger.info(report.summary_line())


def unlinearized_experts(model: torch.nn.Module) -> list[str]:
    """Expert modules holding 3D (or higher) weight parameters: fused MoE experts that
    are not one Linear per expert, which no pruner or DSnoT acts on. Only modules
    whose name or class says "expert" count (a vision tower's 3D position embedding
    is no expert)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.modules.conv._ConvNd)):
            continue
        if "expert" not in f"{name} {type(module).__name__}".lower():
            continue
        if any(p.dim() >= 3 for p in module.parameters(recurse=False)):
            found.append(name)
    return found


def padded_calibration(dataloader) -> str | None:
    """
    Why the calibration batches hold padding, or None: a sample whose
    ``attention_mask`` holds zeros, or (batch size above 1) samples of different
    lengths, which the collator pads. Reads the dataset's items (not the loader:
    iterating it could draw from the random number generator).
    """
    dataset = getattr(dataloader, "dataset", None)
    if dataset is None:
        return None
    batch_size = getattr(dataloader, "batch_size", 1) or 1
    try:
        if hasattr(dataset, "column_names") and "attention_mask" in dataset.column_names:
            masks = dataset["attention_mask"]
            lengths = [len(m) for m in masks]
        else:
            masks, lengths = [], []
            for i in range(len(dataset)):
                item = dataset[i]
                if not isinstance(item, dict) or "input_ids" not in item:
                    return None
                mask = item.get("attention_mask")
                ids = item["input_ids"]
                lengths.append(len(ids))
                if mask is not None:
                    masks.append(mask)
    except (TypeError, KeyError, IndexError):
        return None
    for i, mask in enumerate(masks):
        if 0 in (mask.tolist() if isinstance(mask, torch.Tensor) else list(mask)):
            return f"calibration sample {i} has attention_mask zeros (padding)"
    if batch_size > 1 and len(set(lengths)) > 1:
        return (
            f"batch_size is {batch_size} and the calibration samples have different "
            f"lengths ({min(lengths)} to {max(lengths)} tokens), so batches are padded"
        )
    return None


def name_a_few(names: list[str], few: int = 5) -> str:
    """``"3: a, b, c"`` or ``"40: a, b, c, d, e, ..."``."""
    shown = ", ".join(names[:few])
    return f"{len(names)}: {shown}" + (", ..." if len(names) > few else "")

