"""
A slow, plain, row-by-row statement of DSnoT's two rules, written independently
of ``dsnot_modifier.swaps`` (Python loops and lists, float64, the error recomputed
from scratch at every step), to check the vectorised version against.

Where its rules come from. The reference is a second opinion only where it follows
the paper or docs/algorithm.md (the project's statement of the algorithm); where docs/algorithm.md leaves
a choice open, the reference makes the same choice as the implementation on purpose
(so that the two can be compared row for row), and a change of that choice in
``swaps.py`` must be made here too, deliberately. Marked [spec] and [ours] below.

``mean`` (the paper's rule):
- [spec] r_i = Σ_c (W_ic − Wc_ic)·mean_c, per token; grow score sign(r)·W·mean/var^p
  over pruned weights; prune among kept weights whose removal moves r toward zero, by
  least Wanda score |Wc|·sqrt(sqnorm), Wc being the current (pruner's) value; for N:M,
  the kept weight of the grown weight's block with the lowest initial score.
- [spec] candidate lists made once per layer (scores of the initial mask) and walked
  from their front, so every weight changes state at most once; a row stops for good
  at its first refused swap, once |r| <= threshold, when a list runs out, or at
  max_cycles; a swap is refused unless it makes |r| smaller (docs/algorithm.md's fix of the
  public code); with sign_check also if it flips the sign of r; sign_check unset means
  off for unstructured, on for N:M.
- [ours] the zero-variance guard: var clamped to ``tiny + 1e-12·max(var)`` (docs/algorithm.md
  only says such columns need a guard).
- [ours] sign_check accepts r_new == 0 (a swap that lands exactly on zero error).
- [ours] a pruned weight with a grow score of exactly 0 (dense zero, dead input) is
  never grown; unstructured, a kept weight with Wc·mean == 0 is never pruned.
- [ours] tie order: grow list for r > 0 by lower column first, for r < 0 by higher
  column first; prune list for r > 0 by higher column first, for r < 0 by lower
  column first; N:M prune ties by lower column.

``gram`` (the exact error, beyond the paper):
- [spec] L_i = e_iᵀ H e_i with e = W − Wc; the ΔL of a grow, of a prune (with the
  current value Wc_p) and their cross term −2·e_g·Wc_p·H_gp, as in docs/algorithm.md; a swap is
  made only if its total ΔL is negative; N:M prunes in the grown weight's block.
- [ours] the search: the grow of least ΔL first, then the best prune given it (not the
  best pair); a relative margin ``rtol·L`` that the gain must exceed; each weight
  changes state at most once (a grown weight is never pruned again, a pruned one never
  regrown); a row stops at its first refused swap; dense zeros are never grown; ties
  go to the lowest column.
"""

from __future__ import annotations

import math

import torch


def _block(c: int, nm):
    if nm is None:
        return None
    m = nm[1]
    start = c // m * m
    return range(start, start + m)


def refine_row_mean(w, wc, mean, var, sqnorm, nm, max_cycles, threshold, var_power, sign_check):
    """One row under the paper's rule (see docs/algorithm.md); returns the new row as a list."""
    w, wc = [float(x) for x in w], [float(x) for x in wc]
    mean, var, sqnorm = ([float(x) for x in t] for t in (mean, var, sqnorm))
    cols = len(w)
    vmax = max(max(var), 0.0)
    floor = torch.finfo(torch.float64).tiny + 1e-12 * vmax  # [ours] the zero-variance guard
    vp = [max(v, floor) ** var_power if var_power else 1.0 for v in var]
    pruned0 = [x == 0 for x in wc]
    s = {c: w[c] * mean[c] / vp[c] for c in range(cols) if pruned0[c]}
    grow_pos = sorted((c for c in s if s[c] > 0), key=lambda c: (-s[c], c))
    grow_neg = sorted((c for c in s if s[c] < 0), key=lambda c: (s[c], -c))
    score = [abs(wc[c]) * math.sqrt(max(sqnorm[c], 0.0)) for c in range(cols)]
    prune_for_pos = sorted((c for c in range(cols) if not pruned0[c] and wc[c] * mean[c] < 0), key=lambda c: (score[c], -c))
    prune_for_neg = sorted((c for c in range(cols) if not pruned0[c] and wc[c] * mean[c] > 0), key=lambda c: (score[c], c))
    prunable = [not p for p in pruned0]

    def err():
        return sum((w[c] - wc[c]) * mean[c] for c in range(cols))

    for _ in range(max_cycles):
        r = err()
        if abs(r) <= threshold:
            break
        grow_list, prune_list = (grow_pos, prune_for_pos) if r > 0 else (grow_neg, prune_for_neg)
        if not grow_list:
            break
        g = grow_list[0]
        if nm is None:
            if not prune_list:
                break
            p = prune_list[0]
        else:
            options = [c for c in _block(g, nm) if prunable[c]]
            if not options:
                break
            p = min(options, key=lambda c: (score[c], c))
        r_new = r - w[g] * mean[g] + wc[p] * mean[p]
        if not abs(r_new) < abs(r):  # [spec] never a swap that does not shrink |r|
            break
        if sign_check and r_new * r < 0:  # [ours] landing on r_new == 0 is allowed
            break
        grow_list.pop(0)
        if nm is None:
            prune_list.pop(0)
        prunable[p] = False
        wc[g], wc[p] = w[g], 0.0
    return wc


def refine_row_gram(w, wc, gram, nm, max_cycles, rtol):
    """One row under the exact-error rule, greedy; returns the new row as a list."""
    w, wc = [float(x) for x in w], [float(x) for x in wc]
    h = gram.double()
    cols = len(w)
    growable = [wc[c] == 0 and w[c] != 0 for c in range(cols)]
    prunable = [wc[c] != 0 for c in range(cols)]

    def loss_and_u():
        e = torch.tensor([w[c] - wc[c] for c in range(cols)], dtype=torch.float64)
        u = h @ e
        return float(e @ u), u.tolist()

    for _ in range(max_cycles):
        loss, u = loss_and_u()
        best_g, best_dg = None, math.inf
        for c in range(cols):
            if growable[c]:
                e = w[c] - wc[c]
                d = -2 * e * u[c] + e * e * float(h[c, c])
                if d < best_dg:
                    best_g, best_dg = c, d
        if best_g is None:
            break
        g = best_g
        delta_g = -(w[g] - wc[g])
        candidates = range(cols) if nm is None else _block(g, nm)
        best_p, best_dp = None, math.inf
        for c in candidates:
            if prunable[c]:
                d = 2 * wc[c] * u[c] + wc[c] ** 2 * float(h[c, c]) + 2 * delta_g * wc[c] * float(h[g, c])
                if d < best_dp:
                    best_p, best_dp = c, d
        # [spec] only a swap that lowers L; [ours] by more than rtol·L
        if best_p is None or not best_dg + best_dp < -rtol * max(loss, 0.0):
            break
        wc[g], wc[best_p] = w[g], 0.0
        growable[g] = prunable[best_p] = False
    return wc


def refine_reference(dense, current, objective, nm=None, *, mean=None, var=None, sqnorm=None,
                     gram=None, max_cycles=50, threshold=0.0, var_power=1.0, sign_check=None, rtol=1e-6):
    rows = []
    check = (nm is not None) if sign_check is None else sign_check
    for i in range(dense.shape[0]):
        if objective == "mean":
            rows.append(refine_row_mean(dense[i], current[i], mean, var, sqnorm, nm, max_cycles,
                                        threshold, var_power, check))
        else:
            rows.append(refine_row_gram(dense[i], current[i], gram, nm, max_cycles, rtol))
    return torch.tensor(rows, dtype=torch.float64)
