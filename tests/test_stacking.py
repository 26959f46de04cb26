"""issue 15: layers that share their inputs' statistics (q/k/v, gate/up, every expert's
gate/up under all-expert calibration) are refined stacked, in fewer calls of
``refine_mask``, with exactly the weights and reports of refining them one by one."""

import dataclasses

import pytest
import torch

import dsnot_modifier.modifier as modifier_module
import dsnot_modifier.stacking as stacking
import dsnot_modifier.swaps as swaps
from dsnot_modifier import DSnoTModifier
from helpers import COMMON, build, linears, random_windows, run_built
from llmcompressor.modifiers.pruning import WandaPruningModifier

#: the default bound (the tests patch it)
DEFAULT_LIMIT = stacking.STACK_ELEMENTS
#: 4 experts of [32, 64] gate/up each (2048 weights): at most 3 layers a call
SMALL_LIMIT = 3 * 2048


class Calls:
    """Counts the modifier's calls of ``refine_mask``: the rows of each and its segments."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = swaps.refine_mask

        def counted(dense, current, **kwargs):
            self.calls.append((dense.numel(), kwargs.get("segments")))
            return original(dense, current, **kwargs)

        monkeypatch.setattr(modifier_module, "refine_mask", counted)


def run_with_limit(arch, dsnot_kwargs, structure, dtype, limit, monkeypatch, directory, sparsities=None):
    """Prune ``arch`` (Wanda, or DSnoT's own initial mask) and refine with stacks of at
    most ``limit`` weights (0: every layer alone); the weights, reports, skipped layers
    and ``refine_mask`` calls. The model's config goes to ``directory``."""
    monkeypatch.setattr(stacking, "STACK_ELEMENTS", limit)
    calls = Calls(monkeypatch)
    model = build(arch).to(dtype)
    dsnot = DSnoTModifier(**dsnot_kwargs, **COMMON)
    recipe = [dsnot]
    if "initial" not in dsnot_kwargs:
        recipe.insert(0, WandaPruningModifier(sparsity=0.5, mask_structure=structure, **COMMON))
    elif sparsities:
        dsnot.set_layer_sparsities(sparsities)
    run_built(model, random_windows(2, 64), recipe, directory, moe_calibrate_all_experts=True)
    reports = [{k: v for k, v in dataclasses.asdict(r).items() if k not in ("seconds", "update_seconds")}
               for r in dsnot.report.layers]
    return linears(model), reports, dsnot.report.skipped, calls.calls


CASES = [
    ("llama", dict(objective="gram"), "0:0", torch.float32),
    ("llama", dict(objective="mean"), "2:4", torch.bfloat16),
    ("llama", dict(objective="gram", chunk_rows=40), "2:4", torch.float16),
    ("llama", dict(objective="mean", initial="wanda", sparsity=0.5), None, torch.float32),
    # ("qwen3_moe", gram, "0:0", float32): test_stacks_are_bounded
    ("qwen3_moe", dict(objective="mean"), "0:0", torch.bfloat16),
    ("qwen3_moe", dict(objective="gram"), "2:4", torch.bfloat16),
    # the weight update after stacked swaps: each layer updated on its own mask
    ("qwen3_moe", dict(objective="mean", update_weights=True), "2:4", torch.float32),
]


@pytest.mark.parametrize("arch, dsnot_kwargs, structure, dtype", CASES)
def test_stacked_equals_layer_by_layer(arch, dsnot_kwargs, structure, dtype, monkeypatch, tmp_path):
    # standalone: q and k of the first layer with sparsities of their own (one stack)
    sparsities = {"model.layers.0.self_attn.q_proj": 0.3, "model.layers.0.self_attn.k_proj": 0.7}
    alone = run_with_limit(arch, dsnot_kwargs, structure, dtype, 0, monkeypatch, tmp_path, sparsities)
    stacked = run_with_limit(arch, dsnot_kwargs, structure, dtype, DEFAULT_LIMIT, monkeypatch, tmp_path, sparsities)
    weights, reports, skipped, calls = stacked
    assert set(weights) == set(alone[0])
    for name, w in weights.items():
        assert w.dtype == dtype and torch.equal(w, alone[0][name]), name
    assert reports == alone[1] and skipped == alone[2]
    assert len(reports) >= 14 and sum(r["swaps"] for r in reports) > 0
    if "initial" in dsnot_kwargs:
        by_name = {r["name"]: r for r in reports}
        assert by_name["model.layers.0.self_attn.q_proj"]["sparsity"] == pytest.approx(0.3, abs=0.02)
        assert by_name["model.layers.0.self_attn.k_proj"]["sparsity"] == pytest.approx(0.7, abs=0.02)
    # one call a layer alone; stacked: q/k/v in one call, gate/up (of every expert) in one
    assert len(alone[3]) == len(reports) and all(s is None for _, s in alone[3])
    stacks = [s for _, s in calls if s is not None]
    per_layer = 2  # decoder layers
    if arch == "llama":
        assert len(calls) == len(reports) - 3 * per_layer  # 7 layers in 4 calls
        assert sorted(len(s) for s in stacks) == [2, 2, 3, 3]
    else:
        # every expert's gate and up (4 experts) in one call: 16 layers in 7 calls
        assert len(calls) == len(reports) - 9 * per_layer
        assert sorted(len(s) for s in stacks) == [3, 3, 8, 8]


def test_stacks_are_bounded(monkeypatch, tmp_path):
    """At most STACK_ELEMENTS weights a call: the 4 experts' gate/up in several calls, same result."""
    args = ("qwen3_moe", dict(objective="gram"), "0:0", torch.float32)
    alone = run_with_limit(*args, 0, monkeypatch, tmp_path)
    weights, reports, _, calls = run_with_limit(*args, SMALL_LIMIT, monkeypatch, tmp_path)
    assert all(torch.equal(w, alone[0][n]) for n, w in weights.items())
    assert reports == alone[1]
    assert all(numel <= SMALL_LIMIT for numel, s in calls if s is not None)
    assert len([s for _, s in calls if s is not None and len(s) == 3]) >= 2
    assert len(alone[3]) > len(calls) > len(run_with_limit(*args, DEFAULT_LIMIT, monkeypatch, tmp_path)[3])
