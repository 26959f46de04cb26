"""DSnoTModifier(update_weights=True) inside oneshot: after the swaps, every layer's kept
weights are re-solved on its refined mask (:mod:`dsnot_modifier.update`); the mask, the
structure and the weight dtype stay, and the layer's exact squared output error falls."""

import pytest
import torch

import dsnot_modifier.update as update_module
from dsnot_modifier import DSnoTModifier
from dsnot_modifier.swaps import gram_error
from helpers import COMMON, block_zeros, run
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

NAME = "model.layers.1.mlp.down_proj"


class Capture(Modifier):
    """The inputs of one layer in calibration."""

    inputs: list = []

    def on_initialize(self, state, **kwargs):
        self.inputs.clear()
        module = state.model.model.layers[1].mlp.down_proj
        self.register_hook(module, lambda m, a, o: self.inputs.append(a[0].detach().clone()), "forward")
        return True


def exact_gram(inputs) -> torch.Tensor:
    x = torch.cat(inputs).reshape(-1, inputs[0].shape[-1]).double()
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("pruner, structure, objective, dtype", [
    (WandaPruningModifier, "2:4", "gram", torch.float32),
    (WandaPruningModifier, "0:0", "mean", torch.bfloat16),
    (SparseGPTModifier, "0:0", "gram", torch.float32),
    (SparseGPTModifier, "2:4", "mean", torch.float32),
])
def test_update_lowers_the_exact_error_and_keeps_the_mask(tiny_model_dir, calib_windows, dense,
                                                           pruner, structure, objective, dtype):
    capture = Capture()
    dsnot = DSnoTModifier(objective=objective, update_weights=True, **COMMON)
    model = run(tiny_model_dir, calib_windows,
                [capture, pruner(sparsity=0.5 if structure == "2:4" else 0.6,
                                 mask_structure=structure, **COMMON), dsnot], dtype=dtype)
    assert dsnot.report.params["update_weights"] is True
    layers = {layer.name: layer for layer in dsnot.report.layers}
    assert len(layers) == 14
    for name, layer in layers.items():
        assert layer.update_reason is None
        assert layer.update_error_after <= layer.update_error_before
        weight = dict(model.named_modules())[name].weight.detach()
        assert weight.dtype == dtype and bool(torch.isfinite(weight).all())
        assert int((weight == 0).sum()) == layer.zeros
        if structure == "2:4":  # SparseGPT may leave more zeros in a block, never fewer
            assert bool((block_zeros(weight, 4) >= 2).all())
    # most layers gain, and the gain is real: the exact error of the written weight
    gains = [layer.update_error_after / layer.update_error_before for layer in layers.values()]
    assert sum(g < 0.99 for g in gains) >= len(gains) // 2
    h = exact_gram(capture.inputs)
    written = model.model.layers[1].mlp.down_proj.weight.detach()
    exact = float(gram_error(dense[NAME], written, h).sum())
    assert exact == pytest.approx(layers[NAME].update_error_after, rel=2e-2 if dtype == torch.bfloat16 else 1e-3)
    if objective == "gram":  # the swaps' own figure is the update's starting point
        assert layers[NAME].update_error_before == pytest.approx(layers[NAME].error_after, rel=1e-3)


def test_a_layer_the_update_cannot_solve_is_left_as_the_swaps_left_it(
        tiny_model_dir, calib_windows, monkeypatch, warnings_seen):
    """A Gram matrix without signal (dead inputs): no update, the reason in the report and
    one warning; the weights are those of DSnoT without the update, bit for bit."""
    original = update_module.update_weights
    monkeypatch.setattr(update_module, "update_weights",
                        lambda dense, current, gram: original(dense, current, torch.zeros_like(gram)))
    recipe = lambda **kw: [WandaPruningModifier(sparsity=0.5, mask_structure="2:4", **COMMON),  # noqa: E731
                           DSnoTModifier(**kw, **COMMON)]
    with_update = recipe(update_weights=True)
    model = run(tiny_model_dir, calib_windows, with_update)
    plain = run(tiny_model_dir, calib_windows, recipe())
    reasons = {layer.update_reason for layer in with_update[1].report.layers}
    assert len(reasons) == 1 and None not in reasons
    got = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for n, m in plain.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.equal(got[n], m.weight), n
    assert sum("weight update left" in w for w in warnings_seen) == 1
