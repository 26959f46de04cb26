"""
Layers refined together: the layers of a subgraph that share one set of input
statistics (q/k/v; gate/up; under MoE all-expert calibration, every expert's
gate/up, see :class:`.stats.SharedInputs`) are stacked into one matrix and refined
in one call of ``refine_mask``: rows are independent, and each layer's result is
bit for bit what its own call gives (``refine_mask``'s ``segments``). Stacked are
only layers of the same statistics object, weight dtype and device, columns,
structure and origin of the mask; a layer left alone (few tokens, not pruned) is
not; a standalone (``initial``) mask is made per layer, with its own sparsity,
before. A stack holds at most :data:`STACK_ELEMENTS` weights (a larger layer goes
alone), so that 128 experts' gate/up take several calls, not one giant copy.

Every module of a stack is on its execution device while it is refined (offloaded
ones too), each written back as a single layer is. Called by the modifier, which
makes each layer ready (:data:`Prepare`) and calls ``refine_mask``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
from compressed_tensors.utils import align_module_device
from loguru import logger

from llmcompressor.utils.metric_logging import CompressionLogger

from dsnot_modifier.errors import DSnoTConfigError
from dsnot_modifier.layers import PrunerTarget, layer_structure
from dsnot_modifier.masks import check_refined, check_same_mask, format_structure, initial_mask
from dsnot_modifier.offload import write_weight
from dsnot_modifier.report import LayerReport, SkippedLayer
from dsnot_modifier.stats import InputStats, LayerState

__all__ = ["STACK_ELEMENTS", "ReadyLayer", "Prepare", "prepare_layer", "refine_layers", "cut_runs", "stack_groups", "refine_stack"]

#: at most this many weights refined in one stacked call of ``refine_mask`` (2^24:
#: 64 MiB a float32 copy; the call copies the stack's dense and current weights and
#: works on copies of its rows). 0 refines every layer in a call of its own
STACK_ELEMENTS = 1 << 24


@dataclass
class ReadyLayer:
    """
    A layer ready for ``refine_mask``.

    :param current: the mask to refine (the pruner's weight, or the initial mask)
    :param dense: its dense weight, on the device of ``current``
    :param nm: the structure kept (None: unstructured)
    :param origin: where the mask came from (``"pruner"``, ``"wanda"``, ``"magnitude"``)
    :param asked: what the pruner was asked for (None: standalone, or not known)
    """

    module: torch.nn.Module
    name: str
    dense: torch.Tensor
    current: torch.Tensor
    stats: InputStats
    nm: tuple[int, int] | None
    origin: str
    asked: PrunerTarget | None = None

    def kind(self) -> tuple:
        """Layers of one kind can be stacked."""
        c = self.current
        return id(self.stats), c.dtype, c.device, c.shape[1], self.nm, self.origin


#: make one layer ready (module, its dense weight, its statistics; the module on
#: its execution device), or the reason it is left as it is
Prepare = Callable[[torch.nn.Module, torch.Tensor, InputStats], "ReadyLayer | SkippedLayer"]


def prepare_layer(
    module: torch.nn.Module,
    name: str,
    dense: torch.Tensor,
    stats: InputStats,
    asked: PrunerTarget | None,
    *,
    min_tokens: int,
    initial: str | None,
    nm: tuple[int, int] | None,
    sparsity: float | None,
    mask_structure: str | None,
) -> ReadyLayer | SkippedLayer:
    """
    The layer ready to refine, or the reason it is left as it is: fewer calibration
    tokens than ``min_tokens`` (a routed expert), or left dense by the pruner. Its
    structure is checked (:func:`.layers.layer_structure`); standalone (``initial``),
    its initial mask is made here, at ``sparsity``.

    :param asked: what the pruner was asked for (None: standalone, or not known)
    :param nm: DSnoT's own structure (parsed ``mask_structure``, or standalone N:M)
    """
    if stats.tokens < min_tokens:  # a routed expert: left as the pruner left it
        return SkippedLayer(name, "few tokens", stats.tokens, f"saw {stats.tokens} calibration "
                            f"tokens, fewer than min_tokens={min_tokens}")
    current = module.weight.detach()
    dense = dense.to(current.device)
    if initial is not None:
        if not torch.equal(current, dense):
            raise DSnoTConfigError(
                f"{name} was changed by another modifier during calibration, but "
                f"DSnoTModifier has initial: {initial}; remove `initial` to refine "
                "that modifier's mask, or remove the other modifier"
            )
        stats.check_finite(name)
        mask = initial_mask(dense, sparsity, nm, initial, stats.sqnorm())
        return ReadyLayer(module, name, dense, dense.masked_fill(mask, 0), stats, nm, initial, asked)
    if not bool(((current == 0) & (dense != 0)).any()):
        logger.debug(f"DSnoT: {name} was not pruned by an earlier modifier, left as it is")
        return SkippedLayer(name, "not pruned", stats.tokens, "the pruner left it dense")
    stats.check_finite(name)
    structure = layer_structure(name, current, dense, asked, mask_structure, nm)
    return ReadyLayer(module, name, dense, current, stats, structure, "pruner", asked)


def stack_groups(layers: dict[torch.nn.Module, LayerState], limit: int) -> list[list[torch.nn.Module]]:
    """
    The layers that may be stacked, by shared statistics, in order of the first of
    each group; a group is cut into runs of at most ``limit`` weights (a larger
    layer alone).
    """
    by_stats: dict[int, list[torch.nn.Module]] = {}
    for module, state in layers.items():
        by_stats.setdefault(id(state.stats), []).append(module)
    return [run for modules in by_stats.values()
            for run in cut_runs(modules, [layers[m].dense.numel() for m in modules], limit)]


def cut_runs(items: list, sizes: list[int], limit: int) -> list[list]:
    """``items`` in order, cut into runs of at most ``limit`` in size (a larger item alone)."""
    runs, run, total = [], [], 0
    for item, size in zip(items, sizes):
        if run and total + size > limit:
            runs.append(run)
            run, total = [], 0
        run.append(item)
        total += size
    runs.append(run)
    return runs


def refine_layers(
    layers: dict[torch.nn.Module, LayerState],
    prepare: Prepare,
    refine: Callable[[list[ReadyLayer]], list[LayerReport]],
) -> dict[torch.nn.Module, LayerReport | SkippedLayer]:
    """
    Refine the layers of a subgraph, stacked (:func:`stack_groups` with
    :data:`STACK_ELEMENTS`, then by :meth:`ReadyLayer.kind`): each group's modules on
    their execution devices, each layer made ready (``prepare``), each stack refined
    and written (``refine``, see :func:`refine_stack`).

    :param layers: module -> its state, in forward order; emptied (a group's states
        are freed once it is done)
    :return: module -> its report or the reason it was left alone, in forward order
    """
    order = list(layers)
    results: dict[torch.nn.Module, LayerReport | SkippedLayer] = {}
    for group in stack_groups(layers, STACK_ELEMENTS):
        states = [layers.pop(module) for module in group]
        with torch.no_grad(), contextlib.ExitStack() as onloaded:
            for module in group:
                onloaded.enter_context(align_module_device(module))
            kinds: dict[tuple, list[ReadyLayer]] = {}
            for module, state in zip(group, states):
                ready = prepare(module, state.dense, state.stats)
                if isinstance(ready, SkippedLayer):
                    results[module] = ready
                else:
                    kinds.setdefault(ready.kind(), []).append(ready)
            del states
            for stack in kinds.values():
                results.update(zip((layer.module for layer in stack), refine(stack)))
    return {module: results[module] for module in order if module in results}


def refine_stack(stack: list[ReadyLayer], refine_mask: Callable, objective: str,
                 variance: str, update: Callable | None = None, **options) -> list[LayerReport]:
    """
    Refine the layers of ``stack`` (one kind) in one call of ``refine_mask`` (with
    ``segments`` if more than one), check each refined structure, then (with
    ``update``, :func:`.update.update_weights`) re-solve each layer's kept weights on
    its refined mask, then write and report each layer. A layer's ``seconds`` is its
    share (by rows) of the call's time, plus its update's. Logged as llm-compressor's
    modifiers log a layer.
    """
    first = stack[0]
    with CompressionLogger(first.module) as log:
        start = time.perf_counter()
        if len(stack) == 1:
            dense, current, segments = first.dense, first.current, None
        else:
            dense = torch.cat([layer.dense for layer in stack])
            current = torch.cat([layer.current for layer in stack])
            segments = [layer.current.shape[0] for layer in stack]
        statistics = first.stats.for_objective(objective, variance)
        result = refine_mask(dense, current, objective=objective, nm=first.nm,
                             **({} if segments is None else {"segments": segments}),
                             **options, **statistics)
        del dense, current
        seconds = time.perf_counter() - start
        parts = [result] if segments is None else result.segments
        for layer, part in zip(stack, parts):  # never write a broken structure
            check_refined(layer.current, part.weight, layer.nm, layer.name)
        if update is None:
            updates = [None] * len(stack)
        else:  # the Gram matrix of the swaps' objective, or gathered for the update
            gram = statistics["gram"] if "gram" in statistics else first.stats.gram()
            updates = _updated(stack, parts, update, gram)
        del statistics
        rows = sum(layer.current.shape[0] for layer in stack)
        reports = []
        for layer, part, updated in zip(stack, parts, updates):
            write_weight(layer.module, layer.name, part.weight if updated is None else updated.weight)
            share = seconds * layer.current.shape[0] / rows
            reports.append(LayerReport.of(
                part, name=layer.name, structure=format_structure(layer.nm), objective=objective,
                initial=layer.origin, seconds=share + (0.0 if updated is None else updated.seconds),
                pruner_structure=layer.asked.mask_structure if layer.asked else None,
                update=updated))
        log.set_results(name="DSnoT", loss=sum(report.error_after for report in reports))
    return reports


def _updated(stack: list[ReadyLayer], parts: list, update: Callable, gram: torch.Tensor) -> list:
    """Each layer's kept weights re-solved on its refined mask (the mask checked unchanged)."""
    results = []
    for layer, part in zip(stack, parts):
        start = time.perf_counter()
        result = update(layer.dense, part.weight, gram)
        result.seconds = time.perf_counter() - start
        check_same_mask(part.weight, result.weight, layer.name)
        results.append(result)
    return results
