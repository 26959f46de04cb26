"""
DSnoT chained with quantization: the shipped *_quant_*.yaml recipes end to end on the
tiny Llama. After QuantizationModifier the weights the model computes with (fake-quantized,
i.e. dequantized) keep every zero DSnoT left, and N:M blocks stay N:M; GPTQ after
DSnoT (which does not keep zeros) is refused before the model is touched.
"""

import glob
import os

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.pruning import WandaPruningModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.recipe import Recipe
from loguru import logger

from dsnot_modifier import DSnoTConfigError, DSnoTModifier
from helpers import COMMON, Spy, assert_untouched, block_zeros, run, run_expecting, save_tiny_llama

RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "recipes", "*quant*.yaml")))


def dequantized(model) -> dict:
    """name -> (weight the model computes with (fake-quantized), the module) for quantized Linears."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
            assert getattr(m, "quantization_scheme", None) is not None, f"{name} was not quantized"
            with torch.no_grad():
                out[name] = (forward_quantize(m, m.weight.detach(), "weight", m.quantization_scheme.weights), m)
    return out


def rounds_to_zero(weight: torch.Tensor, module) -> torch.Tensor:
    """
    Where a weight, divided by its scale, becomes 0 on the scheme's grid: an integer
    grid rounds |w / scale| <= 1/2 to 0; FP8 (e4m3) only what underflows it.
    """
    scale = module.weight_scale.detach().float()
    if scale.shape[1] not in (1, weight.shape[1]):  # one scale per group of columns
        scale = scale.repeat_interleave(weight.shape[1] // scale.shape[1], dim=1)
    q = weight.float() / scale
    if module.quantization_scheme.weights.type == "float":
        return q.to(torch.float8_e4m3fn).float() == 0
    return torch.round(q) == 0


def quant_type(quant: QuantizationModifier) -> str:
    """``int`` or ``float``: the weights' number type of the recipe's single scheme."""
    (scheme,) = quant.resolve_quantization_config().config_groups.values()
    return scheme.weights.type


def with_spy_after_dsnot(path):
    """The recipe's own modifiers, with a Spy between DSnoT and the quantizer."""
    modifiers = list(Recipe.create_instance(path).modifiers)
    names = [type(m).__name__ for m in modifiers]
    assert names[-2:] == ["DSnoTModifier", "QuantizationModifier"], names
    spy = Spy(pruned_only=True)
    return modifiers[:-1] + [spy] + modifiers[-1:], spy, modifiers


def test_quant_recipes_are_shipped():
    names = {os.path.basename(p) for p in RECIPES}
    assert names >= {
        "wanda_dsnot_2of4_quant_fp8.yaml", "sparsegpt_dsnot_2of4_quant_fp8.yaml",
        "wanda_dsnot_2of4_quant_w8a8.yaml", "sparsegpt_dsnot_2of4_quant_w8a8.yaml",
        "wanda_dsnot_unstructured_quant_w4a16.yaml",
    }


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_quant_recipe_keeps_dsnot_zeros(path, tiny_model_dir, calib_windows):
    recipe, spy, modifiers = with_spy_after_dsnot(path)
    pruner, dsnot, quant = modifiers[0], modifiers[-2], modifiers[-1]
    model = run(tiny_model_dir, calib_windows, recipe)
    weights = dequantized(model)
    assert set(weights) == set(spy.seen) and len(weights) == 14
    assert all(layer.error_after < layer.error_before for layer in dsnot.report.layers)
    structure = pruner.mask_structure
    extra_total = kept_total = 0
    for name, (fq, module) in weights.items():
        left = spy.seen[name]  # what DSnoT left
        # the quantizer keeps the float weight and only attaches scales
        assert torch.equal(module.weight.detach(), left), name
        # every zero DSnoT left is a zero of the dequantized weight
        assert bool((fq[left == 0] == 0).all()), name
        # new zeros only where rounding gives 0 (a kept weight under half a step)
        extra = (fq == 0) & (left != 0)
        assert torch.equal(extra, (left != 0) & rounds_to_zero(left, module)), name
        extra_total += int(extra.sum())
        kept_total += int((left != 0).sum())
        if structure != "0:0":
            n, m = map(int, structure.split(":"))
            assert bool((block_zeros(fq, m) >= n).all()), name
    print(f"{os.path.basename(path)}: {extra_total} of {kept_total} kept weights round to zero")
    if quant_type(quant) == "float":
        # FP8 e4m3 spans ~2^17 below a row's largest weight: nothing rounds to zero here,
        # so the dequantized zeros are exactly DSnoT's
        assert extra_total == 0
    else:
        # integer steps are coarser: a few small kept weights round to zero, never many
        assert extra_total < 0.01 * kept_total


def test_w4a16_preset_group_128_on_a_wider_model(tmp_path_factory, calib_windows):
    """The stock W4A16 preset (group 128) needs widths that are multiples of 128."""
    # the tokenizer of tiny_model_dir: the calibration windows use its token ids
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-128"), hidden_size=128,
                           intermediate_size=256, num_hidden_layers=1)
    spy = Spy(pruned_only=True)
    model = run(path, calib_windows, [
        WandaPruningModifier(sparsity=0.5, mask_structure="0:0", **COMMON), DSnoTModifier(**COMMON),
        spy, QuantizationModifier(scheme="W4A16", **COMMON),
    ])
    weights = dequantized(model)
    assert len(weights) == 7
    for name, (fq, module) in weights.items():
        assert module.quantization_scheme.weights.group_size == 128
        groups = module.weight.shape[1] // 128
        assert tuple(module.weight_scale.shape) == (module.weight.shape[0], groups), name
        left = spy.seen[name]
        assert bool((fq[left == 0] == 0).all()), name
        assert torch.equal((fq == 0) & (left != 0), (left != 0) & rounds_to_zero(left, module)), name


def test_gptq_after_dsnot_is_refused_before_touching_the_model(tiny_model_dir, calib_windows):
    recipe = [WandaPruningModifier(sparsity=0.5, mask_structure="2:4", **COMMON),
              DSnoTModifier(**COMMON), GPTQModifier(scheme="W8A8", **COMMON)]
    model = run_expecting(tiny_model_dir, calib_windows, recipe, DSnoTConfigError,
                          "GPTQModifier comes after DSnoTModifier.*QuantizationModifier instead")
    assert_untouched(tiny_model_dir, model)


def test_gptq_after_dsnot_is_refused_in_yaml_too(tiny_model_dir, calib_windows):
    recipe = """
sparsity_stage:
  sparsity_modifiers:
    WandaPruningModifier: {sparsity: 0.5, mask_structure: "2:4", targets: ["Linear"], ignore: ["re:.*lm_head"]}
    DSnoTModifier: {targets: ["Linear"], ignore: ["re:.*lm_head"]}
quantization_stage:
  quantization_modifiers:
    GPTQModifier: {scheme: W4A16, targets: ["Linear"], ignore: ["re:.*lm_head"]}
"""
    run_expecting(tiny_model_dir, calib_windows, recipe, DSnoTConfigError, "does not keep zero weights zero")


def test_quantizer_before_dsnot_warns_and_zeros_still_hold(tiny_model_dir, calib_windows):
    messages = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        spy = Spy(pruned_only=True)
        model = run(tiny_model_dir, calib_windows, [
            WandaPruningModifier(sparsity=0.5, mask_structure="2:4", **COMMON),
            QuantizationModifier(scheme="W8A8", **COMMON), DSnoTModifier(**COMMON), spy,
        ])
    finally:
        logger.remove(sink)
    assert any("comes before DSnoTModifier" in m and "Put QuantizationModifier after" in m for m in messages)
    for name, (fq, _module) in dequantized(model).items():
        assert bool((fq[spy.seen[name] == 0] == 0).all()), name
