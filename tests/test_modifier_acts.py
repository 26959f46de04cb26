"""
DSnoTModifier in oneshot, checked from outside: what reached ``refine_mask`` (every
parameter of the modifier, the statistics of the layer's real inputs), what came out
(the reference's result on the same inputs), and what DSnoT did to each layer (the
weights changed where and as much as its report says, at most ``max_cycles`` swaps a
row, the pruner's kept values untouched, regrown values dense, each layer's error
recomputed from its hooked calibration inputs). Half-precision models go through the
whole recipe.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dsnot_modifier import DSnoTModifier
from dsnot_modifier import modifier as modifier_module
from dsnot_harness.pipeline import load_model
from dsnot_modifier.swaps import gram_error, mean_error
from helpers import COMMON, blocks_hold, linears, run
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from reference import refine_reference
from test_reference_float32 import assert_matches_reference


#: what InputCapture saw in the last run: layer name -> inputs, and -> weight as pruned
INPUTS: dict[str, list[torch.Tensor]] = {}
PRUNED: dict[str, torch.Tensor] = {}


class InputCapture(Modifier):
    """Hooks every target layer and keeps its calibration inputs (in ``INPUTS``; the
    hooks are off while the pipeline propagates, as DSnoT's are)."""

    def on_initialize(self, state, **kwargs):
        INPUTS.clear()
        for name, module in state.model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                self.register_hook(module, functools.partial(self._record, name), "forward")
        return True

    def _record(self, name, module, args, output):
        INPUTS.setdefault(name, []).append(args[0].detach().clone())


class AfterPruner(Modifier):
    """Between the pruner and DSnoT: keeps each layer's weight as the pruner left it
    (in ``PRUNED``) at the epoch's end (modifiers act there in recipe order)."""

    def on_initialize(self, state, **kwargs):
        PRUNED.clear()
        self._model = state.model
        return True

    def on_sequential_epoch_end(self, state, event, **kwargs):
        for name, module in self._model.named_modules():
            if name in INPUTS and name not in PRUNED:
                PRUNED[name] = module.weight.detach().clone()


def tokens(name) -> torch.Tensor:
    """The layer's captured inputs, ``[tokens, C]``, float64."""
    x = torch.cat(INPUTS[name])
    return x.reshape(-1, x.shape[-1]).double()


def sequences(name) -> torch.Tensor:
    """The layer's captured inputs, ``[sequences, seq, C]``, float64."""
    x = torch.cat(INPUTS[name])
    return x.reshape(-1, x.shape[-2], x.shape[-1]).double()


class RefineRecorder:
    """Wraps the modifier's ``refine_mask``: keeps every layer's inputs (unchanged), a
    stacked call's (``segments``) split into its layers."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = modifier_module.refine_mask

        def recorded(dense, current, **kwargs):
            result = original(dense, current, **kwargs)
            sizes = kwargs.pop("segments", None) or [dense.shape[0]]
            kept = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            for d, c, part in zip(dense.split(sizes), current.split(sizes), result.segments or [result]):
                self.calls.append(dict(dense=d.clone(), current=c.clone(), kwargs=kept, swaps=part.swaps))
            return result

        monkeypatch.setattr(modifier_module, "refine_mask", recorded)


def by_layer(recorder, dsnot):
    """The recorded calls by layer name (the report lists the layers in call order)."""
    assert len(recorder.calls) == len(dsnot.report.layers) == 14
    return {layer.name: call for layer, call in zip(dsnot.report.layers, recorder.calls)}


def stats64(call, names):
    return {k: call["kwargs"][k].double() for k in names}


# ------------------------------------------------------- every parameter reaches the rule

MEAN_PARAMS = dict(objective="mean", variance="global", var_power=2.0, sign_check=True,
                   threshold=1e-3, max_cycles=3, chunk_rows=5)


def test_every_mean_parameter_reaches_the_rule(tiny_model_dir, calib_windows, monkeypatch):
    recorder = RefineRecorder(monkeypatch)
    dsnot = DSnoTModifier(**MEAN_PARAMS, **COMMON)
    model = run(tiny_model_dir, calib_windows,
                [InputCapture(), WandaPruningModifier(sparsity=0.6, mask_structure="0:0", **COMMON), AfterPruner(), dsnot])
    calls, final = by_layer(recorder, dsnot), linears(model)
    rule = dict(max_cycles=3, threshold=1e-3, var_power=2.0, sign_check=True)
    differs_from = {name: 0 for name in ("max_cycles", "threshold", "var_power", "sign_check", "variance")}
    for name, call in calls.items():
        kwargs = call["kwargs"]
        assert {k: kwargs[k] for k in rule} == rule and kwargs["chunk_rows"] == 5
        assert kwargs["objective"] == "mean" and kwargs["nm"] is None
        # the statistics are those of the layer's inputs; the variance is the global one
        x = tokens(name)
        torch.testing.assert_close(kwargs["mean"].double(), x.mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(kwargs["var"].double(), x.var(0, correction=0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(kwargs["sqnorm"].double(), (x * x).mean(0), rtol=1e-4, atol=1e-6)
        # refine_mask got the dense weight and the pruner's, and wrote what it returned
        assert torch.equal(call["current"], PRUNED[name])
        stats = stats64(call, ("mean", "var", "sqnorm"))
        assert_matches_reference("mean", call["dense"], call["current"], stats, final[name], **rule)
        # every parameter matters: the reference with it at its default gives other weights
        per_sequence = sequences(name).var(1, correction=0).mean(0)
        for param, default in (("max_cycles", 50), ("threshold", DSnoTModifier().threshold),
                               ("var_power", 1.0), ("sign_check", False), ("variance", None)):
            other = dict(rule, **{param: default}) if param != "variance" else rule
            s = dict(stats, var=per_sequence) if param == "variance" else stats
            ref = refine_reference(call["dense"].double(), call["current"].double(), "mean", None, **s, **other)
            differs_from[param] += int(not torch.equal(ref, final[name].double()))
    assert all(differs_from.values()), differs_from


def test_gram_parameters_and_statistics_reach_the_rule(tiny_model_dir, calib_windows, monkeypatch):
    recorder = RefineRecorder(monkeypatch)
    dsnot = DSnoTModifier(objective="gram", max_cycles=3, chunk_rows=7, mask_structure="2:4", **COMMON)
    model = run(tiny_model_dir, calib_windows,
                [InputCapture(), WandaPruningModifier(sparsity=0.5, mask_structure="2:4", **COMMON), AfterPruner(), dsnot])
    calls, final = by_layer(recorder, dsnot), linears(model)
    capped = 0
    for name, call in calls.items():
        kwargs = call["kwargs"]
        assert kwargs["max_cycles"] == 3 and kwargs["chunk_rows"] == 7 and kwargs["nm"] == (2, 4)
        x = tokens(name)
        torch.testing.assert_close(kwargs["gram"].double(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
        gram = stats64(call, ("gram",))
        assert_matches_reference("gram", call["dense"], call["current"], gram, final[name], (2, 4),
                                 max_cycles=3)
        free = refine_reference(call["dense"].double(), call["current"].double(), "gram", (2, 4), **gram,
                                max_cycles=6)
        capped += int(not torch.equal(free, final[name].double()))
    assert capped > 0  # the cycle cap changed some layer's result


# ------------------------------------------------------------------ DSnoT acted

def check_acted(dense, final, dsnot, max_cycles, objective, nm=None):
    """Per layer: what changed, how much, which values; the error from hooked inputs."""
    reports = {layer.name: layer for layer in dsnot.report.layers}
    assert set(reports) == set(final) and len(final) == 14
    at_cap = 0
    for name, w in final.items():
        pruned, layer = PRUNED[name], reports[name]
        grown = (w != 0) & (pruned == 0)
        removed = (w == 0) & (pruned != 0)
        kept = (w != 0) & (pruned != 0)
        # the weights changed exactly where the report says: one grow and one prune a swap
        assert int((w != pruned).sum()) == 2 * layer.swaps > 0, name
        assert int(grown.sum()) == int(removed.sum()) == layer.swaps, name
        assert int((w != pruned).any(1).sum()) == layer.rows_changed, name
        per_row = grown.sum(1)
        assert torch.equal(per_row, removed.sum(1)), name
        assert int(per_row.max()) <= max_cycles, name
        at_cap += int((per_row == max_cycles).sum())
        if nm is not None:
            n, m = nm
            assert blocks_hold(w, n, m), name
        # the pruner's kept values untouched (SparseGPT's updated ones), regrown ones dense
        assert torch.equal(w[kept], pruned[kept]), name
        assert torch.equal(w[grown], dense[name][grown]), name
        # the error, recomputed in float64 from the layer's hooked calibration inputs
        x = tokens(name)
        if objective == "gram":
            h = x.T @ x / x.shape[0]
            before, after = gram_error(dense[name], pruned, h), gram_error(dense[name], w, h)
            assert bool((after <= before * (1 + 1e-5)).all()), name
        else:
            mu = x.mean(0)
            before, after = mean_error(dense[name], pruned, mu).abs(), mean_error(dense[name], w, mu).abs()
            assert bool((after <= before + 1e-6).all()), name
        assert float(after.sum()) < float(before.sum()), name
        assert layer.error_before == pytest.approx(float(before.sum()), rel=1e-3), name
        assert layer.error_after == pytest.approx(float(after.sum()), rel=1e-3), name
    assert at_cap > 0  # the cap was reached, so the bound was tested


@pytest.mark.parametrize("objective", ["gram", "mean"])
def test_dsnot_acts_on_sparsegpt_as_its_report_says(tiny_model_dir, calib_windows, dense, objective):
    dsnot = DSnoTModifier(objective=objective, max_cycles=4, threshold=0.0, **COMMON)
    model = run(tiny_model_dir, calib_windows,
                [InputCapture(), SparseGPTModifier(sparsity=0.6, mask_structure="0:0", **COMMON), AfterPruner(), dsnot])
    final = linears(model)
    # SparseGPT moved the kept values: equal-to-dense would not show that they are kept
    moved = sum(int(((p != 0) & (p != dense[n])).sum()) for n, p in PRUNED.items())
    assert moved > 0.9 * sum(int((p != 0).sum()) for p in PRUNED.values())
    check_acted(dense, final, dsnot, 4, objective)


# --------------------------------------------------------- half-precision models

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_through_the_recipe(tiny_model_dir, calib_windows, monkeypatch, dtype):
    recorder = RefineRecorder(monkeypatch)
    dsnot = DSnoTModifier(max_cycles=2, **COMMON)
    model = run(tiny_model_dir, calib_windows,
                [InputCapture(), WandaPruningModifier(sparsity=0.5, mask_structure="2:4", **COMMON), AfterPruner(), dsnot],
                dtype=dtype)
    final = linears(model)
    assert all(w.dtype == dtype for w in final.values())
    dense = {n: w.to(dtype) for n, w in linears(load_model(tiny_model_dir)).items()}
    check_acted(dense, final, dsnot, 2, "gram", (2, 4))
    for name, call in by_layer(recorder, dsnot).items():
        assert call["dense"].dtype == call["current"].dtype == dtype
        assert_matches_reference("gram", call["dense"].float(), call["current"].float(),
                                 stats64(call, ("gram",)), final[name].float(), (2, 4), max_cycles=2)
