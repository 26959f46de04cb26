"""
Which target layers DSnoT refines, and which it leaves alone and why (issue 13):
the structure each pruner was asked for, MoE experts that are not Linear layers,
and calibration data with padding. Small functions, called by the modifier.
"""

from __future__ import annotations

import torch

from dsnot_modifier.masks import parse_mask_structure

__all__ = [
    "PrunerTarget",
    "pruner_targets",
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
    registered at its calibration start (llm-compressor's ``_module_names``);
    ``None`` if a pruner does not expose them (then every target counts).

    :raises MaskStructureError: if a pruner's mask_structure is malformed
    """
    targets: dict[torch.nn.Module, PrunerTarget] = {}
    for pruner in pruners:
        modules = getattr(pruner, "_module_names", None)
        if not isinstance(modules, dict):
            return None
        structure = str(getattr(pruner, "mask_structure", "0:0"))
        nm = parse_mask_structure(structure)
        for module in modules:
            if module in names:
                # a later pruner prunes the layer again: its structure is the last word
                targets[module] = PrunerTarget(type(pruner).__name__, structure, nm)
    return targets


def unlinearized_experts(model: torch.nn.Module) -> list[str]:
    """Modules holding 3D (or higher) weight parameters: fused MoE experts that are
    not one Linear per expert, which no pruner or DSnoT acts on."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.modules.conv._ConvNd)):
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

