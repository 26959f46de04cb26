"""
DSnoT's swap machinery in plain torch: refine a pruning mask by swapping pruned
weights back in for kept ones, row by row, so that every row (and, for N:M, every
block of M input columns) keeps its number of zeros exactly.

Two objectives share the machinery (see the package README and DSNOT.md):

- ``mean``: the paper's rule. It steers the expected error of each row,
  ``r_i = Σ_c (W_ic − Wc_ic)·mean_c``: grow the pruned weight with the largest
  ``sign(r_i)·W_ic·mean_c / var_c^p``, prune the kept weight of least Wanda score
  ``|Wc_ic|·sqrt(sqnorm_c)`` among those whose removal also moves ``r_i`` toward
  zero (for N:M: the least Wanda score in the grown weight's block). Candidate
  lists are sorted once per layer and walked with a pointer per end, so each
  weight changes state at most once. A swap is made only if it shrinks ``|r_i|``.
- ``gram``: the exact squared error ``L_i = e_iᵀ H e_i`` with ``e_i = W_i − Wc_i``
  and the inputs' Gram matrix ``H = E[x xᵀ]``. Greedy: the grow that lowers
  ``L_i`` most, then the best prune given it (cross term included; for N:M in the
  same block). A swap is made only if it lowers ``L_i``, so ``L_i`` decreases
  monotonically and needs no threshold. Here too each weight changes state at
  most once.

A row stops for good at its first refused swap, when its candidates run out,
or at the cycle limit. All rows advance together (no Python loop over rows);
rows are processed in chunks so that memory stays bounded; the math is float32
(float64 for float64 weights) whatever the weight dtype, and the result has the
weight's dtype. Kept values are never changed and a regrown weight gets its
dense value, so the result holds only values of the two inputs, exactly.
The loop syncs with the host once per cycle (to stop when no row is active).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "OBJECTIVES",
    "DEFAULT_THRESHOLD",
    "RefineResult",
    "refine_mask",
    "mean_error",
    "gram_error",
]

OBJECTIVES = ("gram", "mean")

#: The paper stops a row at |r| <= 0.1 with r summed over 2048-token sequences;
#: r here is a per-token mean, so the same point is 0.1 / 2048.
DEFAULT_THRESHOLD = 0.1 / 2048

#: target number of weights in one chunk of rows
DEFAULT_CHUNK_ELEMENTS = 1 << 22

_INF = float("inf")


@dataclass
class RefineResult:
    """
    :param weight: the refined weight, same shape, dtype and device as the input
    :param swaps: number of swaps made (each one grow and one prune)
    :param rows_changed: rows with at least one swap
    :param error_before: the objective's error summed over rows, before
        (``mean``: Σ|r_i|; ``gram``: Σ L_i)
    :param error_after: the same, after
    :param cycles: cycles run (the most of any chunk)
    """

    weight: torch.Tensor
    swaps: int
    rows_changed: int
    error_before: float
    error_after: float
    cycles: int


def mean_error(dense: torch.Tensor, current: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Expected error of every row, ``r_i = Σ_c (W_ic − Wc_ic)·mean_c`` (float64)."""
    return (dense.double() - current.double()) @ mean.double()


def gram_error(dense: torch.Tensor, current: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Squared error of every row, ``L_i = e_iᵀ H e_i`` (float64)."""
    e = dense.double() - current.double()
    return ((e @ gram.double()) * e).sum(1)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _block_columns(g: torch.Tensor, m: int) -> torch.Tensor:
    """Columns of the N:M block that holds column ``g`` of each row: ``[rows, m]``."""
    return (g // m * m).unsqueeze(1) + torch.arange(m, device=g.device)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[i, idx[i]]`` for every row i."""
    return x.gather(1, idx.unsqueeze(1)).squeeze(1)


class _Objective:
    """
    One chunk of rows under one objective: what a cycle proposes, what a swap does.
    Every tensor named in ``row_fields`` has one entry per row, so that the rows
    that stopped can be dropped (:meth:`select`) and the cycles get cheaper.
    """

    row_fields = ("w", "wc")

    def __init__(self, w: torch.Tensor, wc: torch.Tensor, nm: tuple[int, int] | None):
        self.w, self.wc, self.nm = w, wc, nm

    def propose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:return: grow column, prune column and whether the swap is worth making"""
        raise NotImplementedError

    def apply(self, idx: torch.Tensor, g: torch.Tensor, p: torch.Tensor):
        """Make the swaps of rows ``idx`` (grow ``g``, prune ``p``) in ``self.wc``."""
        w, wc = self.w, self.wc
        wc[idx, g] = w[idx, g]
        wc[idx, p] = 0

    def row_error(self) -> torch.Tensor:
        """The objective's error of every row (``mean``: |r_i|; ``gram``: L_i)."""
        raise NotImplementedError

    def select(self, keep: torch.Tensor):
        """Keep only the rows ``keep`` (indices into the current rows)."""
        for name in self.row_fields:
            value = getattr(self, name)
            if isinstance(value, (tuple, list)):
                setattr(self, name, type(value)(v[keep] for v in value))
            elif value is not None:
                setattr(self, name, value[keep])


class _MeanObjective(_Objective):
    row_fields = ("w", "wc", "r", "grow_order", "n_grow", "prune_order", "n_prune", "score", "ptr")

    def __init__(self, w, wc, nm, *, mean, var_p, score_col, threshold, sign_check):
        super().__init__(w, wc, nm)
        rows, cols = w.shape
        self.mean, self.threshold, self.sign_check = mean, threshold, sign_check
        self.cols = cols
        pruned = wc == 0
        self.r = (w - wc) @ mean
        # grow list: pruned weights by W·mean/var^p, largest first; the positive ones
        # (for r > 0) are walked from the front, the negative ones (r < 0) from the back
        grow_key = (w * (mean / var_p)).masked_fill_(~pruned, 0)
        self.grow_order = torch.sort(grow_key, dim=1, descending=True, stable=True).indices
        self.n_grow = ((grow_key > 0).sum(1), (grow_key < 0).sum(1))
        del grow_key
        score = wc.abs().mul_(score_col)
        self.prune_order = self.n_prune = self.score = None
        if nm is None:
            # prune list, ascending: [r>0 group: Wc·mean<0 by descending score]
            # [r<0 group: Wc·mean>0 by ascending score] [others]
            v = wc * mean
            prune_key = torch.where(v < 0, -score, score).masked_fill_(v == 0, _INF)
            self.prune_order = torch.sort(prune_key, dim=1, stable=True).indices
            self.n_prune = ((v < 0).sum(1), (v > 0).sum(1))
        else:
            self.score = score.masked_fill_(pruned, _INF)
        zeros = torch.zeros(rows, dtype=torch.long, device=w.device)
        self.ptr = [zeros.clone() for _ in range(4)]  # grow+, grow-, prune (r>0), prune (r<0)
        self.pos = None
        self.r_new = None

    def propose(self):
        w, wc, mean, r = self.w, self.wc, self.mean, self.r
        last = self.cols - 1
        gp, gn, qn, qp = self.ptr
        pos = r > 0
        g_ok = torch.where(pos, gp < self.n_grow[0], gn < self.n_grow[1])
        g = _take(self.grow_order, torch.where(pos, gp, last - gn).clamp_(0, last))
        if self.nm is None:
            n_neg, n_pos = self.n_prune
            p_ok = torch.where(pos, qn < n_neg, qp < n_pos)
            p = _take(self.prune_order, torch.where(pos, n_neg - 1 - qn, n_neg + qp).clamp_(0, last))
        else:
            block = _block_columns(g, self.nm[1])
            s = self.score.gather(1, block)
            best = s.argmin(1)
            p = _take(block, best)
            p_ok = torch.isfinite(_take(s, best))
        r_new = r - _take(w, g) * mean[g] + _take(wc, p) * mean[p]
        ok = g_ok & p_ok & (r.abs() > self.threshold) & (r_new.abs() < r.abs())
        if self.sign_check:
            ok &= (r_new * r) >= 0
        self.pos, self.r_new = pos, r_new
        return g, p, ok

    def apply(self, idx, g, p):
        super().apply(idx, g, p)
        self.r[idx] = self.r_new[idx]
        pos = self.pos[idx].long()
        gp, gn, qn, qp = self.ptr
        gp[idx] += pos
        gn[idx] += 1 - pos
        qn[idx] += pos
        qp[idx] += 1 - pos
        if self.nm is not None:
            self.score[idx, p] = _INF

    def row_error(self):
        return self.r.abs()


class _GramObjective(_Objective):
    row_fields = ("w", "wc", "e", "u", "loss", "grow_penalty", "prune_penalty")

    def __init__(self, w, wc, nm, *, gram, rtol):
        super().__init__(w, wc, nm)
        self.h = gram
        self.h_diag = gram.diagonal()
        self.rtol = rtol
        self.e = w - wc
        self.u = self.e @ gram
        self.loss = (self.e * self.u).sum(1)
        # each weight changes state at most once: a pruned weight may be grown, a kept
        # one pruned, never back (so kept values are always the pruner's). Excluded
        # candidates carry +inf, added to their score (an add is much faster on CPU
        # than a masked fill)
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        self.grow_penalty = torch.where((wc != 0) | (w == 0), _INF, zero)
        self.prune_penalty = torch.where(wc == 0, _INF, zero)
        self.total = None
        self.h_g = None

    def propose(self):
        wc, e, u, h_diag = self.wc, self.e, self.u, self.h_diag
        # growing g (e_g -> 0): dL = e_g (e_g H_gg - 2 u_g)
        d_grow = (e * h_diag).sub_(u, alpha=2).mul_(e).add_(self.grow_penalty)
        g = d_grow.argmin(1)
        d_g = _take(d_grow, g)
        del d_grow
        delta_g = -_take(e, g)
        h_g = self.h.index_select(0, g)  # H is symmetric: row g is column g
        # pruning p (e_p -> e_p + Wc_p) after growing g:
        # dL = Wc_p (2 (u_p + delta_g H_gp) + Wc_p H_pp)
        if self.nm is None:
            cols, wc_p, u_p, hg_p, hd_p, penalty = None, wc, u, h_g, h_diag, self.prune_penalty
        else:
            cols = _block_columns(g, self.nm[1])
            wc_p, u_p, hg_p = wc.gather(1, cols), u.gather(1, cols), h_g.gather(1, cols)
            hd_p, penalty = h_diag[cols], self.prune_penalty.gather(1, cols)
        d_prune = torch.addcmul(u_p, hg_p, delta_g.unsqueeze(1)).mul_(2).addcmul_(wc_p, hd_p)
        d_prune.mul_(wc_p).add_(penalty)
        best = d_prune.argmin(1)
        p = best if cols is None else _take(cols, best)
        total = d_g + _take(d_prune, best)
        ok = total < -self.rtol * self.loss.clamp_min(0)
        self.total, self.h_g = total, h_g
        return g, p, ok

    def apply(self, idx, g, p):
        w, wc, e = self.w, self.wc, self.e
        delta_g = -e[idx, g]
        delta_p = wc[idx, p]
        update = self.h.index_select(0, p).mul_(delta_p.unsqueeze(1))
        update.addcmul_(self.h_g[idx], delta_g.unsqueeze(1))
        self.u.index_add_(0, idx, update)
        e[idx, g] = 0
        e[idx, p] = w[idx, p]
        self.loss[idx] += self.total[idx]
        self.grow_penalty[idx, g] = _INF
        self.prune_penalty[idx, p] = _INF
        super().apply(idx, g, p)

    def row_error(self):
        # tracked incrementally; tests recompute it exactly with gram_error
        return self.loss.clamp_min(0)


def _check_inputs(dense, current, objective, mean, var, sqnorm, gram, nm, max_cycles):
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    if dense.dim() != 2 or dense.shape != current.shape:
        raise ValueError(
            f"dense and current weights must be 2-D of the same shape, got "
            f"{tuple(dense.shape)} and {tuple(current.shape)}"
        )
    cols = dense.shape[1]
    needed = {"mean": (mean, var, sqnorm), "gram": (gram,)}[objective]
    if any(t is None for t in needed):
        names = "mean, var and sqnorm" if objective == "mean" else "gram"
        raise ValueError(f"objective {objective!r} needs the statistics {names}")
    for t in needed:
        if t.shape[-1] != cols:
            raise ValueError(f"statistics of {t.shape[-1]} columns for a weight of {cols}")
    if nm is not None and cols % nm[1]:
        raise ValueError(f"{cols} columns are not a multiple of the N:M block size {nm[1]}")
    if max_cycles < 0:
        raise ValueError("max_cycles must be >= 0")


@torch.no_grad()
def refine_mask(
    dense: torch.Tensor,
    current: torch.Tensor,
    *,
    objective: str = "gram",
    nm: tuple[int, int] | None = None,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
    sqnorm: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
    max_cycles: int = 50,
    threshold: float = DEFAULT_THRESHOLD,
    var_power: float = 1.0,
    sign_check: bool | None = None,
    rtol: float = 1e-6,
    chunk_rows: int | None = None,
) -> RefineResult:
    """
    Refine the mask of ``current`` (zeros are pruned) toward ``dense``.

    :param dense: the layer's weight before pruning, ``[rows, cols]``
    :param current: the pruned weight (kept values as the pruner left them)
    :param objective: ``"gram"`` (exact squared error) or ``"mean"`` (the paper's)
    :param nm: ``(N, M)`` to keep the zeros of every block of M columns, or None
    :param mean: per-column input mean (``mean`` objective)
    :param var: per-column input variance (``mean`` objective)
    :param sqnorm: per-column input mean square (``mean`` objective, Wanda score)
    :param gram: the inputs' Gram matrix ``E[x xᵀ]`` (``gram`` objective)
    :param max_cycles: at most this many swaps per row
    :param threshold: ``mean`` only: a row stops once ``|r_i|`` is at most this
        (per-token units; the paper's 0.1 at 2048 tokens is 0.1/2048)
    :param var_power: ``mean`` only: exponent p of the variance in the grow score
    :param sign_check: ``mean`` only: refuse swaps that flip the sign of ``r_i``;
        None means the paper's choice: off for unstructured, on for N:M
    :param rtol: ``gram`` only: a swap must lower ``L_i`` by more than
        ``rtol · L_i``, so that float rounding never passes for a gain
    :param chunk_rows: rows per chunk (default: about 4M weights per chunk)
    """
    _check_inputs(dense, current, objective, mean, var, sqnorm, gram, nm, max_cycles)
    rows, cols = dense.shape
    dtype = _compute_dtype(current)
    device = current.device
    if chunk_rows is None:
        chunk_rows = max(1, DEFAULT_CHUNK_ELEMENTS // max(cols, 1))
    if objective == "mean":
        mean = mean.to(device, dtype)
        var = var.to(device, dtype)
        if var_power:
            floor = torch.finfo(dtype).tiny + 1e-12 * float(var.max().clamp_min(0))
            var_p = var.clamp_min(floor).pow(var_power)
        else:
            var_p = torch.ones_like(var)
        score_col = sqnorm.to(device, dtype).clamp_min(0).sqrt()
        check = (nm is not None) if sign_check is None else bool(sign_check)
        options = dict(mean=mean, var_p=var_p, score_col=score_col, threshold=threshold, sign_check=check)
        make = _MeanObjective
    else:
        options = dict(gram=gram.to(device, dtype), rtol=rtol)
        make = _GramObjective

    out = current.clone()
    swaps = torch.zeros(rows, dtype=torch.long, device=device)
    before = torch.zeros((), dtype=torch.float64, device=device)
    after = torch.zeros((), dtype=torch.float64, device=device)
    cycles_run = 0
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        w = dense[start:stop].to(dtype)
        wc = current[start:stop].to(dtype, copy=True)
        state = make(w, wc, nm, **options)
        before += state.row_error().double().sum()
        live = torch.arange(start, stop, device=device)  # the rows still in `state`
        active = torch.ones(stop - start, dtype=torch.bool, device=device)
        for cycle in range(max_cycles):
            g, p, ok = state.propose()
            ok &= active
            idx = ok.nonzero().squeeze(1)  # the cycle's one host sync
            if idx.numel() == 0:
                break
            state.apply(idx, g[idx], p[idx])
            swaps.index_add_(0, live[idx], torch.ones_like(idx))
            active = ok
            cycles_run = max(cycles_run, cycle + 1)
            if 2 * idx.numel() <= live.numel():
                # drop the rows that stopped: write them out, keep the active ones
                done = (~ok).nonzero().squeeze(1)
                out[live[done]] = state.wc[done].to(out.dtype)
                after += state.row_error()[done].double().sum()
                state.select(idx)
                live = live[idx]
                active = torch.ones(idx.numel(), dtype=torch.bool, device=device)
        out[live] = state.wc.to(out.dtype)
        after += state.row_error().double().sum()
    return RefineResult(
        weight=out,
        swaps=int(swaps.sum()),
        rows_changed=int((swaps > 0).sum()),
        error_before=float(before),
        error_after=float(after),
        cycles=cycles_run,
    )
