"""
DSnoTModifier: llm-compressor glue around :mod:`dsnot_modifier.swaps`.
"""

from __future__ import annotations

import tempfile
import time
from typing import Literal

import torch
from compressed_tensors.distributed import is_source_process
from compressed_tensors.offload import get_offloaded_device
from compressed_tensors.offload.cache import DiskCache
from compressed_tensors.utils import (
    align_module_device,
    get_execution_device,
    match_named_modules,
    update_offload_parameter,
)
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator

from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers.modifier import Modifier
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase

from dsnot_modifier.distributed import (
    DEFAULT_TIMEOUT,
    DSnoTDistributedError,
    RankGroup,
    assign_layers,
    mask_digest,
    receive_weight,
    tensor_digest,
    world_size,
)
from dsnot_modifier.layers import (
    FIX_FEW_TOKENS,
    FIX_PADDING,
    FIX_UNLINEARIZED,
    name_a_few,
    padded_calibration,
    pruner_targets,
    unlinearized_experts,
)
from dsnot_modifier.masks import (
    MaskStructureError,
    check_blocks,
    check_refined,
    check_structure,
    format_structure,
    infer_structure,
    initial_mask,
    parse_mask_structure,
)
from dsnot_modifier.report import DSnoTReport, LayerReport, SkippedLayer
from dsnot_modifier.stats import InputStats, SharedInputs
from dsnot_modifier.swaps import DEFAULT_THRESHOLD, refine_mask

__all__ = ["DSnoTModifier", "DSnoTConfigError", "DSnoTDistributedError"]

#: default of ``min_tokens`` (measured: benchmarks/min_tokens.py, see BENCHMARKS.md)
MIN_TOKENS = 128

_FIX_DISTRIBUTED = (
    "under torchrun, give DSnoTModifier `initial: wanda` and `sparsity` (or an N:M "
    "mask_structure) instead of the pruner: DSnoT then makes the initial mask itself from "
    "the statistics of all the ranks, summed; or run the recipe in a single process"
)

_FIX_ORDER = (
    "put DSnoTModifier after a WandaPruningModifier or SparseGPTModifier in the same "
    "recipe stage and run oneshot with pipeline='sequential', or give DSnoTModifier "
    "`initial: wanda` (or `magnitude`) and `sparsity` so that it prunes by itself"
)


class DSnoTConfigError(ValueError):
    """A recipe or model that DSnoT cannot refine as asked; the message names the fix."""


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
        - find the target layers; check the recipe order (a pruner before DSnoT,
          or ``initial``)
        - register_hook(module, calibrate_module, "forward")
    - on_calibration_start
        - under torchrun: make DSnoT's process group (collectives with a timeout);
          refuse a pruner (its masks would differ between ranks)
        - check that disk-offloaded target layers can be written
    - calibrate_module (every batch)
        - first batch of a layer: check that the pruner calibrates in the same pass
          (sequential pipeline), snapshot the layer's dense weight (on the cpu if the
          layer is offloaded, else on its execution device)
        - accumulate input statistics, shared by layers that read the same input
    - on_sequential_epoch_end (after the pruner's own)
        - refine every pruned layer of the subgraph on its execution device, write
          its weight, free its state
        - under torchrun: check that all ranks see the same weights, sum the
          statistics over the ranks, spread the layers over the ranks (each refined
          once), broadcast the refined weights, check that all ranks hold them
    - on_calibration_end
        - remove hooks, log the summary; error if no layer was refined
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
    :param mask_structure: ``"N:M"`` or ``"0:0"``; unset, it is the pruner's own
        ``mask_structure`` (so SparseGPT 2:4 blocks with extra zeros stay N:M). Given,
        it must agree with the pruner's
    :param min_tokens: a layer that saw fewer calibration tokens (an MoE expert
        under routed calibration, ``moe_calibrate_all_experts=False``) is left exactly
        as the pruner left it, listed in the report, and named in one warning: its
        statistics are too few for a swap to help beyond the tokens seen
    :param initial: ``wanda`` or ``magnitude`` to make the initial mask without an
        earlier pruner (standalone); needs ``sparsity`` unless N:M is given
    :param sparsity: fraction of weights to prune, standalone only (0 < s < 1)
    :param targets: layers to refine (Linear layers matched as llm-compressor does)
    :param ignore: layers to leave alone; ``lm_head`` by default
    :param chunk_rows: rows refined at once (default: about 4M weights a chunk)
    :param snapshot_device: where the dense copy of a layer waits between its first
        forward and its refinement: ``execution`` (the layer's execution device),
        ``cpu``, or ``auto`` (default): the offload device of a layer offloaded to
        the cpu, the cpu for one offloaded to disk, else the execution device
    :param dist_timeout: under torchrun, seconds a collective of DSnoT waits for the
        other ranks before failing with DSnoTDistributedError (a rank that failed or
        hangs); must exceed the time one rank needs to refine its layers of a subgraph
    """

    requires_calibration_data: bool = True

    objective: Literal["gram", "mean"] = "gram"
    max_cycles: int = Field(default=50, ge=0)
    threshold: float = Field(default=DEFAULT_THRESHOLD, ge=0)
    var_power: float = Field(default=1.0, ge=0)
    variance: Literal["per_sequence", "global"] = "per_sequence"
    sign_check: bool | None = None
    mask_structure: str | None = None
    initial: Literal["wanda", "magnitude"] | None = None
    sparsity: float | None = None
    targets: str | list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["re:.*lm_head"])
    chunk_rows: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=MIN_TOKENS, ge=1)
    snapshot_device: Literal["auto", "execution", "cpu"] = Field(
        default="auto",
        description="where the dense copy of a layer is kept until its refinement: "
        "auto (cpu for offloaded layers, else the execution device), execution or cpu",
    )
    dist_timeout: float = Field(
        default=DEFAULT_TIMEOUT,
        gt=0,
        description="under torchrun, seconds a DSnoT collective waits for the other ranks",
    )

    _nm: tuple[int, int] | None = PrivateAttr(default=None)
    _names: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _pruners: list[Modifier] = PrivateAttr(default_factory=list)
    _dense: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(default_factory=dict)
    _stats: dict[torch.nn.Module, InputStats] = PrivateAttr(default_factory=dict)
    _leaders: set[torch.nn.Module] = PrivateAttr(default_factory=set)
    # issue 13: statistics shared by every layer reading the same input in a batch
    _shared: SharedInputs = PrivateAttr(default_factory=SharedInputs)
    # issue 13: the layers the pruners prune, with the structure each was asked for
    # (None: standalone, or a pruner that does not say; then every target counts)
    _pruned_by: dict | None = PrivateAttr(default=None)
    _seen: set = PrivateAttr(default_factory=set)
    _report: DSnoTReport | None = PrivateAttr(default=None)
    _group: RankGroup | None = PrivateAttr(default=None)
    _loads: list[float] = PrivateAttr(default_factory=list)
    _owners: dict[str, int] = PrivateAttr(default_factory=dict)
    _peak_state_bytes: int = PrivateAttr(default=0)

    # ---------------------------------------------------------------- validation

    @field_validator("targets", mode="before")
    @classmethod
    def _targets_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, value):
        if value is not None and not 0 < value < 1:
            raise ValueError(
                f"sparsity must lie strictly between 0 and 1 (e.g. 0.5), got {value}"
            )
        return value

    @model_validator(mode="after")
    def _check_settings(self) -> "DSnoTModifier":
        try:
            self._nm = parse_mask_structure(self.mask_structure)
        except MaskStructureError as err:
            raise ValueError(str(err)) from None
        if self.initial is None:
            if self.sparsity is not None:
                raise ValueError(
                    "sparsity is only used with `initial` (standalone DSnoT); after a "
                    "pruner DSnoT keeps the pruner's sparsity. Remove sparsity, or set "
                    "initial: wanda"
                )
            return self
        if self._nm is None:
            if self.sparsity is None:
                raise ValueError(
                    f"initial: {self.initial} needs a sparsity (e.g. sparsity: 0.5) or an "
                    "N:M mask_structure (e.g. '2:4')"
                )
            if self.mask_structure is None:
                self.mask_structure = "0:0"
        elif self.sparsity is not None and abs(self.sparsity - self._nm[0] / self._nm[1]) > 1e-9:
            raise ValueError(
                f"sparsity {self.sparsity} contradicts mask_structure "
                f"{self.mask_structure!r} ({self._nm[0] / self._nm[1]}); remove sparsity"
            )
        return self

    # ----------------------------------------------------------------- lifecycle

    @property
    def report(self) -> DSnoTReport | None:
        """The per-layer report of the last run (None before calibration)."""
        return self._report

    @property
    def state_bytes(self) -> int:
        """Bytes DSnoT holds now: dense snapshots and input statistics (tensors)."""
        stats = {id(s): s for s in self._stats.values()}.values()
        return sum(d.nbytes for d in self._dense.values()) + sum(s.nbytes for s in stats)

    @property
    def peak_state_bytes(self) -> int:
        """The most bytes :attr:`state_bytes` reached during the last calibration."""
        return self._peak_state_bytes

    @property
    def owners(self) -> dict[str, int]:
        """Under torchrun, the rank that refined each layer of the last run."""
        return dict(self._owners)

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        self._names = {
            module: name
            for name, module in match_named_modules(model, self.targets, self.ignore)
            if isinstance(module, torch.nn.Linear)
        }
        if not self._names:
            raise DSnoTConfigError(
                f"DSnoTModifier targets {self.targets} (ignore {self.ignore}) match no "
                "Linear layer of the model; set targets to layer classes or names of it, "
                "such as ['Linear'] or ['re:.*self_attn.*']"
            )
        modifiers = list(active_session().lifecycle.recipe.modifiers)
        here = next((i for i, m in enumerate(modifiers) if m is self), len(modifiers))
        self._pruners = [m for m in modifiers[:here] if isinstance(m, SparsityModifierBase)]
        later = [type(m).__name__ for m in modifiers[here + 1 :] if isinstance(m, SparsityModifierBase)]
        if self.initial is not None and (self._pruners or later):
            names = [type(m).__name__ for m in self._pruners] + later
            raise DSnoTConfigError(
                f"DSnoTModifier has initial: {self.initial}, so it prunes by itself, but the "
                f"recipe also prunes with {names}. Remove `initial` and `sparsity` to refine "
                "that pruner's masks, or remove the pruner"
            )
        if self.initial is None and not self._pruners:
            where = f"it comes before {later}" if later else "no pruner comes before it"
            raise DSnoTConfigError(
                f"DSnoTModifier refines the masks of an earlier pruner, but {where}: {_FIX_ORDER}"
            )
        if self.mask_structure is not None:
            for pruner in self._pruners:
                theirs = parse_mask_structure(getattr(pruner, "mask_structure", None))
                if theirs != self._nm:
                    raise DSnoTConfigError(
                        f"DSnoTModifier has mask_structure {self.mask_structure!r} but "
                        f"{type(pruner).__name__} prunes with {pruner.mask_structure!r}; "
                        "make them agree, or leave DSnoTModifier's unset to read it from "
                        "the zeros"
                    )
        # quantizers: every modifier acts on a layer at its own step of the layer's epoch
        # end, in recipe order. GPTQ after DSnoT spreads each column's rounding error
        # over the later columns, pruned weights included: DSnoT's zeros would not survive
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.quantization import QuantizationMixin

        gptq = [type(m).__name__ for m in modifiers[here + 1 :] if isinstance(m, GPTQModifier)]
        if gptq:
            raise DSnoTConfigError(
                f"{gptq[0]} comes after DSnoTModifier, but GPTQ in llm-compressor does not "
                "keep zero weights zero (its error feedback rewrites pruned weights), so "
                "the sparsity DSnoT leaves would be lost. Quantize with QuantizationModifier "
                "instead (e.g. scheme: W8A8, FP8_DYNAMIC or W4A16; it rounds each weight "
                "alone and keeps zeros), after DSnoTModifier"
            )
        early = [type(m).__name__ for m in modifiers[:here] if isinstance(m, QuantizationMixin)]
        if early:
            logger.warning(
                f"{early} comes before DSnoTModifier in the recipe: its weight scales (and "
                "GPTQ's rounding) are fixed before DSnoT swaps weights, so the weights DSnoT "
                "regrows are quantized with scales that never saw them. Put "
                "QuantizationModifier after DSnoTModifier"
            )
        self._report = DSnoTReport(params=self._params())
        # issue 13: fused 3D experts are no Linear layers: say so, with the fix
        fused = unlinearized_experts(model)
        if fused:
            logger.warning(
                f"DSnoT: {name_a_few(fused, 3)} module(s) hold MoE experts that are not "
                f"refined: {FIX_UNLINEARIZED}"
            )
        # issue 13: padded positions would enter the statistics: refuse (see FIX_PADDING)
        padded = padded_calibration(getattr(getattr(state, "data", None), "calib", None))
        if padded:
            raise DSnoTConfigError(f"DSnoT: {padded}; {FIX_PADDING}")
        # hooks from the start (not at calibration start), so that a pruner calibrating
        # in a pass of its own is caught at its first forward, before it prunes anything
        for module in self._names:
            self.register_hook(module, self.calibrate_module, "forward")
        return True

    def _check_same_pass(self):
        running = active_session().lifecycle.recipe.modifiers
        if not any(m is self for m in running):
            others = [type(m).__name__ for m in running]
            raise DSnoTConfigError(
                f"{others} calibrates in a pass of its own (oneshot's default pipeline, "
                "'independent'): it would prune the whole model before DSnoTModifier "
                "sees a layer, and the dense weights DSnoT needs would be gone. Run "
                "oneshot with pipeline='sequential'"
            )

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        self._peak_state_bytes = 0
        self._owners = {}
        self._seen = set()
        # issue 13: the pruners registered their layers in their own calibration start
        # (before this one, recipe order); layers none of them prunes are left alone
        try:
            self._pruned_by = pruner_targets(self._pruners, self._names) if self._pruners else None
        except MaskStructureError as err:
            raise DSnoTConfigError(str(err)) from None
        error = None
        try:
            self._setup_distributed()
            self._check_distributed_pruners()
            self._check_offload_writable()
        except Exception as err:  # noqa: BLE001 - every rank must learn of it
            error = err
        if self._group is not None:
            try:
                self._group.agree(error, "checking the recipe and the offload directories")
            except Exception:
                self._group.destroy()  # every rank stops here: leave no group behind
                self._group = None
                raise
        elif error is not None:
            raise error

    def _setup_distributed(self):
        """Under torchrun, DSnoT's process group (collectives with a timeout)."""
        if self._group is not None or world_size() < 2:
            return
        self._group = RankGroup(self.dist_timeout)
        self._loads = [0.0] * self._group.world_size
        logger.info(
            f"DSnoT: distributed over {self._group.world_size} ranks (this is rank "
            f"{self._group.rank}); statistics are summed over the ranks, each layer is "
            "refined by one rank and broadcast"
        )
        if self._group.world_size > len(self._names):
            logger.warning(
                f"DSnoT: {self._group.world_size} ranks but only {len(self._names)} target "
                "layers: some ranks will refine nothing (they still calibrate their share "
                "of the data)"
            )

    def _check_distributed_pruners(self):
        if world_size() < 2 or not self._pruners:
            return
        names = sorted({type(m).__name__ for m in self._pruners})
        raise DSnoTConfigError(
            f"{names} prune each rank's layers from that rank's share of the calibration "
            "data only: llm-compressor 0.14 does not synchronise them across ranks, so "
            f"under torchrun ({world_size()} ranks) their masks would differ between ranks "
            "(and, the model being in memory shared by the ranks, the ranks would overwrite "
            f"each other's masks) before DSnoT sees them. Instead, {_FIX_DISTRIBUTED}"
        )

    def _check_offload_writable(self):
        """DSnoT (and a pruner before it) write weights offloaded to disk in place."""
        dirs: dict[str, list[str]] = {}
        for module, name in self._names.items():
            cache = module._parameters
            if isinstance(cache, DiskCache):
                dirs.setdefault(str(cache.offload_dir), []).append(name)
        for directory, names in dirs.items():
            try:
                with tempfile.NamedTemporaryFile(dir=directory, prefix=".dsnot-probe-"):
                    pass
            except OSError as err:
                raise DSnoTConfigError(
                    f"{len(names)} target layers (e.g. {names[0]}) are offloaded to disk in "
                    f"{directory}, which cannot be written ({err.strerror or err}); the pruned "
                    "weights are written there. Make the directory writable, or load the "
                    "model with a writable offload_folder (from_pretrained(..., "
                    "offload_folder=...)) on a disk with room for the model"
                ) from None

    def _snapshot(self, module: torch.nn.Module) -> torch.Tensor:
        """A copy of the layer's dense weight, where ``snapshot_device`` says."""
        weight = module.weight.detach()
        device = weight.device
        if self.snapshot_device == "cpu":
            device = torch.device("cpu")
        elif self.snapshot_device == "auto":
            offloaded = get_offloaded_device(module)
            if offloaded == "disk":
                device = torch.device("cpu")
            elif offloaded is not None and torch.device(offloaded) != weight.device:
                device = torch.device(offloaded)
        return weight.to(device, copy=True)

    def _new_stats(self, module: torch.nn.Module, num_columns: int) -> InputStats:
        return InputStats(
            num_columns,
            device=get_execution_device(module),
            with_moments=self.objective == "mean",
            with_gram=self.objective == "gram",
        )

    def _track_state(self):
        self._peak_state_bytes = max(self._peak_state_bytes, self.state_bytes)

    def calibrate_module(self, module: torch.nn.Module, args: tuple, _output: torch.Tensor):
        """Forward hook: snapshot the dense weight once, accumulate input statistics."""
        inp = args[0]
        self._seen.add(module)  # issue 13: targets never called are reported
        if module not in self._dense:
            self._check_same_pass()
            self._dense[module] = self._snapshot(module)
            self._track_state()
        if module not in self._stats:
            shared = self._shared.lookup(inp)
            if shared is not None and shared.num_columns == inp.shape[-1]:
                # issue 13: an input an earlier layer of this batch read (q/k/v, gate/up,
                # every expert's gate/up under all-expert calibration): share
                self._stats[module] = shared
                return
            self._stats[module] = self._new_stats(module, inp.shape[-1])
            self._leaders.add(module)
            self._track_state()
        if module in self._leaders:
            if not bool(torch.isfinite(inp).all()):
                # before the pruner touches this layer (it prunes at the epoch's end)
                self._stats[module].update(inp)
                self._stats[module].check_finite(self._names[module])
            self._stats[module].update(inp)
            self._shared.add(inp, self._stats[module])

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        self._shared.clear()
        if self._group is None and world_size() > 1:
            self._setup_distributed()  # outside a pipeline that started calibration
        if self._group is not None:
            self._epoch_end_distributed()
            return
        for module in list(self._dense):
            dense = self._dense.pop(module)
            stats = self._stats.pop(module)
            self._leaders.discard(module)
            with torch.no_grad(), align_module_device(module):
                layer = self._refine_layer(module, dense, stats)
            del dense, stats
            if isinstance(layer, SkippedLayer):  # issue 13: left alone, with the reason
                self._report.skipped.append(layer)
            elif layer is not None:
                self._report.layers.append(layer)
                logger.info("DSnoT " + layer.line())

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        self._dense.clear()
        self._stats.clear()
        self._leaders.clear()
        if self._group is not None:
            self._group.destroy()
            self._group = None
        self._warn_left_alone()
        few = self._report.skipped_names("few tokens")
        if not self._report.layers and few:  # issue 13: say why, with the fix
            raise DSnoTConfigError(
                f"DSnoTModifier refined no layer: the {len(few)} pruned layers each saw fewer "
                f"than min_tokens={self.min_tokens} calibration tokens; give more calibration "
                "samples (or lower min_tokens)"
            )
        if not self._report.layers:
            raise DSnoTConfigError(
                "DSnoTModifier refined no layer: none of its target layers was pruned by "
                f"an earlier modifier during calibration; {_FIX_ORDER}"
            )
        logger.info(self._report.summary_line())

    def _warn_left_alone(self):
        """issue 13: the layers left alone in the report, one warning per kind."""
        report = self._report
        listed = {layer.name for layer in report.layers} | {s.name for s in report.skipped}
        for module, name in self._names.items():
            if name in listed:
                continue
            if module not in self._seen:
                report.skipped.append(SkippedLayer(
                    name, "never called", None, "no forward during calibration"))
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
                f"each saw fewer than min_tokens={self.min_tokens} calibration tokens (MoE "
                f"experts under routed calibration). To refine them, {FIX_FEW_TOKENS}"
            )

    def on_finalize(self, state: State, **kwargs) -> bool:
        self.remove_hooks()
        if state.model is not None and self._report is not None and self._report.layers:
            _attach_report(state.model, self._report)
        return True

    # --------------------------------------------------------------- distributed

    def _epoch_end_distributed(self):
        """
        The subgraph's refinement spread over the ranks (every rank calls the same
        collectives in the same order; a failure on one rank reaches all of them):

        1. every rank describes the layers it calibrated (digests of the dense
           snapshot, of the current weight and of its zero mask); all must agree;
        2. the layers to refine go to the ranks, greedy by cost, balance carried over
           from the subgraphs before, each to a rank that calibrated it;
        3. the statistics are summed over the ranks (all_reduce, one per group of
           layers sharing an input);
        4. each rank refines its layers and writes them; failures are shared;
        5. the owners broadcast the refined weights, the others write them in;
        6. all ranks check they hold the same refined weights.
        """
        group = self._group
        by_name = {name: module for module, name in self._names.items()}
        local = self._describe_layers()
        gathered = group.all_gather_object(local, "comparing the layers the ranks calibrated")
        layers, seen_by = self._agreed_layers(gathered)
        if not self._owners and gathered[0] and all(
            [e["inputs"] for e in summary] == [e["inputs"] for e in gathered[0]]
            for summary in gathered
        ):
            logger.warning(
                f"DSnoT: all {group.world_size} ranks calibrated on exactly the same inputs, "
                "so the run uses 1/world_size of the samples asked for. llm-compressor 0.14 "
                "hands every rank the same first samples when all ranks pass the same "
                "dataset: pass each rank its own shard instead (e.g. dataset[start:end] with "
                "start, end = n*rank//world, n*(rank+1)//world)"
            )
        # the statistics of every group of layers sharing an input (empty if this rank
        # never ran it: it adds zeros to the sum)
        group_stats: dict[str, InputStats] = {}
        for name, entry in layers.items():
            module = by_name[name]
            if module not in self._stats:
                if entry["leader"] not in group_stats:
                    group_stats[entry["leader"]] = self._new_stats(module, entry["columns"])
                self._stats[module] = group_stats[entry["leader"]]
            group_stats.setdefault(entry["leader"], self._stats[module])
        self._track_state()
        todo = [name for name, entry in layers.items() if entry["pruned"] or self.initial]
        costs = {name: self._cost(layers[name]) for name in todo}
        owners = assign_layers(costs, self._loads, allowed=seen_by)
        mine = [name for name in todo if owners[name] == group.rank]
        logger.debug(f"DSnoT rank {group.rank} refines {mine or 'no layer of this subgraph'}")
        needed = {layers[name]["leader"] for name in todo}
        for leader, stats in group_stats.items():
            if leader in needed:
                group.run(f"summing the statistics of {leader}", stats.all_reduce_, group.group)
        kept = {layers[name]["leader"] for name in mine}
        group_stats = {leader: s for leader, s in group_stats.items() if leader in kept}
        dense = {by_name[name]: self._dense[by_name[name]] for name in mine}
        self._dense.clear()
        self._stats.clear()
        self._leaders.clear()

        reports, error = {}, None
        for name in mine:
            module = by_name[name]
            try:
                with torch.no_grad(), align_module_device(module):
                    reports[name] = self._refine_layer(
                        module, dense.pop(module), group_stats[layers[name]["leader"]]
                    )
            except Exception as err:  # noqa: BLE001 - shared with the other ranks below
                error = err
                break
        dense.clear()
        group_stats.clear()
        group.agree(error, "refining its layers")
        for gathered in group.all_gather_object(reports, "sharing the layer reports"):
            reports.update(gathered)

        written = [name for name in todo if isinstance(reports.get(name), LayerReport)]
        # issue 13: layers left alone (too few tokens), in the report of every rank
        self._report.skipped += [r for r in reports.values() if isinstance(r, SkippedLayer)]
        for name in written:
            self._receive_or_send(by_name[name], name, owners[name])
        digests = {}
        for name in written:
            with align_module_device(by_name[name]):
                digests[name] = tensor_digest(by_name[name].weight)
        gathered = group.all_gather_object(digests, "comparing the refined weights")
        differ = [name for name in written if len({g[name] for g in gathered}) > 1]
        if differ:
            raise DSnoTDistributedError(
                f"after DSnoT the ranks hold different weights of {differ}: the broadcast "
                "of the refined weights did not reach every rank's copy of the model. "
                "Please report this with the way the model was loaded and offloaded"
            )
        for name in written:
            layer = reports[name]
            self._owners[name] = owners[name]
            self._report.layers.append(layer)
            if owners[name] == group.rank:
                logger.info(f"DSnoT (rank {group.rank}) " + layer.line())

    def _describe_layers(self) -> list[dict]:
        """This rank's view of the layers it calibrated in this subgraph, in forward order."""
        leaders: dict[int, str] = {}
        summary = []
        for module, dense in self._dense.items():
            stats = self._stats[module]
            with torch.no_grad(), align_module_device(module):
                current = module.weight.detach()
                summary.append(dict(
                    name=self._names[module],
                    leader=leaders.setdefault(id(stats), self._names[module]),
                    shape=list(dense.shape),
                    columns=stats.num_columns,
                    dense=tensor_digest(dense),
                    current=tensor_digest(current),
                    mask=mask_digest(current),
                    pruned=bool(((current == 0) & (dense.to(current.device) != 0)).any()),
                    inputs=_stats_digest(stats),
                ))
        return summary

    def _agreed_layers(self, gathered: list[list[dict]]) -> tuple[dict, dict]:
        """
        The union of the layers the ranks calibrated (rank 0's order first) and the
        ranks that calibrated each; raises on every rank alike if two ranks saw
        different weights, masks or statistics sharing for a layer.
        """
        layers: dict[str, dict] = {}
        seen_by: dict[str, list[int]] = {}
        differences = []
        for rank, summary in enumerate(gathered):
            for entry in summary:
                name = entry["name"]
                if name not in layers:
                    layers[name], seen_by[name] = entry, [rank]
                    continue
                first = seen_by[name][0]
                seen_by[name].append(rank)
                for key in ("shape", "leader", "dense", "mask", "current"):
                    if entry[key] != layers[name][key]:
                        differences.append((key, name, first, rank))
                        break
        if not differences:
            return layers, seen_by
        key, name, first, rank = differences[0]
        where = f"{len(differences)} layer(s), e.g. {name} on ranks {first} and {rank}"
        if key == "mask":
            raise DSnoTConfigError(
                f"the ranks hold different pruning masks before DSnoT refines them ({where}): "
                "the masks were made on each rank from its own share of the data. Instead, "
                + _FIX_DISTRIBUTED
            )
        if key in ("dense", "current"):
            raise DSnoTConfigError(
                f"the ranks hold different weights ({where}): every rank must load the same "
                "model (compressed_tensors.offload.load_offloaded_model shares rank 0's) and "
                "no other modifier may change them differently on different ranks"
            )
        raise DSnoTDistributedError(
            f"the ranks ran the layers differently ({key} differs for {where}); run the "
            "same model and recipe on every rank"
        )

    def _cost(self, entry: dict) -> float:
        rows, cols = entry["shape"]
        return float(rows) * cols * (cols if self.objective == "gram" else 1)

    def _receive_or_send(self, module: torch.nn.Module, name: str, owner: int):
        group = self._group
        with torch.no_grad(), align_module_device(module):
            weight = module.weight.detach()
            if group.rank == owner:
                group.broadcast_(weight.contiguous(), owner, f"broadcasting {name}")
                return
            buffer = torch.empty_like(weight, memory_format=torch.contiguous_format)
            group.broadcast_(buffer, owner, f"receiving {name} from rank {owner}")
            receive_weight(module, buffer)

    # ------------------------------------------------------------------ the work

    def _refine_layer(
        self, module: torch.nn.Module, dense: torch.Tensor, stats: InputStats
    ) -> LayerReport | SkippedLayer | None:
        name = self._names[module]
        # issue 13: too few tokens (a routed expert): left exactly as the pruner left it
        if stats.tokens < self.min_tokens:
            return SkippedLayer(
                name, "few tokens", stats.tokens,
                f"saw {stats.tokens} calibration tokens, fewer than min_tokens="
                f"{self.min_tokens}; left as the pruner left it",
            )
        current = module.weight.detach()
        dense = dense.to(current.device)
        new_zeros = bool(((current == 0) & (dense != 0)).any())
        if self.initial is not None:
            if not torch.equal(current, dense):
                raise DSnoTConfigError(
                    f"{name} was changed by another modifier during calibration, but "
                    f"DSnoTModifier has initial: {self.initial}; remove `initial` to refine "
                    "that modifier's mask, or remove the other modifier"
                )
            stats.check_finite(name)
            mask = initial_mask(dense, self.sparsity, self._nm, self.initial, stats.sqnorm())
            current = dense.masked_fill(mask, 0)
            nm, origin = self._nm, self.initial
        elif not new_zeros:
            logger.debug(f"DSnoT: {name} was not pruned by an earlier modifier, left as it is")
            return SkippedLayer(name, "not pruned", stats.tokens, "the pruner left it dense")
        else:
            stats.check_finite(name)
            nm = self._structure(name, current, dense, module)
            origin = "pruner"
        start = time.perf_counter()
        result = refine_mask(
            dense,
            current,
            objective=self.objective,
            nm=nm,
            max_cycles=self.max_cycles,
            threshold=self.threshold,
            var_power=self.var_power,
            sign_check=self.sign_check,
            chunk_rows=self.chunk_rows,
            **self._statistics(stats),
        )
        seconds = time.perf_counter() - start
        # issue 13: never write a weight whose zeros break the structure
        check_refined(current, result.weight, nm, name)
        self._write_weight(module, name, result.weight)
        zeros = int((result.weight == 0).sum())
        return LayerReport(
            name=name,
            shape=list(result.weight.shape),
            structure=format_structure(nm),
            objective=self.objective,
            initial=origin,
            zeros=zeros,
            sparsity=zeros / result.weight.numel(),
            swaps=result.swaps,
            rows_changed=result.rows_changed,
            error_before=result.error_before,
            error_after=result.error_after,
            seconds=seconds,
            pruner_structure=self._asked(module).mask_structure if self._asked(module) else None,
            mask_digest=mask_digest(result.weight),
        )

    def _write_weight(self, module: torch.nn.Module, name: str, weight: torch.Tensor):
        try:
            update_offload_parameter(module, "weight", weight)
        except OSError as err:
            where = getattr(module._parameters, "offload_dir", None)
            fix = (
                f"it is offloaded to disk in {where}: make that directory writable, with room "
                "for the model, or load the model with another offload_folder"
                if where is not None
                else "check the memory or disk the model is offloaded to"
            )
            raise DSnoTConfigError(
                f"writing the refined weight of {name} failed ({err}); {fix}"
            ) from err

    def _asked(self, module: torch.nn.Module):
        """issue 13: what the pruner of this layer was asked for (None: unknown)."""
        return None if self._pruned_by is None else self._pruned_by.get(module)

    def _structure(self, name: str, current: torch.Tensor, dense: torch.Tensor, module=None):
        asked = self._asked(module)
        if asked is not None:
            # issue 13: the structure is the one the pruner was given, not the zeros'
            # (SparseGPT N:M leaves blocks with extra zeros on inputs never activated)
            if asked.nm is not None:
                try:
                    check_blocks(current, asked.nm, name, asked.pruner)
                except MaskStructureError as err:
                    raise DSnoTConfigError(str(err)) from None
            return asked.nm
        if self.mask_structure is None:
            return infer_structure(current, dense)
        try:
            check_structure(current, self._nm, dense, name)
        except MaskStructureError as err:
            raise DSnoTConfigError(str(err)) from None
        return self._nm

    def _statistics(self, stats: InputStats) -> dict:
        if self.objective == "gram":
            return {"gram": stats.gram()}
        return {"mean": stats.mean(), "var": stats.var(self.variance), "sqnorm": stats.sqnorm()}

    def _params(self) -> dict:
        return self.model_dump(
            include={
                "objective", "max_cycles", "threshold", "var_power", "variance",
                "sign_check", "mask_structure", "initial", "sparsity", "targets", "ignore",
            }
        )


def _stats_digest(stats: InputStats) -> str:
    """A digest of a layer's input statistics (equal on two ranks iff same inputs)."""
    return "|".join(tensor_digest(t) for t in stats.tensors())


def _attach_report(model: torch.nn.Module, report: DSnoTReport):
    """
    Make ``model.save_pretrained(dir)`` also write ``dsnot_report.json`` into ``dir``
    (wrapping whatever ``save_pretrained`` the model has, llm-compressor's included).
    A second DSnoT run on the same model replaces the report. Outside oneshot (whose
    pre-processing wraps ``save_pretrained`` first) nothing is wrapped: the report is
    ``DSnoTModifier.report`` and ``report.save(dir)`` writes it.
    """
    save = model.save_pretrained
    if getattr(save, "_dsnot_report", None) is not None:
        save._dsnot_report[0] = report
        return
    if not getattr(save, "_overridden", False):
        logger.info("DSnoT: save the report with DSnoTModifier.report.save(directory)")
        return
    holder = [report]

    def save_pretrained_with_dsnot_report(save_directory, *args, **kwargs):
        result = save(save_directory, *args, **kwargs)
        if is_source_process():  # under torchrun, rank 0 writes (as it saves the model)
            path = holder[0].save(save_directory)
            logger.info(f"DSnoT report written to {path}")
        return result

    save_pretrained_with_dsnot_report._dsnot_report = holder
    save_pretrained_with_dsnot_report._overridden = True
    model.save_pretrained = save_pretrained_with_dsnot_report
