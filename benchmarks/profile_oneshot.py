"""
Where the time of a Wanda + DSnoT oneshot goes (issue 15, part 1): the main job's
oneshot (embedded SmolLM2, 32 windows x 512 tokens, 60%) for Wanda alone and for
Wanda + DSnoT with each objective, with DSnoT's steps timed by wrapping them
(the code run is the product's, unchanged). Prints a table and writes JSON.

Nested timers: the hook's total holds the statistics update, the dense snapshot
and the same-pass check; the epoch end's total holds the refinement, the structure
check, the write-back and the report. Time it with nothing else running.

    .venv/bin/python benchmarks/profile_oneshot.py --json runs/profile.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import time

import torch

import dsnot_modifier.modifier as modifier_module
import dsnot_modifier.stacking as stacking_module
from dsnot_modifier import DSnoTModifier
from dsnot_modifier.report import LayerReport, write_json
from dsnot_modifier.stats import InputStats, LayerState

TOTALS: dict[str, float] = collections.defaultdict(float)
CALLS: dict[str, int] = collections.defaultdict(int)

#: (owner, attribute, label): what is timed; functions the modifier imported are
#: wrapped in the modifier's namespace, where it looks them up
TIMED = [
    (DSnoTModifier, "calibrate_module", "hook: all per-batch work"),
    (LayerState, "accumulate", "hook: statistics (sharing, finiteness, update)"),
    (InputStats, "update", "hook: statistics update (Gram product or moments)"),
    (modifier_module, "snapshot_weight", "hook: dense snapshot"),
    (modifier_module, "check_same_pass", "hook: same-pass check"),
    (DSnoTModifier, "on_sequential_epoch_end", "epoch end: all"),
    (InputStats, "for_objective", "epoch end: statistics finalised"),
    (InputStats, "check_finite", "epoch end: finiteness check"),
    (modifier_module, "refine_mask", "epoch end: refine_mask"),
    (stacking_module, "check_refined", "epoch end: structure check"),
    (stacking_module, "write_weight", "epoch end: write-back"),
    (LayerReport, "of", "epoch end: report (mask digest)"),
]


def _timed(function, label):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TOTALS[label] += time.perf_counter() - start
            CALLS[label] += 1

    return wrapper


def install_timers() -> list[tuple[object, str, object]]:
    """Wrap the steps in timers; returns what :func:`remove_timers` puts back."""
    saved = []
    for owner, attribute, label in TIMED:
        original = owner.__dict__[attribute] if isinstance(owner, type) else getattr(owner, attribute)
        saved.append((owner, attribute, original))
        if isinstance(original, (staticmethod, classmethod)):
            setattr(owner, attribute, type(original)(_timed(original.__func__, label)))
        else:
            setattr(owner, attribute, _timed(original, label))
    # the refinement by layer kind (the last part of the layers' names: layers that
    # share their statistics are refined in one stack, e.g. "q_proj+k_proj+v_proj")
    refine_stack = stacking_module.refine_stack
    saved.append((modifier_module, "refine_stack", refine_stack))

    def by_kind(stack, *args, **kwargs):
        start = time.perf_counter()
        try:
            return refine_stack(stack, *args, **kwargs)
        finally:
            kind = "+".join(dict.fromkeys(layer.name.rsplit(".", 1)[-1] for layer in stack))
            TOTALS[f"refine by kind: {kind}"] += time.perf_counter() - start
            CALLS[f"refine by kind: {kind}"] += 1

    modifier_module.refine_stack = by_kind
    return saved


def remove_timers(saved):
    for owner, attribute, original in reversed(saved):
        setattr(owner, attribute, original)


def _dsnot_params(spec: str) -> dict:
    """``gram``, ``mean``, or ``gram:bfloat16`` (bfloat16 Gram products): DSnoT's options."""
    objective, _, gram_dtype = spec.partition(":")
    return {"objective": objective, **({"gram_dtype": gram_dtype} if gram_dtype else {})}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="path or id (default: the embedded SmolLM2)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sparsity", default="0.6")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--objectives", default="mean,gram",
                        help="comma-separated: mean, gram, gram:bfloat16 (bfloat16 Gram products)")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)

    from dsnot_harness.data import calibration_windows
    from dsnot_harness.models import resolve_model
    from dsnot_harness.pipeline import environment, load_tokenizer, make_recipe, run_oneshot

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    calib = calibration_windows(load_tokenizer(path), args.calib_samples, args.seq_len)
    saved = install_timers()
    runs = []
    try:
        for method, params in [("wanda", {})] + [("wanda+dsnot", _dsnot_params(o))
                                                 for o in args.objectives.split(",")]:
            TOTALS.clear()
            CALLS.clear()
            run = run_oneshot(path, make_recipe(method, args.sparsity, **params), calib)
            label = " ".join(f"{v}" for v in params.values())
            runs.append({"method": method + (f" ({label})" if params else ""),
                         "oneshot_s": run.seconds, "steps_s": dict(TOTALS), "calls": dict(CALLS)})
            print(f"{runs[-1]['method']}: oneshot {run.seconds:.1f} s", flush=True)
            del run
    finally:
        remove_timers(saved)

    wanda = runs[0]["oneshot_s"]
    labels = [label for _, _, label in TIMED]
    labels += sorted({k for r in runs for k in r["steps_s"] if k.startswith("refine by kind")})
    print(f"\n| step | {' | '.join(r['method'] for r in runs[1:])} |")
    print("|---|" + "---|" * (len(runs) - 1))
    print(f"| oneshot, s (Wanda alone {wanda:.1f}) | "
          + " | ".join(f"{r['oneshot_s']:.1f} ({r['oneshot_s'] / wanda:.2f}x)" for r in runs[1:]) + " |")
    print("| beyond Wanda's oneshot, s | "
          + " | ".join(f"{r['oneshot_s'] - wanda:.1f}" for r in runs[1:]) + " |")
    for label in labels:
        cells = [f"{r['steps_s'].get(label, 0.0):.2f}" for r in runs[1:]]
        print(f"| {label} | {' | '.join(cells)} |")
    if args.json_path:
        write_json(args.json_path, {"meta": {**vars(args), **environment()}, "runs": runs})
    return runs


if __name__ == "__main__":
    main()
