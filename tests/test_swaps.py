import pytest
import torch

from dsnot_modifier.masks import initial_mask
from dsnot_modifier.swaps import gram_error, mean_error, refine_mask
from reference import refine_reference

STRUCTURES = [None, (2, 4), (4, 8)]


def make_layer(rows=24, cols=64, tokens=2000, seed=0, dtype=torch.float64, nm=None, sparsity=0.6):
    """A random layer with inputs that have non-zero means and uneven scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    scale = torch.rand(cols, generator=g, dtype=torch.float64) * 2 + 0.1
    shift = torch.randn(cols, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) * scale + shift
    stats = dict(
        mean=x.mean(0), var=x.var(0, correction=0), sqnorm=(x * x).mean(0), gram=x.T @ x / tokens
    )
    mask = initial_mask(w, sparsity, nm, "wanda", stats["sqnorm"])
    w = w.to(dtype)
    return w, w.masked_fill(mask, 0), stats


def block_zeros(t, m):
    return (t == 0).reshape(t.shape[0], -1, m).sum(-1)


@pytest.mark.parametrize("nm", STRUCTURES)
@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_matches_plain_per_row_reference(objective, nm):
    w, wc, stats = make_layer(nm=nm, seed=1)
    kwargs = dict(max_cycles=30, threshold=1e-3)
    ours = refine_mask(w, wc, objective=objective, nm=nm, **stats, **kwargs)
    ref = refine_reference(w, wc, objective, nm, **stats, **kwargs)
    assert ours.swaps > 0
    assert torch.equal(ours.weight, ref)


@pytest.mark.parametrize("sign_check", [True, False])
@pytest.mark.parametrize("var_power", [0.0, 1.0, 2.0])
def test_mean_options_match_reference(sign_check, var_power):
    w, wc, stats = make_layer(seed=2)
    kwargs = dict(max_cycles=20, threshold=0.0, var_power=var_power, sign_check=sign_check)
    ours = refine_mask(w, wc, objective="mean", **stats, **kwargs)
    ref = refine_reference(w, wc, "mean", None, **stats, **kwargs)
    assert torch.equal(ours.weight, ref)


@pytest.mark.parametrize("nm", STRUCTURES)
@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_exact_zeros_values_and_lower_error(objective, nm):
    w, wc, stats = make_layer(rows=64, cols=128, dtype=torch.float32, nm=nm, seed=3)
    out = refine_mask(w, wc, objective=objective, nm=nm, **stats).weight
    # every row keeps its number of zeros; every N:M block its N zeros
    assert torch.equal((out == 0).sum(1), (wc == 0).sum(1))
    if nm is not None:
        assert bool((block_zeros(out, nm[1]) == nm[0]).all())
    # a kept weight keeps its value, a regrown one gets its dense value
    nonzero = out != 0
    assert torch.equal(out[nonzero], w[nonzero])
    assert bool((out != wc).any())
    if objective == "gram":
        before, after = gram_error(w, wc, stats["gram"]), gram_error(w, out, stats["gram"])
        assert bool((after <= before * (1 + 1e-5)).all())
        assert after.sum() < 0.95 * before.sum()
    else:
        before, after = mean_error(w, wc, stats["mean"]).abs(), mean_error(w, out, stats["mean"]).abs()
        assert bool((after <= before + 1e-5).all())
        assert after.sum() < (0.5 if nm is None else 0.8) * before.sum()


@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_after_sparsegpt_like_update_kept_values_stay(objective):
    # SparseGPT changes kept weights and prunes a different number per row
    w, _, stats = make_layer(rows=32, cols=64, dtype=torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(w.shape, generator=g) < torch.linspace(0.4, 0.8, w.shape[0]).unsqueeze(1)
    wc = (w + 0.3 * torch.randn(w.shape, generator=g)).masked_fill(mask, 0)
    res = refine_mask(w, wc, objective=objective, **stats)
    out = res.weight
    assert torch.equal((out == 0).sum(1), (wc == 0).sum(1))
    kept = (out != 0) & (wc != 0)
    grown = (out != 0) & (wc == 0)
    assert torch.equal(out[kept], wc[kept])
    assert torch.equal(out[grown], w[grown])
    assert grown.any()
    if objective == "gram":
        before, after = gram_error(w, wc, stats["gram"]), gram_error(w, out, stats["gram"])
        assert bool((after <= before * (1 + 1e-5)).all())
        assert res.error_after < res.error_before
    else:
        before, after = mean_error(w, wc, stats["mean"]).abs(), mean_error(w, out, stats["mean"]).abs()
        assert bool((after <= before + 1e-5).all())


@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_bf16_in_bf16_out_same_decisions_as_float32(objective):
    w, wc, stats = make_layer(rows=32, cols=64, dtype=torch.float32, nm=(2, 4), seed=6)
    wb, wcb = w.bfloat16(), wc.bfloat16()
    out = refine_mask(wb, wcb, objective=objective, nm=(2, 4), **stats).weight
    assert out.dtype == torch.bfloat16
    ref = refine_mask(wb.float(), wcb.float(), objective=objective, nm=(2, 4), **stats).weight
    assert torch.equal(out.float(), ref)
    assert bool((block_zeros(out, 4) == 2).all())


@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_deterministic_across_runs_threads_and_chunks(objective):
    w, wc, stats = make_layer(rows=96, cols=128, dtype=torch.float32, seed=7)
    stats = {k: v.float() for k, v in stats.items()}
    first = refine_mask(w, wc, objective=objective, **stats).weight
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = refine_mask(w, wc, objective=objective, **stats).weight
    finally:
        torch.set_num_threads(threads)
    chunked = refine_mask(w, wc, objective=objective, chunk_rows=7, **stats).weight
    assert torch.equal(first, refine_mask(w, wc, objective=objective, **stats).weight)
    assert torch.equal(first, one_thread)
    assert torch.equal(first, chunked)


def test_zero_variance_and_dead_columns_are_handled():
    w, wc, stats = make_layer(seed=8)
    stats["var"][:4] = 0.0  # constant inputs
    stats["mean"][4:8] = 0.0  # dead inputs
    stats["var"][4:8] = 0.0
    stats["sqnorm"][4:8] = 0.0
    res = refine_mask(w, wc, objective="mean", **stats, threshold=0.0)
    assert torch.isfinite(res.weight).all()
    assert torch.equal((res.weight == 0).sum(1), (wc == 0).sum(1))
    assert torch.equal(res.weight, refine_reference(w, wc, "mean", **stats, threshold=0.0))


def test_dense_exact_zeros_never_grown_and_counts_kept():
    w, wc, stats = make_layer(seed=9)
    w[:, :3] = 0.0  # a checkpoint's own zeros: pruned or kept, they stay zero
    wc = wc.clone()
    wc[:, :3] = 0.0
    for objective in ("mean", "gram"):
        out = refine_mask(w, wc, objective=objective, **stats).weight
        assert torch.equal((out == 0).sum(1), (wc == 0).sum(1))


def test_no_cycles_or_high_threshold_changes_nothing():
    w, wc, stats = make_layer(seed=10)
    assert torch.equal(refine_mask(w, wc, objective="gram", max_cycles=0, **stats).weight, wc)
    res = refine_mask(w, wc, objective="mean", threshold=1e9, **stats)
    assert res.swaps == 0 and torch.equal(res.weight, wc)


def test_inputs_are_not_modified():
    w, wc, stats = make_layer(seed=11)
    w0, wc0 = w.clone(), wc.clone()
    refine_mask(w, wc, objective="gram", **stats)
    refine_mask(w, wc, objective="mean", **stats)
    assert torch.equal(w, w0) and torch.equal(wc, wc0)


def test_bad_arguments():
    w, wc, stats = make_layer(seed=12)
    with pytest.raises(ValueError, match="objective"):
        refine_mask(w, wc, objective="nope", **stats)
    with pytest.raises(ValueError, match="needs the statistics"):
        refine_mask(w, wc, objective="gram")
    with pytest.raises(ValueError, match="same shape"):
        refine_mask(w, wc[:, :8], objective="gram", **stats)
    with pytest.raises(ValueError, match="multiple"):
        refine_mask(w, wc, objective="gram", nm=(2, 5), **stats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_or_inf_is_where_with_inf(dtype):
    from dsnot_modifier._kernels import or_inf

    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, 33, generator=g, dtype=torch.float64).to(dtype)
    x[0, :5] = 0
    x[1, :3] = float("inf")
    x[2, :4] = torch.finfo(dtype).max
    x[3, :4] = torch.finfo(dtype).tiny / 4  # subnormal
    keep = torch.rand(7, 33, generator=g) < 0.5
    got = or_inf(keep, x)
    assert got.dtype == dtype
    assert torch.equal(got, torch.where(keep, x, float("inf")))
