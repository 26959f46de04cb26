"""
DSnoTModifier: llm-compressor glue around :mod:`dsnot_modifier.swaps`.

The lifecycle calls plain functions: the recipe checks (:mod:`.recipe_checks`),
the layers refined or left alone (:mod:`.layers`), the input statistics
(:mod:`.stats`), the structures and initial masks (:mod:`.masks`), the
layers refined together (:mod:`.stacking`), the refinement (:mod:`.swaps`), the
distributed epoch (:mod:`.distributed`) and the
report with its save-time hook (:mod:`.report`).
"""

from __future__ import annotations

from typing import Literal

import torch
from compressed_tensors.utils import get_execution_device, match_named_modules
from pydantic import Field, PrivateAttr, field_validator, model_validator

from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers.modifier import Modifier

from dsnot_modifier.distributed import (
    DEFAULT_TIMEOUT,
    RankWork,
    make_group,
    world_size,
)
from dsnot_modifier.errors import DSnoTConfigError, DSnoTDistributedError
from dsnot_modifier.layers import (
    PrunerTarget,
    check_model_inputs,
    close_report,
    pruner_targets,
)
from dsnot_modifier.masks import Initial
from dsnot_modifier.offload import check_offload_writable, snapshot_weight, wait_for_snapshots
from dsnot_modifier.recipe_checks import (
    check_distributed_pruners,
    check_recipe,
    check_same_pass,
    check_settings,
    check_targets,
)
from dsnot_modifier.report import DSnoTReport, SkippedLayer, attach_report
from dsnot_modifier.stacking import ReadyLayer, prepare_layer, refine_layers, refine_stack
from dsnot_modifier.stats import InputStats, LayerState, SharedInputs, Variance
from dsnot_modifier.swaps import DEFAULT_THRESHOLD, Objective, refine_mask
from dsnot_modifier import update as weight_update

__all__ = ["DSnoTModifier", "DSnoTConfigError", "DSnoTDistributedError"]

#: default of ``min_tokens`` (measured: benchmarks/min_tokens.py, see BENCHMARKS.md)
MIN_TOKENS = 128

#: the fields written into the report's ``params``
_REPORTED = {
    "objective", "max_cycles", "threshold", "var_power", "variance",
    "sign_check", "mask_structure", "initial", "sparsity", "targets", "ignore", "min_tokens",
    "gram_dtype", "update_weights",
}


class DSnoTModifier(Modifier):
    """
    DSnoT (Dynamic Sparse No Training, Zhang et al., ICLR 2024) for llm-compressor:
    refines, row by row, the pruning masks that an earlier WandaPruningModifier or
    SparseGPTModifier of the same recipe left, by swapping a pruned weight back in
    for a kept one so that the layer's output stays closer to the dense one. Every
    row (and for N:M every block) keeps its number of zeros; kept values stay what
    the pruner left and a regrown weight gets its dense value. No weight is trained.

    Sample yaml (run with ``oneshot(..., pipeline="sequential")``):

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        WandaPruningModifier:
          sparsity: 0.6
          mask_structure: "0:0"
          targets: ["Linear"]
          ignore: ["re:.*lm_head"]
        DSnoTModifier:
          objective: gram
    ```

    Standalone (no earlier pruner), DSnoT makes the initial mask itself:

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        DSnoTModifier:
          initial: wanda
          sparsity: 0.5
          mask_structure: "2:4"
    ```

    Lifecycle:

    - on_initialize
        - find the target layers; check the recipe (:mod:`.recipe_checks`); warn of MoE
          experts that are not Linear layers, refuse padded calibration (:mod:`.layers`)
        - register_hook(module, calibrate_module, "forward")
    - on_calibration_start
        - under torchrun: make DSnoT's process group (collectives with a timeout);
          refuse a pruner (its masks would differ between ranks)
        - check that disk-offloaded target layers can be written; read the structure
          each pruner was asked for (:func:`.layers.pruner_targets`)
    - calibrate_module (every batch)
        - first batch of a layer: check that the pruner calibrates in the same pass
          (sequential pipeline), snapshot the layer's dense weight
        - accumulate input statistics, shared by layers that read the same input in
          the batch (q/k/v, gate/up, every expert's gate/up; :class:`.stats.SharedInputs`)
    - on_sequential_epoch_end (after the pruner's own)
        - refine every pruned layer of the subgraph (one that saw fewer than
          ``min_tokens`` is left alone), check its structure, write it, free its state;
          the layers sharing statistics stacked in one call, each with the result it
          gets alone (:mod:`.stacking`); under torchrun, spread over the ranks
          (:class:`.distributed.RankWork`)
    - on_calibration_end
        - remove hooks; list and warn of the layers left alone, log the summary; error
          if no layer was refined (:func:`.layers.close_report`)
    - on_finalize
        - attach the report to ``model.save_pretrained`` (``dsnot_report.json``)

    :param objective: ``gram`` (default): the exact expected squared output error
        ``eᵀHe`` with the inputs' Gram matrix, lowered by every swap; ``mean``: the
        paper's rule, which steers the expected (mean) output error only
    :param max_cycles: at most this many swaps per row (the paper's 50)
    :param threshold: ``mean`` only: a row stops once its expected error is at most
        this, per token (the paper's 0.1 on sums over 2048-token sequences is
        0.1/2048 ≈ 4.9e-5, the default)
    :param var_power: ``mean`` only: exponent of the input variance in the grow
        score (1 as the paper; 0 switches the variance off)
    :param variance: ``mean`` only: ``per_sequence`` (variance within each
        calibration sequence, averaged, as the authors' code) or ``global``
    :param sign_check: ``mean`` only: refuse swaps that flip the sign of a row's
        expected error; unset means the paper's choice (off unstructured, on N:M)
    :param gram_dtype: where a Gram matrix is gathered (``gram``, ``update_weights``):
        the inputs' dtype in its products, always summed in float32. ``auto`` (default):
        the inputs' own dtype if it is 16-bit and the device multiplies it into float32
        sums (GPUs; exact products, so the Gram differs from float32's only in the
        order of the sums), else float32; ``float32``; or ``bfloat16`` (inputs rounded
        to bfloat16 first: about 0.2% error per entry, see BENCHMARKS.md)
    :param mask_structure: ``"N:M"`` or ``"0:0"``; unset, it is the pruner's own
        ``mask_structure`` (so SparseGPT 2:4 blocks with extra zeros stay N:M). Given,
        it must agree with the pruner's
    :param min_tokens: a layer that saw fewer calibration tokens (an MoE expert
        under routed calibration) is left exactly as the pruner left it, listed in
        the report's ``skipped`` and named in one warning
    :param initial: ``wanda`` or ``magnitude`` to make the initial mask without an
        earlier pruner (standalone); needs ``sparsity`` unless N:M is given
    :param sparsity: fraction of weights to prune, standalone only (0 < s < 1)
    :param targets: layers to refine (Linear layers matched as llm-compressor does)
    :param ignore: layers to leave alone; ``lm_head`` by default
    :param chunk_rows: rows refined at once (default: chosen for the device, see
        :func:`dsnot_modifier.swaps.chunk_rows_for`: on CPU about 1M weights a
        chunk, on a GPU the whole layer if its working memory fits 4 GiB, else the fewest
        chunks that do; never from the free memory, so results do not depend on it)
    :param snapshot_device: where the dense copy of a layer waits between its first
        forward and its refinement: ``execution`` (the layer's execution device),
        ``cpu``, or ``auto`` (default): the offload device of a layer offloaded to
        the cpu, the cpu for one offloaded to disk, else the execution device
    :param update_weights: after the swaps, re-solve each layer's kept weights so that
        the sparse layer reproduces the dense layer's output on the calibration inputs
        (least squares with the inputs' Gram matrix, the refined mask fixed: exact zeros
        stay, N:M blocks stay; :mod:`dsnot_modifier.update`). Off by default: then kept
        values stay exactly what the pruner left. The Gram matrix is gathered for it
        whatever the objective
    :param dist_timeout: under torchrun, seconds a collective of DSnoT waits for the
        other ranks before failing with DSnoTDistributedError (a rank that failed or
        hangs); must exceed the time one rank needs to refine its layers of a subgraph
    """

    requires_calibration_data: bool = True

    objective: Objective = "gram"
    max_cycles: int = Field(default=50, ge=0)
    threshold: float = Field(default=DEFAULT_THRESHOLD, ge=0)
    var_power: float = Field(default=1.0, ge=0)
    variance: Variance = "per_sequence"
    sign_check: bool | None = None
    gram_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    mask_structure: str | None = None
    initial: Initial | None = None
    sparsity: float | None = None
    targets: str | list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["re:.*lm_head"])
    chunk_rows: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=MIN_TOKENS, ge=1)
    snapshot_device: Literal["auto", "execution", "cpu"] = "auto"
    dist_timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0)
    update_weights: bool = False

    _nm: tuple[int, int] | None = PrivateAttr(default=None)
    _names: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _pruners: list[Modifier] = PrivateAttr(default_factory=list)
    _layers: dict[torch.nn.Module, LayerState] = PrivateAttr(default_factory=dict)
    _shared: SharedInputs = PrivateAttr(default_factory=SharedInputs)
    # the layers the pruners prune, with the structure each was asked for (None:
    # standalone, or a pruner that does not say; then every target counts)
    _pruned_by: dict[torch.nn.Module, PrunerTarget] | None = PrivateAttr(default=None)
    _untargeted: set[torch.nn.Module] = PrivateAttr(default_factory=set)
    _report: DSnoTReport | None = PrivateAttr(default=None)
    _ranks: RankWork | None = PrivateAttr(default=None)
    _peak_state_bytes: int = PrivateAttr(default=0)
    _layer_sparsity: dict[str, float] = PrivateAttr(default_factory=dict)

    # ---------------------------------------------------------------- validation

    @field_validator("targets", mode="before")
    @classmethod
    def _targets_list(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_settings(self) -> "DSnoTModifier":
        self._nm, structure = check_settings(self.initial, self.sparsity, self.mask_structure,
                                             self.objective, self.gram_dtype, self.update_weights)
        if structure != self.mask_structure:
            self.mask_structure = structure
        return self

    # ----------------------------------------------------------------- lifecycle

    @property
    def report(self) -> DSnoTReport | None:
        """The per-layer report of the last run (None before calibration)."""
        return self._report

    @property
    def state_bytes(self) -> int:
        """Bytes DSnoT holds now: dense snapshots and input statistics (tensors)."""
        layers = self._layers.values()
        stats = {id(s.stats): s.stats for s in layers if s.stats is not None}.values()
        dense = sum(s.dense.nbytes for s in layers if s.dense is not None)
        return dense + sum(s.nbytes for s in stats)

    @property
    def peak_state_bytes(self) -> int:
        """The most bytes :attr:`state_bytes` reached during the last calibration."""
        return self._peak_state_bytes

    def set_layer_sparsities(self, sparsities: dict[str, float]) -> None:
        """
        Standalone (``initial``) only: the sparsity of each named target layer, in
        place of ``sparsity`` (which the layers not named keep). OWLModifier sets
        these before calibration; an empty dict goes back to ``sparsity`` alone.
        """
        bad = {n: s for n, s in sparsities.items() if not 0 < s < 1}
        if bad:
            raise DSnoTConfigError(f"layer sparsities must lie strictly between 0 and 1, got {bad}")
        self._layer_sparsity = dict(sparsities)

    @property
    def owners(self) -> dict[str, int]:
        """Under torchrun, the rank that refined each layer of the last run."""
        return {} if self._ranks is None else dict(self._ranks.owners)

    def on_initialize(self, state: State, **kwargs) -> bool:
        self._names = {
            module: name
            for name, module in match_named_modules(state.model, self.targets, self.ignore)
            if isinstance(module, torch.nn.Linear)
        }
        check_targets(self._names, self.targets, self.ignore)
        self._pruners = check_recipe(self, active_session().lifecycle.recipe.modifiers)
        self._report = DSnoTReport(params=self._params())
        check_model_inputs(state.model, getattr(getattr(state, "data", None), "calib", None))
        # hooks from the start (not at calibration start), so that a pruner calibrating
        # in a pass of its own is caught at its first forward, before it prunes anything
        for module in self._names:
            self.register_hook(module, self.calibrate_module, "forward")
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        self._peak_state_bytes = 0
        self._ranks = None
        # the pruners registered their layers at their own calibration start (before
        # this one, in recipe order)
        self._pruned_by = pruner_targets(self._pruners, self._names)
        self._untargeted = set()
        error = None
        try:
            self._setup_distributed()
            check_distributed_pruners(self._pruners, world_size())
            check_offload_writable(self._names)
        except Exception as err:  # noqa: BLE001 - every rank must learn of it
            error = err
        if self._ranks is not None:
            try:
                self._ranks.group.agree(error, "checking the recipe and the offload directories")
            except Exception:
                self._ranks.destroy()  # every rank stops here: leave no group behind
                self._ranks = None
                raise
        elif error is not None:
            raise error

    def _setup_distributed(self):
        """Under torchrun, DSnoT's process group (collectives with a timeout)."""
        if self._ranks is None and world_size() > 1:
            self._ranks = RankWork(make_group(self.dist_timeout, len(self._names)))

    def _new_stats(self, module: torch.nn.Module, num_columns: int) -> InputStats:
        return InputStats(num_columns, device=get_execution_device(module),
                          with_moments=self.objective == "mean",
                          with_gram=self.objective == "gram" or self.update_weights,
                          gram_dtype=None if self.gram_dtype == "auto" else getattr(torch, self.gram_dtype))

    def _track_state(self):
        self._peak_state_bytes = max(self._peak_state_bytes, self.state_bytes)

    def calibrate_module(self, module: torch.nn.Module, args: tuple, _output: torch.Tensor):
        """Forward hook: snapshot the dense weight once, accumulate input statistics."""
        layer = self._layers.get(module)
        if layer is None:
            check_same_pass(self, active_session().lifecycle.recipe.modifiers)
            if self._pruned_by is not None and module not in self._pruned_by:
                # no pruner of the recipe prunes it: no dense copy, no statistics
                if module not in self._untargeted:
                    self._untargeted.add(module)
                    self._report.skipped.append(SkippedLayer(
                        self._names[module], "not pruned", None, "no pruner of the recipe targets it"))
                return
            dense = snapshot_weight(module, self.snapshot_device, self._names[module], non_blocking=True)
            layer = self._layers[module] = LayerState(dense=dense)
            self._track_state()
        new_stats = lambda columns: self._new_stats(module, columns)  # noqa: E731
        if layer.accumulate(args[0], self._shared, new_stats):
            self._track_state()

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        wait_for_snapshots()  # the dense copies made without blocking are complete
        self._shared.clear()
        self._setup_distributed()  # if outside a pipeline that started calibration
        if self._ranks is None:
            for report in self._refine(self._layers).values():
                self._report.add(report)
            return
        results = self._ranks.refine(
            self._layers, self._names, self._refine, self._new_stats, objective=self.objective,
            refine_all=self.initial is not None, track=self._track_state,
        )
        for report, owner in results.values():
            mine = owner == self._ranks.group.rank
            self._report.add(report, f"DSnoT (rank {owner})" if mine else None)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        self._layers.clear()
        self._shared.clear()
        if self._ranks is not None:
            self._ranks.destroy()  # its owners stay readable
        close_report(self._report, self._names, self.min_tokens)

    def on_finalize(self, state: State, **kwargs) -> bool:
        self.remove_hooks()
        if state.model is not None and self._report is not None and self._report.layers:
            attach_report(state.model, self._report)
        return True

    # ------------------------------------------------------------------ the work

    def _prepare(
        self, module: torch.nn.Module, dense: torch.Tensor, stats: InputStats
    ) -> ReadyLayer | SkippedLayer:
        """The layer ready to refine (its structure checked, standalone: its initial mask)."""
        name = self._names[module]
        return prepare_layer(
            module, name, dense, stats, None if self._pruned_by is None else self._pruned_by.get(module),
            min_tokens=self.min_tokens, initial=self.initial, nm=self._nm,
            sparsity=self._layer_sparsity.get(name, self.sparsity), mask_structure=self.mask_structure)

    def _refine(self, layers: dict[torch.nn.Module, LayerState]) -> dict:
        """Refine and write the layers (stacked, :mod:`.stacking`): module -> report."""
        return refine_layers(layers, self._prepare, lambda stack: refine_stack(
            stack, refine_mask, self.objective, self.variance,
            update=weight_update.update_weights if self.update_weights else None,
            max_cycles=self.max_cycles,
            threshold=self.threshold, var_power=self.var_power, sign_check=self.sign_check,
            chunk_rows=self.chunk_rows))

    def _params(self) -> dict:
        return self.model_dump(include=_REPORTED)
