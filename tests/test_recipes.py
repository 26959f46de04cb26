"""Every shipped recipe parses, runs on the tiny model, and leaves the structure it names."""

import glob
import os

import pytest
import yaml

from helpers import blocks_hold, linears, run

ALL_RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "recipes", "*.yaml")))
# the quantization recipes are run, with stricter zero-pattern checks, by test_quantization.py
RECIPES = [p for p in ALL_RECIPES if "_quant_" not in os.path.basename(p)]


def test_recipes_are_shipped():
    names = {os.path.basename(p) for p in ALL_RECIPES}
    assert {"wanda_dsnot_unstructured.yaml", "wanda_dsnot_2of4.yaml",
            "sparsegpt_dsnot_2of4.yaml", "dsnot_standalone.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_runs_and_keeps_its_structure(path, tiny_model_dir, calib_windows, tmp_path):
    with open(path) as f:
        spec = yaml.safe_load(f)
    modifiers = next(iter(next(iter(spec.values())).values()))
    assert "DSnoTModifier" in modifiers
    first = next(v for k, v in modifiers.items() if k != "OWLModifier")  # the pruner
    structure = first.get("mask_structure", "0:0")
    if "OWLModifier" in modifiers and modifiers["OWLModifier"].get("m", 0) > 3:
        # the tiny random model has (nearly) no scores above 10x or 20x its layers' mean, so at
        # the shipped M every layer would get the same sparsity: run the recipe as shipped
        # but with M = 3, where its layers' outlier shares differ. Its two decoder layers go
        # to S - λ and S + λ, so a λ of 1 - S or more (0.3 at 70%, valid for SmolLM2's 30
        # layers) would put one at 100% and be refused: λ 0.2 then
        owl = modifiers["OWLModifier"]
        owl["m"] = 3
        if owl.get("lmbda", 0) >= round(1 - first["sparsity"], 9):
            owl["lmbda"] = 0.2
        path = tmp_path / os.path.basename(path)
        path.write_text(yaml.safe_dump(spec, sort_keys=False))  # order matters
    model = run(tiny_model_dir, calib_windows, str(path))
    if "OWLModifier" in modifiers:  # per-layer sparsities (test_owl.py checks their values)
        weights = linears(model).values()
        overall = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert overall == pytest.approx(first["sparsity"], abs=1e-3)
        assert len({round(float((w == 0).float().mean()), 2) for w in weights}) > 1
        return
    for name, w in linears(model).items():
        zeros = w == 0
        if structure == "0:0":
            # Wanda (and DSnoT's own Wanda mask) prune int(cols * sparsity) of every row
            assert bool((zeros.sum(1) == int(w.shape[1] * first["sparsity"])).all()), name
        else:
            n, m = map(int, structure.split(":"))
            assert blocks_hold(w, n, m), name
