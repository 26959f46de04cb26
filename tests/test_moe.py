"""issue 13: MoE experts (empty inputs, min_tokens, shared statistics), N:M from the
pruner, and the report's mask digest (layers left alone, padding and fused experts:
tests/test_layers.py)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsnot_modifier import DSnoTModifier
from dsnot_modifier.checkpoint import verify_checkpoint
from dsnot_modifier.masks import RefinedStructureError, check_refined
from dsnot_modifier.stats import InputStats, SharedInputs
from helpers import COMMON, VOCAB, Spy, block_zeros, linears, load_script, random_windows, run, run_built
from llmcompressor.modifiers.pruning import WandaPruningModifier


def test_empty_input_changes_no_statistic():
    g = torch.Generator().manual_seed(0)
    for gram in (False, True):
        stats = InputStats(8, with_moments=True, with_gram=gram)
        stats.update(torch.randn(2, 5, 8, generator=g))
        before = [t.clone() for t in stats.tensors()]
        for empty in (torch.empty(0, 8), torch.empty(1, 0, 8), torch.empty(3, 0, 8)):
            stats.update(empty)
        after = stats.tensors()
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert (stats.tokens, stats.sequences) == (10, 2)
        assert bool(torch.isfinite(stats.var("per_sequence")).all())
    only_empty = InputStats(8, with_moments=True)
    only_empty.update(torch.empty(0, 8))
    assert (only_empty.tokens, only_empty.sequences) == (0, 0)


def test_shared_inputs_recognise_the_same_input_whatever_the_order():
    shared = SharedInputs()
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    sx, sy = InputStats(8), InputStats(8)
    shared.add(x, sx)
    shared.add(y, sy)  # another layer's input in between (an expert's down_proj)
    assert shared.lookup(x) is sx and shared.lookup(y) is sy
    assert shared.lookup(x.view(4, 8)) is sx  # a view of the same memory and layout
    assert shared.lookup(x.clone()) is None  # same values, other memory: not assumed
    assert shared.lookup(x[:2]) is None and shared.lookup(x.t()) is None
    x.add_(1)  # changed in place since: not the same input any more
    assert shared.lookup(x) is None
    e = torch.empty(0, 8)
    se = InputStats(8)
    shared.add(e, se)
    assert shared.lookup(e) is se and shared.lookup(torch.empty(0, 8)) is None
    shared.add(y, sy)
    ptr = y.data_ptr()
    del y  # freed: its memory may hold another tensor next
    z = torch.randn(4, 8)
    assert z.data_ptr() != ptr or shared.lookup(z) is None


def test_check_refined_refuses_a_broken_structure():
    before = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]])
    check_refined(before, before.clone(), (2, 4), "x")
    moved = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]])
    check_refined(before, moved, (2, 4), "x")  # counts per block kept
    lost = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])  # block 2 gained one
    with pytest.raises(RefinedStructureError, match="x: .*blocks of 4"):
        check_refined(before, lost, (2, 4), "x")
    check_refined(before, lost, None, "x")  # unstructured: the row's count is kept
    with pytest.raises(RefinedStructureError, match="rows"):
        check_refined(before, torch.ones_like(before), None, "x")


@pytest.mark.parametrize("objective", ["gram", "mean"])
def test_routed_experts_with_few_tokens_left_as_the_pruner_left_them(objective, tmp_path, warnings_seen):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=1, max_position_embeddings=128))
    from llmcompressor.modeling.moe.linearize import linearize_moe

    linearize_moe(model)
    spy = Spy()
    # 4 x 32 = 128 tokens: the attention sees them all, each expert about 16
    dsnot = DSnoTModifier(objective=objective, min_tokens=100, **COMMON)
    wanda = WandaPruningModifier(sparsity=0.5, mask_structure="0:0", **COMMON)
    run_built(model, random_windows(4, 32), [wanda, spy, dsnot], tmp_path / "config",
              moe_calibrate_all_experts=False)
    out = linears(model)
    few = [s for s in dsnot.report.skipped if s.reason == "few tokens"]
    assert len(few) >= 24  # 8 experts x 3 projections x 2 layers, all or nearly
    for s in few:
        assert s.tokens < 100 and ".experts." in s.name
        assert torch.equal(out[s.name], spy.seen[s.name])  # exactly the pruner's
    assert {layer.name.split(".")[-1] for layer in dsnot.report.layers} >= {"q_proj", "o_proj"}
    assert all(torch.isfinite(w).all() for w in out.values())
    mine = [w for w in warnings_seen if "min_tokens" in w]
    assert len(mine) == 1 and "moe_calibrate_all_experts=True" in mine[0]
    assert f"{len(few)}: " in mine[0]
    saved = dsnot.report.to_dict()["skipped"]
    assert {s["name"] for s in saved} >= {s.name for s in few}


def test_all_expert_calibration_holds_one_gram_of_the_hidden_states():
    bench = load_script("benchmarks/moe_memory.py")
    rows = [bench.measure(e, hidden=64, inter=16, heads=4) for e in (2, 6)]
    for r in rows:
        assert r["hidden_stats_once"], r
        assert r["peak_state_bytes"] < r["unshared_bytes"]
    # each expert more costs its dense copy and its down_proj Gram only
    per_expert = (rows[1]["peak_state_bytes"] - rows[0]["peak_state_bytes"]) / 4
    assert per_expert == 3 * 64 * 16 * 4 + 16 * 16 * 4


def test_verify_catches_a_moved_zero(tiny_model_dir, calib_windows, tmp_path):
    dsnot = DSnoTModifier(**COMMON)
    run(tiny_model_dir, calib_windows, [WandaPruningModifier(sparsity=0.5, mask_structure="0:0", **COMMON), dsnot],
        output_dir=str(tmp_path))
    assert verify_checkpoint(tmp_path).ok
    report = json.loads((tmp_path / "dsnot_report.json").read_text())
    assert all(layer["mask_digest"] for layer in report["layers"])
    # move one zero within a row: every count (row, layer) stays the same
    file = next(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    tensors = load_file(tmp_path / file)
    key = "model.layers.0.self_attn.q_proj.weight"
    w = tensors[key].clone()
    zero, kept = int((w[0] == 0).nonzero()[0]), int((w[0] != 0).nonzero()[0])
    w[0, zero], w[0, kept] = w[0, kept], 0.0
    tensors[key] = w
    save_file(tensors, tmp_path / file, metadata={"format": "pt"})
    result = verify_checkpoint(tmp_path)
    assert not result.ok
    bad = [c for c in result.layers if c.problems]
    assert [c.name for c in bad] == ["model.layers.0.self_attn.q_proj"]
    assert "zero mask differs" in bad[0].problems[0]


@pytest.mark.parametrize("objective", ["gram", "mean"])
def test_nm_blocks_with_extra_zeros_keep_them(objective):
    """SparseGPT 2:4 on inputs never activated: blocks with 3 or 4 zeros. Swaps stay
    inside blocks, every block keeps its count, and rows whose best growth would lie
    in an all-zero block still swap elsewhere."""
    from dsnot_modifier.masks import initial_mask
    from dsnot_modifier.swaps import refine_mask

    g = torch.Generator().manual_seed(3)
    rows, cols = 32, 32
    x = torch.randn(512, cols, generator=g) + 0.3
    x[:, :3] = 0  # dead inputs: columns 0, 1, 2
    dense = torch.randn(rows, cols, generator=g)
    current = dense.masked_fill(initial_mask(dense, None, (2, 4), "magnitude"), 0)
    current[:, :3] = 0  # as SparseGPT leaves them: block 0 holds 3 or 4 zeros
    stats = InputStats(cols, with_moments=True, with_gram=True)
    stats.update(x)
    extra = dict(gram=stats.gram()) if objective == "gram" else dict(
        mean=stats.mean(), var=stats.var(), sqnorm=stats.sqnorm())
    result = refine_mask(dense, current, objective=objective, nm=(2, 4), **extra)
    assert torch.equal(block_zeros(result.weight, 4), block_zeros(current, 4))
    assert int(block_zeros(current, 4)[:, 0].min()) >= 3
    assert result.swaps > 0
    check_refined(current, result.weight, (2, 4), "layer")
