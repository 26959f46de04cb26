"""DSnoTModifier inside llm-compressor's oneshot, on a tiny Llama built from a config."""

import pytest
import torch
from pydantic import ValidationError

import dsnot_modifier
from dsnot_modifier import DSnoTConfigError, DSnoTModifier
from dsnot_harness.pipeline import load_model
from dsnot_modifier.stats import NonFiniteStatisticsError
from dsnot_modifier.swaps import gram_error
from helpers import COMMON, Spy, assert_untouched, blocks_hold, linears, run, run_expecting
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier


@pytest.mark.parametrize("structure", ["0:0", "2:4", "4:8"])
@pytest.mark.parametrize("objective", ["gram", "mean"])
def test_refines_wanda_masks_keeping_zeros_and_values(tiny_model_dir, calib_windows, dense, objective, structure):
    spy = Spy(pruned_only=True)
    dsnot = DSnoTModifier(objective=objective, **COMMON)
    wanda = WandaPruningModifier(sparsity=0.5, mask_structure=structure, **COMMON)
    model = run(tiny_model_dir, calib_windows, [wanda, spy, dsnot])
    out = linears(model)
    assert set(spy.seen) == set(out) and len(out) == 14
    assert len(dsnot.report.layers) == 14
    changed = 0
    for name, w in out.items():
        pruned = spy.seen[name]
        # every row keeps Wanda's number of zeros; N:M blocks keep N
        assert torch.equal((w == 0).sum(1), (pruned == 0).sum(1)), name
        if structure != "0:0":
            n, m = map(int, structure.split(":"))
            assert blocks_hold(w, n, m), name
        # Wanda keeps dense values, DSnoT regrows dense values: every non-zero is dense
        assert torch.equal(w[w != 0], dense[name][w != 0]), name
        changed += int((w != pruned).any())
    assert changed == 14
    for layer in dsnot.report.layers:
        assert layer.error_after < layer.error_before
        assert layer.structure == ("unstructured" if structure == "0:0" else structure)


def test_refines_sparsegpt_keeping_its_updated_values(tiny_model_dir, calib_windows, dense):
    spy = Spy(pruned_only=True)
    dsnot = DSnoTModifier(**COMMON)
    sgpt = SparseGPTModifier(sparsity=0.5, mask_structure="2:4", **COMMON)
    model = run(tiny_model_dir, calib_windows, [sgpt, spy, dsnot])
    grown_total = 0
    for name, w in linears(model).items():
        pruned = spy.seen[name]
        kept = (w != 0) & (pruned != 0)
        grown = (w != 0) & (pruned == 0)
        assert torch.equal(w[kept], pruned[kept]), name  # SparseGPT's updated values
        assert torch.equal(w[grown], dense[name][grown]), name  # regrown: dense values
        assert blocks_hold(w, 2, 4), name
        grown_total += int(grown.sum())
    assert grown_total > 0
    assert all(layer.error_after < layer.error_before for layer in dsnot.report.layers)


@pytest.mark.parametrize("gram_dtype, rel", [("float32", 1e-3), ("bfloat16", 2e-2)])
def test_gram_error_recomputed_is_lower(tiny_model_dir, calib_windows, dense, gram_dtype, rel):
    """The report's figures are those of the layer: recompute L with captured inputs
    (float64 Gram); with bfloat16 Gram products, the figures are within their rounding
    and the exact error still goes down."""
    captured = {}

    class Capture(Modifier):
        def on_initialize(self, state, **kwargs):
            module = state.model.model.layers[1].mlp.down_proj
            self.register_hook(module, lambda m, a, o: captured.setdefault("x", []).append(a[0].detach().clone()), "forward")
            return True

    spy = Spy(pruned_only=True)
    dsnot = DSnoTModifier(gram_dtype=gram_dtype, **COMMON)
    model = run(tiny_model_dir, calib_windows,
                [Capture(), WandaPruningModifier(sparsity=0.6, mask_structure="0:0", **COMMON), spy, dsnot])
    x = torch.cat(captured["x"]).reshape(-1, 128).double()
    h = x.T @ x / x.shape[0]
    name = "model.layers.1.mlp.down_proj"
    before = gram_error(dense[name], spy.seen[name], h).sum()
    after = gram_error(dense[name], model.model.layers[1].mlp.down_proj.weight.detach(), h).sum()
    layer = next(r for r in dsnot.report.layers if r.name == name)
    assert after < before
    assert layer.error_before == pytest.approx(float(before), rel=rel)
    assert layer.error_after == pytest.approx(float(after), rel=rel)
    assert dsnot.report.params["gram_dtype"] == gram_dtype


def test_yaml_recipe_finds_the_modifier_by_name(tiny_model_dir, calib_windows):
    recipe = """
sparsity_stage:
  sparsity_modifiers:
    WandaPruningModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      targets: ["Linear"]
      ignore: ["re:.*lm_head"]
    DSnoTModifier:
      objective: gram
      max_cycles: 20
"""
    model = run(tiny_model_dir, calib_windows, recipe)
    for name, w in linears(model).items():
        assert blocks_hold(w, 2, 4), name


def test_standalone_initial_masks(tiny_model_dir, calib_windows):
    model = run(tiny_model_dir, calib_windows,
                [DSnoTModifier(initial="wanda", mask_structure="2:4", **COMMON)])
    for name, w in linears(model).items():
        assert blocks_hold(w, 2, 4), name
    dsnot = DSnoTModifier(initial="wanda", sparsity=0.6, objective="mean", **COMMON)
    model = run(tiny_model_dir, calib_windows, [dsnot])
    for name, w in linears(model).items():
        assert bool(((w == 0).sum(1) == int(w.shape[1] * 0.6)).all()), name
    assert sum(layer.swaps for layer in dsnot.report.layers) > 0
    model = run(tiny_model_dir, calib_windows,
                [DSnoTModifier(initial="magnitude", sparsity=0.5, **COMMON)])
    ws = linears(model)
    assert sum(int((w == 0).sum()) for w in ws.values()) == sum(int(w.numel() * 0.5) for w in ws.values())


def test_attention_only_targets_leave_mlp_as_wanda_left_it(tiny_model_dir, calib_windows):
    spy = Spy(pruned_only=True)
    dsnot = DSnoTModifier(targets=["re:.*self_attn.*"], ignore=[])
    model = run(tiny_model_dir, calib_windows,
                [WandaPruningModifier(sparsity=0.5, mask_structure="0:0", **COMMON), spy, dsnot])
    assert {layer.name.split(".")[-1] for layer in dsnot.report.layers} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    for name, w in linears(model).items():
        if ".mlp." in name:
            assert torch.equal(w, spy.seen[name]), name


def test_same_input_layers_share_statistics(tiny_model_dir, calib_windows):
    dsnot = DSnoTModifier(**COMMON)
    shared = {}
    original = DSnoTModifier.on_sequential_epoch_end

    def spy(self, state, event, **kwargs):
        for module, layer in self._layers.items():
            shared.setdefault(id(layer.stats), []).append(self._names[module].split(".")[-1])
        return original(self, state, event, **kwargs)

    DSnoTModifier.on_sequential_epoch_end = spy
    try:
        run(tiny_model_dir, calib_windows, [WandaPruningModifier(sparsity=0.5, **COMMON), dsnot])
    finally:
        DSnoTModifier.on_sequential_epoch_end = original
    groups = sorted(tuple(v) for v in shared.values())
    assert ("q_proj", "k_proj", "v_proj") in groups and ("gate_proj", "up_proj") in groups
    assert ("o_proj",) in groups and ("down_proj",) in groups


def test_deterministic(tiny_model_dir, calib_windows):
    recipe = lambda: [WandaPruningModifier(sparsity=0.6, **COMMON), DSnoTModifier(**COMMON)]  # noqa: E731
    first = linears(run(tiny_model_dir, calib_windows, recipe()))
    second = linears(run(tiny_model_dir, calib_windows, recipe()))
    assert all(torch.equal(first[n], second[n]) for n in first)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    (dict(initial="wanda", sparsity=1.0), "strictly between 0 and 1"),
    (dict(initial="wanda", sparsity=0.0), "strictly between 0 and 1"),
    (dict(initial="wanda", sparsity=-0.5), "strictly between 0 and 1"),
    (dict(mask_structure="2-4"), "form 'N:M'"),
    (dict(mask_structure="4:4"), "impossible"),
    (dict(sparsity=0.5), "only used with `initial`"),
    (dict(initial="wanda"), "needs a sparsity"),
    (dict(initial="wanda", sparsity=0.6, mask_structure="2:4"), "contradicts"),
    (dict(objective="best"), "objective"),
    (dict(max_cycles=-1), "max_cycles"),
    (dict(objective="mean", gram_dtype="bfloat16"), r"objective: gram \(or update_weights\) only"),
    (dict(gram_dtype="float16"), "gram_dtype"),
])
def test_bad_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        DSnoTModifier(**kwargs)


def test_default_independent_pipeline_is_refused_before_pruning(tiny_model_dir, calib_windows):
    model = run_expecting(tiny_model_dir, calib_windows,
                          [WandaPruningModifier(sparsity=0.5, **COMMON), DSnoTModifier(**COMMON)],
                          DSnoTConfigError, "pipeline='sequential'", pipeline="independent")
    assert_untouched(tiny_model_dir, model)


@pytest.mark.parametrize("recipe,match", [
    (lambda: [DSnoTModifier(**COMMON)], "no pruner comes before it"),
    (lambda: [DSnoTModifier(**COMMON), WandaPruningModifier(sparsity=0.5, **COMMON)], "comes before"),
    (lambda: [WandaPruningModifier(sparsity=0.5, **COMMON), DSnoTModifier(initial="wanda", sparsity=0.5)], "prunes by itself"),
    (lambda: [WandaPruningModifier(sparsity=0.5, **COMMON), DSnoTModifier(mask_structure="2:4")], "make them agree"),
    (lambda: [WandaPruningModifier(sparsity=0.5, **COMMON), DSnoTModifier(targets=["re:.*nothing.*"])], "match no"),
])
def test_bad_recipes_fail_before_touching_the_model(tiny_model_dir, calib_windows, recipe, match):
    model = run_expecting(tiny_model_dir, calib_windows, recipe(), DSnoTConfigError, match)
    assert_untouched(tiny_model_dir, model)


def test_structure_contradicting_the_zeros(tiny_model_dir, calib_windows):
    # zeros that do not match what the recipe declares: a hand-made 2:4 pruner
    class TwoFour(Modifier):
        def on_initialize(self, state, **kwargs):
            return True

        def on_sequential_epoch_end(self, state, event, modules=(), **kwargs):
            for m in modules:  # the subgraph just calibrated
                if isinstance(m, torch.nn.Linear) and m.out_features != 96:
                    w = m.weight.data
                    idx = w.abs().reshape(w.shape[0], -1, 4).argsort(-1)[..., :2]
                    w.view(w.shape[0], -1, 4).scatter_(-1, idx, 0.0)

    # Wanda (declared unstructured) prunes nothing here; the 2:4 zeros come from TwoFour,
    # which is no pruner: DSnoT refines only the layers a pruner of the recipe prunes
    wanda = WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=["re:.*nothing.*"])
    run_expecting(tiny_model_dir, calib_windows, [wanda, TwoFour(), DSnoTModifier(mask_structure="0:0", **COMMON)],
                  DSnoTConfigError, "refined no layer")


def test_layers_no_pruner_targets_hold_nothing(tiny_model_dir, calib_windows, dense, monkeypatch):
    # Wanda prunes the attention only: DSnoT keeps no dense copy and no statistics of the
    # MLP layers, leaves them dense, and lists them in the report
    import dsnot_modifier.modifier as modifier_module

    snapshotted = []
    snapshot = modifier_module.snapshot_weight

    def spy(module, *args, **kwargs):
        snapshotted.append(module)
        return snapshot(module, *args, **kwargs)

    monkeypatch.setattr(modifier_module, "snapshot_weight", spy)
    dsnot = DSnoTModifier(**COMMON)
    wanda = WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=["re:.*self_attn.*"])
    model = run(tiny_model_dir, calib_windows, [wanda, dsnot])
    names = {m: n for n, m in model.named_modules()}
    assert snapshotted and all("self_attn" in names[m] for m in snapshotted)
    mlp = sorted(n for n in dense if ".mlp." in n)
    skipped = {s.name: s for s in dsnot.report.skipped}
    assert sorted(skipped) == mlp and all(s.reason == "not pruned" for s in skipped.values())
    after = linears(model)
    assert all(torch.equal(after[n], dense[n]) for n in mlp)
    assert sorted(layer.name for layer in dsnot.report.layers) == sorted(n for n in dense if "self_attn" in n)


def test_non_finite_activations(tiny_model_dir, calib_windows):
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[calib_windows[0, 0]] = float("nan")
    with pytest.raises(NonFiniteStatisticsError, match=r"model\.layers\.0\..* NaN or inf"):
        run(tiny_model_dir, calib_windows, [WandaPruningModifier(sparsity=0.5, **COMMON), DSnoTModifier(**COMMON)],
            model=model)
    # checked once per layer at the end of the first decoder layer's epoch (no host sync
    # per batch): the error stops calibration there, nothing past that layer is pruned
    zeroed = {n for n, w in linears(model).items() if bool((w == 0).any())}
    assert zeroed and all(n.startswith("model.layers.0.") for n in zeroed)


def test_package_registers_the_modifier():
    from llmcompressor.modifiers.factory import ModifierFactory

    assert ModifierFactory._registered_registry["DSnoTModifier"] is dsnot_modifier.DSnoTModifier
