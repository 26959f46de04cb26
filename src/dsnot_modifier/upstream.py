"""
The private parts of llm-compressor and compressed-tensors that dsnot-modifier relies
on, each named once here, where no public path does the same job (llm-compressor
0.14, compressed-tensors 0.19). ``tests/test_upstream.py`` fails when upstream
changes one of them.
"""

from __future__ import annotations

from typing import Callable

import torch
from compressed_tensors.offload.cache import (
    DistributedCPUCache,
    DistributedDiskCache,
    OffloadCache,
)

__all__ = [
    "is_compressor_save",
    "mark_compressor_save",
    "pruned_modules",
    "offload_cache",
    "shares_offload",
    "onloaded_copy",
]


def is_compressor_save(save: Callable) -> bool:
    """
    Whether ``save`` is the ``save_pretrained`` that oneshot's pre-processing leaves
    (it compresses and writes the recipe): llm-compressor marks it ``_overridden``.
    """
    return bool(getattr(save, "_overridden", False))


def mark_compressor_save(save: Callable) -> Callable:
    """Mark a wrapper of that ``save_pretrained`` as llm-compressor marks its own (so that
    llm-compressor does not wrap it again)."""
    save._overridden = True
    return save


def pruned_modules(pruner) -> dict[torch.nn.Module, str] | None:
    """
    The modules a Wanda or SparseGPT modifier registered at its calibration start
    (module -> name; its ``_module_names``), None if it does not expose them.
    """
    modules = getattr(pruner, "_module_names", None)
    return modules if isinstance(modules, dict) else None


def offload_cache(module: torch.nn.Module):
    """The parameters of ``module``: compressed-tensors' offload cache for an offloaded
    module (it replaces torch's ``_parameters`` dict), else that dict."""
    return module._parameters


def shares_offload(module: torch.nn.Module) -> bool:
    """The module's weight is offloaded to storage shared by all ranks (shared CPU memory
    or disk files, made by compressed-tensors in a distributed run)."""
    return isinstance(offload_cache(module), (DistributedCPUCache, DistributedDiskCache))


def onloaded_copy(offloaded: torch.Tensor) -> torch.Tensor | None:
    """The onloaded copy compressed-tensors keeps of an offloaded tensor while onloading
    is disabled (None if it keeps none)."""
    return OffloadCache.keep_onloaded_values.get(offloaded)
