"""
The errors DSnoT raises for a recipe, a model or a distributed run it cannot
handle as asked, and the fixes their messages name.
"""

from __future__ import annotations

__all__ = ["DSnoTConfigError", "DSnoTDistributedError", "FIX_ORDER", "FIX_DISTRIBUTED"]

#: how to give DSnoT masks to refine (a pruner before it) or let it prune by itself
FIX_ORDER = (
    "put DSnoTModifier after a WandaPruningModifier or SparseGPTModifier in the same "
    "recipe stage and run oneshot with pipeline='sequential', or give DSnoTModifier "
    "`initial: wanda` (or `magnitude`) and `sparsity` so that it prunes by itself"
)

#: how to run DSnoT under torchrun when a pruner's masks would differ between ranks
FIX_DISTRIBUTED = (
    "under torchrun, give DSnoTModifier `initial: wanda` and `sparsity` (or an N:M "
    "mask_structure) instead of the pruner: DSnoT then makes the initial mask itself from "
    "the statistics of all the ranks, summed; or run the recipe in a single process"
)


class DSnoTConfigError(ValueError):
    """A recipe or model that DSnoT cannot refine as asked; the message names the fix."""


class DSnoTDistributedError(RuntimeError):
    """The ranks of a distributed DSnoT run failed to work together (a rank
    failed, hung, or saw other weights); the message names the cause and the fix."""
