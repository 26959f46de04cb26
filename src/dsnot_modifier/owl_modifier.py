"""
OWLModifier: OWL's layer-wise sparsity for the pruners that follow it in a recipe
(llm-compressor glue around :mod:`dsnot_modifier.owl`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from compressed_tensors.offload import get_execution_device
from compressed_tensors.utils import align_module_device, match_named_modules, match_targets
from loguru import logger
from pydantic import PrivateAttr, field_validator

from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers.modifier import Modifier
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import (
    PRUNABLE_LAYER_TYPES,
    SparsityModifierBase,
)
from llmcompressor.modifiers.pruning.wanda.base import WandaPruningModifier
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.pytorch.utils.helpers import tensors_to_device
from llmcompressor.utils.helpers import DisableQuantization, calibration_forward_context
from llmcompressor.utils.pytorch.module import infer_sequential_targets

from dsnot_modifier.distributed import world_size
from dsnot_modifier.masks import parse_mask_structure
from dsnot_modifier.modifier import DSnoTModifier
from dsnot_modifier.owl import InputSqnorms, OWLError, outlier_ratio, owl_sparsities, per_row_sparsities

__all__ = ["OWLModifier", "OWLError"]

_WHERE = (
    "put OWLModifier before a WandaPruningModifier or SparseGPTModifier (with a single "
    "unstructured sparsity), or before a DSnoTModifier with `initial` and `sparsity`, in "
    "the same recipe"
)


class OWLModifier(Modifier):
    """
    OWL (Outlier Weighed Layerwise sparsity, Yin et al., ICML 2024): spreads the
    sparsity of the pruners that follow it in the recipe unevenly over the decoder
    layers, so that layers with more outlier weights keep more of them; the overall
    sparsity stays the pruner's. DSnoT then refines the masks inside each layer.

    At calibration start, before anything is pruned, it runs one forward pass of
    the dense model over the calibration data (its own hooks only) for the mean
    square ``sqnorm`` of every pruned Linear layer's inputs. For each decoder layer
    l it takes D_l, the share of its pruned weights whose Wanda score
    ``|W_ij|·sqrt(sqnorm_j)`` exceeds ``m`` times the layer's mean score; scales the
    D_l onto [0, 2·lmbda]; and prunes layer l at ``S − (scaled D_l − their mean)``
    with S each pruner's own ``sparsity``. It hands the layer sparsities to the
    pruners (a list in the order of their ``targets``, which works in
    llm-compressor 0.14 where ``sparsity_profile: owl`` does not), and puts their
    ``sparsity`` back at finalize, so the saved recipe is the one written.

    It must come before the pruners in the recipe; a stage of its own before the
    pruning stage works the same (llm-compressor 0.14 runs the modifiers of all the
    stages in one calibration pass, in recipe order). The dense pass costs one
    forward pass of the model over the calibration data.

    Wanda prunes ``int(cols·s)`` weights of every row: OWL's value for each layer
    is rounded per row, and a few layers get one more zero per row, so that the
    overall sparsity is the target (to within one zero per row of one layer).

    Sample yaml (run with ``oneshot(..., pipeline="sequential")``):

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        OWLModifier:
          m: 20
          lmbda: 0.3
        WandaPruningModifier:
          sparsity: 0.7
          mask_structure: "0:0"
          targets: ["Linear"]
          ignore: ["re:.*lm_head"]
        DSnoTModifier: {}
    ```

    Lifecycle:

    - on_initialize
        - find the pruners after it in the recipe; check them (unstructured, one
          sparsity, no OWL of their own)
    - on_calibration_start (before the pruners' own)
        - dense forward pass over the calibration data: sqnorm of every pruned
          Linear layer's inputs (summed over the ranks under torchrun)
        - outlier ratio of every decoder layer, layer sparsities, handed to the
          pruners
    - on_finalize
        - the pruners' ``sparsity`` back to what the recipe says

    :param m: OWL's M: a weight is an outlier if its Wanda score is above ``m`` times
        its decoder layer's mean score (> 0). OWL's paper uses 5 for LLaMA-7B; the
        default, 20, is the best of this project's validation sweep (BENCHMARKS.md, OWL)
    :param lmbda: OWL's λ: layer sparsities spread over S ± lmbda (0.08 in OWL's
        paper); 0 <= lmbda < 0.5, and small enough that every layer's sparsity stays
        in (0, 1): below min(S, 1 − S)/2 always is (a larger one is refused with the
        largest valid value). The default, 0.3, is the validation sweep's best for both
        pruners followed by DSnoT over 70% and 80% (BENCHMARKS.md, OWL). It applies to
        every pruner after OWLModifier. At 80% a model whose outlier ratios mostly sit
        high (a few layers far below the rest) may need a smaller λ: below 0.1 is always
        valid there
    """

    requires_calibration_data: bool = True

    m: float = 20.0
    lmbda: float = 0.3

    _pruners: list[Modifier] = PrivateAttr(default_factory=list)
    _handovers: list["Handover"] = PrivateAttr(default_factory=list)
    _sqnorm: InputSqnorms = PrivateAttr(default_factory=InputSqnorms)
    _ratios: dict[str, float] = PrivateAttr(default_factory=dict)
    _layer_sparsities: dict[str, dict[str, float]] = PrivateAttr(default_factory=dict)
    _sequential_targets: object = PrivateAttr(default=None)

    @field_validator("m")
    @classmethod
    def _m_positive(cls, value):
        if not value > 0:
            raise ValueError(f"OWLModifier m (OWL's M) must be > 0, e.g. 5; got {value}")
        return value

    @field_validator("lmbda")
    @classmethod
    def _lmbda_range(cls, value):
        if not 0 <= value < 0.5:
            raise ValueError(
                "OWLModifier lmbda (OWL's λ) must satisfy 0 <= lmbda < 0.5 (the layer "
                f"sparsities span 2·lmbda, which must stay below 1), e.g. 0.08; got {value}"
            )
        return value

    # ------------------------------------------------------------------ results

    @property
    def outlier_ratios(self) -> dict[str, float]:
        """D_l of every decoder layer of the last run (name -> share of outliers)."""
        return dict(self._ratios)

    @property
    def layer_sparsities(self) -> dict[str, dict[str, float]]:
        """For each pruner (its class name, then ``#2``... for later ones): decoder layer -> sparsity."""
        return {k: dict(v) for k, v in self._layer_sparsities.items()}

    # ----------------------------------------------------------------- lifecycle

    def on_initialize(self, state: State, **kwargs) -> bool:
        modifiers = list(active_session().lifecycle.recipe.modifiers)
        here = next((i for i, m in enumerate(modifiers) if m is self), len(modifiers))
        earlier = [type(m).__name__ for m in modifiers[:here] if _is_pruner(m)]
        if earlier:
            raise OWLError(f"OWLModifier comes after {earlier}, which would prune first: {_WHERE}")
        self._pruners = [m for m in modifiers[here + 1 :] if _is_pruner(m)]
        if not self._pruners:
            raise OWLError(f"OWLModifier has no pruner after it in the recipe: {_WHERE}")
        if sum(isinstance(m, OWLModifier) for m in modifiers) > 1:
            raise OWLError("the recipe has more than one OWLModifier; keep one, before the pruners")
        for pruner in self._pruners:
            self._check_pruner(pruner)
        if state.data.calib is None:
            raise OWLError("OWLModifier needs calibration data (pass oneshot a dataset)")
        self._sequential_targets = infer_sequential_targets(
            state.model, sequential_targets=kwargs.get("sequential_targets")
        )
        return True

    def _check_pruner(self, pruner: Modifier):
        name = type(pruner).__name__
        if getattr(pruner, "sparsity_profile", None) is not None or any(
            getattr(pruner, f, None) is not None for f in ("owl_m", "owl_lmbda")
        ):
            raise OWLError(
                f"the recipe asks for OWL twice: {name} has sparsity_profile/owl_m/owl_lmbda "
                "and OWLModifier comes before it. Remove sparsity_profile, owl_m and "
                f"owl_lmbda from {name} (OWLModifier computes the layer sparsities; "
                "llm-compressor 0.14's own OWL fails in oneshot), or remove OWLModifier"
            )
        structure = getattr(pruner, "mask_structure", None)
        if parse_mask_structure(structure) is not None:
            raise OWLError(
                f"OWL spreads an unstructured sparsity over the layers, but {name} has "
                f"mask_structure {structure!r}: N:M fixes every block's sparsity (the same "
                "N/M in every layer). Use mask_structure '0:0' with a sparsity such as 0.7, "
                "or remove OWLModifier"
            )
        sparsity = pruner.sparsity
        if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 < sparsity < 1:
            raise OWLError(
                f"OWLModifier spreads one target sparsity over the layers, but {name} has "
                f"sparsity {sparsity!r}; give {name} a single sparsity strictly between 0 and "
                "1 (e.g. 0.7): OWL makes the per-layer values"
            )

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        model = state.model
        self._handovers = [_handover(pruner) for pruner in self._pruners]
        self._ratios, self._layer_sparsities = {}, {}
        decoder = [n for n, _ in match_named_modules(model, self._sequential_targets)]
        if not decoder:
            raise OWLError(
                f"OWLModifier found no decoder layer ({self._sequential_targets}) in the model; "
                "pass oneshot sequential_targets naming the decoder layer class"
            )
        plans = [handover.units(model, decoder) for handover in self._handovers]
        modules = dict(model.named_modules())
        order = {name: i for i, name in enumerate(modules)}
        linears = sorted({n for plan in plans for unit in plan for n in unit.linears}, key=order.__getitem__)
        self._dense_pass(model, {n: modules[n] for n in linears}, state.data.calib)
        layers: dict[str, list[str]] = {}
        for name in linears:
            layer = _layer_of(name, decoder)
            if layer is not None:
                layers.setdefault(layer, []).append(name)
        for layer, names in layers.items():
            # one Linear weight at a time, onloaded only while it is scored
            weights = [functools.partial(_weight, modules[name]) for name in names]
            sqnorms = [self._sqnorm.mean(name) for name in names]
            self._ratios[layer] = outlier_ratio(weights, sqnorms, self.m)
        self._sqnorm.clear()
        if len(self._ratios) < 2:
            logger.warning(f"OWL: {len(self._ratios)} decoder layer(s) to prune: the sparsity stays uniform")
        # every pruner's values first (any error leaves the pruners as they were), then hand over
        values = [self._values(handover, plan, modules, key=type(handover.pruner).__name__ + (f"#{i + 1}" if i else ""))
                  for i, (handover, plan) in enumerate(zip(self._handovers, plans))]
        for handover, plan, value in zip(self._handovers, plans, values):
            handover.give(plan, value)

    def _dense_pass(self, model, linears: dict[str, torch.nn.Module], dataloader):
        """sqnorm sums of every Linear in ``linears`` over one forward pass of the dense model."""
        self._sqnorm = InputSqnorms()

        def hook(name):
            def accumulate(_module, args, _output):
                self._sqnorm.add(name, args[0])

            return accumulate

        handles = {self.register_hook(module, hook(name), "forward") for name, module in linears.items()}
        # where the first layer runs (the sequential pipeline's onload device, if set)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        device = get_execution_device(embeddings if embeddings is not None else model)
        try:
            with HooksMixin.disable_hooks(keep=handles), calibration_forward_context(model), \
                    DisableQuantization(model):
                for batch in dataloader:
                    model(**tensors_to_device(batch, device))
        finally:
            self.remove_hooks(handles)
        missing = [n for n in linears if n not in self._sqnorm]
        if missing:
            raise OWLError(
                f"OWLModifier's forward pass never reached {missing[:3]} ({len(missing)} layers): "
                "OWL needs the inputs of every layer the pruners prune"
            )
        if world_size() > 1:
            self._sqnorm.all_reduce(list(linears))  # every rank the same statistics, same sparsities

    def _values(self, handover: "Handover", plan: list["Unit"], modules, key: str) -> list[float]:
        """The sparsity of each of the pruner's units (its list, in the order of its targets)."""
        name = type(handover.pruner).__name__
        target = float(handover.pruner.sparsity)
        layers = list(self._ratios)
        sizes = {layer: 0 for layer in layers}
        for unit in plan:
            if unit.layer in sizes:
                sizes[unit.layer] += sum(_rows(modules[n]) * _cols(modules[n]) for n in unit.linears)
        pruned = [layer for layer in layers if sizes[layer] > 0]
        try:
            sparsity = dict(zip(pruned, owl_sparsities(
                [self._ratios[layer] for layer in pruned], target, self.lmbda,
                sizes=[sizes[layer] for layer in pruned], names=[f"{layer} ({name})" for layer in pruned],
            )))
        except OWLError as error:
            default = "" if "lmbda" in self.model_fields_set else f" (unset, lmbda is its default, {self.lmbda})"
            raise OWLError(f"{error}. Set OWLModifier's lmbda below that bound{default}") from None
        ideal = [sparsity.get(unit.layer, target) for unit in plan]
        values = ideal
        if handover.per_row:
            active = [i for i, unit in enumerate(plan) if unit.linears]
            shapes = [[(_rows(modules[n]), _cols(modules[n])) for n in plan[i].linears] for i in active]
            rounded = per_row_sparsities(shapes, [ideal[i] for i in active], target)
            values = list(ideal)
            for i, value in zip(active, rounded):
                values[i] = value
        self._layer_sparsities[key] = sparsity
        spread = f"{min(sparsity.values()):.4f}..{max(sparsity.values()):.4f}" if sparsity else "uniform"
        logger.info(f"OWL (M={self.m}, lambda={self.lmbda}): {name} at {target} spread over "
                    f"{len(sparsity)} decoder layers, {spread}")
        for layer, value in sparsity.items():
            logger.debug(f"OWL {layer}: outlier ratio {self._ratios[layer]:.5f}, sparsity {value:.4f}")
        return values

    def on_finalize(self, state: State, **kwargs) -> bool:
        for handover in self._handovers:
            handover.restore()
        self._handovers = []
        return True


def _rows(linear: torch.nn.Linear) -> int:
    return linear.out_features  # not weight.shape: that would onload an offloaded weight


def _cols(linear: torch.nn.Linear) -> int:
    return linear.in_features


def _weight(module: torch.nn.Module) -> torch.Tensor:
    """A copy of the module's weight on its execution device (onloaded only for the copy)."""
    with align_module_device(module):
        return module.weight.detach().clone()


def _is_pruner(modifier: Modifier) -> bool:
    return isinstance(modifier, SparsityModifierBase) or (
        isinstance(modifier, DSnoTModifier) and modifier.initial is not None
    )


def _layer_of(name: str, decoder: list[str]) -> str | None:
    """The decoder layer holding module ``name`` (or being it), None if outside them all."""
    for layer in decoder:
        if name == layer or name.startswith(layer + "."):
            return layer
    return None


@dataclass
class Unit:
    """
    One entry of a pruner's sparsity list.

    :param name: what the pruner targets (a Linear layer, or a module holding several)
    :param layer: the decoder layer it lies in (None: outside them, or across several)
    :param linears: the names of the Linear layers it prunes
    """

    name: str
    layer: str | None
    linears: list[str]


class Handover:
    """
    The one place where OWL hands its layer sparsities to a pruner and takes them back:
    an llm-compressor pruner (Wanda, SparseGPT) gets a list for its ``sparsity`` (one
    value per target, in the order of its ``targets``: what llm-compressor 0.14 accepts
    where ``sparsity_profile: owl`` fails), and its own value back at finalize, so the
    saved recipe is the one written.

    :param per_row: the pruner prunes ``int(cols·s)`` weights of every row (OWL rounds
        its values per row); others round per layer or per block
    """

    per_row = False

    def __init__(self, pruner: Modifier):
        self.pruner = pruner
        self.recipe_value = pruner.sparsity

    def units(self, model: torch.nn.Module, decoder: list[str]) -> list[Unit]:
        """The pruner's units, as its own matching finds them (one per entry of its list)."""
        pruner = self.pruner
        plan = []
        for unit_name, unit in match_named_modules(model, pruner.targets):
            inner = []
            for sub, module in match_named_modules(unit, PRUNABLE_LAYER_TYPES):
                # the pruner's own test (llm-compressor 0.14 names these "unit.sub")
                if match_targets(f"{unit_name}.{sub}", module, pruner.ignore):
                    continue
                full = f"{unit_name}.{sub}" if sub else unit_name
                if not isinstance(module, torch.nn.Linear):
                    raise OWLError(
                        f"{type(pruner).__name__} would prune {full} ({type(module).__name__}), "
                        "but OWLModifier scores Linear layers only; add it to the pruner's ignore"
                    )
                inner.append(full)
            layers = {_layer_of(n, decoder) for n in inner}
            contains = [d for d in decoder if d.startswith(unit_name + ".") or not unit_name]
            if len(contains) > 1 and inner:
                raise OWLError(
                    f"{type(pruner).__name__} targets {unit_name or 'the model'}, which holds "
                    f"{len(contains)} decoder layers, so one sparsity would cover them all: "
                    "target Linear layers (targets: ['Linear']) or decoder layers "
                    "(e.g. targets: ['re:model.layers.\\\\d+$'])"
                )
            plan.append(Unit(unit_name, next(iter(layers)) if len(layers) == 1 else None, inner))
        return plan

    def give(self, plan: list[Unit], values: list[float]):
        """Hand the pruner one sparsity per unit."""
        self.pruner.sparsity = values

    def restore(self):
        """Give the pruner back the sparsity its recipe says."""
        self.pruner.sparsity = self.recipe_value


class _WandaHandover(Handover):
    per_row = True


class _StandaloneHandover(Handover):
    """Standalone DSnoT (``initial``): one unit per target Linear, given by name."""

    def __init__(self, pruner: DSnoTModifier):
        super().__init__(pruner)
        self.per_row = pruner.initial == "wanda"

    def units(self, model, decoder):
        return [Unit(name, _layer_of(name, decoder), [name])
                for name, module in match_named_modules(model, self.pruner.targets, self.pruner.ignore)
                if isinstance(module, torch.nn.Linear)]

    def give(self, plan, values):
        self.pruner.set_layer_sparsities({unit.name: v for unit, v in zip(plan, values)})

    def restore(self):
        self.pruner.set_layer_sparsities({})


def _handover(pruner: Modifier) -> Handover:
    if isinstance(pruner, DSnoTModifier):
        return _StandaloneHandover(pruner)
    if isinstance(pruner, WandaPruningModifier):
        return _WandaHandover(pruner)
    return Handover(pruner)
