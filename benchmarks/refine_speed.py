#!/usr/bin/env python
"""
How fast is DSnoT's mask refinement on single layers of real LLM shapes?

For every layer shape (rows × cols of the weight), mask structure (60% unstructured,
2:4), objective (``mean``, ``gram``) and thread count (1 and all, set with
``torch.set_num_threads``), this times side by side, in one run:

- ``refine_s``: our vectorised :func:`dsnot_modifier.swaps.refine_mask`, with the
  modifier's defaults (50 cycles at most), starting from Wanda's mask (the output of
  the timed Wanda step below) for both objectives;
- ``baseline_s``: a plain per-row implementation of the same rule, written here
  (:func:`baseline_refine`): a Python loop over rows, each row running the same
  greedy cycles with torch ops on that one row (for ``gram`` each row first gets its
  ``u = H e_i``, a matrix-vector product). It makes the same masks as
  ``refine_mask``. On big layers only an evenly spaced subset of rows is timed and
  the time is scaled linearly to all rows (the output says so).
  ``baseline_cycles_s`` is the same without the rows' products ``H e_i``: a
  stricter comparison, since ``refine_s`` includes its own product ``E H``;
- ``wanda_s``: llm-compressor 0.14's own Wanda sparsify step
  (``wanda_sparsify.sparsify_weight``) on the same layer, its input statistic
  already accumulated;
- ``sparsegpt_s``: llm-compressor 0.14's own SparseGPT sparsify step
  (``sgpt_sparsify.sparsify_weight``, block 128, dampening 0.01: the modifier's
  defaults), its Hessian (``2 E[x xᵀ]``, as it accumulates it) already accumulated.
  Its cost grows as C³ (three C×C factorisations for the inverse Hessian) plus
  rows·C². Layers wider than ``--sparsegpt-max-cols`` are timed on their first
  ``--sparsegpt-max-cols`` columns and extrapolated: the inverse-Hessian part
  (timed on its own) as C³, its flop count, the rest linearly in C, a lower bound
  for it (marked ``≈`` in the table);
- ``extra_mem_ratio``: the peak memory that ``refine_mask`` takes beyond its
  inputs, as a multiple of the weight's size (the result, a new weight, counts; the
  C×C Gram matrix and the other statistics are inputs and do not). On CPU it is
  measured after all the timings, in one more untimed call per case, from the
  kernel's peak resident set size (Linux): free heap memory is handed back first
  (``malloc_trim``), the peak is reset (``/proc/self/clear_refs``), then peak
  (VmHWM) minus resident before (VmRSS), with glibc's mmap threshold fixed at
  128 KiB so that the resident set follows the live tensors (see
  :func:`memory_pass`: with glibc's growing threshold it does not).

Inputs are synthetic but shaped like real ones: float32 weights with row and
column scales, and inputs ``x = s ⊙ (z + F y) + μ`` with heavy-tailed (log-normal,
plus 0.5% outlier features 20× larger) column scales ``s``, non-zero means ``μ``,
and 16 latent factors ``y`` shared by all columns (so that the Gram matrix is far
from diagonal). Their statistics are exact population moments, cheap even for
28672 columns, and the Gram matrix has full rank as with real calibration sets of
100k+ tokens: ``mean = μ``, ``var = s² (1 + ‖F_c‖²)``, ``sqnorm = var + μ²``,
``E[x xᵀ] = diag(s²) + Gᵀ G`` with ``G = [F ⊙ s; μ]``.

Finally the share of a whole oneshot run that DSnoT takes on the real model is
read from ``dsnot bench``'s JSON (``--oneshot-json``, default ``runs/bench.json``:
its rows' ``time_s``) or from the main job's (rows with ``oneshot_s`` and ``dsnot_s``).

Timings are wall-clock, on whatever else the machine runs: on a shared machine
they are noisy, and threads > 1 suffer most (each parallel region waits for a core).

``--device`` (default ``cpu``) runs the same table on another device, e.g. ``cuda``:
the layer and its statistics are made on the CPU (same values) and moved there, every
timed step runs there, the device is synchronised before a clock is read, the extra
memory is torch's peak allocation on the device beyond what was allocated before,
and the table's title and every JSON row name the device (``device``,
``device_name``). Thread counts then default to the one count set.

``--syncs`` adds, per case, one more untimed call of ``refine_mask`` that counts its
host syncs cycle by cycle (:class:`CycleSyncs`): ``host_syncs_per_cycle``, the most
operations that make a device wait for the host (tests/host_syncs.py's counter, the
one the suite's sync budget is tested with) in any one cycle, and on CUDA
``cuda_syncs_per_cycle``, the most synchronisations the device itself reported
(``torch.cuda.set_sync_debug_mode``) in any one cycle. ``--update`` times the weight
update (:func:`dsnot_modifier.update.update_weights`, its defaults) on each layer's
``gram`` refinement: ``update_s`` and ``update_extra_mem_ratio`` in the ``gram`` rows.
scripts/gpu-check runs this on CUDA with both.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from dsnot_harness.pipeline import cpu_description
from dsnot_modifier import swaps as _swaps
from dsnot_modifier.swaps import DEFAULT_THRESHOLD, refine_mask

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]
STRUCTURES = {"60%": None, "2:4": (2, 4)}
OBJECTIVES = ("mean", "gram")
SPARSITY = 0.6
MAX_CYCLES = 50
SGPT_BLOCK = 128
SGPT_DAMP = 0.01
DEFAULT_ONESHOT_JSON = Path(__file__).resolve().parent.parent / "runs" / "bench.json"
REQUIRED_KEYS = ("shape", "structure", "objective", "threads", "refine_s", "baseline_s",
                 "wanda_s", "sparsegpt_s", "extra_mem_ratio", "device", "device_name")


# --------------------------------------------------------------------------- devices


def device_name(device: torch.device) -> str:
    """What the device is: the GPU's name, the CPU's model and vector features."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_description()
    return str(device)


def _now(tensor: torch.Tensor) -> float:
    """The clock, once the work queued on ``tensor``'s device is done."""
    if tensor.device.type != "cpu":
        module = getattr(torch, tensor.device.type)
        if hasattr(module, "synchronize"):
            module.synchronize(tensor.device)
    return time.perf_counter()


# --------------------------------------------------------------------------- inputs


def make_layer(rows: int, cols: int, seed: int = 0, with_gram: bool = True) -> dict:
    """A random float32 layer and the exact statistics of synthetic inputs (see above)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rows * 31 + cols)
    row_scale = torch.exp(0.2 * torch.randn(rows, 1, generator=g))
    col_scale = torch.exp(0.2 * torch.randn(1, cols, generator=g))
    w = torch.randn(rows, cols, generator=g).mul_(row_scale).mul_(col_scale).mul_(0.02)
    s = torch.exp(0.7 * torch.randn(cols, generator=g))
    s[torch.rand(cols, generator=g) < 0.005] *= 20  # outlier features
    mu = 0.3 * s * torch.randn(cols, generator=g)
    factors = 0.5 * torch.randn(16, cols, generator=g)  # F: 16 latent factors
    var = s.square() * (1 + factors.square().sum(0))
    layer = dict(w=w, mean=mu, var=var, sqnorm=var + mu.square())
    if with_gram:
        low = torch.cat([factors * s, mu.unsqueeze(0)])  # G: [17, C]
        gram = low.t() @ low
        gram.diagonal().add_(s.square())
        layer["gram"] = gram
    return layer


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    module = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    module.weight = torch.nn.Parameter(w, requires_grad=False)
    return module


def wanda_step(w, sqnorm, nm):
    """llm-compressor's Wanda sparsify of the layer: (pruned weight, seconds)."""
    from llmcompressor.modifiers.pruning.wanda.wanda_sparsify import sparsify_weight

    module = _linear(w)
    n, m = nm if nm is not None else (0, 0)
    scalars = {module: sqnorm.clone()}
    gc.collect()
    start = _now(w)
    pruned = sparsify_weight(module, scalars, SPARSITY if nm is None else n / m, n, m)
    return pruned, _now(w) - start


def _inverse_hessian_seconds(hessian: torch.Tensor) -> float:
    """Time SparseGPT's inverse-Hessian steps (as in ``sgpt_sparsify``) on a copy."""
    h = hessian.clone()
    start = _now(h)
    damp = SGPT_DAMP * torch.mean(torch.diag(h))
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp
    h = torch.linalg.cholesky(h)
    h = torch.cholesky_inverse(h)
    torch.linalg.cholesky(h, upper=True)
    return _now(h) - start


def sparsegpt_step(w, gram, nm, max_cols: int):
    """
    llm-compressor's SparseGPT sparsify of the layer: (seconds, extrapolated). Wider
    than ``max_cols``: run on the first ``max_cols`` columns; the inverse Hessian is
    scaled as C³, the rest linearly in C.
    """
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

    cols = w.shape[1]
    sub = cols if cols <= max_cols else max_cols - max_cols % (nm[1] if nm else 1)
    module = _linear(w[:, :sub].contiguous())
    hessian = gram[:sub, :sub].mul(2)
    inverse_s = _inverse_hessian_seconds(hessian) if sub < cols else 0.0
    n, m = nm if nm is not None else (0, 0)
    hessians = {module: hessian}
    gc.collect()
    start = _now(w)
    sparsify_weight(module, hessians, SPARSITY if nm is None else n / m, n, m, SGPT_BLOCK,
                    SGPT_DAMP, False)
    seconds = _now(w) - start
    del hessians, hessian, module
    if sub == cols:
        return seconds, False
    scale = cols / sub
    inverse_s = min(inverse_s, seconds)
    return inverse_s * scale**3 + (seconds - inverse_s) * scale, True


# --------------------------------------------------------------------------- baseline


def _baseline_row_mean(w, wc, mean, var_p, score_col, nm, max_cycles, threshold, sign_check):
    """The paper's rule on one row, walking its sorted candidate lists."""
    cols = w.numel()
    pruned = wc == 0
    r = torch.dot(w - wc, mean)
    grow_key = (w * (mean / var_p)).masked_fill_(~pruned, 0)
    grow_order = torch.sort(grow_key, descending=True, stable=True).indices
    n_gp, n_gn = int((grow_key > 0).sum()), int((grow_key < 0).sum())
    score = wc.abs() * score_col
    if nm is None:
        v = wc * mean
        prune_key = torch.where(v < 0, -score, score).masked_fill_(v == 0, math.inf)
        prune_order = torch.sort(prune_key, stable=True).indices
        n_neg, n_pos = int((v < 0).sum()), int((v > 0).sum())
    else:
        score.masked_fill_(pruned, math.inf)
        m = nm[1]
    gp = gn = qn = qp = 0
    for _ in range(max_cycles):
        if not bool(r.abs() > threshold):
            break
        pos = bool(r > 0)
        if pos:
            if gp >= n_gp:
                break
            g = int(grow_order[gp])
        else:
            if gn >= n_gn:
                break
            g = int(grow_order[cols - 1 - gn])
        if nm is None:
            if pos:
                if qn >= n_neg:
                    break
                p = int(prune_order[n_neg - 1 - qn])
            else:
                if qp >= n_pos:
                    break
                p = int(prune_order[n_neg + qp])
        else:
            start = g // m * m
            block = score[start:start + m]
            best = int(block.argmin())
            if not math.isfinite(float(block[best])):
                break
            p = start + best
        r_new = r - w[g] * mean[g] + wc[p] * mean[p]
        if not bool(r_new.abs() < r.abs()):
            break
        if sign_check and bool(r_new * r < 0):
            break
        wc[g] = w[g]
        wc[p] = 0
        r = r_new
        if pos:
            gp += 1
            qn += 1
        else:
            gn += 1
            qp += 1
        if nm is not None:
            score[p] = math.inf
    return wc


def _baseline_row_gram(w, wc, u, h, h_diag, nm, max_cycles, rtol):
    """The exact-error rule on one row: the best grow, then the best prune given it."""
    e = w - wc
    loss = torch.dot(e, u)
    grow_penalty = torch.zeros_like(w).masked_fill_((wc != 0) | (w == 0), math.inf)
    prune_penalty = torch.zeros_like(w).masked_fill_(wc == 0, math.inf)
    for _ in range(max_cycles):
        d_grow = (e * h_diag - 2 * u) * e + grow_penalty
        g = int(d_grow.argmin())
        delta_g = -e[g]
        h_g = h[g]
        if nm is None:
            lo, hi = 0, w.numel()
        else:
            lo = g // nm[1] * nm[1]
            hi = lo + nm[1]
        wc_b = wc[lo:hi]
        d_prune = ((u[lo:hi] + h_g[lo:hi] * delta_g) * 2 + wc_b * h_diag[lo:hi]) * wc_b
        d_prune += prune_penalty[lo:hi]
        p = lo + int(d_prune.argmin())
        total = d_grow[g] + d_prune[p - lo]
        if not bool(total < -rtol * loss.clamp_min(0)):
            break
        delta_p = wc[p].clone()
        u += h[p] * delta_p + h_g * delta_g
        e[g] = 0
        e[p] = w[p]
        loss = loss + total
        grow_penalty[g] = math.inf
        prune_penalty[p] = math.inf
        wc[g] = w[g]
        wc[p] = 0
    return wc


def baseline_refine(dense, current, objective, nm, stats, rows=None, max_cycles=MAX_CYCLES,
                    threshold=DEFAULT_THRESHOLD, rtol=1e-6):
    """
    The plain per-row implementation: a Python loop over ``rows`` (default all),
    each running its own greedy cycles with torch ops on that row (float32). For
    ``gram`` each row first gets its ``u = H e_i``, a matrix-vector product.

    :return: the refined rows ``[len(rows), cols]``, the seconds spent on the rows'
        products ``u = H e_i`` (``gram``; 0 for ``mean``) and the seconds of the rest
    """
    rows = torch.arange(dense.shape[0]) if rows is None else rows
    rows = rows.to(dense.device)
    w_all = dense[rows].float()
    wc_all = current[rows].float()
    out = torch.empty_like(wc_all)
    product_s = 0.0
    start = _now(out)
    if objective == "mean":
        mean, var = stats["mean"].float(), stats["var"].float()
        floor = torch.finfo(torch.float32).tiny + 1e-12 * float(var.max().clamp_min(0))
        var_p = var.clamp_min(floor)
        score_col = stats["sqnorm"].float().clamp_min(0).sqrt()
        sign_check = nm is not None
        for i in range(len(rows)):
            out[i] = _baseline_row_mean(w_all[i], wc_all[i].clone(), mean, var_p, score_col, nm,
                                        max_cycles, threshold, sign_check)
    else:
        h = stats["gram"].float()
        h_diag = h.diagonal()
        for i in range(len(rows)):
            tick = _now(h)
            u = torch.mv(h, w_all[i] - wc_all[i])  # H is symmetric: H e = (eᵀ H)ᵀ
            product_s += _now(h) - tick
            out[i] = _baseline_row_gram(w_all[i], wc_all[i].clone(), u, h, h_diag, nm,
                                        max_cycles, rtol)
    return out, product_s, _now(out) - start - product_s


def baseline_rows(total: int, limit: int) -> torch.Tensor:
    """``limit`` evenly spaced rows of ``total`` (all of them if there are no more)."""
    if total <= limit:
        return torch.arange(total)
    return torch.linspace(0, total - 1, limit).round().long().unique()


# --------------------------------------------------------------------------- memory


class PeakMemory:
    """
    Peak resident memory taken by a block of code, from the kernel (Linux): hand
    free heap memory back (``malloc_trim``), reset the peak (``clear_refs``), and
    read VmHWM − VmRSS after. ``extra`` is None where that is not available.
    """

    def __init__(self):
        self.extra = None
        self._before = None

    @staticmethod
    def _status() -> dict:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    values[key] = int(value.split()[0]) * 1024
        return values

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self._before = self._status()["VmRSS"]
        except OSError:
            self._before = None
        return self

    def __exit__(self, *exc):
        if self._before is not None:
            self.extra = self._status()["VmHWM"] - self._before
        return False


class DevicePeakMemory:
    """
    Peak memory taken by a block of code on an accelerator: torch's peak allocation
    there (``max_memory_allocated``, reset before) minus what was allocated before.
    ``extra`` is None where torch does not track it.
    """

    def __init__(self, device: torch.device):
        self.device, self.extra, self._before = device, None, None
        self._module = getattr(torch, device.type, None)

    def __enter__(self):
        module = self._module
        if all(hasattr(module, f) for f in ("reset_peak_memory_stats", "max_memory_allocated",
                                            "memory_allocated", "synchronize")):
            gc.collect()
            module.synchronize(self.device)
            module.reset_peak_memory_stats(self.device)
            self._before = module.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self._before is not None:
            self._module.synchronize(self.device)
            self.extra = self._module.max_memory_allocated(self.device) - self._before
        return False


def peak_memory(device: torch.device):
    return PeakMemory() if device.type == "cpu" else DevicePeakMemory(device)


# --------------------------------------------------------------------------- host syncs

#: the test suite's folder: its host_syncs.py counts the operations that sync
TESTS = Path(__file__).resolve().parent.parent / "tests"


class CycleSyncs:
    """
    The host syncs of one ``refine_mask`` call, cycle by cycle, counted two ways:

    - ``ops``: the operations that make a CUDA device wait for the host, seen in torch's
      dispatch on any device (``SyncCounter`` of tests/host_syncs.py, the counter the
      suite's sync budget is tested with on CPU);
    - ``cuda``: on CUDA only, the synchronisations the device reports itself
      (``torch.cuda.set_sync_debug_mode("warn")``: one warning each); None elsewhere.

    A cycle's syncs are those from the start of one ``propose`` of a state to the start
    of its next (the choice of the rows that swap, the swaps, the drop of the rows that
    stopped); a state's last cycle, which ends the loop, is not counted. ``per_cycle``
    and ``cuda_per_cycle`` are the most of any counted cycle, ``cycles`` how many were
    counted, ``total`` and ``cuda_total`` the whole call's (set-up and results included).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[tuple[int, int, int]] = []  # (state, ops so far, cuda so far)
        self.total = self.cuda_total = None

    def __enter__(self):
        if str(TESTS) not in sys.path:
            sys.path.insert(0, str(TESTS))
        from host_syncs import SyncCounter

        self._stack = contextlib.ExitStack()
        self._caught = self._stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        if self.device.type == "cuda":
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            self._stack.callback(torch.cuda.set_sync_debug_mode, mode)
        self._counter = self._stack.enter_context(SyncCounter())
        for cls in (_swaps._MeanObjective, _swaps._GramObjective):
            self._stack.callback(setattr, cls, "propose", cls.__dict__["propose"])
            cls.propose = self._marking(cls.__dict__["propose"])
        return self

    def _cuda_count(self) -> int:
        return sum("synchroniz" in str(w.message) for w in self._caught)

    def _marking(self, propose):
        def marked(state):
            self.marks.append((id(state), self._counter.total, self._cuda_count()))
            return propose(state)
        return marked

    def __exit__(self, *exc):
        self.total, self.cuda_total = self._counter.total, self._cuda_count()
        self._stack.close()
        return False

    def _windows(self, k: int) -> list[int]:
        return [b[k] - a[k] for a, b in zip(self.marks, self.marks[1:]) if a[0] == b[0]]

    @property
    def cycles(self) -> int:
        return len(self._windows(1))

    @property
    def per_cycle(self) -> int | None:
        return max(self._windows(1), default=None)

    @property
    def cuda_per_cycle(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return max(self._windows(2), default=None)


def count_syncs(w, current, objective, nm, stats) -> dict:
    """One more, untimed, call of the case's ``refine_mask`` under :class:`CycleSyncs`."""
    with CycleSyncs(w.device) as syncs:
        refine_mask(w, current, objective=objective, nm=nm, max_cycles=MAX_CYCLES, **stats)
    return {"host_syncs_per_cycle": syncs.per_cycle, "host_syncs_total": syncs.total,
            "cuda_syncs_per_cycle": syncs.cuda_per_cycle,
            "cuda_syncs_total": syncs.cuda_total if w.device.type == "cuda" else None,
            "sync_cycles_counted": syncs.cycles}


def update_step(w, refined, gram, device) -> dict:
    """The weight update (``update_weights``, its defaults) of a refined layer: seconds,
    extra memory (on an accelerator; × the weight's size), iterations and status."""
    from dsnot_modifier.update import update_weights

    peak = None if device.type == "cpu" else DevicePeakMemory(device)
    gc.collect()
    with peak or contextlib.nullcontext():
        start = _now(w)
        result = update_weights(w, refined, gram)
        seconds = _now(w) - start
    extra = None if peak is None or peak.extra is None else peak.extra / (w.numel() * w.element_size())
    return {"update_s": seconds, "update_extra_mem_ratio": extra,
            "update_iterations": result.iterations, "update_status": result.status}


# --------------------------------------------------------------------------- the run


def _refine_stats(layer, objective):
    if objective == "mean":
        return {k: layer[k] for k in ("mean", "var", "sqnorm")}
    return {"gram": layer["gram"]}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        rows, cols = item.lower().split("x")
        shapes.append((int(rows), int(cols)))
    return shapes


def run(shapes, thread_counts, baseline_limit, sparsegpt_max_cols, memory, seed, log=print,
        device="cpu", syncs=False, update=False):
    device = torch.device(device)
    name = device_name(device)
    results = []
    for rows, cols in shapes:
        log(f"## layer {rows}x{cols}: making inputs")
        layer = {k: v.to(device) for k, v in make_layer(rows, cols, seed).items()}
        w = layer["w"]
        weight_bytes = w.numel() * w.element_size()
        sub = baseline_rows(rows, baseline_limit)
        for structure, nm in STRUCTURES.items():
            if nm is not None and cols % nm[1]:
                continue
            for threads in thread_counts:
                torch.set_num_threads(threads)
                current, wanda_s = wanda_step(w, layer["sqnorm"], nm)
                sgpt_s, sgpt_extrapolated = sparsegpt_step(w, layer["gram"], nm, sparsegpt_max_cols)
                for objective in OBJECTIVES:
                    stats = _refine_stats(layer, objective)
                    # on CPU the memory is measured at the end (memory_pass), not here
                    peak = peak_memory(device) if memory and device.type != "cpu" else None
                    with peak or contextlib.nullcontext():
                        start = _now(w)
                        result = refine_mask(w, current, objective=objective, nm=nm,
                                             max_cycles=MAX_CYCLES, **stats)
                        refine_s = _now(w) - start
                    extra = None if peak is None or peak.extra is None else peak.extra / weight_bytes
                    gc.collect()
                    _, product_s, cycles_s = baseline_refine(w, current, objective, nm, stats, sub)
                    scale = rows / len(sub)
                    row = {
                        "shape": [rows, cols], "structure": structure, "objective": objective,
                        "threads": threads, "refine_s": refine_s,
                        "baseline_s": (product_s + cycles_s) * scale,
                        "wanda_s": wanda_s, "sparsegpt_s": sgpt_s, "extra_mem_ratio": extra,
                        "baseline_cycles_s": cycles_s * scale, "baseline_rows": len(sub),
                        "sparsegpt_extrapolated": sgpt_extrapolated,
                        "swaps": result.swaps, "cycles": result.cycles,
                        "device": str(device), "device_name": name,
                    }
                    if update and objective == "gram":
                        row.update(update_step(w, result.weight, layer["gram"], device))
                    if syncs:
                        row.update(count_syncs(w, current, objective, nm, stats))
                    results.append(row)
                    log(f"{rows}x{cols} {structure} {objective} threads={threads}: refine "
                        f"{refine_s:.2f}s ({result.swaps} swaps, {result.cycles} cycles), baseline "
                        f"{row['baseline_s']:.1f}s (cycles only {row['baseline_cycles_s']:.1f}s), "
                        f"wanda {wanda_s:.2f}s, sparsegpt {'~' if sgpt_extrapolated else ''}"
                        f"{sgpt_s:.1f}s, extra memory {_fmt(extra)}x")
                    del result
                del current
        del layer, w
        gc.collect()
    if memory and device.type == "cpu":
        memory_pass(results, seed, log)
    return results


def memory_pass(results, seed, log=print):
    """
    The CPU's extra memory of every case, after all the timings: each case's
    ``refine_mask`` is run once more, untimed, under :class:`PeakMemory`, with glibc's
    mmap threshold fixed at 128 KiB (:func:`fixed_mmap_threshold`), so that every
    tensor but the smallest has pages of its own, given back when it is freed: the
    resident set then follows the live tensors, as torch's peak allocation does on
    an accelerator. With glibc's default (a threshold that grows up to 32 MiB as
    large blocks are freed), freed blocks stay in the heap and are touched again in
    another order, and the peak of the resident set overstates the live memory by a
    varying amount (seen here: 3.60× then 4.53× the weight for the same call, 2.71×
    with the threshold fixed). The change is for the rest of the process, so it
    comes after every timing (allocation pays then a page fault per page).
    """
    fixed = fixed_mmap_threshold()
    if not fixed:
        log("extra memory: glibc's mallopt not available; the resident set's peak is "
            "measured with the allocator's defaults")
    for (rows, cols), cases in _by_shape(results):
        layer = make_layer(rows, cols, seed, with_gram=any(r["objective"] == "gram" for r in cases))
        w = layer["w"]
        for row in cases:
            nm = STRUCTURES[row["structure"]]
            torch.set_num_threads(row["threads"])
            current, _ = wanda_step(w, layer["sqnorm"], nm)
            gc.collect()
            with PeakMemory() as peak:
                result = refine_mask(w, current, objective=row["objective"], nm=nm,
                                     max_cycles=MAX_CYCLES, **_refine_stats(layer, row["objective"]))
            del result, current
            row["extra_mem_ratio"] = None if peak.extra is None else peak.extra / w.nbytes
            row["extra_mem_method"] = "rss, mmap threshold 128 KiB" if fixed else "rss"
            log(f"{rows}x{cols} {row['structure']} {row['objective']} threads={row['threads']}: "
                f"extra memory {_fmt(row['extra_mem_ratio'])}x")
        del layer, w
        gc.collect()


def _by_shape(results):
    """The rows grouped by shape, in order: [(shape, rows)]."""
    groups: dict[tuple, list] = {}
    for row in results:
        groups.setdefault(tuple(row["shape"]), []).append(row)
    return list(groups.items())


#: glibc's mallopt parameter number of the mmap threshold
_M_MMAP_THRESHOLD = -3


def fixed_mmap_threshold(size: int = 128 << 10) -> bool:
    """Fix glibc's mmap threshold at ``size`` bytes (which ends its growth): whether it took."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, size))
    except (OSError, AttributeError):
        return False


def _fmt(x, digits=2):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pruner(row):
    return (row["wanda_s"], "Wanda") if row["objective"] == "mean" else (row["sparsegpt_s"], "SparseGPT")


def markdown_table(results) -> str:
    lines = [
        "| shape | structure | objective | threads | refine s | per-row baseline s "
        "| speed-up (cycles only) | Wanda s | SparseGPT s | refine / its pruner "
        "| extra memory (× weight) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    extra = [(key, title, digits) for key, title, digits in OPTIONAL_COLUMNS
             if any(key in r for r in results)]
    if extra:
        lines[0] += "".join(f" {title} |" for _, title, _ in extra)
        lines[1] += "---|" * len(extra)
    for r in results:
        pruner, name = _pruner(r)
        base = _fmt(r["baseline_s"], 1) + ("*" if r["baseline_rows"] < r["shape"][0] else "")
        sgpt = ("≈" if r["sparsegpt_extrapolated"] else "") + _fmt(r["sparsegpt_s"], 1)
        lines.append(
            f"| {r['shape'][0]}×{r['shape'][1]} | {r['structure']} | {r['objective']} "
            f"| {r['threads']} | {_fmt(r['refine_s'])} | {base} "
            f"| {r['baseline_s'] / r['refine_s']:.1f}× ({r['baseline_cycles_s'] / r['refine_s']:.1f}×) "
            f"| {_fmt(r['wanda_s'])} | {sgpt} | {r['refine_s'] / pruner:.2f} ({name}) "
            f"| {_fmt(r['extra_mem_ratio'])} |"
            + "".join(f" {_cell(r.get(key), digits)} |" for key, _, digits in extra)
        )
    return "\n".join(lines)


#: columns shown when the rows have them (--syncs, --update): key, title, digits
OPTIONAL_COLUMNS = [("host_syncs_per_cycle", "host syncs / cycle (most)", 0),
                    ("cuda_syncs_per_cycle", "CUDA syncs / cycle (most)", 0),
                    ("update_s", "update s", 2), ("update_extra_mem_ratio", "update memory (× weight)", 2)]


def _cell(value, digits):
    if value is None:
        return "–"
    return str(value) if isinstance(value, int) else _fmt(float(value), digits)


def goals(results) -> list[str]:
    """The issue's goals, checked case by case: lines of text."""
    out = []
    for r in results:
        name = f"{r['shape'][0]}×{r['shape'][1]} {r['structure']} {r['objective']} t={r['threads']}"
        pruner, pname = _pruner(r)
        mem = r["extra_mem_ratio"]
        checks = [
            (r["refine_s"] <= pruner, f"refine/{pname} {r['refine_s'] / pruner:.2f} (<= 1)"),
            (r["baseline_s"] >= 10 * r["refine_s"],
             f"per-row baseline/refine {r['baseline_s'] / r['refine_s']:.1f}x (>= 10x)"),
            (mem is not None and mem <= 4, f"extra memory {_fmt(mem)}x (<= 4x)"),
        ]
        for ok, text in checks:
            out.append(f"{'met   ' if ok else 'MISSED'} {name}: {text}")
    return out


def _share_rows(data) -> tuple[dict, list[dict]]:
    """(meta, rows of method, oneshot_s, dsnot_s) from the main job's or ``dsnot bench``'s JSON."""
    if isinstance(data, list):  # dsnot bench: one row per (method, sparsity)
        meta = data[0].get("params", {}) if data else {}
        rows = [{"method": f"{r['method']} {r['sparsity']}", "oneshot_s": r["time_s"]["oneshot"],
                 "dsnot_s": r["time_s"]["dsnot"]} for r in data if "time_s" in r]
        return meta, rows
    return data.get("meta", {}), data.get("rows", [])


def oneshot_share(path: Path) -> list[str]:
    if not path.exists():
        return [f"No oneshot JSON at {path}: the share of DSnoT in a oneshot run is not reported."]
    meta, rows = _share_rows(json.loads(path.read_text()))
    lines = [f"Share of DSnoT in whole oneshot runs on the real model ({path}; model "
             f"{meta.get('model', '?')}, {meta.get('threads', '?')} threads, {meta.get('date', '?')}):",
             "", "| method | oneshot s | DSnoT s | share | goal (<= 20%) |", "|---|---|---|---|---|"]
    for row in rows:
        if row.get("dsnot_s") and row.get("oneshot_s"):
            share = row["dsnot_s"] / row["oneshot_s"]
            lines.append(f"| {row.get('method', '?')} | {row['oneshot_s']:.1f} | "
                         f"{row['dsnot_s']:.1f} | {100 * share:.1f}% | "
                         f"{'met' if share <= 0.2 else 'MISSED'} |")
    return lines


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write one row per case to this file")
    parser.add_argument("--quick", action="store_true", help="the two smallest shapes only")
    parser.add_argument("--shapes", help=argparse.SUPPRESS)  # e.g. 64x128,32x64 (tests)
    parser.add_argument("--threads", help="thread counts, e.g. 1,2 (default: 1 and all)")
    parser.add_argument("--baseline-rows", type=int, default=32,
                        help="rows the per-row baseline is timed on, scaled to all rows")
    parser.add_argument("--sparsegpt-max-cols", type=int, default=11008,
                        help="wider layers: SparseGPT timed on this many columns, extrapolated")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--oneshot-json", type=Path, default=DEFAULT_ONESHOT_JSON)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu",
                        help="where the layers are refined and timed: cpu (default), cuda, "
                             "cuda:1, ...")
    parser.add_argument("--syncs", action="store_true",
                        help="count each case's host syncs per cycle (one more untimed call)")
    parser.add_argument("--update", action="store_true",
                        help="time the weight update (update_weights) after each gram refinement")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    all_threads = torch.get_num_threads()
    if args.threads:
        thread_counts = [int(t) for t in args.threads.split(",")]
    elif device.type == "cpu":
        thread_counts = sorted({1, all_threads})
    else:
        thread_counts = [all_threads]
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    else:
        shapes = sorted(SHAPES, key=lambda s: s[0] * s[1])[:2] if args.quick else SHAPES
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    name = device_name(device)
    log(f"torch {torch.__version__}, {device} ({name}), {all_threads} threads available; "
        f"shapes {shapes}")
    started = time.perf_counter()
    try:
        results = run(shapes, thread_counts, args.baseline_rows, args.sparsegpt_max_cols,
                      not args.no_memory, args.seed, log, device, syncs=args.syncs,
                      update=args.update)
    finally:
        torch.set_num_threads(all_threads)

    print(f"# DSnoT refinement speed (torch {torch.__version__}, {device}: {name}, float32 weights, "
          f"{MAX_CYCLES} cycles at most, starting from Wanda's mask)\n")
    print(markdown_table(results))
    print()
    extrapolated = [r for r in results if r["baseline_rows"] < r["shape"][0]]
    if extrapolated:
        print(f"\\* per-row baseline timed on {extrapolated[0]['baseline_rows']} evenly spaced rows, "
              "scaled linearly to all rows. Speed-up: per-row baseline / refine; in brackets, "
              "the baseline without its per-row products u = H·e_i (gram; refine keeps its "
              "own product E·H).")
    if any(r["sparsegpt_extrapolated"] for r in results):
        print(f"≈ SparseGPT timed on the layer's first {args.sparsegpt_max_cols} columns and "
              "extrapolated: its inverse Hessian (timed on its own) as C³, the rest linearly "
              "in C (a lower bound for that part).")
    if device.type == "cpu":
        print("Extra memory: peak resident set during refine_mask (VmHWM after "
              "/proc/self/clear_refs, free heap handed back first) minus the resident set "
              "before, over the weight's bytes, in a run of its own after all the timings, "
              "with glibc's mmap threshold fixed at 128 KiB so that the resident set "
              "follows the live tensors; the result weight counts, the statistics "
              "(Gram matrix included) do not.\n")
    else:
        print(f"Extra memory: torch's peak allocation on {device} during refine_mask minus "
              "what was allocated before, over the weight's bytes; the result weight "
              "counts, the statistics (Gram matrix included) do not.\n")
    print("Goals per case:\n")
    print("\n".join(goals(results)))
    print()
    print("\n".join(oneshot_share(args.oneshot_json)))
    print(f"\n(benchmark took {time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
