"""
The weight update on a fixed mask (``dsnot_modifier.update``) against an exact, slow,
row-by-row reference written here: ``torch.linalg.solve`` on the damped ``H_KK`` of every
row, in float64.

Tolerance: with the defaults (``cg``, stopping rule ``tol=1e-3``), the layer's exact error
``Σ_i e_iᵀ H e_i`` (undamped ``H``, float64) after the update is within 1% of the
reference's (``REL_TOL``); for bfloat16 weights, within 1% of the larger of that and the
reference's own error once rounded to bfloat16. Run to convergence, the solvers give the
reference's weights (float64, ``allclose``).
"""

from __future__ import annotations

import pytest
import torch

from dsnot_modifier.update import (
    UpdateResult,
    row_errors,
    solve_cg,
    update_weights,
)

#: the layer's error after the update may exceed the reference's by this fraction
REL_TOL = 0.01
#: the documented damping: λ·mean(diag H) added to H's diagonal, λ = 1% (SparseGPT's)
DAMP = 0.01


def gram_of(x: torch.Tensor) -> torch.Tensor:
    return (x.t() @ x / x.shape[0]).to(torch.float64)


def make_gram(cols: int, kind: str, seed: int) -> torch.Tensor:
    """
    ``E[x xᵀ]`` (float64) of correlated inputs with uneven column scales. ``well``: many more
    tokens than columns; ``deficient``: fewer tokens than columns and 3 dead columns (zero rows
    and columns of H); ``ill``: column scales over 8 orders of magnitude, exactly duplicated
    columns and few tokens.
    """
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols, dtype=torch.float64) + 0.5 * torch.randn(cols, cols, generator=g,
                                                                     dtype=torch.float64) / cols ** 0.5
    if kind == "well":
        scale = torch.exp(0.5 * torch.randn(cols, generator=g, dtype=torch.float64))
        x = torch.randn(8 * cols, cols, generator=g, dtype=torch.float64) @ mix * scale
    elif kind == "deficient":
        scale = torch.exp(torch.randn(cols, generator=g, dtype=torch.float64))
        x = torch.randn(cols // 2, cols, generator=g, dtype=torch.float64) @ mix * scale
        x[:, [1, 7, cols - 1]] = 0
    elif kind == "ill":
        scale = torch.logspace(-4, 4, cols, dtype=torch.float64)[torch.randperm(cols, generator=g)]
        x = torch.randn(cols // 3, cols, generator=g, dtype=torch.float64) @ mix * scale
        x[:, 1] = x[:, 0]
        x[:, 3] = -2 * x[:, 2]
    else:
        raise ValueError(kind)
    return gram_of(x)


def wanda_prune(weight: torch.Tensor, gram: torch.Tensor, structure: str) -> torch.Tensor:
    """Wanda's rule: per row (``"0.6"``) or per block of 4 (``"2:4"``), the lowest |W|·sqrt(H_cc)."""
    score = weight.abs().to(torch.float64) * gram.diagonal().clamp(min=0).sqrt()
    rows, cols = weight.shape
    if structure == "2:4":
        order = score.reshape(rows, cols // 4, 4).argsort(dim=2, stable=True)[:, :, :2]
        drop = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(2, order, True).reshape(rows, cols)
    else:
        order = score.argsort(dim=1, stable=True)[:, : int(cols * float(structure))]
        drop = torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, order, True)
    return weight.masked_fill(drop, 0)


def make_problem(rows=48, cols=96, kind="well", structure="0.6", dtype=torch.float32, seed=0):
    """(dense, current, gram) with dense and current in ``dtype``, gram float64."""
    gram = make_gram(cols, kind, seed)
    g = torch.Generator().manual_seed(seed + 1)
    dense = torch.randn(rows, cols, generator=g, dtype=torch.float64).to(dtype)
    return dense, wanda_prune(dense, gram, structure), gram


def reference(dense, current, gram, damp=DAMP) -> torch.Tensor:
    """The exact minimiser of every row, one ``linalg.solve`` of ``D_KK`` per row (float64)."""
    w = dense.to(torch.float64)
    h = gram.to(torch.float64)
    d = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    target = w @ d
    out = torch.zeros_like(w)
    for i in range(w.shape[0]):
        kept = (current[i] != 0).nonzero().flatten()
        if kept.numel():
            out[i, kept] = torch.linalg.solve(d[kept][:, kept], target[i, kept])
    return out


def layer_error(dense, weight, gram) -> float:
    """``Σ_i e_iᵀ H e_i``, written out here in float64."""
    e = dense.to(torch.float64) - weight.to(torch.float64)
    return float(torch.einsum("ic,cd,id->", e, gram.to(torch.float64), e))


def per_row_error(dense, weight, gram) -> torch.Tensor:
    e = dense.to(torch.float64) - weight.to(torch.float64)
    return torch.einsum("ic,cd,id->i", e, gram.to(torch.float64), e)


def assert_mask_and_layout(result: UpdateResult, current: torch.Tensor):
    assert isinstance(result, UpdateResult)
    assert result.weight.dtype == current.dtype
    assert result.weight.shape == current.shape
    assert result.weight.device == current.device
    assert torch.equal(result.weight == 0, current == 0), "the mask changed"
    assert bool(torch.isfinite(result.weight).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("structure", ["0.6", "2:4"])
@pytest.mark.parametrize("kind", ["well", "deficient"])
def test_update_reaches_the_reference_error(kind, structure, dtype):
    dense, current, gram = make_problem(kind=kind, structure=structure, dtype=dtype, seed=3)
    gram_in = gram.to(torch.float64 if dtype == torch.float64 else torch.float32)
    result = update_weights(dense, current, gram_in)
    assert_mask_and_layout(result, current)
    assert result.status == "updated" and result.reason is None
    assert result.iterations > 0

    # the errors reported are the exact ones (undamped H as given, float64)
    before = layer_error(dense, current, gram_in)
    after = layer_error(dense, result.weight, gram_in)
    assert result.error_before == pytest.approx(before, rel=1e-9)
    assert result.error_after == pytest.approx(after, rel=1e-9)
    assert result.error_after <= result.error_before
    assert (per_row_error(dense, result.weight, gram_in) <= per_row_error(dense, current, gram_in)).all()

    exact = reference(dense, current, gram_in)
    best = layer_error(dense, exact, gram_in)
    assert best < 0.9 * before, "the problem should leave room for the update"
    if dtype == torch.bfloat16:
        best = max(best, layer_error(dense, exact.to(dtype), gram_in))
    assert after <= best * (1 + REL_TOL), (after, best, before)


@pytest.mark.parametrize("structure", ["0.6", "2:4"])
def test_nm_blocks_keep_their_zeros(structure):
    dense, current, gram = make_problem(rows=32, cols=64, kind="deficient", structure=structure, seed=5)
    result = update_weights(dense, current, gram.float())
    assert result.status == "updated"
    zeros_in = (current == 0).reshape(32, 16, 4).sum(dim=2)
    zeros_out = (result.weight == 0).reshape(32, 16, 4).sum(dim=2)
    assert torch.equal(zeros_in, zeros_out)
    if structure == "2:4":
        assert bool((zeros_out == 2).all())
    # the kept values did move (the update is not a no-op)
    kept = current != 0
    assert not torch.equal(result.weight[kept], current[kept])


@pytest.mark.parametrize("method", ["cg", "admm", "exact"])
@pytest.mark.parametrize("kind", ["well", "deficient"])
def test_solvers_converge_to_the_reference_weights(method, kind):
    dense, current, gram = make_problem(rows=24, cols=64, kind=kind, structure="0.6",
                                        dtype=torch.float64, seed=11)
    result = update_weights(dense, current, gram, method=method, tol=0.0,
                            max_iters={"cg": 300, "admm": 2000, "exact": 1}[method])
    exact = reference(dense, current, gram)
    assert torch.allclose(result.weight, exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max())), \
        float((result.weight - exact).abs().max())
    assert result.error_after == pytest.approx(layer_error(dense, exact, gram), rel=1e-8)


def test_chunked_rows_give_the_same_weights():
    dense, current, gram = make_problem(rows=40, cols=64, kind="well", seed=2)
    whole = update_weights(dense, current, gram.float())
    chunked = update_weights(dense, current, gram.float(), chunk_rows=7)
    assert torch.allclose(whole.weight, chunked.weight, rtol=1e-4, atol=1e-5)
    assert chunked.error_after == pytest.approx(whole.error_after, rel=1e-4)


def test_dead_columns_keep_their_dense_values():
    dense, current, gram = make_problem(rows=16, cols=64, kind="deficient", seed=4)
    dead = [1, 7, 63]
    assert bool((gram[dead][:, :] == 0).all())
    current[:, dead] = dense[:, dead]                   # keep the dead columns' weights
    result = update_weights(dense, current, gram.float(), tol=1e-10, max_iters=200)
    assert result.status == "updated"
    assert torch.allclose(result.weight[:, dead], dense[:, dead], rtol=1e-4, atol=1e-6)


def test_no_input_signal_leaves_the_layer_unchanged():
    dense, current, _ = make_problem(rows=8, cols=32, seed=1)
    result = update_weights(dense, current, torch.zeros(32, 32))
    assert result.status == "unchanged"
    assert result.reason == "no input signal"
    assert torch.equal(result.weight, current)
    assert result.error_before == result.error_after == 0.0
    assert result.iterations == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ill_conditioned_gram_gives_finite_weights(dtype):
    dense, current, gram = make_problem(rows=32, cols=96, kind="ill", dtype=dtype, seed=7)
    assert float(torch.linalg.cond(gram)) > 1e12 or not bool(torch.isfinite(torch.linalg.cond(gram)))
    result = update_weights(dense, current, gram.float())
    assert_mask_and_layout(result, current)
    assert result.status == "updated"
    assert result.error_after <= result.error_before
    h = gram.float()
    assert (per_row_error(dense, result.weight, h) <= per_row_error(dense, current, h)).all()
    # and the damped problem is still solved: within the tolerance of the reference
    exact = reference(dense, current, gram.float())
    best = max(layer_error(dense, exact, gram.float()), layer_error(dense, exact.to(dtype), gram.float()))
    if dtype == torch.float32:          # (bfloat16's rounding eats most of the gain at these scales)
        assert best < 0.5 * result.error_before
    assert result.error_after <= best * (1 + REL_TOL)


def test_without_damping_a_singular_gram_still_gives_finite_weights():
    dense, current, gram = make_problem(rows=16, cols=64, kind="ill", seed=8)
    result = update_weights(dense, current, gram.float(), damp=0.0)
    assert_mask_and_layout(result, current)
    assert result.error_after <= result.error_before


@pytest.mark.parametrize("where", ["gram", "dense", "current"])
def test_non_finite_input_leaves_the_layer_unchanged(where):
    dense, current, gram = make_problem(rows=8, cols=32, seed=1)
    gram = gram.float()
    {"gram": gram, "dense": dense, "current": current}[where][2, 3] = float("nan")
    result = update_weights(dense, current, gram)
    assert result.status == "unchanged"
    assert "non-finite" in result.reason
    assert torch.equal(result.weight.isnan(), current.isnan())
    assert torch.equal(result.weight.nan_to_num(), current.nan_to_num())


def test_rows_that_would_get_worse_keep_their_input():
    dense, current, gram = make_problem(rows=24, cols=64, kind="well", seed=9)
    # start at the exact solution: one ADMM step from there lands elsewhere, never better
    start = reference(dense, current, gram).float()
    result = update_weights(dense, start, gram.float(), method="admm", max_iters=1)
    assert 0 < result.rows_kept <= 24
    h = gram.float()
    assert (per_row_error(dense, result.weight, h) <= per_row_error(dense, start, h)).all()
    kept_rows = (result.weight == start).all(dim=1)
    assert int(kept_rows.sum()) >= result.rows_kept
    if result.status == "unchanged":
        assert result.reason == "no row improved" and result.rows_kept == 24
        assert torch.equal(result.weight, start)
        assert result.error_after == result.error_before


def test_rows_without_kept_or_pruned_weights():
    dense, current, gram = make_problem(rows=6, cols=32, seed=6)
    current[0] = 0                      # everything pruned: stays all zero
    current[1] = dense[1]               # nothing pruned: already exact
    result = update_weights(dense, current, gram.float())
    assert_mask_and_layout(result, current)
    assert torch.equal(result.weight[0], current[0])
    assert torch.equal(result.weight[1], current[1])
    assert result.status == "updated"


def test_solve_cg_stopping_rule_and_work():
    dense, current, gram = make_problem(rows=32, cols=64, kind="deficient", seed=10)
    w, c, h = dense, current, gram.float()
    mask = c != 0
    _, loose_iters, loose_work = solve_cg(w, c, mask, h, max_iters=500, tol=1e-2)
    _, tight_iters, tight_work = solve_cg(w, c, mask, h, max_iters=500, tol=1e-6)
    assert 0 < loose_iters < tight_iters <= 500
    assert 0 < loose_work <= loose_iters and loose_work < tight_work <= tight_iters
    _, capped, work = solve_cg(w, c, mask, h, max_iters=3, tol=0.0)
    assert capped == 3 and work == 3


def test_row_errors_is_exact_in_float64():
    dense, current, gram = make_problem(rows=8, cols=32, seed=12)
    assert torch.allclose(row_errors(dense, current, gram.float()),
                          per_row_error(dense, current, gram.float()), rtol=1e-12)


def test_bad_arguments():
    dense, current, gram = make_problem(rows=4, cols=16, seed=0)
    with pytest.raises(ValueError, match="shapes"):
        update_weights(dense, current, gram[:8, :8])
    with pytest.raises(ValueError, match="method"):
        update_weights(dense, current, gram, method="newton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_the_device_of_the_weight(dtype):
    dense, current, gram = make_problem(rows=32, cols=64, kind="deficient", structure="2:4", dtype=dtype)
    result = update_weights(dense.cuda(), current.cuda(), gram.float().cuda())
    assert_mask_and_layout(result, current.cuda())
    on_cpu = update_weights(dense, current, gram.float())
    assert result.error_after == pytest.approx(on_cpu.error_after, rel=1e-3)


@pytest.mark.parametrize("method", ["cg", "admm"])
def test_dead_columns_without_damping(method):
    dense, current, gram = make_problem(rows=16, cols=64, kind="deficient", seed=13)
    dead = [1, 7, 63]
    current[:, dead] = dense[:, dead] * 0.5             # kept, and away from their dense values
    result = update_weights(dense, current, gram.float(), damp=0.0, method=method)
    assert_mask_and_layout(result, current)
    assert result.status == "updated"
    assert result.error_after < 0.9 * result.error_before


def test_products_run_in_full_float32_whatever_the_caller_set(high_precision, monkeypatch):
    """A caller's ``set_float32_matmul_precision("high")`` does not reach the update's
    products; the caller's setting is back after."""
    import dsnot_modifier.update as update

    seen = []
    original = update.solve_cg

    def recording(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return original(*args, **kwargs)

    monkeypatch.setattr(update, "solve_cg", recording)
    dense, current, gram = make_problem(seed=5)
    result = update_weights(dense, current, gram)
    assert seen == ["highest"] and torch.get_float32_matmul_precision() == "high"
    assert result.error_after < result.error_before


def test_a_non_finite_gram_leaves_the_layer_unchanged():
    dense, current, gram = make_problem(seed=6)
    for bad in (float("nan"), float("inf"), -float("inf")):
        spoiled = gram.clone()
        spoiled[3, 7] = bad
        result = update_weights(dense, current, spoiled)
        assert result.status == "unchanged" and torch.equal(result.weight, current)
        assert "non-finite" in result.reason
