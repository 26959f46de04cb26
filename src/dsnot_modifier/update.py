"""
The weight update on a fixed mask, in plain torch (see docs/algorithm.md, "Weight update").

A pruner (and DSnoT's swaps) leave a layer whose kept weights need not be the best ones for
its mask. Given the dense weight ``W``, the current weight ``Wc`` (its zeros are the mask:
pruned set ``P_i`` and kept set ``K_i`` of row ``i``) and the inputs' Gram matrix
``H = E[x xᵀ]``, this re-solves the kept values of every row,

    minimise over Ŵ_i  (W_i − Ŵ_i) H (W_i − Ŵ_i)ᵀ   subject to  Ŵ_iP = 0,

whose solution is ``Ŵ_iK = W_iK + H_KK⁻¹ H_KP W_iP``. ``K_i`` differs from row to row, so
a solve per row is slow; the solvers here share the work between the rows:

- ``cg`` (the default): conjugate gradients on the masked normal equations
  ``M ⊙ ((X − W) D) = 0`` of all rows at once, ``D`` the damped ``H``. Each iteration is one
  product ``[rows, cols] × [cols, cols]`` of the masked search directions with ``D``; step
  sizes are per row; preconditioned with ``diag(D)`` (Jacobi). Starts from ``Wc``; a row
  stops once its preconditioned residual ``r·z`` is at most ``tol`` of its error (see
  :func:`solve_cg`), and leaves the products.
- ``admm``: the alternating direction method of multipliers of Boža (arXiv 2401.02938) with
  one factorisation of ``D + ρI`` (after scaling the columns to a unit diagonal): alternate
  an unconstrained ridge solve, the projection onto the mask and a dual step.
- ``exact``: a Cholesky solve of ``D_KK`` per row, batched over chunks of rows (rows padded
  to the chunk's largest ``|K|`` with identity): exact, the benchmark's reference for the
  fast solvers; its cost grows as ``rows·|K|³``.

Damping: ``D = H + λ·mean(diag H)·I`` (ridge towards the dense weight; a kept weight on a
dead input column, ``H_cc = 0``, gets its dense value). Safeguards: the result is cast to
the weight's dtype first, then each row's exact error ``e_iᵀ H e_i`` (float64, undamped ``H``)
is compared with the input row's, and a row that did not improve keeps its input values; a
non-finite result, non-finite inputs or a Gram matrix without signal leave the layer
unchanged, with the reason. The mask is never changed: pruned weights stay exact zeros, and a
kept weight that would come out exactly zero keeps its input value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsnot_modifier._kernels import all_finite, full_precision

__all__ = [
    "UpdateResult",
    "update_weights",
    "damping",
    "damped_gram",
    "row_errors",
    "solve_cg",
    "solve_admm",
    "solve_exact",
    "METHODS",
    "DAMP",
    "MAX_ITERS",
    "TOL",
]

METHODS = ("cg", "admm", "exact")
#: damping λ: ``λ·mean(diag H)`` is added to the diagonal of ``H`` (SparseGPT's 1%)
DAMP = 0.01
#: iteration limit of ``cg`` and the iteration count of ``admm``
MAX_ITERS = 50
#: ``cg`` stops a row once ``r·z`` (its preconditioned residual) is at most ``tol`` of its error
TOL = 1e-3


@dataclass
class UpdateResult:
    """
    The result of :func:`update_weights`.

    :param weight: the updated weight: dtype, device and shape of ``current``, exact zeros
        exactly where ``current`` has them
    :param error_before: ``Σ_i (W_i − Wc_i) H (W_i − Wc_i)ᵀ`` of the input, float64, undamped ``H``
    :param error_after: the same for ``weight`` (never above ``error_before``)
    :param iterations: iterations made by the solver, its slowest row's for ``cg`` (0 for
        ``exact`` or when unchanged)
    :param row_iterations: the mean over rows of the iterations each row made (``cg``'s work
        in products ``[rows, cols] × [cols, cols]``; ``iterations`` for ``admm``)
    :param status: ``"updated"`` or ``"unchanged"`` (then ``weight`` is ``current``'s values)
    :param reason: why the layer was left unchanged, else None
    :param rows_kept: rows that kept their input values because their solution was not
        better (or not finite)
    :param seconds: wall time of the update (set by the caller that times it)
    """

    weight: torch.Tensor
    error_before: float
    error_after: float
    iterations: int
    row_iterations: float = 0.0
    status: str = "updated"
    reason: str | None = None
    rows_kept: int = 0
    seconds: float = 0.0


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """float64 for float64 weights, float32 for every other dtype."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _chunks(rows: int, chunk_rows: int | None):
    step = rows if not chunk_rows or chunk_rows <= 0 else chunk_rows
    for start in range(0, rows, max(step, 1)):
        yield slice(start, min(start + step, rows))


def row_errors(dense: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor,
               chunk_rows: int | None = None) -> torch.Tensor:
    """Each row's exact error ``e_iᵀ H e_i`` with ``e = dense − weight``, in float64, ``[rows]``."""
    h = gram.to(dtype=torch.float64)
    out = torch.empty(dense.shape[0], dtype=torch.float64, device=dense.device)
    for rows in _chunks(dense.shape[0], chunk_rows):
        e = dense[rows].to(torch.float64) - weight[rows].to(torch.float64)
        out[rows] = ((e @ h) * e).sum(dim=1)
    return out


def damping(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """``δ = damp·mean(diag H)``, the damping added to ``H``'s diagonal (a 0-d tensor)."""
    return damp * gram.diagonal().mean()


def damped_gram(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """``D = H + δ·I`` with ``δ = damp·mean(diag H)`` (a new tensor, same dtype)."""
    out = gram.clone()
    out.diagonal().add_(damping(gram, damp))
    return out


def solve_cg(dense: torch.Tensor, start: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor,
             *, damp: float = DAMP, max_iters: int = MAX_ITERS, tol: float = TOL,
             precondition: bool = True) -> tuple[torch.Tensor, int, float]:
    """
    Conjugate gradients on ``M ⊙ ((X − W) D) = 0``, every row at once, from ``X = start``.

    ``dense``, ``start`` ``[rows, cols]`` and ``gram`` in the compute dtype, ``D`` its damped
    form (:func:`damped_gram`); ``mask`` bool, True where kept. Each row has its own step
    sizes, preconditioned with ``diag(D)`` (unless ``precondition`` is False). Stopping rule:
    a row stops once ``r_i·z_i ≤ tol·f_i``, with ``r_i`` the residual (half the negative
    gradient), ``z_i = r_i / diag(D)`` (``r·z`` is the gain still to come where ``D`` is
    diagonal) and ``f_i = e_i H e_iᵀ + δ·|e_iK|²`` the row's damped error without its
    constant part ``δ·|W_iP|²`` (``e = W − X``, ``δ`` the damping added to the diagonal);
    stopped rows leave the working set, so the products shrink as rows converge. All stop
    after ``max_iters``. Returns ``X`` (zero where ``mask`` is False), the iterations made by
    the slowest row and the mean over rows of the iterations each made (the work, in
    products of the whole layer).
    """
    shift = float(damping(gram, damp))
    m = mask.to(dense.dtype)
    out = start * m
    x = out.clone()
    e = dense - x
    eh = e @ gram
    f = (eh * e).sum(dim=1) + shift * (e * e * m).sum(dim=1)
    r = eh.add_(e, alpha=shift).mul_(m)             # (e D) on the kept coordinates: −gradient / 2
    diag = gram.diagonal() + shift
    live = diag > 0                                 # without damping, a dead column is not moved
    inv_diag = torch.where(live, diag.reciprocal(), 0.0) if precondition else live.to(diag.dtype)
    z = r * inv_diag
    rz = torch.linalg.vecdot(r, z)
    p = z.clone()
    rows = torch.arange(dense.shape[0], device=dense.device)
    iters, work = 0, 0
    while True:
        active = rz > tol * f.clamp(min=0)
        count = int(active.sum()) if iters < max_iters else 0     # the iteration's one host sync
        if count < rows.numel():
            out[rows] = x
            if count == 0:
                return out, iters, work / max(dense.shape[0], 1)
            rows, x, r, z, p, rz, f, m = (t[active] for t in (rows, x, r, z, p, rz, f, m))
        work += rows.numel()
        q = torch.addmm(p, p, gram, beta=shift).mul_(m)             # (p D) on the kept coordinates
        pq = torch.linalg.vecdot(p, q)
        alpha = rz / torch.where(pq > 0, pq, torch.full_like(pq, float("inf")))
        x.addcmul_(alpha[:, None], p)
        r.addcmul_(alpha[:, None], q, value=-1.0)
        f = f - alpha * rz
        torch.mul(r, inv_diag, out=z)
        rz_new = torch.linalg.vecdot(r, z)
        p.mul_((rz_new / rz)[:, None]).add_(z)
        rz = torch.where(alpha > 0, rz_new, torch.zeros_like(rz_new))
        iters += 1


def solve_admm(dense: torch.Tensor, start: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor,
               *, damp: float = DAMP, iters: int = MAX_ITERS, rho: float = 1.0) -> torch.Tensor:
    """
    ADMM with one factorisation (Boža, arXiv 2401.02938), from ``Z = start``.

    ``D`` is ``gram`` damped (:func:`damped_gram`); its columns are scaled to a unit diagonal
    (``ρ`` is then relative to it).
    With ``V`` unconstrained, ``Z`` on the mask and ``U`` the scaled dual, each iteration is

    - ``V = (W D + ρ (Z − U)) (D + ρI)⁻¹`` (the ridge step: one product with the inverse,
      computed once from a Cholesky factor),
    - ``Z = M ⊙ (V + U)`` (the projection onto the mask),
    - ``U = U + V − Z``.

    Returns ``Z`` after ``iters`` iterations (zero where ``mask`` is False).
    """
    damped = damped_gram(gram, damp)
    m = mask.to(dense.dtype)
    diag = damped.diagonal()
    s = torch.where(diag > 0, diag, 1.0).sqrt()
    ds = damped / (s[:, None] * s[None, :])
    ws = dense * s
    target = ws @ ds
    factor = ds.clone()
    factor.diagonal().add_(rho)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(factor))
    z = start * s * m
    u = torch.zeros_like(z)
    for _ in range(iters):
        v = (target + rho * (z - u)) @ inverse
        z = (v + u) * m
        u = u + v - z
    return z / s


def solve_exact(dense: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor, *, damp: float = DAMP,
                chunk_rows: int | None = None) -> torch.Tensor:
    """
    The exact solution ``X_iK = D_KK⁻¹ (W_i D)_K`` of every row (``D``: ``gram`` damped), by
    batched Cholesky solves.

    Rows are taken in chunks (``chunk_rows``; None: chosen so that a chunk's systems hold
    about 32M elements); in a chunk, each row's kept columns come first and the systems are
    padded to the chunk's largest ``|K|`` with identity rows and columns.
    """
    damped = damped_gram(gram, damp)
    rows, cols = dense.shape
    out = torch.zeros_like(dense)
    target = dense @ damped
    kept = mask.sum(dim=1)
    if chunk_rows is None:
        widest = max(int(kept.max()), 1) if rows else 1
        chunk_rows = max(1, (32 << 20) // (widest * widest))
    for sl in _chunks(rows, chunk_rows):
        k = kept[sl]
        width = int(k.max()) if k.numel() else 0
        if width == 0:
            continue
        order = torch.sort((~mask[sl]).to(torch.int8), dim=1, stable=True).indices[:, :width]
        valid = torch.arange(width, device=dense.device)[None, :] < k[:, None]
        system = damped[order[:, :, None], order[:, None, :]]
        pair = valid[:, :, None] & valid[:, None, :]
        system = torch.where(pair, system, torch.zeros((), dtype=system.dtype, device=system.device))
        system.diagonal(dim1=1, dim2=2).add_((~valid).to(system.dtype))
        rhs = torch.gather(target[sl], 1, order) * valid
        solution = torch.cholesky_solve(rhs[:, :, None], torch.linalg.cholesky(system))[:, :, 0]
        out[sl].scatter_(1, order, solution * valid)
    return out * mask


def _unchanged(current: torch.Tensor, before: float, reason: str, rows_kept: int = 0) -> UpdateResult:
    return UpdateResult(weight=current.clone(), error_before=before, error_after=before,
                        iterations=0, status="unchanged", reason=reason, rows_kept=rows_kept)


@full_precision()  # float32 products in full precision, whatever the caller set
def update_weights(
    dense: torch.Tensor,
    current: torch.Tensor,
    gram: torch.Tensor,
    *,
    damp: float = DAMP,
    max_iters: int = MAX_ITERS,
    tol: float = TOL,
    chunk_rows: int | None = None,
    method: str = "cg",
    rho: float = 1.0,
) -> UpdateResult:
    """
    Re-solve the kept weights of ``current`` so that the layer reproduces ``dense``'s output.

    :param dense: the dense weight ``W`` ``[rows, cols]``
    :param current: the pruned weight ``Wc``; its exact zeros are the mask, which is kept
    :param gram: ``H = E[x xᵀ]`` ``[cols, cols]``, symmetric positive semi-definite
    :param damp: ``λ``: ``λ·mean(diag H)`` is added to ``H``'s diagonal for the solve
    :param max_iters: iteration limit (``cg``) or count (``admm``)
    :param tol: ``cg``'s stopping rule: a row stops once ``r·z ≤ tol·f`` (its preconditioned
        residual against its error, see :func:`solve_cg`)
    :param chunk_rows: rows solved together (None: all of them; ``exact`` picks its own)
    :param method: ``"cg"``, ``"admm"`` or ``"exact"`` (see the module's doc)
    :param rho: ``admm``'s penalty, relative to the unit diagonal of the scaled ``D``
    :return: an :class:`UpdateResult`; computed in float32 (float64 for float64 weights) on
        ``current``'s device, the weight cast back to ``current``'s dtype
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    rows, cols = current.shape
    if dense.shape != current.shape or gram.shape != (cols, cols):
        raise ValueError(f"shapes do not match: dense {tuple(dense.shape)}, current "
                         f"{tuple(current.shape)}, gram {tuple(gram.shape)} (want [cols, cols])")
    device, dtype = current.device, _compute_dtype(current)
    dense_c = dense.to(device=device, dtype=dtype)
    gram = gram.to(device=device)
    gram_c = gram.to(dtype=dtype)
    if not (all_finite(dense_c) and all_finite(current) and all_finite(gram_c)):
        return _unchanged(current, float("nan"), "non-finite input (weight or Gram matrix)")
    before_rows = row_errors(dense_c, current, gram, chunk_rows)
    before = float(before_rows.sum())
    if float(gram_c.diagonal().clamp(min=0).sum()) <= 0.0:
        return _unchanged(current, before, "no input signal")
    mask = current != 0
    start = current.to(dtype)
    solved = torch.empty_like(start)
    iterations, work = 0, 0.0
    for sl in _chunks(rows, chunk_rows if method != "exact" else None):
        if method == "cg":
            solved[sl], its, mean = solve_cg(dense_c[sl], start[sl], mask[sl], gram_c, damp=damp,
                                             max_iters=max_iters, tol=tol)
            iterations, work = max(iterations, its), work + mean * (sl.stop - sl.start)
        elif method == "admm":
            solved[sl] = solve_admm(dense_c[sl], start[sl], mask[sl], gram_c, damp=damp,
                                    iters=max_iters, rho=rho)
            iterations, work = max_iters, work + max_iters * (sl.stop - sl.start)
        else:
            solved[sl] = solve_exact(dense_c[sl], mask[sl], gram_c, damp=damp, chunk_rows=chunk_rows)
    candidate = solved.to(current.dtype)
    # a kept weight must stay non-zero, a pruned one exactly zero
    candidate = torch.where(mask & (candidate == 0), current, candidate)
    candidate = torch.where(mask, candidate, torch.zeros_like(candidate))
    after_rows = row_errors(dense_c, candidate, gram, chunk_rows)
    better = torch.isfinite(after_rows) & (after_rows < before_rows)
    better &= torch.isfinite(candidate).all(dim=1)
    if not bool(better.any()):
        finite = bool(torch.isfinite(candidate).all())
        return _unchanged(current, before, "the solution is not finite" if not finite
                          else "no row improved", rows_kept=rows)
    weight = torch.where(better[:, None], candidate, current)
    after = float(torch.where(better, after_rows, before_rows).sum())
    return UpdateResult(weight=weight, error_before=before, error_after=after, iterations=iterations,
                        row_iterations=work / max(rows, 1), rows_kept=int((~better).sum()))
