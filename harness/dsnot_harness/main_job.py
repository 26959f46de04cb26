"""
``dsnot run``, the main job: prune a model (the embedded SmolLM2-135M-Instruct by
default) with Wanda, then with Wanda + DSnoT for each objective, and print the
held-out perplexity of each next to the dense model's.
"""

from __future__ import annotations

import argparse
import time

import torch

__all__ = ["main_job", "add_parser", "run"]


def _print(*args):
    print(*args, flush=True)


def main_job(
    model: str | None = None,
    sparsity: str = "0.6",
    objectives: tuple[str, ...] = ("mean", "gram"),
    calib_samples: int = 32,
    seq_len: int = 512,
    eval_windows: int = 40,
    threads: int | None = None,
    json_path: str | None = None,
    verbose: bool = False,
) -> list[dict]:
    """Run the main job; print a table; return its rows (and write them as JSON)."""
    from dsnot_harness.data import CALIBRATION_TEXTS, EVAL_TEXT, calibration_windows
    from dsnot_harness.data import eval_windows as make_eval_windows
    from dsnot_harness.evaluate import perplexity
    from dsnot_harness.models import resolve_model
    from dsnot_harness.pipeline import (
        environment, layer_sparsity, load_model, load_tokenizer, make_recipe, run_oneshot,
    )
    from dsnot_modifier.report import write_json

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    path = resolve_model(model)
    tokenizer = load_tokenizer(path)
    calib = calibration_windows(tokenizer, calib_samples, seq_len)
    evals = make_eval_windows(tokenizer, EVAL_TEXT, eval_windows, seq_len)
    _print(f"model: {path}")
    _print(
        f"calibration: {calib.shape[0]} windows x {seq_len} tokens at random offsets (seed 0) "
        f"of {', '.join(CALIBRATION_TEXTS)}"
    )
    _print(
        f"evaluation: the first {evals.shape[0]} windows x {seq_len} tokens of {EVAL_TEXT} "
        f"(held out), nothing prepended; sparsity {sparsity}; {torch.get_num_threads()} threads"
    )

    rows = []
    dense = load_model(path)
    rows.append({"method": "dense", "ppl": perplexity(dense, evals, desc="dense perplexity"),
                 "sparsity": layer_sparsity(dense), "oneshot_s": 0.0, "dsnot_s": 0.0})
    _print(f"dense: perplexity {rows[-1]['ppl']:.2f}")
    del dense
    methods = [("wanda", {})] + [("wanda+dsnot", {"objective": o}) for o in objectives]
    for method, params in methods:
        label = method + (f" ({params['objective']})" if params else "")
        run = run_oneshot(path, make_recipe(method, sparsity, **params), calib, verbose=verbose)
        ppl = perplexity(run.model, evals, desc=f"{label} perplexity")
        row = {"method": label, "ppl": ppl, "sparsity": layer_sparsity(run.model),
               "oneshot_s": run.seconds, "dsnot_s": run.dsnot_seconds}
        if run.report is not None:
            row["dsnot"] = run.report.summary()
        rows.append(row)
        _print(f"{label}: perplexity {ppl:.2f} (oneshot {run.seconds:.0f}s)")
        del run

    wanda = rows[1]["ppl"]
    _print("")
    _print(f"| method | sparsity | perplexity ({EVAL_TEXT}) | vs Wanda | oneshot s | DSnoT s |")
    _print("|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['ppl'] / wanda:.2f}x" if row["method"] != "dense" else ""
        _print(f"| {row['method']} | {row['sparsity']:.1%} | {row['ppl']:.2f} | {ratio} | "
               f"{row['oneshot_s']:.0f} | {row['dsnot_s']:.1f} |")
    _print(f"\ntotal time {time.perf_counter() - started:.0f}s")
    if json_path:
        meta = {
            "model": path, "sparsity": sparsity, "calib_samples": calib_samples, "seq_len": seq_len,
            "eval_windows": int(evals.shape[0]), "threads": torch.get_num_threads(),
            **environment(),
        }
        write_json(json_path, {"meta": meta, "rows": rows})
    return rows


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("run", help="the main job: Wanda vs Wanda + DSnoT on a real model",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="model id or local checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--sparsity", default="0.6", help="fraction (0.6) or N:M (2:4); default 0.6")
    parser.add_argument("--objectives", default="mean,gram", help="DSnoT objectives to run, comma-separated")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    parser.add_argument("--verbose", action="store_true", help="keep llm-compressor's logs and bars")
    return parser


def run(args) -> int:
    main_job(
        model=args.model, sparsity=args.sparsity,
        objectives=tuple(o for o in args.objectives.split(",") if o),
        calib_samples=args.calib_samples, seq_len=args.seq_len, eval_windows=args.eval_windows,
        threads=args.threads, json_path=args.json_path, verbose=args.verbose,
    )
    return 0
