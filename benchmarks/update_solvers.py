#!/usr/bin/env python
"""
Which solver for the weight update on a fixed mask (:mod:`dsnot_modifier.update`)?
A comparison on real layers of the embedded SmolLM2-135M.

For the Linear layers named by ``--layers`` × ``--modules`` it captures the dense model's
inputs (``--windows`` calibration windows × ``--seq-len`` tokens, as the harness makes them),
builds their Gram matrices ``H = E[x xᵀ]``, prunes each weight with Wanda's rule
(``|W|·sqrt(H_cc)``: the lowest ``int(0.6·cols)`` of every row, and the lowest 2 of every block
of 4), then re-solves the kept weights with every solver, from Wanda's weight:

- ``exact``: batched per-row Cholesky solves of the damped ``H_KK`` (the reference);
- ``cg``: conjugate gradients batched over rows, Jacobi preconditioner, a fixed number of
  iterations (``tol=0``); ``cg tol=T``: the same with its stopping rule at ``T`` (and the
  library's iteration limit);
- ``cg-plain``: fixed iterations without preconditioner;
- ``admm rho=R``: ADMM with one factorisation (Boža), unit-diagonal scaling, penalty ``R``;
- ``update_weights``: the library's entry point with its defaults (the solve, its float64
  error checks and safeguards).

For each it prints the exact squared error ``Σ_i e_iᵀ H e_i`` (undamped ``H``, float64) after
the update relative to Wanda's (``after/before``), relative to the exact solution's
(``vs exact``: 1.000 is exact), the iterations made (the slowest row's), the work (iterations
per row, i.e. products ``[rows, cols] × [cols, cols]``: ``cg`` drops converged rows),
``flops/gram``: that work's flops as a multiple of one Gram product ``xᵀx`` over
``--gram-tokens`` inputs (what the statistics already cost; ``work·rows/tokens``), the
solver's seconds and these seconds as a multiple of that Gram product's, timed here. With
``--undamped``, ``opt`` is the undamped optimum (``exact`` with damping 1e-8, float64): what the
damping costs on the calibration error.
A summary over all problems follows.

Usage: ``python benchmarks/update_solvers.py [--quick] [--json out.json]``. Timings are
wall-clock with ``--threads`` threads (1 by default): compare solvers within one run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dsnot_modifier.update import (
    DAMP,
    MAX_ITERS,
    row_errors,
    solve_admm,
    solve_cg,
    solve_exact,
    update_weights,
)

MODULES = {"q_proj": ("self_attn", "q_proj"), "o_proj": ("self_attn", "o_proj"),
           "gate_proj": ("mlp", "gate_proj"), "down_proj": ("mlp", "down_proj")}


def harness():
    """The harness's ``data`` and ``models`` modules, wherever the harness lives now."""
    try:
        from dsnot_harness import data, models
    except ImportError:
        from dsnot_modifier.experiments import data, models
    return data, models


def capture(layers: list[int], modules: list[str], windows: int, seq_len: int) -> dict:
    """{(layer, module): (weight, Gram matrix of its inputs)} of the dense embedded model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data, models = harness()
    path = str(models.embedded_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    ids = data.calibration_windows(tokenizer, windows, seq_len, seed=0)
    sums: dict = {}
    handles = []

    def record(key):
        def hook(_module, args, _output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            total, count = sums.get(key, (0.0, 0))
            sums[key] = (total + x.t() @ x, count + x.shape[0])
        return hook

    targets = {}
    for index in layers:
        block = model.model.layers[index]
        for name in modules:
            first, second = MODULES[name]
            targets[(index, name)] = getattr(getattr(block, first), second)
            handles.append(targets[(index, name)].register_forward_hook(record((index, name))))

    class _Stop(Exception):
        pass

    def stop(*_):
        raise _Stop

    handles.append(model.model.layers[max(layers)].register_forward_hook(stop))
    with torch.no_grad():
        for window in ids:
            try:
                model(window.view(1, -1))
            except _Stop:
                pass
    for handle in handles:
        handle.remove()
    return {key: (targets[key].weight.detach().clone(), (total / count).float())
            for key, (total, count) in sums.items()}


def wanda(weight: torch.Tensor, gram: torch.Tensor, structure: str) -> torch.Tensor:
    """Wanda's pruned weight: unstructured ``"0.6"`` per row, or ``"2:4"`` per block."""
    score = weight.abs() * gram.diagonal().clamp(min=0).sqrt()
    rows, cols = weight.shape
    if ":" in structure:
        n, m = (int(v) for v in structure.split(":"))
        blocks = score.reshape(rows, cols // m, m)
        drop = torch.zeros_like(blocks, dtype=torch.bool)
        drop.scatter_(2, blocks.argsort(dim=2, stable=True)[:, :, :n], True)
        drop = drop.reshape(rows, cols)
    else:
        k = int(cols * float(structure))
        drop = torch.zeros_like(weight, dtype=torch.bool)
        drop.scatter_(1, score.argsort(dim=1, stable=True)[:, :k], True)
    return torch.where(drop, torch.zeros_like(weight), weight)


def timed(fn, repeat: int = 1):
    """``fn()`` and its least wall-clock time over ``repeat`` calls."""
    best = float("inf")
    for _ in range(max(repeat, 1)):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def gram_seconds(cols: int, tokens: int, repeat: int) -> float:
    """Time of the product ``xᵀx`` over ``tokens`` inputs (float32), the Gram matrix's cost."""
    x = torch.randn(tokens, cols)
    return timed(lambda: x.t() @ x, repeat)[1]


def compare(weight, pruned, gram, iters: list[int], rhos: list[float], tols: list[float],
            damp: float, repeat: int, undamped: bool) -> list[dict]:
    """One problem: every solver's error and time, as rows of the table."""
    mask = pruned != 0
    before = float(row_errors(weight, pruned, gram).sum())

    def error(x):
        return float(row_errors(weight, x, gram).sum())

    exact, exact_s = timed(lambda: solve_exact(weight, mask, gram, damp=damp))
    out = [{"solver": "exact", "iters": 0, "error": error(exact), "seconds": exact_s}]
    if undamped:
        optimum = solve_exact(weight.double(), mask, gram.double(), damp=1e-8)
        out.append({"solver": "opt (damp 1e-8)", "iters": 0, "error": error(optimum),
                    "seconds": float("nan")})
    for it in iters:
        (x, made, _), s = timed(lambda: solve_cg(weight, pruned, mask, gram, damp=damp, max_iters=it, tol=0),
                                   repeat)
        out.append({"solver": "cg", "iters": made, "error": error(x), "seconds": s})
        (x, made, _), s = timed(lambda: solve_cg(weight, pruned, mask, gram, damp=damp, max_iters=it,
                                                 tol=0, precondition=False), repeat)
        out.append({"solver": "cg-plain", "iters": made, "error": error(x), "seconds": s})
        for rho in rhos:
            x, s = timed(lambda: solve_admm(weight, pruned, mask, gram, damp=damp, iters=it, rho=rho),
                          repeat)
            out.append({"solver": f"admm rho={rho:g}", "iters": it, "error": error(x), "seconds": s})
    for tol in tols:
        (x, made, work), s = timed(lambda: solve_cg(weight, pruned, mask, gram, damp=damp,
                                                    max_iters=MAX_ITERS, tol=tol), repeat)
        out.append({"solver": f"cg tol={tol:g}", "iters": made, "work": work, "error": error(x),
                    "seconds": s})
    result, s = timed(lambda: update_weights(weight, pruned, gram, damp=damp), repeat)
    out.append({"solver": "update_weights", "iters": result.iterations, "work": result.row_iterations,
                "error": result.error_after, "seconds": s})
    for row in out:
        if "work" not in row:
            row["work"] = float(row["iters"]) if row["iters"] else float("nan")
        row["after_before"] = row["error"] / before
        row["vs_exact"] = row["error"] / out[0]["error"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="10,25")
    parser.add_argument("--modules", default="q_proj,o_proj,gate_proj,down_proj")
    parser.add_argument("--structures", default="0.6,2:4")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--iters", default="5,10,25,50", help="fixed iteration counts (cg, admm)")
    parser.add_argument("--rhos", default="0.3,1", help="admm penalties")
    parser.add_argument("--tols", default="1e-2,1e-3,1e-4", help="cg's stopping rule (max iterations: "
                        "the library's)")
    parser.add_argument("--gram-tokens", type=int, default=16384,
                        help="tokens of the Gram product timed for scale (the main job's 32 x 512)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each solver this many times, keep the least")
    parser.add_argument("--undamped", action="store_true",
                        help="also the undamped optimum (exact, damping 1e-8, float64): what damping costs")
    parser.add_argument("--damp", type=float, default=DAMP)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default); on a shared machine more threads "
                             "than free cores mostly wait")
    parser.add_argument("--quick", action="store_true", help="layer 10 only, q_proj and down_proj, 8 windows")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.modules, args.windows = "10", "q_proj,down_proj", 8
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [int(v) for v in args.layers.split(",")]
    modules = args.modules.split(",")
    iters = [int(v) for v in args.iters.split(",")]
    rhos = [float(v) for v in args.rhos.split(",") if v]
    tols = [float(v) for v in args.tols.split(",") if v]
    started = time.perf_counter()
    captured = capture(layers, modules, args.windows, args.seq_len)
    print(f"captured {len(captured)} layers' inputs ({args.windows} windows x {args.seq_len} tokens) "
          f"in {time.perf_counter() - started:.0f} s; damp {args.damp:g}, {torch.get_num_threads()} threads")
    rows = []
    for (index, name), (weight, gram) in sorted(captured.items()):
        for structure in args.structures.split(","):
            pruned = wanda(weight, gram, structure)
            gram_s = gram_seconds(weight.shape[1], args.gram_tokens, args.repeat)
            print(f"\nlayer {index} {name} {tuple(weight.shape)} wanda {structure}; "
                  f"Gram product over {args.gram_tokens} tokens: {gram_s:.3f} s")
            print(f"  {'solver':<22} {'iters':>5} {'work':>5} {'flops/gram':>10} {'after/before':>12} "
                  f"{'vs exact':>10} {'seconds':>8} {'/gram':>7}")
            for row in compare(weight, pruned, gram, iters, rhos, tols, args.damp, args.repeat,
                               args.undamped):
                row.update(layer=index, module=name, structure=structure, gram_seconds=gram_s,
                           flops_gram=row["work"] * weight.shape[0] / args.gram_tokens)
                rows.append(row)
                print(f"  {row['solver']:<22} {row['iters']:>5} {row['work']:>5.1f} "
                      f"{row['flops_gram']:>10.2f} "
                      f"{row['after_before']:>12.4f} "
                      f"{row['vs_exact']:>10.5f} {row['seconds']:>8.3f} {row['seconds'] / gram_s:>7.1f}",
                      flush=True)
    summary(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


def summary(rows: list[dict]):
    """
    Per solver (and fixed iteration count): the geometric mean and the worst of ``vs exact``
    over the problems, the iterations made (range), the mean work (iterations per row), the
    seconds summed and as a multiple of the Gram products' summed seconds.
    """
    groups: dict = {}
    for row in rows:
        fixed = row["solver"] in ("cg", "cg-plain") or row["solver"].startswith("admm")
        groups.setdefault((row["solver"], row["iters"] if fixed else None), []).append(row)
    gram_total = sum(r["gram_seconds"] for r in rows if r["solver"] == "exact")
    print("\nover all problems: iterations, work (mean), vs exact (geometric mean, worst), "
          "seconds (sum, / Gram products)")
    for (solver, _), group in groups.items():
        ratios = torch.tensor([r["vs_exact"] for r in group], dtype=torch.float64)
        iters = [r["iters"] for r in group]
        seconds = sum(r["seconds"] for r in group)
        span = f"{min(iters)}" if min(iters) == max(iters) else f"{min(iters)}-{max(iters)}"
        work = sum(r["work"] for r in group) / len(group)
        print(f"  {solver:<22} {span:>6} {work:>5.1f} {float(ratios.log().mean().exp()):>10.5f} "
              f"{float(ratios.max()):>10.5f} "
              f"{seconds:>8.2f} {seconds / gram_total:>7.1f}")


if __name__ == "__main__":
    main()
