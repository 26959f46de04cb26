#!/usr/bin/env python
"""
The GPU path measured in one command (issue 29), run by ``scripts/gpu-check``: on a CUDA
machine with only a PyTorch stack, it installs what is missing from a folder of wheels
(no network), then writes a JSON file and prints a table of:

- the device tests: tests/test_swaps.py, tests/test_stats.py and tests/test_device_path.py
  with ``--device cuda`` (the tests that take the ``device`` fixture run their math there);
- per layer (benchmarks/refine_speed.py's ``run``, ``--device cuda --syncs --update``):
  DSnoT's refinement of Llama-7B, Llama-3-8B and Llama-70B layer shapes, both objectives,
  60% unstructured and 2:4, from Wanda's mask: seconds, peak device memory beyond the
  inputs, host syncs per cycle (counted op by op and as CUDA reports them), the weight
  update's seconds (``update_weights``) and llm-compressor's own Wanda and SparseGPT
  sparsify steps on the same layer and GPU (SparseGPT never extrapolated here);
- CPU against GPU: the same layers refined on both from the same Wanda mask;
- oneshot, bfloat16, on a randomly initialised Llama-3-8B-shaped model with two decoder
  layers (built from a LlamaConfig), calibrated on 32 x 2048 random token ids: Wanda,
  Wanda + DSnoT (gram, mean), SparseGPT, SparseGPT + DSnoT at 60%, then Wanda + DSnoT and
  SparseGPT + DSnoT at 2:4, each with its oneshot time, DSnoT's share
  (``DSnoTModifier.report.summary()["seconds"]``), peak device memory and the checks of its
  zeros (every layer's exact zeros at the target sparsity; 2:4: every block of 4 holds 2;
  with DSnoT: every row keeps the zero count its pruner gave it);
- the targets of issue 29 as PASS / FAIL lines: refinement at most 0.5x SparseGPT's and 2x
  Wanda's sparsify step per layer (Wanda's step with its statistic already accumulated: a
  sort, stricter than the paper's whole-run time), Wanda + DSnoT (gram) oneshot at most
  1.3x Wanda's, at most one host sync per cycle, CPU and GPU refining to the same mask on
  at least 99.9% of each layer's rows with every row's zero count the same.

Usage::

    scripts/gpu-check                      # on the CUDA machine, wheels in .whl/
    scripts/gpu-check --wheels DIR         # or DSNOT_WHEELS=DIR
    scripts/gpu-check --parts oneshot      # a rerun of some parts only
    scripts/gpu-check --smoke              # CPU, tiny shapes, seconds (the test suite runs it)
    scripts/gpu-check --print-downloads    # the pip download lines of the wheels

Without ``--smoke`` it stops at once (exit 2) on a machine without CUDA. The JSON goes to
``--json`` (default ``$OUT/gpu-check.json`` where ``$OUT`` is set, else
``runs/gpu-check.json``), a copy of the table beside it (``.md``) and each part's log in
``gpu-check-logs/``. Exit status: 0 when every part ran to its end (targets missed or not:
they are reported; ``--strict`` makes a FAIL exit 1), 1 when a part failed or ran out of
time, 2 without CUDA, 3 when a wheel is missing.

Wheels
------
The CUDA machine has torch 2.11 (CUDA 13), transformers 5.17, accelerate, numpy, safetensors
and pytest, with their own dependencies, and nothing else; the check needs these more
(Python 3.12, x86_64; 4.2 MB in all, within the 60 MB that may be carried):

    llmcompressor==0.14.0.1            394,940 B   the pruners, oneshot
    compressed-tensors==0.19.0         240,213 B   llmcompressor's
    loguru==0.8.0                       69,409 B   llmcompressor's, dsnot-modifier's
    requests==2.34.2                    73,075 B   imported by llmcompressor
    charset-normalizer==3.5.3          257,134 B   requests' (cp312 manylinux)
    urllib3==2.8.0                     135,717 B   requests'
    idna==3.21                          69,750 B   requests' (httpx's too: usually there)
    certifi==2026.10.19.post1          134,047 B   requests' (httpx's too: usually there)
    pydantic==2.14.4                   494,865 B   compressed-tensors', llmcompressor's
    pydantic-core==2.50.5            2,264,846 B   pydantic's (cp312 manylinux)
    annotated-types==0.8.0              13,427 B   pydantic's
    typing-inspection==0.4.5            14,874 B   pydantic's

each fetched (here, with network) by::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        --platform any -d .whl NAME==VERSION

Only those missing on the machine are installed, with ``pip install --no-index --no-deps
--target .gpu-check/site`` (or by unpacking the wheels where pip is missing), and the
folder is put first on the path of every part. Not carried: llmcompressor's other declared
dependencies that these paths never import (auto-round, nvidia-ml-py, pillow), and
``datasets``, whose pyarrow alone is a 55 MB wheel (datasets, pyarrow, pandas and theirs:
68 MB). llmcompressor imports ``datasets`` when it is imported, for type names only, and
oneshot given a torch DataLoader never uses it: where ``datasets`` is missing, a stub
package of those names is written into the site folder (the JSON says so), and the
oneshot runs here are given a DataLoader of the token ids everywhere, stub or not.

Time budget
-----------
The whole run is held to ``--budget`` (540 s by default: the device machine's commands
stop at 600 s), each part in a process of its own with its own time limit, cut where the
budget has less left; a part cut short keeps the rows it had written. Limits and the
estimates behind them (one H100; the installs take about 10 s):

- tests, 75 s: about 200 small tests, mostly small kernels and the imports;
- refine:7b 50 s, refine:8b 60 s, refine:70b 115 s: per layer Wanda (milliseconds),
  SparseGPT (about 10 small kernels and a host sync per column: 0.1 ms x columns, plus
  its three C x C factorisations and rows x C^2 updates: about 5 s at 28672 columns),
  the refinement (its products E H: rows x C^2, 50 cycles of a few passes over the
  rows x C state: well under 1 s at 70B shapes), the weight update (50 conjugate-gradient
  products of rows x C^2 at most: 13 TFLOP each at 8192 x 28672, a few seconds), the
  per-row baseline on 8 rows and the untimed sync-count call, plus the synthetic layer
  made on the CPU (16 cores; about 5 s at 70B shapes) and moved over;
- agreement, 40 s: 4096 x 4096 and 11008 x 4096, both objectives and structures, refined
  on the CPU too (BENCHMARKS.md's CPU table: 0.4 to 11 s a case on 1 thread, several times
  less on 16);
- oneshot, 160 s: each run traces the model, calibrates and propagates 32 x 2048 tokens
  through each of its two layers (about 1 TFLOP a sample in bfloat16, plus SparseGPT's and
  DSnoT's Gram sums, float32 for SparseGPT: about 1 s a layer) and prunes them (SparseGPT
  about 3 s a layer), about 10 to 20 s a run, 7 runs after a tiny warm-up run.

Estimates only: no such run had been made when this was written. In ``--smoke`` every part
runs in one process on tiny shapes (CPU by default) in a few seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: what every part imports from the checkout (nothing of the project is installed there)
SOURCE_PATHS = [ROOT / "src", ROOT / "harness", ROOT / "tests"]

# ------------------------------------------------------------------------------ wheels

#: (distribution, version, bytes of its wheel for CPython 3.12 on x86_64 Linux, why)
WHEELS = [
    ("llmcompressor", "0.14.0.1", 394940, "the pruners, oneshot"),
    ("compressed-tensors", "0.19.0", 240213, "llmcompressor's"),
    ("loguru", "0.8.0", 69409, "llmcompressor's, dsnot-modifier's"),
    ("requests", "2.34.2", 73075, "imported by llmcompressor"),
    ("charset-normalizer", "3.5.3", 257134, "requests'"),
    ("urllib3", "2.8.0", 135717, "requests'"),
    ("idna", "3.21", 69750, "requests'"),
    ("certifi", "2026.10.19.post1", 134047, "requests'"),
    ("pydantic", "2.14.4", 494865, "compressed-tensors', llmcompressor's"),
    ("pydantic-core", "2.50.5", 2264846, "pydantic's"),
    ("annotated-types", "0.8.0", 13427, "pydantic's"),
    ("typing-inspection", "0.4.5", 14874, "pydantic's"),
]
#: the most the carried wheels may take
WHEELS_LIMIT_BYTES = 60_000_000
PIP_DOWNLOAD = ("python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 "
                "--implementation cp --platform manylinux_2_28_x86_64 "
                "--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "
                "--platform any -d .whl")
#: the stub of ``datasets`` written where it is missing: llmcompressor imports these names
DATASETS_STUB = {
    "__init__.py": '''"""A stub written by scripts/gpu-check where ``datasets`` is missing (its pyarrow is too
big to carry): llmcompressor imports these names for its types only, and oneshot given a
torch DataLoader never uses them."""

__version__ = "0+gpu-check-stub"


class Dataset:
    pass


class DatasetDict(dict):
    pass


class IterableDataset:
    pass


def load_dataset(*args, **kwargs):
    raise RuntimeError("datasets is a stub here (scripts/gpu-check): give oneshot a DataLoader")
''',
    "formatting/__init__.py": "",
    "formatting/formatting.py": "class LazyRow(dict):\n    pass\n",
}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download_line(dist: str, version: str, python: str = "3.12") -> str:
    """The command that fetches the wheel of ``dist==version`` into .whl/ (for ``python``)."""
    return f"{PIP_DOWNLOAD.replace('3.12', python)} {dist}=={version}"


def _fits_here(path: Path) -> bool:
    """Whether this interpreter can install the wheel (its tags; True where ``packaging``,
    transformers' dependency, is missing)."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        return True
    try:
        return not parse_wheel_filename(path.name)[3].isdisjoint(sys_tags())
    except ValueError:
        return False


def is_installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(dist)
        return True
    except PackageNotFoundError:
        return False


def find_wheel(folder: Path, dist: str, version: str) -> Path | None:
    """The wheel of ``dist==version`` in ``folder`` that this interpreter can install."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.whl")):
        name, _, rest = path.name.partition("-")
        if normalized(name) == normalized(dist) and rest.split("-")[0] == version and _fits_here(path):
            return path
    return None


def plan_install(folder: Path, wheels=None, installed=is_installed):
    """(wheels to install, (dist, version) missing from the machine and from ``folder``)."""
    todo, missing = [], []
    for dist, version, *_ in WHEELS if wheels is None else wheels:
        if installed(dist):
            continue
        wheel = find_wheel(folder, dist, version)
        if wheel is None:
            missing.append((dist, version))
        else:
            todo.append(wheel)
    return todo, missing


def missing_message(missing, folder: Path) -> str:
    python = "{}.{}".format(*sys.version_info[:2])
    lines = [f"gpu-check: {len(missing)} wheel(s) needed here are neither installed nor in "
             f"{folder} (for Python {python}); fetch them where there is a network, into "
             "the folder you carry:"]
    lines += [f"  {download_line(dist, version, python)}" for dist, version in missing]
    return "\n".join(lines)


def install(wheels: list[Path], site: Path, log) -> str:
    """Install ``wheels`` into ``site`` without any network; how it was done."""
    site.mkdir(parents=True, exist_ok=True)
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"],
                             capture_output=True).returncode == 0
    if has_pip:
        command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                   "--disable-pip-version-check", "--no-compile", "--quiet", "--upgrade",
                   "--target", str(site), *map(str, wheels)]
        log("installing: " + " ".join(command))
        subprocess.run(command, check=True)
        return "pip install --no-index --no-deps --target"
    for wheel in wheels:  # a wheel is a zip of the files to put on the path
        log(f"unpacking {wheel.name} (no pip here)")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    return "unpacked (no pip)"


def write_datasets_stub(site: Path):
    for relative, text in DATASETS_STUB.items():
        path = site / "datasets" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def prepare_packages(folder: Path, site: Path, log) -> dict:
    """Make every wheel importable (installing the missing ones), ``datasets`` or its stub;
    what was done, or SystemExit(3) naming the missing wheels."""
    import importlib

    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    todo, missing = plan_install(folder)
    if missing:
        print(missing_message(missing, folder), file=sys.stderr)
        raise SystemExit(3)
    how = install(todo, site, log) if todo else None
    importlib.invalidate_caches()
    still = [w.name for w in todo if not is_installed(w.name.split("-")[0])]
    if still:
        raise RuntimeError(f"installed but not found: {still}")
    stub = not is_installed("datasets")
    if stub:
        write_datasets_stub(site)
    return {"installed": [w.name for w in todo], "how": how, "datasets_stub": stub,
            "wheels_folder": str(folder), "site": str(site)}


# ------------------------------------------------------------------------------ the parts

#: each part's time limit on the GPU, in order (see "Time budget" above)
PART_LIMITS = {"tests": 75, "refine:7b": 50, "refine:8b": 60, "refine:70b": 115,
               "agreement": 40, "oneshot": 160}
#: the smoke's parts, in one process (pytest.main last: it leaves closed streams behind)
SMOKE_PARTS = ["refine:smoke", "agreement", "oneshot", "tests"]
REFINE_SHAPES = {
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "8b": [(1024, 4096), (14336, 4096), (4096, 14336)],
    "70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
    "smoke": [(24, 64), (16, 128)],
}
AGREEMENT_SHAPES = {False: [(4096, 4096), (11008, 4096)], True: [(32, 64)]}
TEST_FILES = ["tests/test_swaps.py", "tests/test_stats.py", "tests/test_device_path.py"]
SMOKE_TESTS = ["tests/test_swaps.py::test_inputs_are_not_modified",
               "tests/test_stats.py::test_explicit_float32_off_cpu_keeps_float32_products"]
#: the oneshot runs: method, sparsity, DSnoT's parameters
ONESHOT_RUNS = [("wanda", "0.6", {}), ("wanda+dsnot", "0.6", {"objective": "gram"}),
                ("wanda+dsnot", "0.6", {"objective": "mean"}), ("sparsegpt", "0.6", {}),
                ("sparsegpt+dsnot", "0.6", {"objective": "gram"}),
                ("wanda+dsnot", "2:4", {"objective": "gram"}),
                ("sparsegpt+dsnot", "2:4", {"objective": "gram"})]
#: Llama-3-8B's shapes (two decoder layers), and the smoke's tiny Llama
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rms_norm_eps=1e-5)
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
CALIBRATION = {False: (32, 2048), True: (8, 32)}  # samples x tokens


class Context:
    """What a part gets: its device, the mode, and ``emit`` (a row, written at once)."""

    def __init__(self, part: str, device: str, smoke: bool, out):
        self.part, self.device, self.smoke, self._out = part, device, smoke, out

    def emit(self, kind: str, row: dict):
        self._out.write(json.dumps({"part": self.part, "kind": kind, "row": row}) + "\n")
        self._out.flush()

    def log(self, text: str):
        print(f"[{self.part}] {text}", flush=True)


def _load_refine_speed():
    import importlib.util

    path = ROOT / "benchmarks" / "refine_speed.py"
    spec = importlib.util.spec_from_file_location("refine_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def part_tests(ctx: Context):
    """The device tests, in this process (pytest.main), their outcomes as they come."""
    import pytest

    class Outcomes:
        def __init__(self):
            self.row = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "failures": [],
                        "device": ctx.device, "finished": False}

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                key = {"passed": "passed", "skipped": "skipped"}.get(
                    report.outcome, "failed" if report.when == "call" else "errors")
                self.row[key] += 1
                if report.failed:
                    self.row["failures"].append(f"{report.nodeid} ({report.when})")
                ctx.emit("tests", self.row)

    outcomes = Outcomes()
    files = SMOKE_TESTS if ctx.smoke else TEST_FILES
    code = pytest.main(["-q", "-p", "no:cacheprovider", "--device", ctx.device, *files],
                       plugins=[outcomes])
    outcomes.row.update(finished=True, exit_code=int(code))
    ctx.emit("tests", outcomes.row)


def part_refine(ctx: Context, family: str):
    """refine_speed.run on each shape of ``family``, after a warm-up case."""
    import torch

    rs = _load_refine_speed()
    gc.freeze()  # the modules' objects: refine_speed's gc.collect() calls skip them
    device = torch.device(ctx.device)
    threads = [1] if ctx.smoke else [torch.get_num_threads()]
    max_cols = 64 if ctx.smoke else 1 << 30  # the GPU times SparseGPT whole
    baseline_rows = 4 if ctx.smoke else 8
    kwargs = dict(memory=device.type != "cpu", seed=0, log=ctx.log, device=device,
                  syncs=True, update=True)
    if device.type != "cpu":  # CUDA's context, cuBLAS and cuSOLVER set up before any timing
        rs.run([(256, 512)], threads, 4, max_cols, **kwargs)
    for shape in REFINE_SHAPES[family]:
        for row in rs.run([shape], threads, baseline_rows, max_cols, **kwargs):
            row["family"] = family
            ctx.emit("refine", row)


def part_agreement(ctx: Context):
    """The same layers refined on the CPU and on the device from the same Wanda mask."""
    import torch

    from dsnot_modifier.swaps import refine_mask

    rs = _load_refine_speed()
    gc.freeze()
    device = torch.device(ctx.device)
    for rows, cols in AGREEMENT_SHAPES[ctx.smoke]:
        layer = rs.make_layer(rows, cols, seed=1)
        on_device = {k: v.to(device) for k, v in layer.items()}
        for structure, nm in rs.STRUCTURES.items():
            current, _ = rs.wanda_step(layer["w"], layer["sqnorm"], nm)
            for objective in rs.OBJECTIVES:
                kwargs = dict(objective=objective, nm=nm, max_cycles=rs.MAX_CYCLES)
                start = time.perf_counter()
                cpu = refine_mask(layer["w"], current, **kwargs, **rs._refine_stats(layer, objective))
                cpu_s = time.perf_counter() - start
                start = rs._now(on_device["w"])
                dev = refine_mask(on_device["w"], current.to(device), **kwargs,
                                  **rs._refine_stats(on_device, objective))
                dev_s = rs._now(on_device["w"]) - start
                zero_cpu, zero_dev = cpu.weight == 0, dev.weight.cpu() == 0
                same = (zero_cpu == zero_dev).all(1)
                ctx.emit("agreement", {
                    "shape": [rows, cols], "structure": structure, "objective": objective,
                    "rows": rows, "rows_same_mask": int(same.sum()),
                    "fraction_same": float(same.float().mean()),
                    "zero_counts_equal": bool(torch.equal(zero_cpu.sum(1), zero_dev.sum(1))),
                    "swaps_cpu": cpu.swaps, "swaps_device": dev.swaps,
                    "cpu_s": cpu_s, "device_s": dev_s, "cpu_threads": torch.get_num_threads(),
                    "device": str(device)})
                ctx.log(f"{rows}x{cols} {structure} {objective}: {int(same.sum())}/{rows} rows "
                        f"the same, swaps {cpu.swaps} / {dev.swaps}")
        del layer, on_device
        gc.collect()


def _row_zeros_modifier():
    """A modifier that records, after the pruner, each target Linear's zeros per row."""
    import torch
    from llmcompressor.modifiers import Modifier

    class RowZeros(Modifier):
        counts: dict = {}

        def on_initialize(self, state, **kwargs):
            self.counts.clear()
            self._model = state.model
            return True

        def on_sequential_epoch_end(self, state, event, modules=(), **kwargs):
            names = {m: n for n, m in self._model.named_modules()}
            for module in modules:
                name = names.get(module)
                if (isinstance(module, torch.nn.Linear) and name and "lm_head" not in name
                        and name not in self.counts):
                    self.counts[name] = (module.weight == 0).sum(1).cpu()

    return RowZeros()


def _zero_checks(weights: dict, sparsity: str, pruner_counts: dict) -> dict:
    """The exact-zeros and N:M checks of a pruned model's target weights."""
    from dsnot_modifier.masks import block_zero_counts, parse_sparsity

    fraction, nm = parse_sparsity(sparsity)
    zeros = total = off_target = bad_blocks = changed_rows = 0
    for name, weight in weights.items():
        zero = weight == 0
        count = int(zero.sum())
        zeros, total = zeros + count, total + zero.numel()
        cols = zero.shape[1]
        if abs(count / zero.numel() - fraction) > max(0.005, 1 / cols):
            off_target += 1
        if nm is not None:
            bad_blocks += int((block_zero_counts(zero, nm[1]) != nm[0]).sum())
        if name in pruner_counts:
            changed_rows += int((zero.sum(1) != pruner_counts[name]).sum())
    return {"layers": len(weights), "zero_fraction": zeros / max(total, 1),
            "layers_off_target": off_target, "nm_bad_blocks": bad_blocks if nm else None,
            "rows_zero_count_changed": changed_rows if pruner_counts else None,
            "layers_recorded_after_pruner": len(pruner_counts)}


def part_oneshot(ctx: Context):
    """The oneshot runs on the Llama-3-8B-shaped model (the smoke: a tiny Llama)."""
    import copy

    import torch
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig, LlamaForCausalLM

    import helpers
    from dsnot_harness.pipeline import make_recipe, quiet_llmcompressor

    gc.freeze()
    device = torch.device(ctx.device)
    cuda = device.type == "cuda"
    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-model-"))

    def build(shapes):
        config = LlamaConfig(**shapes, num_hidden_layers=2, tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device(device):  # random init is fast there
            model = LlamaForCausalLM(config)
        model = model.to(device="cpu", dtype=torch.bfloat16).eval()
        model.config.save_pretrained(workdir)  # oneshot reads the config again
        model.config.name_or_path = str(workdir)
        return model

    def loader(vocab, samples, tokens):
        ids = torch.randint(0, vocab, (samples, tokens), generator=torch.Generator().manual_seed(1))
        return DataLoader([{"input_ids": x.unsqueeze(0), "attention_mask": torch.ones(1, tokens, dtype=torch.long)}
                           for x in ids], batch_size=None)

    def prune(model, recipe, data):
        with quiet_llmcompressor():
            oneshot(model=model, processor=helpers.tokenizer(), dataset=data, recipe=recipe,
                    pipeline="sequential")

    if cuda:  # CUDA and llm-compressor's lazy set-up, before any timing
        prune(build(TINY), make_recipe("wanda+dsnot", "0.6"), loader(TINY["vocab_size"], 8, 32))
    shapes = TINY if ctx.smoke else LLAMA3_8B
    start = time.perf_counter()
    base = build(shapes)
    ctx.log(f"model built in {time.perf_counter() - start:.1f} s")
    samples, tokens = CALIBRATION[ctx.smoke]
    data = loader(shapes["vocab_size"], samples, tokens)
    for method, sparsity, params in ONESHOT_RUNS:
        model = copy.deepcopy(base)
        recipe = make_recipe(method, sparsity, **params)
        recorder = _row_zeros_modifier()
        recipe.insert(1, recorder)  # after the pruner, before DSnoT
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        prune(model, recipe, data)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        dsnot = [m for m in recipe if type(m).__name__ == "DSnoTModifier"]
        summary = dsnot[0].report.summary() if dsnot else {}
        dsnot_s = summary.get("seconds")
        row = {"method": method, "sparsity": sparsity, "objective": params.get("objective"),
               "oneshot_s": seconds, "dsnot_s": dsnot_s, "dsnot_swaps": summary.get("swaps"),
               "dsnot_share": None if dsnot_s is None else dsnot_s / seconds,
               "peak_device_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
               "samples": samples, "tokens": tokens, "dtype": "bfloat16",
               "hidden_size": shapes["hidden_size"], "intermediate_size": shapes["intermediate_size"]}
        row.update(_zero_checks(helpers.linears(model), sparsity,
                                dict(recorder.counts) if dsnot else {}))
        ctx.emit("oneshot", row)
        ctx.log(f"{method} {params.get('objective') or ''} {sparsity}: {seconds:.1f} s "
                f"(DSnoT {dsnot_s if dsnot_s is None else round(dsnot_s, 2)} s)")
        del model, recipe, dsnot, recorder
        gc.collect()


PART_FUNCTIONS = {"tests": part_tests, "agreement": part_agreement, "oneshot": part_oneshot}


def run_parts(names: list[str], out_path: Path, device: str, smoke: bool) -> int:
    """The child: run ``names`` in order, each part's rows, end or error into ``out_path``."""
    for path in map(str, SOURCE_PATHS):
        if path not in sys.path:
            sys.path.insert(0, path)
    with open(out_path, "a") as out:
        for name in names:
            ctx = Context(name, device, smoke, out)
            start = time.perf_counter()
            try:
                if name.startswith("refine:"):
                    part_refine(ctx, name.split(":", 1)[1])
                else:
                    PART_FUNCTIONS[name](ctx)
                ctx.emit("done", {"seconds": time.perf_counter() - start})
            except Exception as error:  # noqa: BLE001: the next part still runs
                traceback.print_exc()
                ctx.emit("error", {"seconds": time.perf_counter() - start,
                                   "error": f"{type(error).__name__}: {error}"[:2000]})
    return 0


# ------------------------------------------------------------------------------ the parent

def run_group(names, limit_s, args, env, out_path: Path, log_path: Path) -> dict:
    """One child process running ``names``, killed (its process group) after ``limit_s``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--part", ",".join(names),
               "--part-out", str(out_path), "--device", args.device]
    if args.smoke:
        command.append("--smoke")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            code = child.wait(timeout=limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, sig)
                try:
                    child.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            code = child.returncode
    return {"seconds": time.perf_counter() - start, "timed_out": timed_out, "exit_code": code}


def read_rows(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def _ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def _key(row) -> str:
    return f"{row['shape'][0]}×{row['shape'][1]} {row['structure']} {row['objective']}"


def evaluate(result: dict) -> list[dict]:
    """The targets of issue 29, one check each: name, ok (None: not measured), detail."""
    checks = []

    def add(name, ok, detail):
        checks.append({"name": name, "ok": ok, "detail": detail})

    tests = result["tests"]
    if tests is None or not tests.get("finished"):
        add("device tests pass", None, "not run to the end" if tests is None else
            f"cut short after {tests['passed']} passed, {tests['failed']} failed")
    else:
        add("device tests pass", tests["failed"] == 0 and tests["errors"] == 0 and tests["passed"] > 0,
            f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped on {tests['device']}")
    refine = result["refine"]
    for row in refine:
        key = _key(row)
        sgpt = _ratio(row["refine_s"], row["sparsegpt_s"])
        wanda = _ratio(row["refine_s"], row["wanda_s"])
        add(f"refine <= 0.5x SparseGPT: {key}", None if sgpt is None else sgpt <= 0.5,
            "n/a" if sgpt is None else f"{row['refine_s']:.3f} s / {row['sparsegpt_s']:.3f} s = {sgpt:.2f}x")
        add(f"refine <= 2x Wanda: {key}", None if wanda is None else wanda <= 2,
            "n/a" if wanda is None else f"{row['refine_s']:.3f} s / {row['wanda_s']:.4f} s = {wanda:.2f}x")
        ops, cuda = row.get("host_syncs_per_cycle"), row.get("cuda_syncs_per_cycle")
        measured = [v for v in (ops, cuda) if v is not None]
        add(f"<= 1 host sync per cycle: {key}", None if not measured else max(measured) <= 1,
            f"most in a cycle: {ops} (ops), {cuda if cuda is not None else 'n/a'} (CUDA), "
            f"over {row.get('sync_cycles_counted')} cycles")
    for family in result["refine_families"]:
        if not any(r.get("family") == family for r in refine):
            add(f"refine targets, {family} shapes", None, "not measured (see the part's status)")
    agreement = result["agreement"]
    for row in agreement:
        ok = row["fraction_same"] >= 0.999 and row["zero_counts_equal"]
        add(f"CPU = {row['device']}: {_key(row)}", ok,
            f"same mask on {row['rows_same_mask']}/{row['rows']} rows "
            f"({100 * row['fraction_same']:.2f}%, >= 99.9%), zero counts per row "
            f"{'equal' if row['zero_counts_equal'] else 'DIFFER'}")
    if not agreement:
        add("CPU = device", None, "not measured (see the part's status)")
    runs = result["oneshot"]
    by = {(r["method"], r["sparsity"], r["objective"]): r for r in runs}
    wanda, dsnot = by.get(("wanda", "0.6", None)), by.get(("wanda+dsnot", "0.6", "gram"))
    ratio = _ratio(dsnot and dsnot["oneshot_s"], wanda and wanda["oneshot_s"])
    add("oneshot Wanda + DSnoT (gram) <= 1.3x Wanda (60%)", None if ratio is None else ratio <= 1.3,
        "not measured" if ratio is None else
        f"{dsnot['oneshot_s']:.1f} s / {wanda['oneshot_s']:.1f} s = {ratio:.2f}x")
    for row in runs:
        name = f"{row['method']}{' (' + row['objective'] + ')' if row['objective'] else ''} {row['sparsity']}"
        add(f"exact zeros: {name}", row["layers_off_target"] == 0,
            f"{100 * row['zero_fraction']:.2f}% zeros, {row['layers_off_target']}/{row['layers']} "
            "layers off the target")
        if row["nm_bad_blocks"] is not None:
            add(f"N:M: {name}", row["nm_bad_blocks"] == 0,
                f"{row['nm_bad_blocks']} blocks without exactly N zeros")
        if row["rows_zero_count_changed"] is not None:
            ok = row["rows_zero_count_changed"] == 0 and row["layers_recorded_after_pruner"] == row["layers"]
            add(f"rows keep their pruner's zero count: {name}", ok,
                f"{row['rows_zero_count_changed']} rows changed, {row['layers_recorded_after_pruner']}"
                f"/{row['layers']} layers recorded after the pruner")
    return checks


def _f(x, digits=2, scale=1.0):
    return "n/a" if x is None else f"{x * scale:.{digits}f}"


def report(result: dict) -> str:
    """The table, in markdown."""
    meta = result["meta"]
    lines = [f"# GPU check{' (smoke)' if meta['smoke'] else ''}: {meta['device_name']}",
             "", f"torch {meta['torch']}, CUDA {meta['cuda']}, Python {meta['python']}, "
             f"{meta['date']}; {meta['wall_s']:.0f} s of a {meta['budget_s']} s budget; "
             f"datasets {'stub' if meta['packages'].get('datasets_stub') else 'installed'}",
             "", "| part | status | seconds | limit s |", "|---|---|---|---|"]
    for name, part in result["parts"].items():
        lines.append(f"| {name} | {part['status']} | {_f(part.get('seconds'), 0)} | "
                     f"{_f(part.get('limit_s'), 0)} |")
    tests = result["tests"]
    if tests:
        lines += ["", f"Device tests on {tests['device']}: {tests['passed']} passed, "
                  f"{tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped"
                  + ("" if tests.get("finished") else " (cut short)")]
        lines += [f"- FAILED {name}" for name in tests["failures"]]
    if result["refine"]:
        lines += ["", "Refinement per layer (benchmarks/refine_speed.py run with --syncs --update; "
                  "float32 weights, 50 cycles at most, from Wanda's mask):", "",
                  "| shape | structure | objective | refine s | Wanda s | SparseGPT s | "
                  "refine / SparseGPT | refine / Wanda | extra memory GB | syncs / cycle "
                  "(ops, CUDA) | swaps | update s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["refine"]:
            weight_gb = r["shape"][0] * r["shape"][1] * 4 / 1e9
            extra = None if r.get("extra_mem_ratio") is None else r["extra_mem_ratio"] * weight_gb
            lines.append(
                f"| {r['shape'][0]}×{r['shape'][1]} | {r['structure']} | {r['objective']} | "
                f"{_f(r['refine_s'], 3)} | {_f(r['wanda_s'], 4)} | {_f(r['sparsegpt_s'], 2)} | "
                f"{_f(_ratio(r['refine_s'], r['sparsegpt_s']))} | {_f(_ratio(r['refine_s'], r['wanda_s']))} | "
                f"{_f(extra)} | {r.get('host_syncs_per_cycle')}, {r.get('cuda_syncs_per_cycle')} | "
                f"{r['swaps']} | {_f(r.get('update_s'), 3)} |")
    if result["agreement"]:
        lines += ["", "CPU against the device, same Wanda mask:", "",
                  "| shape | structure | objective | rows with the same mask | zero counts equal | "
                  "swaps CPU / device | CPU s | device s |", "|---|---|---|---|---|---|---|---|"]
        for r in result["agreement"]:
            lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['structure']} | {r['objective']} | "
                         f"{r['rows_same_mask']}/{r['rows']} | {r['zero_counts_equal']} | "
                         f"{r['swaps_cpu']} / {r['swaps_device']} | {_f(r['cpu_s'])} | {_f(r['device_s'], 3)} |")
    if result["oneshot"]:
        first = result["oneshot"][0]
        lines += ["", f"Oneshot, bfloat16, hidden {first['hidden_size']}, MLP {first['intermediate_size']}, "
                  f"2 decoder layers, {first['samples']} x {first['tokens']} random tokens:", "",
                  "| method | sparsity | oneshot s | DSnoT s | DSnoT share | peak device GB | "
                  "zeros | layers off target | N:M bad blocks | rows' zero counts changed |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["oneshot"]:
            method = r["method"] + (f" ({r['objective']})" if r["objective"] else "")
            lines.append(f"| {method} | {r['sparsity']} | {_f(r['oneshot_s'], 1)} | {_f(r['dsnot_s'])} | "
                         f"{_f(r['dsnot_share'], 1, 100)}{'%' if r['dsnot_share'] is not None else ''} | "
                         f"{_f(r['peak_device_bytes'], 2, 1e-9)} | {100 * r['zero_fraction']:.2f}% | "
                         f"{r['layers_off_target']} | {_f(r['nm_bad_blocks'], 0)} | "
                         f"{_f(r['rows_zero_count_changed'], 0)} |")
    lines += ["", "Targets (issue 29):", ""]
    for check in result["checks"]:
        mark = {True: "PASS", False: "FAIL", None: "N/A "}[check["ok"]]
        lines.append(f"{mark} {check['name']}: {check['detail']}")
    return "\n".join(lines)


def default_json() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu-check.json" if out else ROOT / "runs" / "gpu-check.json"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, every part in one process, CPU unless --device")
    parser.add_argument("--device", help="where the parts run (default: cuda; --smoke: cpu)")
    parser.add_argument("--json", type=Path, help="the result (default: $OUT/gpu-check.json "
                        "where $OUT is set, else runs/gpu-check.json)")
    parser.add_argument("--wheels", type=Path,
                        default=Path(os.environ.get("DSNOT_WHEELS", ROOT / ".whl")),
                        help="the folder of wheels carried beside the checkout "
                             "(default: $DSNOT_WHEELS, else .whl/)")
    parser.add_argument("--site", type=Path, default=ROOT / ".gpu-check" / "site",
                        help="where the missing wheels are installed (default: .gpu-check/site)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run "
                        "(default: 540; --smoke: 300)")
    parser.add_argument("--parts", help="the parts to run, comma-separated (default: all: "
                        + ", ".join(PART_LIMITS) + ")")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--print-downloads", action="store_true",
                        help="print the pip download line of every wheel and stop")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # the child: parts to run
    parser.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.budget = args.budget or (300.0 if args.smoke else 540.0)
    return args


def no_cuda_message(torch) -> str | None:
    """Why this machine cannot run the check (None: it can)."""
    if torch is None:
        return "gpu-check: torch is not installed here: run it on the CUDA machine"
    if not torch.cuda.is_available():
        return (f"gpu-check: no CUDA device here (torch {torch.__version__}: "
                "torch.cuda.is_available() is False). Run it on a CUDA machine, or run "
                "`scripts/gpu-check --smoke` for the CPU smoke run.")
    return None


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.part:
        return run_parts(args.part.split(","), args.part_out, args.device, args.smoke)
    if args.print_downloads:
        print("\n".join(download_line(d, v) for d, v, *_ in WHEELS))
        print(f"# {sum(w[2] for w in WHEELS):,} bytes in all (at most {WHEELS_LIMIT_BYTES:,})")
        return 0
    torch = None  # imported here only to look for CUDA (the parts import it themselves)
    if not args.smoke or args.device.startswith("cuda"):
        with contextlib.suppress(ImportError):
            import torch
        message = no_cuda_message(torch)
        if message:
            print(message, file=sys.stderr)
            return 2
    log = lambda text: print(f"gpu-check: {text}", file=sys.stderr, flush=True)  # noqa: E731
    packages = prepare_packages(args.wheels.resolve(), args.site.resolve(), log)

    json_path = (args.json or default_json()).resolve()
    logs = json_path.parent / (json_path.stem + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([packages["site"], *map(str, SOURCE_PATHS)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.smoke:
        groups = [SMOKE_PARTS]
        limits = {name: args.budget for name in SMOKE_PARTS}
    else:
        chosen = args.parts.split(",") if args.parts else list(PART_LIMITS)
        unknown = [p for p in chosen if p not in PART_LIMITS]
        if unknown:
            print(f"gpu-check: unknown parts {unknown} (choose from {', '.join(PART_LIMITS)})",
                  file=sys.stderr)
            return 2
        groups = [[name] for name in chosen]
        limits = PART_LIMITS
    rows, parts = [], {}
    reserve = 10.0  # for the report
    for group in groups:
        left = args.budget - (time.perf_counter() - started) - reserve
        limit = min(limits[group[0]], left)
        label = ",".join(group)
        if limit < 5:
            for name in group:
                parts[name] = {"status": "not run: no time left", "limit_s": max(limit, 0.0)}
            continue
        out_path = logs / f"{label.replace(':', '-').replace(',', '+')}.jsonl"
        out_path.unlink(missing_ok=True)
        log(f"{label}: up to {limit:.0f} s")
        ran = run_group(group, limit, args, env, out_path,
                        logs / f"{label.replace(':', '-').replace(',', '+')}.log")
        got = read_rows(out_path)
        rows += got
        for name in group:
            ends = [r for r in got if r["part"] == name and r["kind"] in ("done", "error")]
            if ends and ends[-1]["kind"] == "done":
                status, seconds = "ok", ends[-1]["row"]["seconds"]
            elif ends:
                status, seconds = "failed: " + ends[-1]["row"]["error"], ends[-1]["row"]["seconds"]
            elif ran["timed_out"]:
                status, seconds = f"timed out after {ran['seconds']:.0f} s", None
            else:
                status, seconds = f"failed: exit {ran['exit_code']} (see its log)", None
            parts[name] = {"status": status, "seconds": seconds, "limit_s": limit,
                           "group_seconds": ran["seconds"], "log": str(logs / f"{label.replace(':', '-').replace(',', '+')}.log")}
            log(f"{name}: {status}")

    def of(kind):
        return [r["row"] for r in rows if r["kind"] == kind]

    tests = of("tests")
    cuda = torch is not None and args.device.startswith("cuda")
    from importlib.metadata import version

    result = {
        "meta": {"smoke": args.smoke, "device": args.device,
                 "device_name": torch.cuda.get_device_name(torch.device(args.device)) if cuda
                 else f"{args.device} (no GPU)",
                 "torch": version("torch"), "cuda": torch.version.cuda if torch else None,
                 "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"),
                 "budget_s": args.budget, "wall_s": time.perf_counter() - started,
                 "packages": packages},
        "parts": parts,
        "tests": tests[-1] if tests else None,
        "refine": of("refine"),
        "refine_families": [p.split(":", 1)[1] for p in parts if p.startswith("refine:")],
        "agreement": of("agreement"),
        "oneshot": of("oneshot"),
    }
    result["checks"] = evaluate(result)
    result["meta"]["wall_s"] = time.perf_counter() - started
    table = report(result)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    json_path.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\n(JSON: {json_path})")
    if any(not p["status"] == "ok" for p in parts.values()):
        return 1
    if args.strict and any(c["ok"] is False for c in result["checks"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
