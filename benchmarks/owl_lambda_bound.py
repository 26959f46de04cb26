"""
The largest λ OWL can take on the embedded SmolLM2, per M and target sparsity
(issue 16): how much room the defaults leave before a layer's sparsity leaves (0, 1).

One dense forward pass over the bench's calibration windows (the same texts, count,
length and seed as ``dsnot bench``) collects each Linear's input mean squares
(``owl.InputSqnorms``, as OWLModifier does); the outlier ratios D_l of the decoder layers and ``max_lambda`` follow from
:mod:`dsnot_modifier.owl`, the functions OWLModifier uses. Prints a table and writes
JSON (``--out``). CPU, a few minutes.

    python benchmarks/owl_lambda_bound.py --out benchmarks/results/owl_lambda_bound.json
"""

from __future__ import annotations

import argparse
import re

import torch

from dsnot_modifier.owl import InputSqnorms, max_lambda, outlier_ratio, owl_offsets
from dsnot_modifier.report import write_json

#: ``dsnot bench``'s defaults: 64 calibration windows of 512 tokens
DEFAULT_CALIB_SAMPLES, DEFAULT_SEQ_LEN = 64, 512


def input_sqnorms(model, windows: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Mean of x_j² over every token, for each Linear of the decoder (lm_head left out)."""
    from dsnot_harness.pipeline import linear_layers

    sqnorms = InputSqnorms()

    def hook(name):
        return lambda _module, args, _output: sqnorms.add(name, args[0])

    handles = [m.register_forward_hook(hook(n)) for n, m in linear_layers(model)]
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[start : start + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {name: sqnorms.mean(name) for name in sqnorms.sums}


def decoder_layers(model) -> dict[str, list[str]]:
    """The Linear layers (lm_head left out) of each decoder layer, by the decoder layer's name."""
    from dsnot_harness.pipeline import linear_layers

    layers: dict[str, list[str]] = {}
    for name, _ in linear_layers(model):
        match = re.match(r"(.*\.layers\.\d+)\.", name)
        if match:
            layers.setdefault(match.group(1), []).append(name)
    return layers


def layer_ratios(model, m: float, sqnorms: dict[str, torch.Tensor]) -> dict[str, float]:
    """OWL's outlier ratio D_l of each decoder layer, from the inputs' mean squares."""
    modules = dict(model.named_modules())
    return {layer: outlier_ratio([modules[n].weight.detach() for n in names], [sqnorms[n] for n in names], m)
            for layer, names in decoder_layers(model).items()}


def main() -> None:
    from dsnot_harness.data import CALIBRATION_TEXTS, calibration_windows
    from dsnot_harness.models import resolve_model
    from dsnot_harness.pipeline import environment, load_model, load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=float, nargs="+", default=[5.0, 10.0, 15.0, 20.0])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.6, 0.7, 0.8])
    p.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = resolve_model(None)
    tokenizer = load_tokenizer(path)
    windows = calibration_windows(tokenizer, args.calib_samples, DEFAULT_SEQ_LEN, texts=CALIBRATION_TEXTS)
    model = load_model(path)
    sqnorms = input_sqnorms(model, windows)
    modules = dict(model.named_modules())
    # weights per decoder layer: OWLModifier weighs the mean by them (equal sizes: no shift)
    sizes = [sum(modules[n].weight.numel() for n in names) for names in decoder_layers(model).values()]
    rows = []
    print(f"{len(decoder_layers(model))} decoder layers, {args.calib_samples} windows x {DEFAULT_SEQ_LEN} tokens")
    print("| M | D_l (min, max) | largest λ at " + " | ".join(f"{s:.0%}" for s in args.sparsities)
          + " | top layer at λ = 0.16, 0.2 (" + ", ".join(f"{s:.0%}" for s in args.sparsities) + ") |")
    print("|---|---|" + "---|" * len(args.sparsities) + "---|")
    for m in args.m:
        by_layer = layer_ratios(model, m, sqnorms)
        ratios = list(by_layer.values())
        bounds = {s: max_lambda(ratios, s, sizes) for s in args.sparsities}
        # the highest layer sparsity at λ: S minus the most negative offset
        top = {lam: {s: s - min(owl_offsets(ratios, lam, sizes)) for s in args.sparsities} for lam in (0.16, 0.2)}
        rows.append({"m": m, "ratios": by_layer, "max_lambda": bounds,
                     "top_sparsity": top})
        print(f"| {m:g} | {min(ratios):.5f}, {max(ratios):.5f} | "
              + " | ".join(f"{bounds[s]:.4f}" for s in args.sparsities) + " | "
              + "; ".join(", ".join(f"{top[lam][s]:.1%}" for s in args.sparsities) for lam in (0.16, 0.2))
              + " |", flush=True)
    if args.out:
        write_json(args.out, {"params": {"calib_samples": args.calib_samples, "seq_len": DEFAULT_SEQ_LEN,
                                         "texts": list(CALIBRATION_TEXTS), **environment()},
                              "rows": rows})


if __name__ == "__main__":
    main()
