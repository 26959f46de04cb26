"""
Time ``refine_mask`` on synthetic 7B-shaped layers (4096×4096, 4096×11008; 60% and 2:4; both
objectives), min of 3 calls, for whichever ``dsnot_modifier`` is imported: to compare two
versions in one session, run it once per version, alone on the machine, e.g.

    python benchmarks/refine_timing.py before.json   # with PYTHONPATH=<other checkout>/src
    python benchmarks/refine_timing.py after.json

Each row: shape, structure, objective, seconds, swaps, error after (the swaps and errors must
match between versions that claim the same results).
"""
import json, sys, time
import torch
import dsnot_modifier.swaps as swaps
torch.manual_seed(0)
out = []
for rows, cols in [(4096, 4096), (4096, 11008)]:
    x = torch.randn(2048, cols) * torch.rand(cols) * 2
    gram = (x.T @ x) / x.shape[0]
    mean, var, sqnorm = x.mean(0), x.var(0), (x * x).mean(0)
    w = torch.randn(rows, cols) * 0.02
    score = w.abs() * sqnorm.sqrt()
    for structure in ("0.6", "2:4"):
        if structure == "2:4":
            blocks = score.view(rows, -1, 4)
            idx = blocks.argsort(-1)[..., :2]
            mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, idx, True).view(rows, cols)
            nm = (2, 4)
        else:
            k = int(cols * 0.6)
            idx = score.argsort(1)[:, :k]
            mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)
            nm = None
        wc = w.masked_fill(mask, 0)
        for objective in ("mean", "gram"):
            stats = dict(gram=gram) if objective == "gram" else dict(mean=mean, var=var, sqnorm=sqnorm)
            best = 1e9
            for _ in range(3):
                t = time.perf_counter()
                r = swaps.refine_mask(w, wc, objective=objective, nm=nm, **stats)
                best = min(best, time.perf_counter() - t)
            out.append(dict(shape=f"{rows}x{cols}", structure=structure, objective=objective,
                            seconds=best, swaps=r.swaps, error_after=r.error_after))
            print(out[-1], flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
