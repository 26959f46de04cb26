"""
``dsnot_modifier.layers``: which target layers DSnoT refines with which structure
(``pruner_targets``, ``layer_structure``), what it refuses or warns about before
calibration (``check_model_inputs``: padding, MoE experts that are not Linear layers),
and how the layers left alone are listed, warned about and refused at the end
(``close_report``); then the same in oneshot.
"""

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

from dsnot_harness.pipeline import load_model
from dsnot_modifier import DSnoTConfigError, DSnoTModifier
from dsnot_modifier.errors import FIX_ORDER
from dsnot_modifier.layers import (
    FIX_FEW_TOKENS,
    FIX_PADDING,
    FIX_UNLINEARIZED,
    PrunerTarget,
    check_model_inputs,
    close_report,
    layer_structure,
    name_a_few,
    padded_calibration,
    pruner_targets,
    unlinearized_experts,
)
from dsnot_modifier.report import DSnoTReport, LayerReport, SkippedLayer
from helpers import COMMON, build, run


def two_four(rows=4, cols=8, seed=0) -> torch.Tensor:
    """A weight with exactly 2 zeros in every block of 4 columns (the 2 smallest)."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).abs() + 0.1
    idx = w.reshape(rows, -1, 4).argsort(-1)[..., :2]
    w.view(rows, -1, 4).scatter_(-1, idx, 0.0)
    return w


def refined(name: str) -> LayerReport:
    return LayerReport(name=name, shape=[4, 8], structure="unstructured", objective="gram",
                       initial="pruner", zeros=16, sparsity=0.5, swaps=3, rows_changed=2,
                       error_before=2.0, error_after=1.5, seconds=0.25)


# ---------------------------------------------------------------- pruner_targets

def test_pruner_targets_are_the_modules_each_pruner_registered():
    a, b, other = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    names = {a: "model.a", b: "model.b"}
    wanda = WandaPruningModifier(sparsity=0.5, mask_structure="2:4")
    wanda._module_names.update({a: "model.a", b: "model.b", other: "model.other"})
    targets = pruner_targets([wanda], names)
    assert set(targets) == {a, b}  # a module outside ``names`` is no target
    assert all(isinstance(t, PrunerTarget) for t in targets.values())
    assert (targets[a].pruner, targets[a].mask_structure, targets[a].nm) == ("WandaPruningModifier", "2:4", (2, 4))
    # a later pruner prunes b again: its structure is the last word
    sgpt = SparseGPTModifier(sparsity=0.5, mask_structure="0:0")
    sgpt._module_names[b] = "model.b"
    targets = pruner_targets([wanda, sgpt], names)
    assert (targets[a].pruner, targets[a].nm) == ("WandaPruningModifier", (2, 4))
    assert (targets[b].pruner, targets[b].mask_structure, targets[b].nm) == ("SparseGPTModifier", "0:0", None)
    # registered nothing yet (before its calibration start): no target
    assert pruner_targets([WandaPruningModifier(sparsity=0.5)], names) == {}


def test_pruner_targets_none_without_pruners_or_their_modules():
    a = torch.nn.Linear(8, 4)
    assert pruner_targets([], {a: "a"}) is None  # standalone DSnoT
    wanda = WandaPruningModifier(sparsity=0.5)
    wanda._module_names[a] = "a"
    assert pruner_targets([wanda, SimpleNamespace(mask_structure="2:4")], {a: "a"}) is None


def test_pruner_targets_refuse_a_malformed_structure():
    a = torch.nn.Linear(8, 4)
    wanda = WandaPruningModifier(sparsity=0.5)
    wanda._module_names[a] = "a"
    wanda.mask_structure = "2-4"
    with pytest.raises(DSnoTConfigError, match="'2-4' is not of the form 'N:M'"):
        pruner_targets([wanda], {a: "a"})


# --------------------------------------------------------------- layer_structure

def test_layer_structure_read_from_the_zeros_when_nothing_is_declared():
    w = two_four()
    assert layer_structure("x", w, w.abs() + 1, None, None, None) == (2, 4)
    unstructured = w.clone()
    unstructured[0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # 5 zeros, the other rows 4
    assert layer_structure("x", unstructured, unstructured.abs() + 1, None, None, None) is None


def test_layer_structure_declared_by_dsnot_is_checked_against_the_zeros():
    w = two_four()
    dense = w.abs() + 1
    assert layer_structure("x", w, dense, None, "2:4", (2, 4)) == (2, 4)
    with pytest.raises(DSnoTConfigError, match="x: mask_structure is unstructured but the earlier pruner left 2:4"):
        layer_structure("x", w, dense, None, "0:0", None)
    short = w.clone()
    short[1, :4] = 1.0  # a block without zeros
    with pytest.raises(DSnoTConfigError, match="x: mask_structure '2:4' contradicts the zeros"):
        layer_structure("x", short, dense, None, "2:4", (2, 4))


def test_layer_structure_asked_of_the_pruner_comes_first():
    w = two_four()
    dense = w.abs() + 1
    asked = PrunerTarget("WandaPruningModifier", "2:4", (2, 4))
    more = w.clone()
    more[0, :3] = 0.0  # a block with 3 zeros (SparseGPT's dead inputs): kept
    assert layer_structure("x", more, dense, asked, None, None) == (2, 4)
    # what the pruner was asked wins over DSnoT's own declaration and the zeros
    unstructured = PrunerTarget("WandaPruningModifier", "0:0", None)
    assert layer_structure("x", w, dense, unstructured, "2:4", (2, 4)) is None
    short = w.clone()
    short[2, 4:] = 1.0
    with pytest.raises(DSnoTConfigError,
                       match=r"x: WandaPruningModifier was given mask_structure '2:4' but 1 of the "
                             r"layer's 8 blocks of 4 hold fewer than 2 zeros"):
        layer_structure("x", short, dense, asked, None, None)
    with pytest.raises(DSnoTConfigError, match="not a multiple of 4"):
        layer_structure("x", torch.zeros(4, 6), torch.ones(4, 6), asked, None, None)


# ------------------------------------------------------- check_model_inputs and padding

def loader(items, batch_size=1):
    return SimpleNamespace(dataset=items, batch_size=batch_size)


def test_padded_calibration_reads_the_masks_and_lengths():
    ids = [[1, 2, 3, 4]] * 3
    ones = [[1] * 4] * 3
    assert padded_calibration(loader(Dataset.from_dict({"input_ids": ids, "attention_mask": ones}))) is None
    holes = [[1] * 4, [1] * 4, [1, 1, 1, 0]]
    assert padded_calibration(loader(Dataset.from_dict({"input_ids": ids, "attention_mask": holes}))) == (
        "calibration sample 2 has attention_mask zeros (padding)")
    # items of a plain list: tensors or lists, with or without a mask
    items = [{"input_ids": torch.tensor([1, 2]), "attention_mask": torch.tensor([1, 1])},
             {"input_ids": torch.tensor([1, 2]), "attention_mask": torch.tensor([0, 1])}]
    assert padded_calibration(loader(items)) == "calibration sample 1 has attention_mask zeros (padding)"
    ragged = [{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2, 3, 4, 5]}]
    assert padded_calibration(loader(ragged)) is None  # one sample a batch: nothing padded
    assert padded_calibration(loader(ragged, batch_size=None)) is None
    assert padded_calibration(loader(ragged, batch_size=2)) == (
        "batch_size is 2 and the calibration samples have different lengths (3 to 5 tokens), "
        "so batches are padded")
    assert padded_calibration(loader([{"input_ids": [1, 2]}] * 2, batch_size=2)) is None


def test_padded_calibration_none_where_it_cannot_read_the_samples():
    assert padded_calibration(object()) is None  # no dataset
    assert padded_calibration(loader([torch.ones(3)])) is None  # items are not dicts
    assert padded_calibration(loader([{"text": "w1 w2"}])) is None  # not tokenized
    assert padded_calibration(loader(iter([{"input_ids": [1]}]))) is None  # no len()


def test_check_model_inputs_warns_about_fused_experts_and_refuses_padding(warnings_seen):
    fused = torch.nn.Module()
    fused.experts = torch.nn.Module()
    fused.experts.gate_up = torch.nn.Parameter(torch.randn(4, 8, 6))
    clean = loader(Dataset.from_dict({"input_ids": [[1, 2]] * 2, "attention_mask": [[1, 1]] * 2}))
    check_model_inputs(torch.nn.Linear(2, 2), clean)
    assert warnings_seen == []
    check_model_inputs(fused, clean)
    assert len(warnings_seen) == 1
    assert "DSnoT: 1: experts module(s) hold MoE experts that are not refined" in warnings_seen[0]
    assert FIX_UNLINEARIZED in warnings_seen[0]
    padded = loader(Dataset.from_dict({"input_ids": [[1, 2]] * 2, "attention_mask": [[1, 1], [1, 0]]}))
    with pytest.raises(DSnoTConfigError) as info:
        check_model_inputs(torch.nn.Linear(2, 2), padded)
    assert str(info.value) == f"DSnoT: calibration sample 1 has attention_mask zeros (padding); {FIX_PADDING}"


def test_unlinearized_experts_are_expert_modules_with_3d_weights():
    class FusedExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 8, 6))

    model = torch.nn.Module()
    model.moe = FusedExperts()  # found by its class name
    model.mlp = torch.nn.Module()
    model.mlp.experts = torch.nn.Module()  # found by its module name
    model.mlp.experts.down = torch.nn.Parameter(torch.randn(4, 6, 8))
    model.mlp.experts.linear = torch.nn.Linear(8, 8)
    model.pos = torch.nn.Module()  # a 3D parameter that is no expert
    model.pos.table = torch.nn.Parameter(torch.zeros(1, 16, 8))
    model.expert_conv = torch.nn.Conv3d(2, 2, 3)  # a 5D weight of a convolution: no expert
    model.expert_embed = torch.nn.Embedding(4, 8)
    model.expert_gate = torch.nn.Module()  # experts' 2D router: nothing fused
    model.expert_gate.w = torch.nn.Parameter(torch.randn(4, 8))
    assert unlinearized_experts(model) == ["moe", "mlp.experts"]
    assert unlinearized_experts(build("qwen3_moe")) == []  # linearized: one Linear per expert


def test_name_a_few():
    assert name_a_few(["a", "b", "c"]) == "3: a, b, c"
    assert name_a_few(list("abcdef")) == "6: a, b, c, d, e, ..."
    assert name_a_few(list("abcd"), 3) == "4: a, b, c, ..."
    assert name_a_few(list("abc"), 3) == "3: a, b, c"
    assert name_a_few([]) == "0: "


# ------------------------------------------------------------------ close_report

def test_close_report_lists_the_layers_never_called_and_warns_once(warnings_seen, infos):
    a, b, c, d = (torch.nn.Linear(8, 4) for _ in range(4))
    report = DSnoTReport(layers=[refined("a")], skipped=[SkippedLayer("b", "not pruned", 300, "left dense")])
    close_report(report, {a: "a", b: "b", c: "c", d: "d"}, min_tokens=128)
    assert report.skipped == [SkippedLayer("b", "not pruned", 300, "left dense"),
                              SkippedLayer("c", "never called", None, "no forward during calibration"),
                              SkippedLayer("d", "never called", None, "no forward during calibration")]
    assert len(warnings_seen) == 1
    assert "DSnoT left 3: b, c, d target layer(s) as they are (2 never ran a forward in calibration, " \
           "1 were not pruned by the pruner)" in warnings_seen[0]
    assert report.layers == [refined("a")]
    assert [m for m in infos if report.summary_line() in m]  # the summary is logged


def test_close_report_warns_about_layers_with_few_tokens(warnings_seen):
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    report = DSnoTReport(layers=[refined("a")], skipped=[SkippedLayer("b", "few tokens", 12, "")])
    close_report(report, {a: "a", b: "b"}, min_tokens=100)
    assert len(report.skipped) == 1
    assert len(warnings_seen) == 1
    assert "DSnoT left 1: b layer(s) exactly as the pruner left them" in warnings_seen[0]
    assert "min_tokens=100" in warnings_seen[0] and FIX_FEW_TOKENS in warnings_seen[0]


def test_close_report_quiet_when_every_target_was_refined(warnings_seen):
    a = torch.nn.Linear(8, 4)
    report = DSnoTReport(layers=[refined("a")])
    close_report(report, {a: "a"}, min_tokens=128)
    assert warnings_seen == [] and report.skipped == []


def test_close_report_refuses_a_run_that_refined_nothing():
    a = torch.nn.Linear(8, 4)
    few = DSnoTReport(skipped=[SkippedLayer("a", "few tokens", 12, "")])
    with pytest.raises(DSnoTConfigError, match=r"refined no layer: the 1 pruned layers each saw fewer "
                                               r"than min_tokens=64 calibration tokens"):
        close_report(few, {a: "a"}, min_tokens=64)
    with pytest.raises(DSnoTConfigError) as info:
        close_report(DSnoTReport(), {a: "a"}, min_tokens=64)
    assert "refined no layer: none of its target layers was pruned" in str(info.value)
    assert str(info.value).endswith(FIX_ORDER)


# ----------------------------------------------------------------- in oneshot

def test_layers_left_alone_are_reported_and_warned(tiny_model_dir, calib_windows, tmp_path, warnings_seen):
    model = load_model(tiny_model_dir)
    # a target the calibration never runs (as a vision tower under text data)
    model.model.unused = torch.nn.Linear(64, 64)
    wanda = WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=["Linear"],
                                 ignore=["re:.*lm_head", "re:.*mlp.down_proj"])
    dsnot = DSnoTModifier(**COMMON)
    run(tiny_model_dir, calib_windows, [wanda, dsnot], model=model)
    skipped = {s.name: s.reason for s in dsnot.report.skipped}
    assert skipped["model.unused"] == "never called"
    assert skipped["model.layers.0.mlp.down_proj"] == "not pruned"
    assert skipped["model.layers.1.mlp.down_proj"] == "not pruned"
    assert len(dsnot.report.layers) == 12
    warned = [w for w in warnings_seen if "left 3: " in w]
    assert len(warned) == 1 and "model.unused" in warned[0]
    assert not dsnot._layers and not dsnot.state_bytes


def test_padding_is_refused(tiny_model_dir, calib_windows):
    ids = calib_windows.tolist()
    mask = [[1] * len(r) for r in ids]
    mask[1][-4:] = [0] * 4
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": mask})
    with pytest.raises(DSnoTConfigError, match="sample 1 has attention_mask zeros.*batch_size=1"):
        run(tiny_model_dir, calib_windows, [WandaPruningModifier(sparsity=0.5, **COMMON), DSnoTModifier(**COMMON)],
            dataset=data)
    ragged = [r[: 20 + i] for i, r in enumerate(ids)]
    data = Dataset.from_dict({"input_ids": ragged, "attention_mask": [[1] * len(r) for r in ragged]})
    with pytest.raises(DSnoTConfigError, match="batch_size is 2 .*different lengths"):
        run(tiny_model_dir, calib_windows, [WandaPruningModifier(sparsity=0.5, **COMMON), DSnoTModifier(**COMMON)],
            dataset=data, batch_size=2)


def test_fused_experts_are_named_with_the_fix(tiny_model_dir, calib_windows, warnings_seen):
    class FusedExperts(torch.nn.Module):  # experts kept as one 3D tensor, unknown to llm-compressor
        def __init__(self):
            super().__init__()
            self.gate_up = torch.nn.Parameter(torch.randn(4, 64, 32))

    class PositionEmbedding(torch.nn.Module):  # a 3D parameter that is no expert
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.zeros(1, 16, 64))

    model = load_model(tiny_model_dir)
    model.model.layers[0].moe = FusedExperts()
    model.model.pos = PositionEmbedding()
    assert unlinearized_experts(model) == ["model.layers.0.moe"]
    assert unlinearized_experts(build("llama")) == []
    run(tiny_model_dir, calib_windows, [WandaPruningModifier(sparsity=0.5, **COMMON), DSnoTModifier(**COMMON)],
        model=model)
    warned = [w for w in warnings_seen if "not refined" in w]
    assert len(warned) == 1 and "model.layers.0.moe" in warned[0] and "linearize_moe" in warned[0]
