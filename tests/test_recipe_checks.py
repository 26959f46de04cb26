"""
The recipe and pipeline checks as plain functions: real modifier instances (no
llm-compressor session) and lightweight stand-ins.
"""

from __future__ import annotations

import pytest
import torch
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

from dsnot_modifier import DSnoTConfigError, DSnoTModifier
from dsnot_modifier.recipe_checks import (
    check_distributed_pruners,
    check_recipe,
    check_same_pass,
    check_settings,
    check_targets,
)

COMMON = dict(targets=["Linear"], ignore=["re:.*lm_head"])


def wanda(structure="0:0"):
    return WandaPruningModifier(sparsity=0.5, mask_structure=structure, **COMMON)


def test_pruners_before_dsnot_are_returned():
    dsnot = DSnoTModifier()
    first, second = wanda(), SparseGPTModifier(sparsity=0.5, **COMMON)
    assert check_recipe(dsnot, [first, second, dsnot]) == [first, second]


@pytest.mark.parametrize("order, match", [
    (lambda d: [d], "no pruner comes before it"),
    (lambda d: [d, wanda()], r"it comes before \['WandaPruningModifier'\]"),
    (lambda d: [QuantizationModifier(scheme="W8A8", **COMMON), d], "no pruner comes before it"),
])
def test_dsnot_without_a_pruner_before_is_refused(order, match):
    dsnot = DSnoTModifier()
    with pytest.raises(DSnoTConfigError, match=match) as info:
        check_recipe(dsnot, order(dsnot))
    assert "initial: wanda" in str(info.value)  # the other fix is named too


@pytest.mark.parametrize("where", ["before", "after"])
def test_initial_and_a_pruner_is_refused(where):
    dsnot = DSnoTModifier(initial="wanda", sparsity=0.5)
    recipe = [wanda(), dsnot] if where == "before" else [dsnot, wanda()]
    with pytest.raises(DSnoTConfigError, match=r"prunes by itself.*\['WandaPruningModifier'\]"):
        check_recipe(dsnot, recipe)
    assert check_recipe(dsnot, [dsnot]) == []


def test_mask_structure_must_agree_with_the_pruner():
    dsnot = DSnoTModifier(mask_structure="2:4")
    with pytest.raises(DSnoTConfigError, match="make them agree"):
        check_recipe(dsnot, [wanda("4:8"), dsnot])
    with pytest.raises(DSnoTConfigError, match="make them agree"):
        check_recipe(dsnot, [wanda("0:0"), dsnot])
    pruner = wanda("2:4")
    assert check_recipe(dsnot, [pruner, dsnot]) == [pruner]
    unset = DSnoTModifier()  # read from the zeros: any pruner structure goes
    assert check_recipe(unset, [pruner, unset]) == [pruner]


def test_gptq_after_dsnot_is_refused_quantization_after_is_not(warnings_seen):
    dsnot = DSnoTModifier()
    with pytest.raises(DSnoTConfigError, match="GPTQModifier comes after DSnoTModifier.*QuantizationModifier"):
        check_recipe(dsnot, [wanda(), dsnot, GPTQModifier(scheme="W4A16", **COMMON)])
    pruner = wanda()
    assert check_recipe(dsnot, [pruner, dsnot, QuantizationModifier(scheme="W8A8", **COMMON)]) == [pruner]
    assert warnings_seen == []


def test_quantizer_before_dsnot_is_warned(warnings_seen):
    dsnot = DSnoTModifier()
    pruner = wanda()
    assert check_recipe(dsnot, [QuantizationModifier(scheme="W8A8", **COMMON), pruner, dsnot]) == [pruner]
    assert len(warnings_seen) == 1 and "['QuantizationModifier'] comes before DSnoTModifier" in warnings_seen[0]


def test_same_pass():
    dsnot = DSnoTModifier()
    pruner = wanda()
    check_same_pass(dsnot, [pruner, dsnot])
    with pytest.raises(DSnoTConfigError, match=r"\['WandaPruningModifier'\] calibrates in a pass of its own.*sequential"):
        check_same_pass(dsnot, [pruner])


def test_pruner_under_torchrun_is_refused():
    check_distributed_pruners([wanda()], 1)
    check_distributed_pruners([], 4)
    with pytest.raises(DSnoTConfigError, match=r"torchrun \(2 ranks\).*initial: wanda"):
        check_distributed_pruners([wanda(), wanda()], 2)


def test_targets_must_match_a_linear_layer():
    check_targets({torch.nn.Linear(2, 2): "x"}, ["Linear"], [])
    with pytest.raises(DSnoTConfigError, match=r"targets \['re:.*nothing'\].*match no Linear"):
        check_targets({}, ["re:.*nothing"], [])


@pytest.mark.parametrize("initial, sparsity, structure, expected", [
    (None, None, None, (None, None)),
    (None, None, "2:4", ((2, 4), "2:4")),
    ("wanda", 0.5, None, (None, "0:0")),
    ("magnitude", None, "4:8", ((4, 8), "4:8")),
    ("wanda", 0.5, "2:4", ((2, 4), "2:4")),
])
def test_settings_that_agree(initial, sparsity, structure, expected):
    assert check_settings(initial, sparsity, structure) == expected


@pytest.mark.parametrize("initial, sparsity, structure, match", [
    (None, 0.5, None, "only used with `initial`"),
    ("wanda", None, None, "needs a sparsity"),
    ("wanda", 0.6, "2:4", "contradicts mask_structure"),
    (None, None, "3:2", "0 < N < M"),
    (None, None, "half", "not of the form 'N:M'"),
])
def test_settings_that_do_not(initial, sparsity, structure, match):
    with pytest.raises(ValueError, match=match):
        check_settings(initial, sparsity, structure)


@pytest.mark.parametrize("objective, gram_dtype, update, ok", [
    ("gram", "float32", False, True), ("gram", "bfloat16", False, True),
    ("gram", "auto", False, True), ("mean", "float32", False, True),
    ("mean", "auto", False, True), ("mean", "bfloat16", True, True),
    ("mean", "bfloat16", False, False),
])
def test_gram_dtype_is_for_the_gram_objective_only(objective, gram_dtype, update, ok):
    if ok:
        assert check_settings(None, None, None, objective, gram_dtype, update) == (None, None)
    else:
        with pytest.raises(ValueError, match=r"objective: gram \(or update_weights\) only; remove gram_dtype"):
            check_settings(None, None, None, objective, gram_dtype, update)
