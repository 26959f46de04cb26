#!/usr/bin/env python
"""
How good is the greedy swap search of the ``gram`` objective, and what does its cycle cap
cost? A study on real layers of the embedded SmolLM2 (BENCHMARKS.md quotes its output).

For one decoder layer it takes the dense model's inputs of the attention and MLP projections
(``--samples`` calibration windows × 512 tokens), their Gram matrices ``H = E[x xᵀ]``, prunes
every row to ``--sparsity`` by the Wanda score ``|W|·sqrt(H_cc)``, and reports the remaining
squared error ``Σ_i e_iᵀ H e_i`` as a fraction of Wanda's after:

- ``refine cN``: :func:`dsnot_modifier.swaps.refine_mask` with ``max_cycles=N`` (with its time,
  the cycles run and the swaps made);
- on ``--rows`` evenly spaced rows, plain per-row searches written here (float64):
  ``greedy`` (the same rule as refine_mask: the best grow, then the best prune given it; stop
  at the first refused swap), ``alt`` (when that pair is refused, also try the best prune, then
  the best grow given it), ``free`` (``alt`` where a weight may change state more than once),
  and ``opt`` (the best of all grow/prune pairs of the row each cycle: optimal 1-swaps).

Usage: ``python benchmarks/search_variants.py --layer 10``. Single-threaded by default.
"""

from __future__ import annotations

import argparse
import time

import torch

from dsnot_modifier.masks import initial_mask
from dsnot_modifier.swaps import gram_error, refine_mask

MODULES = {"q_proj": ("self_attn", "q_proj"), "o_proj": ("self_attn", "o_proj"),
           "gate_proj": ("mlp", "gate_proj"), "down_proj": ("mlp", "down_proj")}


def capture(layer_index: int, samples: int, seq_len: int = 512) -> dict:
    """{name: {"w": weight, "h": Gram matrix of its inputs}} for one layer of the dense model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsnot_harness.data import calibration_windows
    from dsnot_harness.models import embedded_checkpoint

    path = embedded_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    windows = calibration_windows(tokenizer, samples, seq_len, seed=0)
    layer = model.model.layers[layer_index]
    sums: dict[str, list] = {}

    def hook(name):
        def record(_module, args, _output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            total, count = sums.get(name, (0, 0))
            sums[name] = [total + x.t() @ x, count + x.shape[0]]
        return record

    modules = {name: getattr(getattr(layer, a), b) for name, (a, b) in MODULES.items()}
    for name, module in modules.items():
        module.register_forward_hook(hook(name))

    class _Stop(Exception):
        pass

    def stop(*_):
        raise _Stop

    layer.register_forward_hook(stop)
    with torch.no_grad():
        for ids in windows:
            try:
                model(ids.view(1, -1))
            except _Stop:
                pass
    return {name: {"w": modules[name].weight.detach().clone(), "h": total / count}
            for name, (total, count) in sums.items()}


def wanda_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's mask (the package's own, as standalone DSnoT makes it), pruned weights zeroed."""
    return w.masked_fill(initial_mask(w, sparsity, None, "wanda", h.diagonal()), 0.0)


def search_row(w, wc, h, cycles: int, mode: str, rtol: float = 1e-6) -> float:
    """One row's error after a per-row search (see the module docstring for ``mode``)."""
    w, wc, h = w.double(), wc.double().clone(), h.double()
    hd = h.diagonal()
    inf = float("inf")
    e = w - wc
    u = h @ e
    loss = float(e @ u)
    changed = torch.zeros_like(w, dtype=torch.bool)
    for _ in range(cycles):
        pruned = wc == 0
        may_grow = pruned & (w != 0)
        may_prune = ~pruned
        if mode != "free":
            may_grow &= ~changed
            may_prune &= ~changed
        d_grow = (e * (e * hd - 2 * u)).masked_fill(~may_grow, inf)
        d_prune0 = (wc * (2 * u + wc * hd)).masked_fill(~may_prune, inf)
        best = None
        if mode == "opt":
            gi, pi = may_grow.nonzero().squeeze(1), may_prune.nonzero().squeeze(1)
            if len(gi) == 0 or len(pi) == 0:
                break
            total = (d_grow[gi].unsqueeze(1) + d_prune0[pi].unsqueeze(0)
                     - 2 * e[gi].unsqueeze(1) * wc[pi].unsqueeze(0) * h[gi][:, pi])
            k = int(total.argmin())
            g, p, t = int(gi[k // len(pi)]), int(pi[k % len(pi)]), float(total.view(-1)[k])
            if t < -rtol * loss:
                best = (g, p, t)
        else:
            g = int(d_grow.argmin())
            d_prune = (wc * (2 * (u - e[g] * h[g]) + wc * hd)).masked_fill(~may_prune, inf)
            p = int(d_prune.argmin())
            t = float(d_grow[g] + d_prune[p])
            if t < -rtol * loss:
                best = (g, p, t)
            elif mode in ("alt", "free"):
                p = int(d_prune0.argmin())
                u_p = u + wc[p] * h[p]
                d_grow_p = (e * (e * hd - 2 * u_p)).masked_fill(~may_grow, inf)
                g = int(d_grow_p.argmin())
                t = float(d_prune0[p] + d_grow_p[g])
                if t < -rtol * loss:
                    best = (g, p, t)
        if best is None:
            break
        g, p, t = best
        u += h[p] * wc[p] - h[g] * e[g]
        e[g], e[p] = 0.0, w[p]
        wc[g], wc[p] = w[g], 0.0
        changed[g] = changed[p] = True
        loss += t
    return float((w - wc) @ h @ (w - wc))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--rows", type=int, default=96, help="rows for the per-row searches")
    parser.add_argument("--cycles", default="50,100,200,1000")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    caps = [int(c) for c in args.cycles.split(",")]
    layers = capture(args.layer, args.samples)
    print(f"layer {args.layer}, {args.samples} x 512 tokens, {args.sparsity:.0%} unstructured; "
          "error after / Wanda's error")
    for name, d in layers.items():
        w, h = d["w"], d["h"]
        wc = wanda_prune(w, h, args.sparsity)
        base = float(gram_error(w, wc, h).sum())
        parts = []
        for cap in caps:
            start = time.perf_counter()
            res = refine_mask(w, wc, objective="gram", gram=h, max_cycles=cap)
            seconds = time.perf_counter() - start
            ratio = float(gram_error(w, res.weight, h).sum()) / base
            parts.append(f"refine c{cap} {ratio:.4f} ({seconds:.2f}s, {res.cycles} cycles, "
                         f"{res.swaps} swaps)")
        rows = torch.linspace(0, w.shape[0] - 1, min(args.rows, w.shape[0])).long().unique()
        row_base = float(gram_error(w[rows], wc[rows], h).sum())
        for mode in ("greedy", "alt", "free", "opt"):
            for cap in (caps[0], caps[-1]) if mode != "opt" else (caps[0],):
                total = sum(search_row(w[i], wc[i], h, cap, mode) for i in rows)
                parts.append(f"{mode} c{cap} {total / row_base:.4f}")
        print(f"{name} {tuple(w.shape)}: " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
