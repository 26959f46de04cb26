"""
A slow, plain, row-by-row statement of DSnoT's two rules, written independently
of ``dsnot_modifier.swaps`` (Python loops and lists, float64, the error recomputed
from scratch at every step), to check the vectorised version against.
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
    floor = torch.finfo(torch.float64).tiny + 1e-12 * vmax
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
        if not abs(r_new) < abs(r):
            break
        if sign_check and r_new * r < 0:
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
