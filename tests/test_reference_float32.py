"""
The vectorised refinement against the plain reference (``tests/reference.py``) on data
that the float64, tie-free comparisons of ``test_swaps.py`` cannot catch bugs with:

- float32 weights and float32 statistics, as the modifier hands them to ``refine_mask``
  (the reference runs in float64 on copies of the same values), both objectives ×
  unstructured, 2:4 and 4:8 × several seeds, on inputs with correlated columns;
- SparseGPT-like current weights: kept values perturbed away from the dense ones and a
  different number of zeros per row, so that using the dense weight where the current
  one belongs (or the other way round) changes the result;
- wide rows (enough columns that ``mean``'s candidate lists come from the two-stage
  top-k, :func:`dsnot_modifier._kernels.topk_rows`) with quantised values, so that many
  candidates tie, also across the k-th place of the lists (the rows that
  :func:`dsnot_modifier._kernels.fix_ties` must sort in full);
- bfloat16 and float16 weights (refined in float32, returned in their dtype).

How often float32 legitimately picks another swap than the float64 reference: never, on
every layer here (measured: 0 differing rows of 48 in each of the 36 float32 layers of
this file, at 2 to 28 swaps per row). It can happen only at a near-tie: two candidates
whose scores, or a swap's gain and the acceptance bound, differ by less than float32's
rounding of the row's sums (about 1e-7 of their size). Such a row is allowed to differ,
at most ``MAX_DIFFERING_ROWS`` per layer, if its float64 error (recomputed here from the
weights, not taken from the refinement) is within ``GRAM_RTOL`` of the reference row's
for ``gram`` (relative: the parting swaps gain the same to rounding; later swaps may
differ, hence a margin well above the rounding) and within ``MEAN_ATOL`` for ``mean``
(absolute, per-token units: 2% of the default threshold).
"""

from __future__ import annotations

import pytest
import torch

from dsnot_modifier import _kernels, swaps
from dsnot_modifier.masks import initial_mask
from dsnot_modifier.swaps import gram_error, mean_error, refine_mask
from helpers import block_zeros
from reference import refine_reference

STRUCTURES = [None, (2, 4), (4, 8)]
SEEDS = [0, 1, 2]

#: differing rows allowed per layer (of 48), see the module's docstring
MAX_DIFFERING_ROWS = 1
GRAM_RTOL = 1e-3
MEAN_ATOL = 1e-6
#: reported (incremental) vs recomputed error of a layer: measured at most 4e-7 in float32
REPORT_RTOL = 1e-5


def correlated_layer(rows=48, cols=128, seed=0, nm=None, *, sparsegpt=False, tokens=1024,
                     sequences=8, sparsity=0.6):
    """
    A float32 layer and the float32 statistics of its inputs (as ``InputStats`` gives
    them): inputs with correlated columns, non-zero means and uneven scales; the mask
    is Wanda's, or for ``sparsegpt`` a random one with 40% to 80% zeros per row
    (unstructured; N:M: Wanda's blocks) with kept values moved off the dense ones.
    """
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    w = torch.randn(rows, cols, **f64).float()
    mix = torch.randn(cols, cols, **f64) / cols**0.5 + torch.diag(torch.rand(cols, **f64) * 2)
    x = (torch.randn(tokens, cols, **f64) @ mix + 0.5 * torch.randn(cols, **f64)).float().double()
    stats = dict(
        mean=x.mean(0), var=x.view(sequences, -1, cols).var(1, correction=0).mean(0),
        sqnorm=(x * x).mean(0), gram=x.T @ x / tokens,
    )
    stats = {k: v.float() for k, v in stats.items()}
    if sparsegpt and nm is None:
        mask = torch.rand(w.shape, generator=g) < torch.linspace(0.4, 0.8, rows).unsqueeze(1)
    else:
        mask = initial_mask(w, sparsity, nm, "wanda", stats["sqnorm"])
    wc = w
    if sparsegpt:
        wc = w + 0.3 * torch.randn(w.shape, **f64).float()
    return w, wc.masked_fill(mask, 0), stats


def row_errors(objective, w, out, stats):
    """Every row's error in float64, recomputed from the weights."""
    stats = {k: v.double() for k, v in stats.items()}
    if objective == "gram":
        return gram_error(w, out, stats["gram"])
    return mean_error(w, out, stats["mean"]).abs()


def assert_matches_reference(objective, w, wc, stats, out, nm=None, exact=False, **kwargs):
    """
    ``out`` (the refinement of the float32 ``w, wc``) against the reference run in
    float64 on copies of the same values: equal rows, or (``exact`` False) at most
    ``MAX_DIFFERING_ROWS`` rows whose float64 error is as good within the tolerance.
    """
    ref = refine_reference(w.double(), wc.double(), objective, nm,
                           **{k: v.double() for k, v in stats.items()}, **kwargs)
    differ = (out.double() != ref).any(1)
    if exact or not differ.any():
        assert torch.equal(out.double(), ref), f"{int(differ.sum())} rows differ"
        return ref
    assert int(differ.sum()) <= MAX_DIFFERING_ROWS, f"{int(differ.sum())} rows differ"
    ours, theirs = row_errors(objective, w, out, stats)[differ], row_errors(objective, w, ref, stats)[differ]
    if objective == "gram":
        assert bool((ours <= theirs * (1 + GRAM_RTOL)).all()), (ours, theirs)
    else:
        assert bool((ours <= theirs + MEAN_ATOL).all()), (ours, theirs)
    return ref


def assert_reported_errors_exact(objective, w, wc, stats, res, rel=REPORT_RTOL):
    """
    The errors ``refine_mask`` reports (tracked incrementally through the swaps, in the
    compute dtype) against float64 recomputations from the weights: catches a running
    ``r`` or ``L`` that drifts away from the weights it stands for.
    """
    before = float(row_errors(objective, w, wc, stats).sum())
    after = float(row_errors(objective, w, res.weight, stats).sum())
    assert res.error_before == pytest.approx(before, rel=rel)
    assert res.error_after == pytest.approx(after, rel=rel)
    assert after < before


def assert_swaps_keep_values(w, wc, out, nm=None):
    """Zeros per row (and per N:M block) kept; kept values the current ones, grown dense."""
    assert torch.equal((out == 0).sum(1), (wc == 0).sum(1))
    if nm is not None:
        n, m = nm
        assert torch.equal(block_zeros(out, m), block_zeros(wc, m))
    kept, grown = (out != 0) & (wc != 0), (out != 0) & (wc == 0)
    assert torch.equal(out[kept], wc[kept]) and torch.equal(out[grown], w[grown])


# ------------------------------------------------------------ float32, both objectives

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("nm", STRUCTURES)
@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_float32_matches_float64_reference(objective, nm, seed):
    w, wc, stats = correlated_layer(seed=10 + seed, nm=nm)
    kwargs = dict(max_cycles=50, threshold=0.0)
    res = refine_mask(w, wc, objective=objective, nm=nm, **stats, **kwargs)
    assert res.weight.dtype == torch.float32
    assert res.rows_changed >= w.shape[0] // 3  # many rows swap: the comparison means something
    assert_matches_reference(objective, w, wc, stats, res.weight, nm, **kwargs)
    assert_reported_errors_exact(objective, w, wc, stats, res)


@pytest.mark.parametrize("nm", STRUCTURES)
def test_mean_threshold_stops_rows_as_the_reference(nm):
    """A threshold that stops about half the rows early (its test reads the running r)."""
    w, wc, stats = correlated_layer(seed=15, nm=nm, sparsegpt=True)
    free = refine_mask(w, wc, objective="mean", nm=nm, **stats, threshold=0.0)
    threshold = float(mean_error(w, wc, stats["mean"]).abs().median()) / 4
    res = refine_mask(w, wc, objective="mean", nm=nm, **stats, threshold=threshold)
    assert 0 < res.swaps < free.swaps
    assert_matches_reference("mean", w, wc, stats, res.weight, nm, threshold=threshold)
    assert_reported_errors_exact("mean", w, wc, stats, res)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_sparsegpt_like_weights_match_reference(objective, nm, dtype):
    """Kept values differ from the dense ones, rows have different zero counts."""
    w, wc, stats = correlated_layer(seed=20, nm=nm, sparsegpt=True)
    if nm is None:
        assert len(set((wc == 0).sum(1).tolist())) > 10
    kept = wc != 0
    assert bool((wc[kept] != w[kept]).all())
    w, wc = w.to(dtype), wc.to(dtype)
    stats = {k: v.to(dtype) for k, v in stats.items()}
    kwargs = dict(max_cycles=50, threshold=0.0)
    res = refine_mask(w, wc, objective=objective, nm=nm, **stats, **kwargs)
    # swap chains (measured: 1.7 to 28 swaps a row, gram unstructured the longest)
    assert res.swaps >= w.shape[0]
    assert_swaps_keep_values(w, wc, res.weight, nm)
    assert_matches_reference(objective, w, wc, stats, res.weight, nm,
                             exact=dtype == torch.float64, **kwargs)
    assert_reported_errors_exact(objective, w, wc, stats, res)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_half_precision_weights_match_reference(objective, dtype):
    """bf16/fp16 weights: the reference on the same rounded values (float64 copies)."""
    nm = (2, 4)
    w, wc, stats = correlated_layer(seed=30, nm=nm, sparsegpt=True)
    w, wc = w.to(dtype), wc.to(dtype)
    kwargs = dict(max_cycles=50, threshold=0.0)
    res = refine_mask(w, wc, objective=objective, nm=nm, **stats, **kwargs)
    assert res.weight.dtype == dtype and res.swaps > w.shape[0]
    assert_swaps_keep_values(w, wc, res.weight, nm)
    assert_matches_reference(objective, w.float(), wc.float(), stats, res.weight.float(), nm, **kwargs)


# ------------------------------------------------------------- wide rows with ties

class TopkSpy:
    """Records what the candidate lists of ``mean`` went through (wraps, does not change)."""

    def __init__(self, monkeypatch):
        self.two_stage = 0
        self.tied_rows = 0
        topk, fix = _kernels.topk_rows, swaps.fix_ties

        def topk_rows(key, k, largest):
            cols = key.shape[1]
            if cols % _kernels._TOPK_PARTS == 0 and cols // _kernels._TOPK_PARTS >= 4 * k:
                self.two_stage += 1
            return topk(key, k, largest)

        def fix_ties(tied, lists):
            self.tied_rows += int(tied.sum())
            return fix(tied, lists)

        monkeypatch.setattr(_kernels, "topk_rows", topk_rows)  # called by first_k
        monkeypatch.setattr(swaps, "fix_ties", fix_ties)  # called by the mean lists


def quantised_layer(rows=48, cols=512, seed=0, nm=None, tokens=256, sparsegpt=False):
    """
    Weights, input statistics and Gram matrix on a coarse dyadic grid, so that many grow
    and prune scores tie exactly (in float32 and float64 alike: every sum is exact).
    """
    g = torch.Generator().manual_seed(seed)

    def pick(values, shape):
        values = torch.tensor(values, dtype=torch.float32)
        return values[torch.randint(len(values), shape, generator=g)]

    w = pick([-1.0, -0.75, -0.5, -0.25, 0.25, 0.5, 0.75, 1.0], (rows, cols))
    x = pick([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5], (tokens, cols))
    stats = dict(mean=pick([-1.0, -0.5, 0.5, 1.0], (cols,)), var=pick([0.25, 0.5, 1.0, 2.0], (cols,)),
                 sqnorm=pick([0.25, 1.0, 4.0], (cols,)), gram=x.T @ x / tokens)
    mask = initial_mask(w, 0.6, nm, "wanda", stats["sqnorm"])
    wc = w
    if sparsegpt:
        wc = w + pick([-0.25, 0.0, 0.25], (rows, cols))
        wc = torch.where(wc == 0, w, wc)  # a kept weight is never zero
    return w, wc.masked_fill(mask, 0), stats


@pytest.mark.parametrize("sparsegpt", [False, True])
@pytest.mark.parametrize("sign_check", [True, False])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_wide_rows_with_ties_match_reference(monkeypatch, nm, sign_check, sparsegpt):
    max_cycles = 7  # two-stage top-k from 32 · (max_cycles + 1) = 256 columns on
    w, wc, stats = quantised_layer(seed=40 + sparsegpt, nm=nm, sparsegpt=sparsegpt)
    spy = TopkSpy(monkeypatch)
    kwargs = dict(max_cycles=max_cycles, threshold=0.0, sign_check=sign_check)
    res = refine_mask(w, wc, objective="mean", nm=nm, **stats, **kwargs)
    assert spy.two_stage > 0, "the two-stage top-k was not reached"
    assert spy.tied_rows >= 5, "no tie across the k-th place of a candidate list"
    assert res.rows_changed >= w.shape[0] // 2
    assert_swaps_keep_values(w, wc, res.weight, nm)
    assert_matches_reference("mean", w, wc, stats, res.weight, nm, exact=True, **kwargs)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_gram_ties_take_the_first_column_as_the_reference(nm):
    """Exactly tied gains (dyadic data): both pick the lowest column, in every block size."""
    w, wc, stats = quantised_layer(rows=32, cols=256, seed=50, nm=nm, sparsegpt=True)
    kwargs = dict(max_cycles=20)
    res = refine_mask(w, wc, objective="gram", nm=nm, gram=stats["gram"], **kwargs)
    assert res.rows_changed >= w.shape[0] // 2
    assert_matches_reference("gram", w, wc, stats, res.weight, nm, exact=True, **kwargs)
