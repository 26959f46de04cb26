import pytest
import torch

from dsnot_modifier.masks import (
    MaskStructureError,
    check_structure,
    infer_structure,
    initial_mask,
    parse_mask_structure,
)
from dsnot_modifier.stats import InputStats, NonFiniteStatisticsError


def batches(seed=0, n=5, seq=16, cols=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, seq, cols, generator=g) * 3 + 1.5 for _ in range(n)]


def test_streaming_statistics_equal_batch_formulas():
    xs = batches()
    stats = InputStats(12, with_moments=True, with_gram=True)
    for x in xs:
        stats.update(x)
    full = torch.cat(xs).double()  # [sequences, seq, cols]
    flat = full.reshape(-1, 12)
    assert stats.tokens == flat.shape[0] and stats.sequences == full.shape[0]
    torch.testing.assert_close(stats.mean().double(), flat.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.sqnorm().double(), (flat**2).mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.var("global").double(), flat.var(0, correction=0), rtol=1e-5, atol=1e-5)
    per_seq = full.var(1, correction=0).mean(0)
    torch.testing.assert_close(stats.var("per_sequence").double(), per_seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.gram().double(), flat.T @ flat / flat.shape[0], rtol=1e-5, atol=1e-5)
    # per-sequence variance leaves the spread between sequences out
    assert not torch.allclose(stats.var("per_sequence"), stats.var("global"))


def test_statistics_are_additive():
    xs = batches(seed=1)
    whole = InputStats(12, with_moments=True, with_gram=True)
    left = InputStats(12, with_moments=True, with_gram=True)
    right = InputStats(12, with_moments=True, with_gram=True)
    for i, x in enumerate(xs):
        whole.update(x)
        (left if i % 2 else right).update(x)
    left.merge_(right)
    for a, b in zip(whole.tensors(), left.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_two_dimensional_input_is_one_sequence():
    x = batches(seed=2, n=1)[0][0]  # [seq, cols]
    stats = InputStats(12)
    stats.update(x)
    assert stats.sequences == 1 and stats.tokens == x.shape[0]


def test_gram_only_statistics_give_mean_square_from_diagonal():
    x = batches(seed=3, n=1)[0]
    stats = InputStats(12, with_moments=False, with_gram=True)
    stats.update(x)
    flat = x.reshape(-1, 12).double()
    torch.testing.assert_close(stats.sqnorm().double(), (flat**2).mean(0), rtol=1e-5, atol=1e-5)


def test_non_finite_inputs_are_an_error_naming_the_fix():
    stats = InputStats(12, with_gram=True)
    x = batches(seed=4, n=1)[0]
    x[0, 3, 5] = float("inf")
    stats.update(x)
    with pytest.raises(NonFiniteStatisticsError, match="float16"):
        stats.check_finite("model.layers.0.mlp.up_proj")


def test_wrong_width_is_an_error():
    with pytest.raises(ValueError, match="features"):
        InputStats(8).update(torch.zeros(2, 3, 12))


@pytest.mark.parametrize("text,expected", [
    ("0:0", None), ("unstructured", None), (None, None), ("2:4", (2, 4)), (" 4:8 ", (4, 8)), ("1:3", (1, 3)),
])
def test_parse_mask_structure(text, expected):
    assert parse_mask_structure(text) == expected


@pytest.mark.parametrize("text", ["2-4", "2:4:8", "a:b", "", "2:"])
def test_malformed_mask_structure(text):
    with pytest.raises(MaskStructureError, match="form 'N:M'"):
        parse_mask_structure(text)


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "2:0"])
def test_impossible_mask_structure(text):
    with pytest.raises(MaskStructureError, match="impossible"):
        parse_mask_structure(text)


def layer(seed=0, rows=32, cols=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g), torch.rand(cols, generator=g) + 0.1


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4), (8, 16)])
def test_infer_structure_reads_n_m(nm):
    w, sq = layer()
    pruned = w.masked_fill(initial_mask(w, None, nm, "wanda", sq), 0)
    assert infer_structure(pruned, w) == nm


def test_infer_structure_unstructured_and_with_dense_zeros():
    w, sq = layer(1)
    assert infer_structure(w.masked_fill(initial_mask(w, 0.5, None, "wanda", sq), 0), w) is None
    # a dense zero left kept in a 2:4 block gives that block 3 zeros: still 2:4
    w[0, 0] = 0.0
    pruned = w.masked_fill(initial_mask(w, None, (2, 4), "wanda", sq), 0)
    pruned[0, :4] = torch.where(w[0, :4] == 0, 0.0, pruned[0, :4])
    assert infer_structure(pruned, w) == (2, 4)


def test_check_structure_contradictions():
    w, sq = layer(2)
    unstructured = w.masked_fill(initial_mask(w, 0.5, None, "wanda", sq), 0)
    two_four = w.masked_fill(initial_mask(w, None, (2, 4), "wanda", sq), 0)
    check_structure(two_four, (2, 4), w)
    check_structure(unstructured, None, w)
    with pytest.raises(MaskStructureError, match="contradicts"):
        check_structure(unstructured, (2, 4), w)
    with pytest.raises(MaskStructureError, match="would break"):
        check_structure(two_four, None, w)
    with pytest.raises(MaskStructureError, match="multiple of 8"):
        check_structure(w[:, :60], (4, 8), w[:, :60])


def test_initial_masks_have_exact_sparsity():
    w, sq = layer(3, rows=16, cols=40)
    wanda = initial_mask(w, 0.6, None, "wanda", sq)
    assert bool((wanda.sum(1) == int(40 * 0.6)).all())
    magnitude = initial_mask(w, 0.6, None, "magnitude")
    assert int(magnitude.sum()) == int(w.numel() * 0.6)
    # magnitude is per layer: the smallest |W| of the layer are pruned
    assert float(w.abs()[magnitude].max()) <= float(w.abs()[~magnitude].min())
    nm = initial_mask(w, None, (2, 4), "magnitude")
    assert bool((nm.reshape(16, 10, 4).sum(-1) == 2).all())
    with pytest.raises(ValueError, match="initial"):
        initial_mask(w, 0.5, None, "random")


def test_per_sequence_variance_is_exact_for_columns_with_a_large_mean():
    """The shifted two-sum variance matches a float64 two-pass variance where the mean
    dwarfs the spread (a massive activation of 1e4 with spread 1e-2): E[x²] − E[x]² on
    unshifted float32 sums would lose every digit there (1e8 against 1e-4)."""
    torch.manual_seed(0)
    x = torch.randn(3, 40, 12)
    x[..., 0] = 1e4 + 1e-2 * x[..., 0]
    x[1, :, 1] = 5.0  # a constant column: variance exactly 0, never negative
    stats = InputStats(12)
    stats.update(x)
    exact = x.double().var(dim=1, correction=0).mean(0)
    got = stats.var("per_sequence").double()
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=0)
    naive = ((x.square().sum(1) / 40).double() - (x.sum(1) / 40).double().square()).mean(0)
    assert abs(naive[0] - exact[0]) > 10 * exact[0]  # what the shift protects against


def test_non_finite_inputs_reach_every_statistic():
    """The finiteness check is made once per layer, on the sums: NaN or inf in any
    batch must leave every kind of statistic non-finite (no check per batch)."""
    for value in (float("nan"), float("inf"), float("-inf")):
        for with_moments, with_gram in ((True, False), (False, True)):
            stats = InputStats(12, with_moments=with_moments, with_gram=with_gram)
            for i, x in enumerate(batches(seed=5, n=3)):
                if i == 1:
                    x[0, 2, 7] = value
                stats.update(x)
            with pytest.raises(NonFiniteStatisticsError):
                stats.check_finite("layer")


def test_bfloat16_gram_products():
    """bfloat16 Gram products: the sum of each batch's product of the inputs rounded to
    bfloat16, in float32; exact where the inputs and products are (small integers);
    within bfloat16's rounding of the float32 Gram otherwise."""
    torch.manual_seed(1)
    xs = [torch.randn(2, 30, 16) for _ in range(3)]
    low = InputStats(16, with_moments=False, with_gram=True, gram_dtype=torch.bfloat16)
    full = InputStats(16, with_moments=False, with_gram=True)
    for x in xs:
        low.update(x)
        full.update(x)
    expected = sum(torch.mm(x.reshape(-1, 16).bfloat16().t(), x.reshape(-1, 16).bfloat16()).float()
                   for x in xs)
    assert torch.equal(low.gram_sum, expected)
    assert low.gram_sum.dtype == torch.float32
    torch.testing.assert_close(low.gram(), full.gram(), rtol=2e-2, atol=2e-2)
    assert not torch.equal(low.gram(), full.gram())
    ints = torch.randint(-3, 4, (1, 20, 16)).float()
    exact = InputStats(16, with_moments=False, with_gram=True, gram_dtype=torch.bfloat16)
    exact.update(ints)
    flat = ints.reshape(-1, 16)
    assert torch.equal(exact.gram_sum, flat.t() @ flat)
    with pytest.raises(ValueError, match="bfloat16"):
        InputStats(16, with_gram=True, gram_dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scratch_buffers_give_the_same_sums_bit_for_bit(dtype):
    """The CPU updates' reused buffers change no bit of any statistic, whatever the
    order of batch shapes (a buffer grown by a big batch serves a smaller one)."""
    from dsnot_modifier._kernels import Workspace

    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(2, 37, 24, generator=g) * 3 + 1, torch.randn(50, 24, generator=g),
               torch.randn(1, 9, 24, generator=g), torch.randn(3, 40, 24, generator=g) - 2]
    batches = [b.to(dtype) for b in batches]
    copies = [b.clone() for b in batches]
    scratch = Workspace(reuse=True)
    for kinds in ({"with_moments": True}, {"with_moments": True, "with_gram": True},
                  {"with_moments": False, "with_gram": False}):
        plain, reused = InputStats(24, **kinds), InputStats(24, **kinds)
        for b in batches:
            plain.update(b)
            reused.update(b, scratch)
        for field in ("sum", "sumsq", "seq_var_sum", "gram_sum"):
            a, b = getattr(plain, field), getattr(reused, field)
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b), field
    assert all(torch.equal(b, c) for b, c in zip(batches, copies))  # inputs only read
    held = scratch.take("x", (2, 3), torch.float32, "cpu")
    assert scratch.take("x", (3, 2), torch.float32, "cpu").data_ptr() == held.data_ptr()  # reused
    scratch.clear()
    again = scratch.take("x", (2, 3), torch.float32, "cpu")  # made afresh (held is still alive)
    assert again.shape == (2, 3) and again.data_ptr() != held.data_ptr()


def test_finiteness_is_checked_again_after_the_sums_change():
    """check_finite returns at once for sums it passed, and checks again once an update,
    a merge or a reduction changed them."""
    stats = InputStats(12)
    for x in batches(seed=5, n=2):
        stats.update(x)
    stats.check_finite("a")
    stats.check_finite("a")
    bad = batches(seed=6, n=1)[0]
    bad[0, 0, 0] = float("nan")
    stats.update(bad)
    with pytest.raises(NonFiniteStatisticsError, match="inputs of b hold NaN"):
        stats.check_finite("b")
    clean, poisoned = InputStats(12), InputStats(12)
    clean.update(batches(seed=7, n=1)[0])
    clean.check_finite()
    poisoned.update(bad)
    clean.merge_(poisoned)
    with pytest.raises(NonFiniteStatisticsError):
        clean.check_finite()
