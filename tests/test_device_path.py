"""The GPU path, tested on CPU: chunk sizes per device (never from the free memory), results
independent of the chunking, and the host syncs of a refinement counted op by op."""

from collections import Counter

import pytest
import torch

from dsnot_modifier import swaps
from dsnot_modifier.swaps import (
    DEVICE_CHUNK_BYTES,
    GRAM_CHUNK_MIN_ROWS,
    _GramObjective,
    _MeanObjective,
    chunk_bytes_per_row,
    chunk_rows_for,
    refine_mask,
)
from host_syncs import SyncCounter, watch_methods
from test_swaps import make_layer

GiB = 1 << 30


# ------------------------------------------------------------------ chunk sizes


@pytest.mark.parametrize("objective", ["mean", "gram"])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (64, 128),
                                   (8, 1 << 23)])
def test_cpu_chunks_are_sized_for_its_caches(objective, shape):
    rows, cols = shape
    got = chunk_rows_for(objective, rows, cols, "cpu", torch.float32)
    if objective == "mean":
        assert got == max(1, (1 << 20) // cols)
    else:
        assert got == max((1 << 20) // cols, GRAM_CHUNK_MIN_ROWS)


def no_free_memory_query(monkeypatch):
    """Make any query of a device's free memory fail the test."""
    def query(*args, **kwargs):
        raise AssertionError("the chunk size must not depend on the free memory")

    monkeypatch.setattr(torch.cuda, "mem_get_info", query)
    monkeypatch.setattr(torch.cuda, "memory_reserved", query)


@pytest.mark.parametrize("objective", ["mean", "gram"])
@pytest.mark.parametrize("device", ["cuda:1", "xpu", "mps"])
def test_accelerator_takes_the_whole_layer_when_it_fits(monkeypatch, objective, device):
    no_free_memory_query(monkeypatch)
    rows, cols = 4096, 11008  # 45M weights: ~2 GB of working memory in float32
    assert rows * chunk_bytes_per_row(objective, cols, torch.float32) < DEVICE_CHUNK_BYTES
    assert chunk_rows_for(objective, rows, cols, device, torch.float32) == rows


@pytest.mark.parametrize("objective", ["mean", "gram"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accelerator_splits_a_layer_too_big_for_the_budget(monkeypatch, objective, dtype):
    """The fewest chunks within the fixed budget, of equal size, the same on every device."""
    no_free_memory_query(monkeypatch)
    rows, cols = 28672, 8192  # Llama-70B's gate_proj
    per_row = chunk_bytes_per_row(objective, cols, dtype)
    chunk = chunk_rows_for(objective, rows, cols, "cuda", dtype)
    assert chunk * per_row <= DEVICE_CHUNK_BYTES < rows * per_row
    # the fewest chunks that fit, of equal size: one chunk fewer would not fit
    chunks = -(-rows // chunk)
    assert -(-rows // (chunks - 1)) * per_row > DEVICE_CHUNK_BYTES
    assert chunk * chunks - rows < chunks
    assert chunk_rows_for(objective, rows, cols, "mps", dtype) == chunk
    # a row wider than the budget: still one row at a time
    assert chunk_rows_for(objective, 4, DEVICE_CHUNK_BYTES, "cuda", dtype) == 1


def test_working_memory_counts_the_compute_dtype():
    assert chunk_bytes_per_row("gram", 100, torch.float64) > chunk_bytes_per_row(
        "gram", 100, torch.float32)
    assert chunk_bytes_per_row("gram", 200, torch.float32) == 2 * chunk_bytes_per_row(
        "gram", 100, torch.float32)


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_any_chunking_gives_the_same_result(objective, nm):
    w, wc, stats = make_layer(rows=40, cols=64, dtype=torch.float32, nm=nm, seed=5)
    kwargs = dict(objective=objective, nm=nm, max_cycles=25, threshold=0.0, **stats)
    whole = refine_mask(w, wc, chunk_rows=40, **kwargs)
    assert whole.swaps > 0
    for chunk_rows in (None, 1, 3, 16, 39, 1000):
        other = refine_mask(w, wc, chunk_rows=chunk_rows, **kwargs)
        assert torch.equal(other.weight, whole.weight), chunk_rows
        assert (other.swaps, other.rows_changed) == (whole.swaps, whole.rows_changed)
        # r and L are float32 matrix products: their rounding may depend on the chunk
        assert other.error_after == pytest.approx(whole.error_after, rel=1e-5)


# ------------------------------------------------------------------ host syncs

#: syncs allowed besides the cycles' one each: per layer (the ``mean`` variance floor
#: and finiteness check; the result's counts, then its rows' errors), and per chunk while
#: the state is made (``mean``'s tie fixes: one, then two per list and per full sort,
#: three lists at most)
PER_LAYER = {"mean": 4, "gram": 2}
PER_CHUNK = {"mean": 13, "gram": 0}
METHODS = ("propose", "apply", "select", "write")


def refine_counting(monkeypatch, w, wc, **kwargs):
    calls = Counter()
    counter = SyncCounter()
    for cls in (_MeanObjective, _GramObjective):
        watch_methods(monkeypatch, counter, cls, ("__init__",) + METHODS, calls)
    with counter:
        result = refine_mask(w, wc, **kwargs)
    return result, counter, calls


CASES = [("gram", None, None), ("gram", (2, 4), None), ("mean", None, False),
         ("mean", None, True), ("mean", (2, 4), None)]


@pytest.mark.parametrize("chunk_rows", [None, 16])
@pytest.mark.parametrize("objective,nm,sign_check", CASES)
def test_at_most_one_host_sync_per_cycle(monkeypatch, objective, nm, sign_check, chunk_rows):
    w, wc, stats = make_layer(rows=48, cols=128, dtype=torch.float32, nm=nm, seed=7)
    result, syncs, calls = refine_counting(
        monkeypatch, w, wc, objective=objective, nm=nm, sign_check=sign_check,
        max_cycles=40, threshold=0.0, chunk_rows=chunk_rows, **stats)
    # enough cycles that one more sync per cycle would exceed the per-layer allowance
    assert result.swaps > 0 and result.cycles > PER_LAYER[objective]
    cls = "_MeanObjective" if objective == "mean" else "_GramObjective"
    cycles = calls[f"{cls}.propose"]
    chunks = calls[f"{cls}.__init__"]
    assert cycles >= result.cycles and chunks == -(-48 // (chunk_rows or 48))
    assert calls[f"{cls}.select"] > 0  # the rows that stopped were dropped at least once
    if objective == "gram":
        assert calls[f"{cls}.write"] >= chunks
    assert_sync_budget(syncs, calls, objective)


def assert_sync_budget(syncs, calls, objective):
    cls = "_MeanObjective" if objective == "mean" else "_GramObjective"
    cycles, chunks = calls[f"{cls}.propose"], calls[f"{cls}.__init__"]
    # nothing a cycle calls syncs
    assert all(syncs.by_phase[f"{cls}.{name}"] == 0 for name in METHODS), syncs.ops
    # the cycle itself syncs once (and the per-layer ones), making a chunk a few times
    assert cycles <= syncs.by_phase["other"] <= cycles + PER_LAYER[objective], syncs.ops
    assert syncs.by_phase[f"{cls}.__init__"] <= PER_CHUNK[objective] * chunks, syncs.ops


@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_a_sync_inside_propose_is_caught(monkeypatch, objective):
    """The counter above would fail if a cycle synced: an ``.item()`` in propose is seen."""
    cls = _MeanObjective if objective == "mean" else _GramObjective
    propose = cls.propose

    def propose_with_item(self):
        g, p, ok = propose(self)
        if ok.any():  # a Python `if` on a tensor: one sync
            ok.sum().item()  # and another
        return g, p, ok

    monkeypatch.setattr(cls, "propose", propose_with_item)
    w, wc, stats = make_layer(rows=48, cols=64, dtype=torch.float32, seed=7)
    _, syncs, calls = refine_counting(monkeypatch, w, wc, objective=objective, max_cycles=40,
                                      threshold=0.0, **stats)
    cycles = calls[f"{cls.__name__}.propose"]
    assert syncs.by_phase[f"{cls.__name__}.propose"] >= cycles > 0
    with pytest.raises(AssertionError):
        assert_sync_budget(syncs, calls, objective)


def test_the_counter_sees_what_syncs_and_only_that():
    x = torch.arange(12.0).view(3, 4)
    mask = x > 4
    idx = torch.tensor([0, 2])
    with SyncCounter() as syncs:
        x[idx]
        x.gather(1, idx.view(1, 2).expand(3, 2))
        torch.where(mask, x, 0.0)
        x.masked_fill(mask, 0)
        torch.repeat_interleave(x, torch.tensor([1, 2, 0]), dim=0, output_size=3)
        torch.sort(mask.to(torch.uint8), stable=True)
    assert syncs.total == 0, syncs.ops
    checks = [lambda: x.sum().item(), lambda: bool(mask.any()), lambda: mask.nonzero(),
              lambda: torch.where(mask), lambda: x[mask], lambda: x.masked_select(mask),
              lambda: x.tolist(), lambda: x.cpu(), lambda: torch.unique(x),
              lambda: torch.repeat_interleave(torch.tensor([1, 2])), lambda: float(x[0, 0])]
    for check in checks:
        with SyncCounter() as syncs:
            check()
        assert syncs.total >= 1, check
    y = x.clone()
    with SyncCounter() as syncs:
        y[mask] = torch.zeros(int(mask.sum()))  # int() of the count, and the masked write
    assert syncs.total == 2, syncs.ops


@pytest.mark.parametrize("objective,nm,sign_check", CASES)
def test_results_do_not_depend_on_the_thread_caps(monkeypatch, objective, nm, sign_check):
    """The CPU thread caps (one thread per ELEMENTS_PER_THREAD weights) change only the
    speed: with every operation on one thread, or on as many as the caller has, the
    weights, counts and error sums are bit for bit the same."""
    w, wc, stats = make_layer(rows=300, cols=256, dtype=torch.float32, nm=nm, seed=11)
    kwargs = dict(objective=objective, nm=nm, sign_check=sign_check, max_cycles=30, **stats)
    results = []
    with swaps.threads(2):
        for per_thread in (1 << 30, 1 << 10):
            monkeypatch.setattr(swaps, "ELEMENTS_PER_THREAD", per_thread)
            results.append(refine_mask(w, wc, **kwargs))
    one, many = results
    assert one.swaps > 0 and torch.equal(one.weight, many.weight)
    assert (one.swaps, one.rows_changed, one.error_before, one.error_after, one.cycles) == (
        many.swaps, many.rows_changed, many.error_before, many.error_after, many.cycles)
