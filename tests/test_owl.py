"""OWL's layer-wise sparsity: the math against a slow statement, and OWLModifier in oneshot."""

import pytest
import torch
import yaml
from pydantic import ValidationError

import reference_owl as ref
from dsnot_modifier import DSnoTModifier, OWLError, OWLModifier
from dsnot_modifier import owl
from dsnot_harness.pipeline import load_model, make_recipe
from helpers import COMMON, Spy, assert_untouched, linears, load_offloaded, load_script, run, run_expecting
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

# ------------------------------------------------------------------------- math


def _layer(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(r, c, generator=g) * (1 + 3 * (torch.rand(r, c, generator=g) > 0.97)) for r, c in shapes]
    sqnorms = [torch.rand(c, generator=g) * 4 for _, c in shapes]
    return weights, sqnorms


@pytest.mark.parametrize("m", [1.0, 3.0, 5.0, 7.5])
def test_outlier_ratio_matches_the_slow_rule(m, monkeypatch):
    weights, sqnorms = _layer(0, [(12, 16), (6, 16), (16, 40)])
    sqnorms[1][3] = 0.0  # a dead input column
    expected = ref.outlier_ratio(weights, sqnorms, m)
    assert owl.outlier_ratio(weights, sqnorms, m) == expected
    monkeypatch.setattr(owl, "_CHUNK", 37)  # scored in chunks of rows: the same count
    assert owl.outlier_ratio(weights, sqnorms, m) == expected
    assert 0 < expected < 0.5 or m == 1.0


def test_layer_sparsities_match_the_slow_rule():
    ratios = [0.012, 0.031, 0.02, 0.05, 0.013]
    for sparsity, lmbda in [(0.7, 0.08), (0.5, 0.2), (0.8, 0.0), (0.6, 0.1)]:
        got = owl.owl_sparsities(ratios, sparsity, lmbda)
        want = ref.layer_sparsities(ratios, sparsity, lmbda)
        assert got == pytest.approx(want, abs=1e-12)
        assert sum(got) / len(got) == pytest.approx(sparsity, abs=1e-12)
        assert max(got) - min(got) == pytest.approx(2 * lmbda, abs=1e-12)
        # more outliers, fewer zeros
        assert got[3] == min(got) and got[0] == max(got)
    assert owl.owl_sparsities([0.02, 0.02, 0.02], 0.7, 0.1) == [0.7, 0.7, 0.7]


def test_unequal_layer_sizes_keep_the_overall_sparsity():
    ratios, sizes = [0.01, 0.04, 0.02], [100, 300, 200]
    got = owl.owl_sparsities(ratios, 0.6, 0.1, sizes=sizes)
    assert sum(s * n for s, n in zip(got, sizes)) / sum(sizes) == pytest.approx(0.6, abs=1e-12)
    plain = ref.layer_sparsities(ratios, 0.6, 0.1)
    shifts = [g - p for g, p in zip(got, plain)]
    assert max(shifts) - min(shifts) < 1e-12  # one constant: OWL's spread unchanged


def test_lambda_bound_is_named_and_exact():
    ratios = [0.01, 0.05, 0.02]
    bound = owl.max_lambda(ratios, 0.8)
    assert owl.owl_sparsities(ratios, 0.8, bound * 0.999)
    with pytest.raises(OWLError, match=rf"below {bound:.4g} for this model") as err:
        owl.owl_sparsities(ratios, 0.8, bound * 1.001, names=["a", "b", "c"])
    assert "outside (0, 1)" in str(err.value) and "prune a at" in str(err.value)
    with pytest.raises(OWLError, match=">= 0"):
        owl.owl_offsets(ratios, -0.1)
    with pytest.raises(OWLError, match="> 0"):
        owl.outlier_ratio(*_layer(1, [(4, 4)]), 0)


def test_input_sqnorms_is_the_mean_square_over_every_token():
    torch.manual_seed(0)
    batches = [torch.randn(2, 5, 8) * 3, torch.randn(1, 7, 8), torch.randn(4, 8).to(torch.bfloat16)]
    acc = owl.InputSqnorms()
    for x in batches:
        acc.add("a", x)
    acc.add("b", batches[1])
    tokens = torch.cat([x.to(torch.float64).reshape(-1, 8) for x in batches])
    assert acc.tokens == {"a": 21, "b": 7}
    assert acc.mean("a").dtype == torch.float64
    torch.testing.assert_close(acc.mean("a"), tokens.square().mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(acc.mean("b"), batches[1].to(torch.float64).square().mean((0, 1)), rtol=1e-6, atol=0)
    assert "a" in acc and "c" not in acc
    acc.clear()
    assert "a" not in acc and acc.tokens == {}


def test_per_row_rounding_reaches_the_target():
    # the tiny Llama's shapes (two layers), each Linear a unit, OWL at 0.6 +- 0.1
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    units = [[s] for s in shapes] * 2
    ideal = [0.5] * 7 + [0.7] * 7
    values = owl.per_row_sparsities(units, ideal, 0.6)
    total = sum(r * c for r, c in shapes) * 2
    floor_only = sum(owl.per_row_zeros(u, s) for u, s in zip(units, ideal)) / total
    got = sum(owl.per_row_zeros(u, v) for u, v in zip(units, values)) / total
    assert abs(floor_only - 0.6) > 1e-3  # per-row floors alone miss the target
    assert abs(got - 0.6) <= 64 / total  # half of the largest unit step (128 rows)
    for unit, s, v in zip(units, ideal, values):
        (rows, cols), = unit
        # each Linear: OWL's value rounded per row (floor, or one zero more per row)
        assert int(cols * v) - int(cols * s) in (0, 1) if cols * s % 1 else int(cols * v) == cols * s
    # several shapes in one unit (decoder-layer targets): counts stay consistent
    values = owl.per_row_sparsities([shapes, shapes], [0.5, 0.7], 0.6)
    for v, s in zip(values, [0.5, 0.7]):
        assert all(int(c * v) - int(c * s) in (0, 1) for _, c in shapes)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs,match", [
    (dict(m=0), "must be > 0"),
    (dict(m=-2), "must be > 0"),
    (dict(lmbda=-0.01), "0 <= lmbda < 0.5"),
    (dict(lmbda=0.5), "0 <= lmbda < 0.5"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        OWLModifier(**kwargs)


@pytest.mark.parametrize("recipe,match", [
    (lambda: [OWLModifier(), WandaPruningModifier(sparsity=0.5, mask_structure="2:4", **COMMON)],
     "mask_structure '0:0'"),
    (lambda: [OWLModifier(), DSnoTModifier(initial="wanda", mask_structure="2:4")], "N:M fixes every block"),
    (lambda: [OWLModifier(), WandaPruningModifier(sparsity=0.5, sparsity_profile="owl", owl_m=5, owl_lmbda=0.08,
                                                   **COMMON)], "asks for OWL twice"),
    (lambda: [WandaPruningModifier(sparsity=0.5, **COMMON), OWLModifier()], "comes after"),
    (lambda: [OWLModifier()], "no pruner after it"),
    (lambda: [OWLModifier(), WandaPruningModifier(sparsity=[0.5] * 15, **COMMON)], "single sparsity"),
    (lambda: [OWLModifier(m=2, lmbda=0.2), WandaPruningModifier(sparsity=0.85, **COMMON), DSnoTModifier()],
     r"lambda must be below 0.15 for this model"),
    (lambda: [OWLModifier(), WandaPruningModifier(sparsity=0.5, targets=["re:model$"])], "holds 2 decoder layers"),
    (lambda: [OWLModifier(m=2), WandaPruningModifier(sparsity=0.8, **COMMON)],
     r"below 0.2 for this model.*Set OWLModifier's lmbda below that bound \(unset, lmbda is its default, 0.3\)"),
])
def test_bad_recipes_fail_before_pruning(tiny_model_dir, calib_windows, recipe, match):
    model = run_expecting(tiny_model_dir, calib_windows, recipe(), OWLError, match)
    assert_untouched(tiny_model_dir, model)


# ------------------------------------------------------------------- end to end


def _by_layer(weights: dict):
    layers = {}
    for name, w in weights.items():
        layer = ".".join(name.split(".")[:3])
        zeros, size, rows = layers.get(layer, (0, 0, 0))
        layers[layer] = (zeros + int((w == 0).sum()), size + w.numel(), rows + w.shape[0])
    return layers


@pytest.fixture(scope="module")
def expected(tiny_model_dir, calib_windows):
    """OWL's ratios and sparsities at M = 3, λ = 0.1, S = 0.6 from a plain dense forward pass."""
    model = load_model(tiny_model_dir)
    sqnorm = ref.dense_sqnorms(model, calib_windows)
    modules = dict(model.named_modules())
    ratios = {}
    for layer in ("model.layers.0", "model.layers.1"):
        names = [n for n in sqnorm if n.startswith(layer + ".")]
        ratios[layer] = ref.outlier_ratio([modules[n].weight for n in names], [sqnorm[n] for n in names], 3.0)
    sparsities = dict(zip(ratios, ref.layer_sparsities(list(ratios.values()), 0.6, 0.1)))
    return ratios, sparsities


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt", "standalone"])
def test_owl_then_dsnot(tiny_model_dir, calib_windows, dense, expected, pruner):
    ratios, sparsities = expected
    owl_mod = OWLModifier(m=3, lmbda=0.1)
    spy = Spy(pruned_only=True)
    if pruner == "standalone":
        dsnot = DSnoTModifier(initial="wanda", sparsity=0.6, **COMMON)
        recipe = [owl_mod, dsnot]
    else:
        cls = WandaPruningModifier if pruner == "wanda" else SparseGPTModifier
        prune = cls(sparsity=0.6, mask_structure="0:0", **COMMON)
        dsnot = DSnoTModifier(**COMMON)
        recipe = [owl_mod, prune, spy, dsnot]
    model = run(tiny_model_dir, calib_windows, recipe)
    out = linears(model)
    # OWL's statistics are the dense model's: equal to a plain dense forward pass
    assert owl_mod.outlier_ratios.keys() == ratios.keys()
    for layer, d in ratios.items():
        assert owl_mod.outlier_ratios[layer] == pytest.approx(d, abs=2 / 36864)
    (computed,) = owl_mod.layer_sparsities.values()
    assert computed == pytest.approx(sparsities, abs=1e-9)
    assert sparsities["model.layers.0"] != pytest.approx(sparsities["model.layers.1"], abs=0.1)
    # the overall sparsity of the pruned Linear layers is the target to 0.1%
    total = sum(w.numel() for w in out.values())
    assert sum(int((w == 0).sum()) for w in out.values()) / total == pytest.approx(0.6, abs=1e-3)
    # each decoder layer at OWL's value: per-row pruners within one zero per row of it,
    # SparseGPT (threshold per 128-column block) within one zero per block
    for layer, (zeros, size, rows) in _by_layer(out).items():
        slack = rows if pruner != "sparsegpt" else 2 * 7
        assert abs(zeros - sparsities[layer] * size) <= slack, layer
    # DSnoT refined every layer, each kept its row counts, and reports its own sparsity
    report = {layer.name: layer for layer in dsnot.report.layers}
    assert set(report) == set(out)
    for name, w in out.items():
        assert report[name].sparsity == int((w == 0).sum()) / w.numel()
        if pruner == "standalone":
            counts = (w == 0).sum(1)
            assert bool((counts == counts[0]).all()), name  # Wanda's mask: the same k every row
            assert torch.equal(w[w != 0], dense[name][w != 0])
        else:
            assert torch.equal((w == 0).sum(1), (spy.seen[name] == 0).sum(1)), name
    assert sum(layer.swaps for layer in report.values()) > 0
    assert all(layer.error_after <= layer.error_before for layer in report.values())
    # the pruner's (or DSnoT's) sparsity is the recipe's again after the run
    assert recipe[1].sparsity == 0.6
    if pruner == "standalone":
        assert dsnot._layer_sparsity == {}


def test_owl_stage_before_the_pruning_stage_is_the_same(tiny_model_dir, calib_windows, tmp_path):
    # llm-compressor 0.14 runs all the stages' modifiers in one calibration pass, in order
    stages = {
        "owl_stage": {"owl_modifiers": {"OWLModifier": {"m": 3, "lmbda": 0.1}}},
        "sparsity_stage": {"sparsity_modifiers": {
            "WandaPruningModifier": {"sparsity": 0.6, "mask_structure": "0:0", **COMMON},
            "DSnoTModifier": COMMON,
        }},
    }
    single = {"sparsity_stage": {"sparsity_modifiers": {**stages["owl_stage"]["owl_modifiers"],
                                                        **stages["sparsity_stage"]["sparsity_modifiers"]}}}
    models = []
    for spec in (stages, single):
        path = tmp_path / f"recipe{len(models)}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        models.append(linears(run(tiny_model_dir, calib_windows, str(path))))
    assert all(torch.equal(models[0][n], models[1][n]) for n in models[0])
    assert len({round(float((w == 0).float().mean()), 2) for w in models[0].values()}) > 1


@pytest.mark.parametrize("pruner", [WandaPruningModifier, SparseGPTModifier,
                                    lambda **kw: DSnoTModifier(initial="wanda", **kw)])
def test_default_lambda_for_every_pruner(tiny_model_dir, calib_windows, expected, pruner):
    """Two decoder layers: OWL puts the one with fewer outliers at S + 0.3, the other at S − 0.3."""
    ratios, _ = expected
    owl_mod = OWLModifier(m=3)
    assert owl_mod.lmbda == 0.3
    run(tiny_model_dir, calib_windows, [owl_mod, pruner(sparsity=0.6, mask_structure="0:0", **COMMON)])
    low, high = sorted(ratios, key=ratios.get)
    (computed,) = owl_mod.layer_sparsities.values()
    assert computed == pytest.approx({low: 0.9, high: 0.3}, abs=1e-9)


def test_decoder_layer_targets_and_independent_pipeline(tiny_model_dir, calib_windows, expected):
    _, sparsities = expected
    wanda = WandaPruningModifier(sparsity=0.6, targets=["re:model.layers.\\d+$"], ignore=["re:.*lm_head"])
    out = linears(run(tiny_model_dir, calib_windows, [OWLModifier(m=3, lmbda=0.1), wanda], pipeline="independent"))
    for layer, (zeros, size, rows) in _by_layer(out).items():
        assert abs(zeros - sparsities[layer] * size) <= rows, layer


def test_bench_methods_build_owl_recipes():
    for method, pruner in [("owl-wanda", WandaPruningModifier), ("owl-sparsegpt", SparseGPTModifier)]:
        for extra in ("", "+dsnot"):
            recipe = make_recipe(method + extra, "0.7", owl={"m": 7, "lmbda": 0.05}, max_cycles=3)
            assert [type(m) for m in recipe] == [OWLModifier, pruner] + ([DSnoTModifier] if extra else [])
            assert (recipe[0].m, recipe[0].lmbda) == (7, 0.05)
            assert recipe[1].sparsity == 0.7 and recipe[1].mask_structure == "0:0"
            assert recipe[1].sparsity_profile is None
            if extra:
                assert recipe[2].max_cycles == 3 and recipe[2].initial is None
    for method in ("owl-wanda", "owl-sparsegpt+dsnot"):  # unset: OWLModifier's defaults
        recipe = make_recipe(method, "0.6")
        assert (recipe[0].m, recipe[0].lmbda) == (20.0, 0.3)
    assert make_recipe("owl-sparsegpt", "0.6", owl={"lmbda": 0.25})[0].lmbda == 0.25
    with pytest.raises(ValueError, match="unstructured"):
        make_recipe("owl-wanda", "2:4")


def test_bench_owl_options_reach_the_rows(monkeypatch, capsys):
    from dsnot_harness import bench
    from dsnot_modifier.cli import main as cli_main

    assert {"owl-wanda", "owl-wanda+dsnot", "owl-sparsegpt", "owl-sparsegpt+dsnot"} <= set(bench.METHODS)
    specs = []

    def fake_row(spec):
        specs.append(spec)
        return {"method": spec["method"], "sparsity": spec["sparsity"], "ppl": {"t": 1.0},
                "time_s": {"oneshot": 0.0, "dsnot": 0.0}, "recon_error": 0.0, "peak_rss_mb": 0.0, "params": {}}

    monkeypatch.setattr(bench, "run_row", fake_row)
    monkeypatch.setattr("dsnot_harness.models.resolve_model", lambda model: "unused")
    assert cli_main(["bench", "--model", "x", "--methods", "owl-wanda+dsnot,wanda", "--sparsities", "0.7,2:4",
                     "--owl-m", "7", "--owl-lambda", "0.05", "--in-process"]) == 0
    assert [(s["method"], s["sparsity"]) for s in specs] == [("owl-wanda+dsnot", "0.7"), ("wanda", "0.7"),
                                                            ("wanda", "2:4")]
    assert all(s["owl"] == {"m": 7.0, "lmbda": 0.05} for s in specs)
    assert "skipped (OWL is unstructured only): owl-wanda+dsnot 2:4" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_offloaded_model_gets_the_same_owl_result(tiny_model_dir, calib_windows, tmp_path, where):
    def recipe():
        return [OWLModifier(m=3, lmbda=0.1), WandaPruningModifier(sparsity=0.6, **COMMON), DSnoTModifier(**COMMON)]

    in_memory = linears(run(tiny_model_dir, calib_windows, recipe()))
    steps = recipe()
    model = load_offloaded(tiny_model_dir, where, tmp_path / "offload")
    run(tiny_model_dir, calib_windows, steps, model=model)
    got = linears(model)
    assert all(torch.equal(got[n], w) for n, w in in_memory.items())
    assert len({round(float((w == 0).float().mean()), 2) for w in got.values()}) > 1


def test_lambda_bound_script_measures_what_the_modifier_uses(tiny_model_dir, calib_windows):
    """benchmarks/owl_lambda_bound.py: its ratios are OWLModifier's, its bound is where OWL refuses."""
    script = load_script("benchmarks/owl_lambda_bound.py")
    owl_mod = OWLModifier(m=3, lmbda=0.1)
    run(tiny_model_dir, calib_windows, [owl_mod, WandaPruningModifier(sparsity=0.6, mask_structure="0:0", **COMMON)])
    model = load_model(tiny_model_dir)
    ratios = script.layer_ratios(model, 3.0, script.input_sqnorms(model, calib_windows))
    assert ratios.keys() == owl_mod.outlier_ratios.keys() == {"model.layers.0", "model.layers.1"}
    for layer, d in ratios.items():
        assert d == pytest.approx(owl_mod.outlier_ratios[layer], abs=2 / 36864)
    values = list(ratios.values())
    bound = owl.max_lambda(values, 0.6)
    assert 0 < bound < 1
    owl.owl_sparsities(values, 0.6, bound * 0.999)
    with pytest.raises(OWLError, match="lambda must be below"):
        owl.owl_sparsities(values, 0.6, bound * 1.001)
