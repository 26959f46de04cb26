"""
The estimated peak memory of refining each layer of a Llama-3-8B and a Llama-3-70B decoder
layer on a GPU (:func:`dsnot_modifier.memory.estimate_peak_bytes`): computed from the shapes,
not measured (tests/test_memory.py checks the estimate against the peak measured on CPU, for
these shapes scaled down). bfloat16 weights, the accelerator's fixed chunk budget
(``swaps.DEVICE_CHUNK_BYTES``), objectives ``gram`` and ``mean``, unstructured (50%) and 2:4,
the mask of a pruner or standalone (``initial: wanda``), with and without ``update_weights``.
Layers that share their inputs are stacked as the modifier stacks them (``STACK_ELEMENTS``):
k and v together, the others alone.

Columns: the layer's weight, its dense copy and inputs' statistics (held from calibration to
its refinement; the Gram matrix: float32 C×C, gathered for ``gram`` and for the update), then
DSnoT's peak beyond those, in GiB, with the phase of the peak: ``prepare`` (the checks of the
mask, the Gram's finiteness check; standalone, the initial mask's sort), ``refine`` (the
chunks), ``update`` (the weight update).

    python benchmarks/memory_estimate.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dsnot_modifier.memory import estimate_peak_bytes
from dsnot_modifier.stacking import STACK_ELEMENTS, cut_runs

#: a decoder layer's projections, [rows, cols], in the order of their inputs' groups
LLAMA3 = {
    "Llama-3-8B": {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096),
                   "o_proj": (4096, 4096), "gate_proj": (14336, 4096), "up_proj": (14336, 4096),
                   "down_proj": (4096, 14336)},
    "Llama-3-70B": {"q_proj": (8192, 8192), "k_proj": (1024, 8192), "v_proj": (1024, 8192),
                    "o_proj": (8192, 8192), "gate_proj": (28672, 8192),
                    "up_proj": (28672, 8192), "down_proj": (8192, 28672)},
}
#: the layers that read one input (one set of statistics): the modifier's stacking groups
SHARED = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))

OBJECTIVES = ("gram", "mean")
STRUCTURES = {"unstructured": None, "2:4": (2, 4)}
ORIGINS = {"pruner": None, "standalone": "wanda"}
GIB = 1 << 30


def stacks(layers: dict[str, tuple[int, int]]) -> list[tuple[str, list[int], int]]:
    """
    The layers refined in one call, as ``stacking.stack_groups`` cuts each group: (label,
    the rows of each stacked layer, columns). Layers alone of one shape side by side (gate
    and up) share a line: "gate_proj, up_proj" is each of them.
    """
    out = []
    for group in SHARED:
        sizes = [layers[name][0] * layers[name][1] for name in group]
        for run in cut_runs(group, sizes, STACK_ELEMENTS):
            segments, cols = [layers[name][0] for name in run], layers[run[0]][1]
            if out and len(run) == 1 and out[-1][1:] == (segments, cols):
                out[-1] = (f"{out[-1][0]}, {run[0]}", segments, cols)
            else:
                out.append((" + ".join(run), segments, cols))
    return out


def rows() -> list[dict]:
    """Every (model, stack, objective, structure, origin, update) with its estimate."""
    table = []
    for model, layers in LLAMA3.items():
        for label, segments, cols in stacks(layers):
            for objective in OBJECTIVES:
                for structure, nm in STRUCTURES.items():
                    for origin, initial in ORIGINS.items():
                        for update in (False, True):
                            est = estimate_peak_bytes(
                                sum(segments), cols, objective=objective, nm=nm,
                                initial=initial, update=update, dtype=torch.bfloat16,
                                device="cuda", segments=segments if len(segments) > 1 else None)
                            weight = 2 * sum(segments) * cols
                            table.append(dict(
                                model=model, layers=label, rows=sum(segments), cols=cols,
                                objective=objective, structure=structure, origin=origin,
                                update=update, chunk_rows=est.chunk_rows,
                                weight_bytes=weight, state_bytes=est.resident - weight,
                                peak_bytes=est.peak, phase=est.phase,
                                phases=dict(est.phases)))
    return table


def markdown(table: list[dict]) -> str:
    """One line per (model, layers, objective, structure): the peak of each origin and update."""
    head = ("| model | layers [rows × cols] | objective | structure | chunks | weight | dense + "
            "stats | pruner | pruner + update | standalone | standalone + update |")
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    keys = []
    for row in table:
        key = (row["model"], row["layers"], row["objective"], row["structure"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        cells = {(r["origin"], r["update"]): r for r in table
                 if (r["model"], r["layers"], r["objective"], r["structure"]) == key}
        first = cells[("pruner", False)]
        chunks = -(-first["rows"] // first["chunk_rows"])
        peaks = [cells[(origin, update)] for origin in ORIGINS for update in (False, True)]
        lines.append(
            f"| {key[0]} | {key[1]} [{first['rows']} × {first['cols']}] | {key[2]} | {key[3]} "
            f"| {chunks} | {first['weight_bytes'] / GIB:.2f} | {first['state_bytes'] / GIB:.2f} | "
            + " | ".join(f"{r['peak_bytes'] / GIB:.2f} ({r['phase']})" for r in peaks) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every row (each phase's bytes) to this file")
    args = parser.parse_args(argv)
    table = rows()
    print("Estimated peak memory of refining each layer on a GPU, GiB beyond the layer's weight,"
          " dense copy and statistics (bfloat16 weights; computed, not measured)\n")
    print(markdown(table))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(dtype="bfloat16", device="cuda", rows=table), fh, indent=1)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
