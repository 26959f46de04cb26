"""
``dsnot bench``: methods × sparsities on one model, each in a fresh oneshot run
with the same calibration data, scored by perplexity on held-out text.

Every (method, sparsity) runs in a process of its own (so that its peak memory
is its own and nothing leaks from one run into the next); the rows are written
to the JSON file as they finish, and ``--resume`` skips the rows already there.

A row of the JSON list::

    {"method": "wanda+dsnot", "sparsity": "0.6",
     "ppl": {"prideprejudice": 56.1},
     "time_s": {"oneshot": 231.0, "dsnot": 30.2},
     "recon_error": 0.21, "peak_rss_mb": 2900.0, "params": {...}}

``recon_error`` is the mean over pruned layers of ‖W X − Ws X‖_F / ‖W X‖_F, with
W the dense weight, Ws the pruned one and X the layer's inputs in the pruned
model on the first ``--recon-windows`` calibration windows; ``time_s.dsnot`` is
the time inside DSnoT's refinement alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from dsnot_harness.pipeline import environment, layer_sparsity, linear_layers
from dsnot_modifier.masks import initial_mask, parse_sparsity
from dsnot_modifier.report import write_json
from dsnot_modifier.stats import VARIANCE_KINDS
from dsnot_modifier.swaps import OBJECTIVES

__all__ = [
    "METHODS",
    "SPARSITIES",
    "parse_sparsity",
    "run_row",
    "reconstruction_error",
    "magnitude_prune",
    "bench",
    "format_table",
    "plot",
    "add_parser",
    "run",
]

METHODS = ("dense", "magnitude", "wanda", "wanda+dsnot", "wanda+dsnot+update", "sparsegpt",
           "sparsegpt+dsnot", "sparsegpt+dsnot+update", "dsnot", "owl-wanda", "owl-wanda+dsnot",
           "owl-wanda+dsnot+update", "owl-sparsegpt", "owl-sparsegpt+dsnot",
           "owl-sparsegpt+dsnot+update")
SPARSITIES = ("0.5", "0.6", "0.7", "0.8", "2:4", "4:8")
_DENSE_SPARSITY = "0"


@torch.no_grad()
def magnitude_prune(model: torch.nn.Module, sparsity: str) -> None:
    """
    Plain magnitude pruning of every decoder Linear layer (``lm_head`` kept):
    the smallest |W| of the whole layer for a fraction, of every block for N:M.
    """
    fraction, nm = parse_sparsity(sparsity)
    for _, module in linear_layers(model):
        mask = initial_mask(module.weight, fraction, nm, "magnitude")
        module.weight.masked_fill_(mask, 0)


@torch.no_grad()
def reconstruction_error(
    model: torch.nn.Module,
    dense: dict[str, torch.Tensor],
    windows: torch.Tensor,
    batch_size: int = 4,
) -> float:
    """
    Mean over the layers of ``dense`` whose weight differs in ``model`` of
    ‖W X − Ws X‖_F / ‖W X‖_F, X the layer's inputs in ``model`` on ``windows``.
    """
    modules = dict(model.named_modules())
    pruned = {n: w for n, w in dense.items() if not torch.equal(modules[n].weight, w.to(modules[n].weight))}
    if not pruned:
        return 0.0
    sums = {n: [0.0, 0.0] for n in pruned}
    handles = []

    def hook(name):
        def accumulate(module, args, _output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            w = pruned[name].to(x)
            ref = x @ w.T
            diff = ref - x @ module.weight.float().T
            sums[name][0] += float(diff.double().square().sum())
            sums[name][1] += float(ref.double().square().sum())

        return accumulate

    for name in pruned:
        handles.append(modules[name].register_forward_hook(hook(name)))
    try:
        device = next(model.parameters()).device
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    ratios = [(num / den) ** 0.5 for num, den in sums.values() if den > 0]
    return sum(ratios) / max(len(ratios), 1)


def _dsnot_params(spec: dict) -> dict:
    return {k: v for k, v in (spec.get("dsnot") or {}).items() if v is not None}


def run_row(spec: dict) -> dict:
    """One (method, sparsity) in this process: prune, evaluate, measure. See the module doc."""
    from dsnot_harness.data import calibration_windows, eval_windows
    from dsnot_harness.evaluate import perplexity
    from dsnot_harness.pipeline import load_model, load_tokenizer, make_recipe, run_oneshot

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    method, sparsity, path = spec["method"], spec["sparsity"], spec["model"]
    tokenizer = load_tokenizer(path)
    calib = calibration_windows(tokenizer, spec["calib_samples"], spec["seq_len"],
                                texts=spec["calib_texts"], seed=spec.get("seed", 0))
    evals = {text_name(name): eval_windows(tokenizer, name, spec["eval_windows"], spec["seq_len"])
             for name in spec["eval_texts"]}
    dsnot = _dsnot_params(spec) if "dsnot" in method else {}
    owl = {k: v for k, v in (spec.get("owl") or {}).items() if v is not None} if method.startswith("owl-") else {}
    oneshot_s = dsnot_s = 0.0
    report = recipe = None
    if method == "dense":
        model = load_model(path)
    elif method == "magnitude":
        model = load_model(path)
        start = time.perf_counter()
        magnitude_prune(model, sparsity)
        oneshot_s = time.perf_counter() - start
    else:
        recipe = make_recipe(method, sparsity, owl=owl, **dsnot)
        result = run_oneshot(path, recipe, calib, verbose=spec.get("verbose", False))
        model, oneshot_s, dsnot_s, report = result.model, result.seconds, result.dsnot_seconds, result.report
    ppl = {name: perplexity(model, w, desc=f"{method} {sparsity} {name}") for name, w in evals.items()}
    recon = 0.0
    if method != "dense":
        reference = load_model(path)
        dense = {name: m.weight.detach().clone() for name, m in linear_layers(reference)}
        del reference
        recon = reconstruction_error(model, dense, calib[: spec["recon_windows"]])
    params = {
        "calib_texts": list(spec["calib_texts"]), "calib_samples": spec["calib_samples"],
        "seq_len": spec["seq_len"], "eval_windows": spec["eval_windows"], "seed": spec.get("seed", 0),
        "recon_windows": spec["recon_windows"], "threads": torch.get_num_threads(),
        "layer_sparsity": layer_sparsity(model),
    }
    if dsnot:
        params["dsnot"] = dsnot
    if method.startswith("owl-"):  # the values OWL ran with, the defaults too
        params["owl"] = {"m": recipe[0].m, "lmbda": recipe[0].lmbda}
    if report is not None:
        params["dsnot_summary"] = report.summary()
    if spec.get("tag"):
        params["tag"] = spec["tag"]
    return {
        "method": method,
        "sparsity": sparsity,
        "ppl": ppl,
        "time_s": {"oneshot": oneshot_s, "dsnot": dsnot_s},
        "recon_error": recon,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": params,
    }


def text_name(text: str) -> str:
    """The key of a text in ``ppl``: a shipped novel's name, or a file's name without extension."""
    return os.path.splitext(os.path.basename(text))[0] if os.sep in text or "." in text else text


def _row_key(row: dict) -> tuple:
    return row["method"], row["sparsity"], row.get("params", {}).get("tag")


def _run_in_subprocess(spec: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="dsnot-bench-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "row.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run([sys.executable, "-m", "dsnot_harness.bench", "--worker", spec_path, out_path],
                              env=env)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(
                f"the {spec['method']} {spec['sparsity']} run failed (exit {proc.returncode}); "
                "its error is printed above"
            )
        with open(out_path) as f:
            return json.load(f)


def bench(
    model: str | None = None,
    methods: list[str] = list(METHODS),
    sparsities: list[str] = list(SPARSITIES),
    calib_texts: list[str] | None = None,
    calib_samples: int = 64,
    seq_len: int = 512,
    eval_texts: list[str] | None = None,
    eval_windows: int = 40,
    recon_windows: int = 16,
    threads: int | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    resume: bool = False,
    isolate: bool = True,
    tag: str | None = None,
    dsnot: dict | None = None,
    verbose: bool = False,
    seed: int = 0,
    owl: dict | None = None,
) -> list[dict]:
    """
    Run the matrix (see the module doc); print a table; return the rows.
    ``isolate=False`` runs the rows in this process (faster to start, but then
    ``peak_rss_mb`` is this process's peak so far, not the row's own).
    """
    from dsnot_harness.data import CALIBRATION_TEXTS, EVAL_TEXT, TEXTS
    from dsnot_harness.models import resolve_model

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    for s in sparsities:
        parse_sparsity(s)
    eval_texts = list(eval_texts or [EVAL_TEXT])
    calib_texts = list(calib_texts or CALIBRATION_TEXTS)
    overlap = [t for t in eval_texts if t in calib_texts and t in TEXTS]
    if overlap:
        raise ValueError(
            f"{overlap} is both a calibration and an evaluation text; held-out perplexity "
            "needs them apart: change --calib-text or --eval-text"
        )
    path = resolve_model(model)
    base = {
        "model": path, "calib_texts": calib_texts, "calib_samples": calib_samples, "seq_len": seq_len,
        "eval_texts": eval_texts, "eval_windows": eval_windows, "recon_windows": recon_windows,
        "threads": threads, "dsnot": dsnot or {}, "tag": tag, "verbose": verbose, "seed": seed,
        "owl": owl or {},
    }
    print(f"model: {path}", flush=True)
    print(f"calibration: {calib_samples} windows x {seq_len} tokens at random offsets (seed {seed}) of "
          f"{', '.join(calib_texts)}; evaluation: the first {eval_windows} windows x {seq_len} tokens "
          f"of {', '.join(eval_texts)}, nothing prepended", flush=True)
    rows: list[dict] = []
    if resume and json_path and os.path.exists(json_path):
        with open(json_path) as f:
            rows = json.load(f)
    done = {_row_key(r) for r in rows}
    plan = []
    if "dense" in methods:
        plan.append(("dense", _DENSE_SPARSITY))
    plan += [(m, s) for s in sparsities for m in methods if m != "dense"]
    skipped = [f"{m} {s}" for m, s in plan if m.startswith("owl-") and ":" in s]
    if skipped:  # OWL spreads an unstructured sparsity; N:M fixes every block
        print(f"skipped (OWL is unstructured only): {', '.join(skipped)}", flush=True)
        plan = [(m, s) for m, s in plan if not (m.startswith("owl-") and ":" in s)]
    for method, sparsity in plan:
        if (method, sparsity, tag) in done:
            continue
        started = time.perf_counter()
        spec = dict(base, method=method, sparsity=sparsity)
        row = _run_in_subprocess(spec) if isolate else _finish_row(run_row(spec))
        rows.append(row)
        ppl = ", ".join(f"{k} {v:.2f}" for k, v in row["ppl"].items())
        print(f"{method} {sparsity}: perplexity {ppl}; recon error {row['recon_error']:.4f}; "
              f"oneshot {row['time_s']['oneshot']:.0f}s, DSnoT {row['time_s']['dsnot']:.1f}s "
              f"({time.perf_counter() - started:.0f}s in all)", flush=True)
        if json_path:
            write_json(json_path, rows)
    print("")
    print(format_table(rows), flush=True)
    if plot_path:
        plot(rows, plot_path)
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table: one line per method, one column per sparsity, perplexities."""
    texts = list(dict.fromkeys(k for r in rows for k in r["ppl"]))
    sparsities = list(dict.fromkeys(r["sparsity"] for r in rows if r["method"] != "dense"))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["sparsity"]): r for r in rows}
    head = "perplexity (" + " / ".join(texts) + ")"
    lines = [f"| {head} | " + " | ".join(sparsities or ["-"]) + " |",
             "|---|" + "---|" * max(len(sparsities), 1)]
    for method in methods:
        if method == "dense":
            r = cell[("dense", _DENSE_SPARSITY)]
            values = " / ".join(f"{r['ppl'][t]:.2f}" for t in texts)
            lines.append(f"| dense | " + " | ".join([values] * max(len(sparsities), 1)) + " |")
            continue
        out = []
        for s in sparsities:
            r = cell.get((method, s))
            out.append(" / ".join(f"{r['ppl'][t]:.2f}" for t in texts) if r else "")
        lines.append(f"| {method} | " + " | ".join(out) + " |")
    return "\n".join(lines)


#: markers of the N:M points in the plot (others: a plus)
NM_MARKERS = {"2:4": "s", "4:8": "D"}


def plot(rows: list[dict], path: str, text: str | None = None) -> str:
    """
    Perplexity against sparsity, one line per method (log scale); N:M patterns as
    points at their fraction (2:4 squares, 4:8 diamonds) in their method's colour.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = text or next(iter(rows[0]["ppl"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    patterns: set[str] = set()
    order = {m: i for i, m in enumerate(METHODS)}
    methods = sorted({r["method"] for r in rows}, key=lambda m: order.get(m, len(order)))
    for method in methods:
        if method == "dense":
            r = next(r for r in rows if r["method"] == "dense")
            ax.axhline(r["ppl"][text], color="black", linestyle=":", label="dense")
            continue
        points = sorted((parse_sparsity(r["sparsity"])[0], r["ppl"][text], r["sparsity"])
                        for r in rows if r["method"] == method)
        line = [(x, y) for x, y, pattern in points if ":" not in pattern]
        color = None  # the method's colour, for its N:M points too
        if line:
            (drawn,) = ax.plot(*zip(*line), marker="o", label=method)
            color = drawn.get_color()
        for x, y, pattern in points:
            if ":" in pattern:
                (dot,) = ax.plot([x], [y], marker=NM_MARKERS.get(pattern, "P"), linestyle="none",
                                 color=color, markersize=7, label="_nolegend_" if color else method)
                color = dot.get_color()
                patterns.add(pattern)
    for pattern in sorted(patterns):  # one legend entry per N:M pattern
        ax.plot([], [], marker=NM_MARKERS.get(pattern, "P"), linestyle="none", color="grey",
                label=pattern)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (N:M at N/M: 2:4 squares, 4:8 diamonds)")
    ax.set_ylabel(f"perplexity on {text} (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _bool_or_auto(value: str) -> bool | None:
    value = value.lower()
    if value in ("auto", ""):
        return None
    if value in ("on", "true", "1"):
        return True
    if value in ("off", "false", "0"):
        return False
    raise argparse.ArgumentTypeError("use on, off or auto")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="methods x sparsities on one model: perplexity, time, memory",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model id or local checkpoint (default: embedded SmolLM2)")
    p.add_argument("--methods", type=_split, default=list(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--sparsities", type=_split, default=list(SPARSITIES), help="comma-separated, e.g. 0.6,2:4")
    p.add_argument("--calib-text", action="append", default=None,
                   help="a shipped novel or a text file to calibrate on (repeatable; default: the five novels "
                        "other than Pride and Prejudice)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-text", action="append", default=None,
                   help="a shipped novel or a text file (repeatable; default: prideprejudice)")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--recon-windows", type=int, default=16, help="calibration windows for recon_error")
    p.add_argument("--seed", type=int, default=0, help="calibration window offsets")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--plot", dest="plot_path", default=None, help="write a PNG of perplexity vs sparsity")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --json, run the others")
    p.add_argument("--tag", default=None, help="a label stored in each row's params (sweeps)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--in-process", action="store_true",
                   help="run every row in this process (faster start; peak_rss_mb is then cumulative)")
    d = p.add_argument_group("DSnoT parameters (default: DSnoTModifier's)")
    d.add_argument("--objective", choices=OBJECTIVES, default=None)
    d.add_argument("--max-cycles", type=int, default=None)
    d.add_argument("--threshold", type=float, default=None)
    d.add_argument("--var-power", type=float, default=None)
    d.add_argument("--variance", choices=VARIANCE_KINDS, default=None)
    d.add_argument("--sign-check", type=_bool_or_auto, default=None, help="on, off or auto")
    d.add_argument("--gram-dtype", choices=("float32", "bfloat16"), default=None,
                   help="gram only: the inputs' dtype in the Gram products (float32 sums)")
    d.add_argument("--dsnot-targets", type=_split, default=None,
                   help="layers DSnoT refines, comma-separated (e.g. 're:.*self_attn.*' for attention only)")
    o = p.add_argument_group("OWL parameters of the owl-* methods (default: OWLModifier's)")
    o.add_argument("--owl-m", type=float, default=None, help="OWL's M: outliers are scores above M x the layer mean")
    o.add_argument("--owl-lambda", type=float, default=None, help="OWL's lambda: layer sparsities within S +- lambda")
    return p


def run(args) -> int:
    dsnot = {
        "objective": args.objective, "max_cycles": args.max_cycles, "threshold": args.threshold,
        "var_power": args.var_power, "variance": args.variance, "sign_check": args.sign_check,
        "targets": args.dsnot_targets, "gram_dtype": args.gram_dtype,
    }
    bench(
        model=args.model, methods=args.methods, sparsities=args.sparsities, calib_texts=args.calib_text,
        calib_samples=args.calib_samples, seq_len=args.seq_len, eval_texts=args.eval_text,
        eval_windows=args.eval_windows, recon_windows=args.recon_windows, threads=args.threads,
        json_path=args.json_path, plot_path=args.plot_path, resume=args.resume, isolate=not args.in_process, tag=args.tag,
        dsnot={k: v for k, v in dsnot.items() if v is not None}, verbose=args.verbose, seed=args.seed,
        owl={k: v for k, v in {"m": args.owl_m, "lmbda": args.owl_lambda}.items() if v is not None},
    )
    return 0


def _finish_row(row: dict) -> dict:
    row["params"].update(environment())
    return row


def _die_with_parent():
    """Linux: end this worker when the ``dsnot bench`` that started it ends (killed too)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _worker(spec_path: str, out_path: str) -> int:
    _die_with_parent()
    with open(spec_path) as f:
        spec = json.load(f)
    write_json(out_path, _finish_row(run_row(spec)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1], argv[2])
    parser = argparse.ArgumentParser(prog="python -m dsnot_harness.bench")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["bench", *argv]))


if __name__ == "__main__":
    sys.exit(main())
