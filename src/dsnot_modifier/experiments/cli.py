"""
The ``dsnot`` command.

- ``dsnot run``: the main job. Prune a model (the embedded SmolLM2-135M-Instruct
  by default) with Wanda, then with Wanda + DSnoT for each objective, and print
  the held-out perplexity of each next to the dense model's.

- ``dsnot verify PATH``: check a saved checkpoint against its ``dsnot_report.json``
  (:func:`dsnot_modifier.checkpoint.verify_checkpoint`).

Other subcommands (``bench``, ``eval``) live in modules of their own, each with
``add_parser(sub)`` and ``run(args) -> int`` (see ``_SUBCOMMANDS``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch

__all__ = ["main", "main_job"]


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
    from dsnot_modifier.experiments.data import CALIBRATION_TEXTS, EVAL_TEXT, calibration_windows
    from dsnot_modifier.experiments.data import eval_windows as make_eval_windows
    from dsnot_modifier.experiments.evaluate import perplexity
    from dsnot_modifier.experiments.models import resolve_model
    from dsnot_modifier.report import write_json
    from dsnot_modifier.experiments.pipeline import (
        environment, layer_sparsity, load_model, load_tokenizer, make_recipe, run_oneshot,
    )

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


def add_verify_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "verify",
        help="check a saved checkpoint's zeros and N:M structure against its dsnot_report.json",
        description=(
            "Read the safetensors weights of a saved checkpoint (dense, or quantized by "
            "llm-compressor in the compressed-tensors format), print every DSnoT layer's "
            "sparsity and N:M structure, and exit 1 if they are not what dsnot_report.json "
            "states (2 if the checkpoint or its report cannot be read)."
        ),
    )
    parser.add_argument("path", help="checkpoint directory")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the result as JSON here")
    return parser


def run_verify(args) -> int:
    from dsnot_modifier.checkpoint import CheckpointError, verify_checkpoint
    from dsnot_modifier.report import write_json

    try:
        result = verify_checkpoint(args.path)
    except CheckpointError as err:
        print(f"dsnot verify: {err}", file=sys.stderr, flush=True)
        return 2
    _print(result.table())
    if args.json_path:
        write_json(args.json_path, result.to_dict())
    return 0 if result.ok else 1


#: subcommands implemented elsewhere: name -> module with add_parser(sub) and run(args)
_SUBCOMMANDS: dict[str, str] = {
    "bench": "dsnot_modifier.experiments.bench",
    "eval": "dsnot_modifier.experiments.evaluate",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsnot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the main job: Wanda vs Wanda + DSnoT on a real model")
    run.add_argument("--model", default=None,
                     help="model id or local checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    run.add_argument("--sparsity", default="0.6", help="fraction (0.6) or N:M (2:4); default 0.6")
    run.add_argument("--objectives", default="mean,gram", help="DSnoT objectives to run, comma-separated")
    run.add_argument("--calib-samples", type=int, default=32)
    run.add_argument("--seq-len", type=int, default=512)
    run.add_argument("--eval-windows", type=int, default=40)
    run.add_argument("--threads", type=int, default=None)
    run.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    run.add_argument("--verbose", action="store_true", help="keep llm-compressor's logs and bars")
    for module in _SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    add_verify_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "run":
        main_job(
            model=args.model, sparsity=args.sparsity,
            objectives=tuple(o for o in args.objectives.split(",") if o),
            calib_samples=args.calib_samples, seq_len=args.seq_len, eval_windows=args.eval_windows,
            threads=args.threads, json_path=args.json_path, verbose=args.verbose,
        )
        return 0
    if args.command == "verify":
        return run_verify(args)
    return int(importlib.import_module(_SUBCOMMANDS[args.command]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
