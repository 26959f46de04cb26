"""
DSnoTModifier: llm-compressor glue around :mod:`dsnot_modifier.swaps`.
"""

from __future__ import annotations

import time
import weakref
from typing import Literal

import torch
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

from dsnot_modifier.masks import (
    MaskStructureError,
    check_structure,
    format_structure,
    infer_structure,
    initial_mask,
    parse_mask_structure,
)
from dsnot_modifier.report import DSnoTReport, LayerReport
from dsnot_modifier.stats import InputStats
from dsnot_modifier.swaps import DEFAULT_THRESHOLD, refine_mask

__all__ = ["DSnoTModifier", "DSnoTConfigError"]

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
    - calibrate_module (every batch)
        - first batch of a layer: check that the pruner calibrates in the same pass
          (sequential pipeline), snapshot the layer's dense weight
        - accumulate input statistics, shared by layers that read the same input
    - on_sequential_epoch_end (after the pruner's own)
        - refine every pruned layer of the subgraph, write its weight, free its state
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
    :param mask_structure: ``"N:M"`` or ``"0:0"``; unset, it is read from the zeros
        the pruner left. Given, it must agree with them
    :param initial: ``wanda`` or ``magnitude`` to make the initial mask without an
        earlier pruner (standalone); needs ``sparsity`` unless N:M is given
    :param sparsity: fraction of weights to prune, standalone only (0 < s < 1)
    :param targets: layers to refine (Linear layers matched as llm-compressor does)
    :param ignore: layers to leave alone; ``lm_head`` by default
    :param chunk_rows: rows refined at once (default: about 4M weights a chunk)
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

    _nm: tuple[int, int] | None = PrivateAttr(default=None)
    _names: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _pruners: list[Modifier] = PrivateAttr(default_factory=list)
    _dense: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(default_factory=dict)
    _stats: dict[torch.nn.Module, InputStats] = PrivateAttr(default_factory=dict)
    _leaders: set[torch.nn.Module] = PrivateAttr(default_factory=set)
    _last_input: object = PrivateAttr(default=None)
    _last_stats: InputStats | None = PrivateAttr(default=None)
    _report: DSnoTReport | None = PrivateAttr(default=None)

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
        self._report = DSnoTReport(params=self._params())
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

    def calibrate_module(self, module: torch.nn.Module, args: tuple, _output: torch.Tensor):
        """Forward hook: snapshot the dense weight once, accumulate input statistics."""
        inp = args[0]
        if module not in self._dense:
            self._check_same_pass()
            self._dense[module] = module.weight.detach().clone()
        if module not in self._stats:
            last = self._last_input() if self._last_input is not None else None
            if last is inp and self._last_stats.num_columns == inp.shape[-1]:
                # same input tensor as the layer before (q/k/v, gate/up): share
                self._stats[module] = self._last_stats
                return
            self._stats[module] = InputStats(
                inp.shape[-1],
                device=get_execution_device(module),
                with_moments=self.objective == "mean",
                with_gram=self.objective == "gram",
            )
            self._leaders.add(module)
        if module in self._leaders:
            if not bool(torch.isfinite(inp).all()):
                # before the pruner touches this layer (it prunes at the epoch's end)
                self._stats[module].update(inp)
                self._stats[module].check_finite(self._names[module])
            self._stats[module].update(inp)
            self._last_input = weakref.ref(inp)
            self._last_stats = self._stats[module]

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        self._last_input = self._last_stats = None
        for module in list(self._dense):
            dense = self._dense.pop(module)
            stats = self._stats.pop(module)
            self._leaders.discard(module)
            with torch.no_grad(), align_module_device(module):
                layer = self._refine_layer(module, dense, stats)
            if layer is not None:
                self._report.layers.append(layer)
                logger.info("DSnoT " + layer.line())

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        self._dense.clear()
        self._stats.clear()
        self._leaders.clear()
        if not self._report.layers:
            raise DSnoTConfigError(
                "DSnoTModifier refined no layer: none of its target layers was pruned by "
                f"an earlier modifier during calibration; {_FIX_ORDER}"
            )
        logger.info(self._report.summary_line())

    def on_finalize(self, state: State, **kwargs) -> bool:
        self.remove_hooks()
        if state.model is not None and self._report is not None and self._report.layers:
            _attach_report(state.model, self._report)
        return True

    # ------------------------------------------------------------------ the work

    def _refine_layer(
        self, module: torch.nn.Module, dense: torch.Tensor, stats: InputStats
    ) -> LayerReport | None:
        name = self._names[module]
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
            return None
        else:
            stats.check_finite(name)
            nm = self._structure(name, current, dense)
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
        update_offload_parameter(module, "weight", result.weight)
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
        )

    def _structure(self, name: str, current: torch.Tensor, dense: torch.Tensor):
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
        path = holder[0].save(save_directory)
        logger.info(f"DSnoT report written to {path}")
        return result

    save_pretrained_with_dsnot_report._dsnot_report = holder
    save_pretrained_with_dsnot_report._overridden = True
    model.save_pretrained = save_pretrained_with_dsnot_report
