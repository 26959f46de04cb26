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


def refine_on(device, w, wc, **kwargs):
    """``refine_mask`` with its tensors on ``device`` (the tests' ``--device``, CPU unless
    told), the result's weight back on the CPU: on the CPU the very same call."""
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    result = refine_mask(w.to(device), wc.to(device), **moved)
    assert result.weight.device.type == device.type
    result.weight = result.weight.cpu()
    return result


@pytest.mark.parametrize("nm", STRUCTURES)
@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_matches_plain_per_row_reference(objective, nm, device):
    w, wc, stats = make_layer(nm=nm, seed=1)
    kwargs = dict(max_cycles=30, threshold=1e-3)
    ours = refine_on(device, w, wc, objective=objective, nm=nm, **stats, **kwargs)
    ref = refine_reference(w, wc, objective, nm, **stats, **kwargs)
    assert ours.swaps > 0
    assert torch.equal(ours.weight, ref)


@pytest.mark.parametrize("sign_check", [True, False])
@pytest.mark.parametrize("var_power", [0.0, 1.0, 2.0])
def test_mean_options_match_reference(sign_check, var_power, device):
    w, wc, stats = make_layer(seed=2)
    kwargs = dict(max_cycles=20, threshold=0.0, var_power=var_power, sign_check=sign_check)
    ours = refine_on(device, w, wc, objective="mean", **stats, **kwargs)
    ref = refine_reference(w, wc, "mean", None, **stats, **kwargs)
    assert torch.equal(ours.weight, ref)


@pytest.mark.parametrize("nm", STRUCTURES)
@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_exact_zeros_values_and_lower_error(objective, nm, device):
    w, wc, stats = make_layer(rows=64, cols=128, dtype=torch.float32, nm=nm, seed=3)
    out = refine_on(device, w, wc, objective=objective, nm=nm, **stats).weight
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
def test_after_sparsegpt_like_update_kept_values_stay(objective, device):
    # SparseGPT changes kept weights and prunes a different number per row
    w, _, stats = make_layer(rows=32, cols=64, dtype=torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(w.shape, generator=g) < torch.linspace(0.4, 0.8, w.shape[0]).unsqueeze(1)
    wc = (w + 0.3 * torch.randn(w.shape, generator=g)).masked_fill(mask, 0)
    res = refine_on(device, w, wc, objective=objective, **stats)
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
def test_bf16_in_bf16_out_same_decisions_as_float32(objective, device):
    w, wc, stats = make_layer(rows=32, cols=64, dtype=torch.float32, nm=(2, 4), seed=6)
    wb, wcb = w.bfloat16(), wc.bfloat16()
    out = refine_on(device, wb, wcb, objective=objective, nm=(2, 4), **stats).weight
    assert out.dtype == torch.bfloat16
    ref = refine_on(device, wb.float(), wcb.float(), objective=objective, nm=(2, 4), **stats).weight
    assert torch.equal(out.float(), ref)
    assert bool((block_zeros(out, 4) == 2).all())


@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_deterministic_across_runs_threads_and_chunks(objective, device):
    w, wc, stats = make_layer(rows=96, cols=128, dtype=torch.float32, seed=7)
    w, wc = w.to(device), wc.to(device)
    stats = {k: v.float().to(device) for k, v in stats.items()}
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


def test_zero_variance_and_dead_columns_are_handled(device):
    w, wc, stats = make_layer(seed=8)
    stats["var"][:4] = 0.0  # constant inputs
    stats["mean"][4:8] = 0.0  # dead inputs
    stats["var"][4:8] = 0.0
    stats["sqnorm"][4:8] = 0.0
    res = refine_on(device, w, wc, objective="mean", **stats, threshold=0.0)
    assert torch.isfinite(res.weight).all()
    assert torch.equal((res.weight == 0).sum(1), (wc == 0).sum(1))
    assert torch.equal(res.weight, refine_reference(w, wc, "mean", **stats, threshold=0.0))


def test_dense_exact_zeros_never_grown_and_counts_kept(device):
    w, wc, stats = make_layer(seed=9)
    w[:, :3] = 0.0  # a checkpoint's own zeros: pruned or kept, they stay zero
    wc = wc.clone()
    wc[:, :3] = 0.0
    for objective in ("mean", "gram"):
        out = refine_on(device, w, wc, objective=objective, **stats).weight
        assert torch.equal((out == 0).sum(1), (wc == 0).sum(1))


def test_no_cycles_or_high_threshold_changes_nothing(device):
    w, wc, stats = make_layer(seed=10)
    assert torch.equal(refine_on(device, w, wc, objective="gram", max_cycles=0, **stats).weight, wc)
    res = refine_on(device, w, wc, objective="mean", threshold=1e9, **stats)
    assert res.swaps == 0 and torch.equal(res.weight, wc)


def test_inputs_are_not_modified(device):
    w, wc, stats = make_layer(seed=11)
    w, wc, stats = w.to(device), wc.to(device), {k: v.to(device) for k, v in stats.items()}
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


def _same_result(a, b):
    return (torch.equal(a.weight, b.weight), a.swaps, a.rows_changed, a.error_before,
            a.error_after, a.cycles) == (True, b.swaps, b.rows_changed, b.error_before,
                                         b.error_after, b.cycles)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_stacked_segments_equal_separate_calls(objective, nm, dtype, monkeypatch, device):
    """Layers sharing statistics refined in one call (``segments``): each segment's
    weight, swaps and errors are bit for bit those of the layer's own call, with
    chunks cut inside the layers (a stacked call's chunks would straddle them), rows
    that stop at different cycles (drops of stopped rows), and thread caps that a
    stacked call raises (one thread per 4096 weights here, 2 threads)."""
    import dsnot_modifier.swaps as swaps

    monkeypatch.setattr(swaps, "ELEMENTS_PER_THREAD", 1 << 12)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layers = [make_layer(rows=rows, cols=64, seed=40 + rows, dtype=torch.float64, nm=nm,
                             sparsity=0.5) for rows in (160, 8, 90, 1)]
        # rows of very different scales: the sums of their errors round, so they
        # must be summed as the layer's own call sums them to give the same bits
        g = torch.Generator().manual_seed(4)
        span = 8 if dtype == torch.float16 else 40
        scales = [2.0 ** torch.randint(-span, span + 1, (w.shape[0], 1), generator=g)
                  for w, _, _ in layers]
        layers = [((w * k).to(device, dtype), (wc * k).to(device, dtype), s)
                  for (w, wc, s), k in zip(layers, scales)]
        stats = {k: v.float().to(device) for k, v in layers[0][2].items()}  # one set of statistics
        for chunk_rows in (None, 16):
            kwargs = dict(objective=objective, nm=nm, chunk_rows=chunk_rows, max_cycles=12, **stats)
            alone = [refine_mask(w, wc, **kwargs) for w, wc, _ in layers]
            stacked = refine_mask(torch.cat([w for w, _, _ in layers]),
                                  torch.cat([wc for _, wc, _ in layers]),
                                  segments=[w.shape[0] for w, _, _ in layers], **kwargs)
            assert len(stacked.segments) == len(layers)
            for one, part in zip(alone, stacked.segments):
                assert _same_result(part, one)
                assert part.weight.dtype == dtype
            assert sum(one.swaps for one in alone) > 10
            assert len({one.cycles for one in alone}) > 1 or chunk_rows is None
            assert torch.equal(stacked.weight, torch.cat([one.weight for one in alone]))
            assert stacked.swaps == sum(one.swaps for one in alone)
            assert stacked.error_after == sum(one.error_after for one in alone)
            assert stacked.cycles == max(one.cycles for one in alone)
    finally:
        torch.set_num_threads(threads)
    # without segments the result has none; one segment is the layer's own call
    w, wc, _ = layers[0]
    alone = refine_mask(w, wc, objective=objective, nm=nm, **stats)
    assert alone.segments is None
    assert _same_result(refine_mask(w, wc, objective=objective, nm=nm, segments=[160],
                                    **stats).segments[0], alone)
    for bad in ([36], [37, 0], [40, -3]):
        with pytest.raises(ValueError, match="segments"):
            refine_mask(w, wc, objective=objective, nm=nm, segments=bad, **stats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_or_inf_is_where_with_inf(dtype, device):
    from dsnot_modifier._kernels import or_inf

    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, 33, generator=g, dtype=torch.float64).to(dtype)
    x[0, :5] = 0
    x[1, :3] = float("inf")
    x[2, :4] = torch.finfo(dtype).max
    x[3, :4] = torch.finfo(dtype).tiny / 4  # subnormal
    keep = torch.rand(7, 33, generator=g) < 0.5
    x, keep = x.to(device), keep.to(device)
    got = or_inf(keep, x)
    assert got.dtype == dtype
    assert torch.equal(got, torch.where(keep, x, float("inf")))


def test_or_inf_into_given_buffers_is_the_same():
    from dsnot_modifier._kernels import or_inf

    g = torch.Generator().manual_seed(1)
    x = torch.rand(9, 40, generator=g)
    keep = torch.rand(9, 40, generator=g) < 0.3
    want = torch.where(keep, x, float("inf"))
    out, scratch = torch.full_like(x, 7.0), torch.full_like(x, -3.0)
    got = or_inf(keep.clone(), x, out, scratch)
    assert torch.equal(got, want) and got.data_ptr() == out.data_ptr()


@pytest.mark.parametrize("m", [2, 3, 4, 8, 16])
def test_blocks_without_kept_reads_every_block(m, device):
    """The integer view of M bools finds exactly the all-pruned blocks (and the plain
    `all` does for other M or layouts)."""
    from dsnot_modifier.swaps import _blocks_without_kept

    g = torch.Generator().manual_seed(m)
    rows, blocks = 13, 11
    pruned = torch.rand(rows, blocks * m, generator=g) < 0.5
    pruned.view(rows, blocks, m)[torch.rand(rows, blocks, generator=g) < 0.3] = True
    pruned.view(rows, blocks, m)[:, 0, : m - 1] = True  # one kept weight only: not empty
    pruned = pruned.to(device)
    want = pruned.view(rows, blocks, m).all(-1, keepdim=True)
    assert want.any() and not want.all()
    assert torch.equal(_blocks_without_kept(pruned, m), want)
    wide = torch.zeros(rows, blocks * m + 1, dtype=torch.bool, device=device)
    wide[:, 1:] = pruned  # a view at an odd offset: the plain path
    assert torch.equal(_blocks_without_kept(wide[:, 1:], m), want)


@pytest.mark.parametrize("sign_check", [None, True, False])
@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_reused_buffers_give_the_same_result_bit_for_bit(nm, sign_check, monkeypatch):
    """mean's chunks reuse their temporaries on CPU (a Workspace): the result, counts
    and error sums are those of fresh tensors, over many chunks of unequal sizes."""
    import dsnot_modifier.swaps as swaps

    w, wc, stats = make_layer(rows=75, cols=64, dtype=torch.float32, nm=nm, seed=4)
    kw = dict(objective="mean", nm=nm, sign_check=sign_check, chunk_rows=16,
              **{k: stats[k] for k in ("mean", "var", "sqnorm")})
    reused = refine_mask(w, wc, **kw)
    fresh_workspace = swaps.Workspace
    monkeypatch.setattr(swaps, "Workspace", lambda reuse: fresh_workspace(False))
    fresh = refine_mask(w, wc, **kw)
    assert fresh.swaps > 0
    assert _same_result(reused, fresh)


@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_products_run_in_full_float32_whatever_the_caller_set(objective, monkeypatch, device):
    """A caller's ``set_float32_matmul_precision("high")`` (TF32 on CUDA, bfloat16 passes on
    CPU) does not reach DSnoT's products; the caller's setting is back after."""
    import dsnot_modifier.swaps as swaps

    seen = []
    original = swaps._refine

    def recording(*args, **kwargs):
        seen.append((torch.get_float32_matmul_precision(),
                     torch.backends.cuda.matmul.allow_tf32))
        return original(*args, **kwargs)

    monkeypatch.setattr(swaps, "_refine", recording)
    w, wc, stats = make_layer(seed=21)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        result = refine_on(device, w, wc, objective=objective, **stats)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen == [("highest", False)]
    assert torch.equal(result.weight, refine_on(device, w, wc, objective=objective, **stats).weight)
