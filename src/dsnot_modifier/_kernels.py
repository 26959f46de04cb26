"""
The speed primitives that :mod:`dsnot_modifier.swaps` calls: intra-op thread caps
for CPU, row-wise minima, top-k's and sorts that vectorise on CPU where torch's own
do not, a float-bit trick for masked +inf, and the tie fixes that keep the top-k's
exactly equal to a stable sort. Each returns what the plain torch expression in its
docstring returns, bit for bit; none of them knows the algorithm. The CPU-tuned ones
run their tuned steps on CPU only: on any other device they are that one torch op.
:func:`full_precision` pins the matrix products to full float32 for their duration.
No function here leaves a process-wide setting changed.

Plain torch; nothing here imports llm-compressor.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = [
    "ELEMENTS_PER_THREAD",
    "INF",
    "threads",
    "at_most_threads",
    "full_precision",
    "all_finite",
    "block_columns",
    "take",
    "argmin_rows",
    "or_inf",
    "Workspace",
    "sorted_rows",
    "topk_rows",
    "first_k",
    "fix_ties",
]

#: on CPU, at most one intra-op thread per this many weights: of the layer for the
#: whole refinement, of the chunk for its cycles. Below it an operation takes well
#: under a millisecond and a second thread costs more than it brings (and waits for
#: a core when the cores are shared). Measured against a larger value in BENCHMARKS.md
#: (whole cost, the speed cuts kept); the results are bit for bit the same whatever it
#: is (products run with the caller's threads, see :func:`threads`)
ELEMENTS_PER_THREAD = 1 << 18

#: parts the columns are split into by the two-stage top-k (:func:`topk_rows`)
_TOPK_PARTS = 8

#: column block sizes tried by the row minimum (:func:`argmin_rows`)
_ARGMIN_BLOCKS = (64, 32, 128, 256, 16)

INF = float("inf")


@contextlib.contextmanager
def threads(n: int | None, at_most: bool = False):
    """
    Run with ``n`` intra-op threads (None: as set); with ``at_most``, only ever fewer. The
    matrix products run with the caller's threads (``threads(caller's count)``): BLAS's
    rounding depends on the thread count, and results must not depend on the caps.
    """
    before = torch.get_num_threads()
    if n is None or n == before or (at_most and n > before):
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def at_most_threads(n: int | None):
    """Run with at most ``n`` intra-op threads (None: as set)."""
    return threads(n, at_most=True)


#: the backends whose float32 matrix products torch may run in lower precision
_MATMUL_BACKENDS = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)


@contextlib.contextmanager
def full_precision():
    """
    Run float32 matrix products in full float32: no TF32 on CUDA, no bfloat16 passes
    on CPU, whatever the caller set (``torch.set_float32_matmul_precision("high")``
    is common in training scripts, and turns the products' rounding from 2⁻²⁴ into
    TF32's 2⁻¹¹). The caller's settings are back after, also on an exception.
    """
    before = _matmul_settings()
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        _restore_matmul_settings(before)


def _matmul_settings() -> tuple[str | None, list[str]]:
    """torch's float32 matmul precision (None if unreadable) and each backend's own."""
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the caller mixed torch's old and new precision settings
        legacy = None
    return legacy, [backend.fp32_precision for backend in _MATMUL_BACKENDS]


def _restore_matmul_settings(settings: tuple[str | None, list[str]]):
    legacy, per_backend = settings
    if legacy is not None:
        torch.set_float32_matmul_precision(legacy)
    # the backends' own last: they are what the products read, exactly as before
    for backend, value in zip(_MATMUL_BACKENDS, per_backend):
        backend.fp32_precision = value


def all_finite(x: torch.Tensor) -> bool:
    """
    ``bool(torch.isfinite(x).all())`` from the extremes (NaN and inf reach one of them):
    no temporary the size of ``x`` (a Gram matrix of 28672 columns: 5.4 GB). One host sync.
    """
    if x.numel() == 0:
        return True
    return bool(torch.stack([x.amax(), x.amin()]).isfinite().all())


def block_columns(g: torch.Tensor, m: int) -> torch.Tensor:
    """Columns of the N:M block that holds column ``g`` of each row: ``[rows, m]``."""
    return (g // m * m).unsqueeze(1) + torch.arange(m, device=g.device)


def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[i, idx[i]]`` for every row i."""
    return x.gather(1, idx.unsqueeze(1)).squeeze(1)


def argmin_rows(x: torch.Tensor) -> torch.Tensor:
    """
    ``x.argmin(1)`` for a contiguous ``[rows, cols]`` tensor (the first minimum of
    every row), in two steps that vectorise on CPU where argmin does not: the
    minimum of every block of columns, then the first block that holds the row's
    minimum, then the first minimum inside that block. Same result, NaN included.
    Off CPU: ``x.argmin(1)`` (one kernel).
    """
    if x.device.type != "cpu":
        return x.argmin(1)
    rows, cols = x.shape
    for size in _ARGMIN_BLOCKS:
        if cols % size == 0 and cols >= 2 * size:
            break
    else:
        return x.argmin(1)
    blocks = x.view(rows, cols // size, size)
    block = blocks.amin(2).argmin(1)
    inner = blocks.gather(1, block.view(rows, 1, 1).expand(rows, 1, size)).squeeze(1)
    return block * size + inner.argmin(1)


_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}


def or_inf(keep: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None,
           scratch: torch.Tensor | None = None) -> torch.Tensor:
    """
    ``torch.where(keep, x, inf)`` for ``x >= +0`` (no NaN, no -0.0), exactly, in a
    fraction of its time on CPU: the bit patterns of non-negative floats order as
    integers, so the result is the integer maximum of ``x``'s bits and those of +inf
    where ``keep`` is false (0 where it is true). ``out`` (like ``x``) receives the
    result and ``scratch`` (like ``x``) the penalty, if given; ``keep`` is overwritten
    then. Off CPU: ``torch.where(keep, x, inf)`` (one kernel; ``out`` and ``scratch``
    unused, the result is the returned tensor).
    """
    if x.dtype not in _BITS or x.device.type != "cpu":
        return torch.where(keep, x, INF)
    itype, inf_bits = _BITS[x.dtype]
    if scratch is None:
        penalty = torch.logical_not(keep).to(itype).mul_(inf_bits)
    else:
        penalty = scratch.view(itype)
        penalty.copy_(torch.logical_not(keep, out=keep)).mul_(inf_bits)
    if out is None:
        return torch.maximum(x.view(itype), penalty).view(x.dtype)
    return torch.maximum(x.view(itype), penalty, out=out.view(itype)).view(x.dtype)


class Workspace:
    """
    Named buffers reused for temporaries, each grown to the largest request and held
    until :meth:`clear` (or the workspace goes). On CPU a fresh temporary of a
    layer's or batch's size is memory taken from the kernel, paid with a page fault
    per page at its first write (glibc maps blocks of 128 KiB and more afresh, at
    first; above 32 MiB always). Off (``reuse=False``: accelerators, whose caching
    allocators reuse blocks already) it hands out fresh tensors.

    Two users: the chunks of one ``refine_mask`` call, and the CPU updates of the
    input statistics, batch after batch (one per
    :class:`~dsnot_modifier.stats.SharedInputs`, cleared at every epoch end). What
    it saves on large layers and batches is in BENCHMARKS.md (whole cost, the speed
    cuts kept). Results are the same values as with fresh tensors. Requests for a
    device other than the CPU always get fresh tensors.
    """

    def __init__(self, reuse: bool):
        self.reuse = reuse
        self._held: dict[tuple, torch.Tensor] = {}

    def take(self, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """A tensor of ``shape`` and ``dtype`` on ``device``; its contents are undefined."""
        if not self.reuse or torch.device(device).type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        numel = 1
        for n in shape:
            numel *= int(n)
        key = (name, dtype, torch.device(device))
        held = self._held.get(key)
        if held is None or held.numel() < numel:
            held = self._held[key] = torch.empty(numel, dtype=dtype, device=device)
        return held[:numel].view(shape)

    def clear(self):
        """Give the buffers back (the next requests make them again)."""
        self._held.clear()


def sorted_rows(key: torch.Tensor, largest: bool, low_first):
    """
    Every row of ``key`` sorted (descending if ``largest``), ties by index (lower first
    if ``low_first``, a bool or one bool per row): values and indices ``[rows, cols]``.
    """
    if isinstance(low_first, torch.Tensor):
        values = torch.empty_like(key)
        order = torch.empty(key.shape, dtype=torch.long, device=key.device)
        for flag in (True, False):
            rows = (low_first == flag).nonzero().squeeze(1)
            if rows.numel():
                values[rows], order[rows] = sorted_rows(key[rows], largest, flag)
        return values, order
    if low_first:
        return torch.sort(key, dim=1, descending=largest, stable=True)
    values, order = torch.sort(key.flip(1), dim=1, descending=largest, stable=True)
    return values, (key.shape[1] - 1) - order


def topk_rows(key: torch.Tensor, k: int, largest: bool):
    """
    ``torch.topk(key, k, dim=1, largest=largest)``: the k best entries of every row
    (values sorted, ties in any order). Wide rows go in two stages, cheaper on CPU:
    cut each row into ``_TOPK_PARTS`` runs of W consecutive columns; group j holds
    the j-th column of every run, and its best entry is an elementwise max over the
    runs. Take the k best groups, then the k best of their entries. That finds the
    same values: an entry outside those groups is no better than k entries inside
    them (their groups' best), so it can at most tie with the k-th value. Off CPU:
    ``torch.topk`` in one stage.
    """
    rows, cols = key.shape
    parts = _TOPK_PARTS
    if (key.device.type != "cpu" or cols % parts or cols // parts < 4 * k
            or not key.is_contiguous()):
        return torch.topk(key, k, dim=1, largest=largest)
    width = cols // parts
    split = key.view(rows, parts, width)
    best = split.amax(1) if largest else split.amin(1)  # [rows, width]
    chosen = torch.topk(best, k, dim=1, largest=largest, sorted=False).indices
    columns = (chosen.unsqueeze(2) + width * torch.arange(parts, device=key.device)).view(rows, -1)
    values, order = torch.topk(key.gather(1, columns), k, dim=1, largest=largest)
    return values, columns.gather(1, order)


def first_k(key: torch.Tensor, k: int, largest: bool, low_first):
    """
    The first ``k`` entries of :func:`sorted_rows` (all of them if ``k`` reaches the
    width), from a top-k instead of a full sort: values, indices ``[rows, min(k, cols)]``
    and the rows where the top-k cannot decide them (a tie across the k-th place:
    those rows must be sorted in full, see :func:`fix_ties`).
    """
    rows, cols = key.shape
    if k >= cols:
        values, order = sorted_rows(key, largest, low_first)
        return values, order, torch.zeros(rows, dtype=torch.bool, device=key.device)
    values, order = topk_rows(key, k + 1, largest)
    # ties in any order from topk: order them by index, then (stably) by value
    if isinstance(low_first, torch.Tensor):
        perm = torch.sort(torch.where(low_first.unsqueeze(1), order, -order), dim=1).indices
        order = order.gather(1, perm)
    else:
        order, perm = torch.sort(order, dim=1, descending=not low_first)
    values, perm = torch.sort(values.gather(1, perm), dim=1, descending=largest, stable=True)
    order = order.gather(1, perm)
    tied = values[:, k - 1] == values[:, k]
    return values[:, :k], order[:, :k], tied


def fix_ties(tied: torch.Tensor, lists):
    """
    Redo, with full stable sorts, the rows ``tied`` of candidate lists made by
    :func:`first_k`: ``lists`` holds ``(key, largest, low_first, values, indices)``.
    One host sync for all the lists.
    """
    rows = tied.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    for key, largest, low_first, values, order in lists:
        k = values.shape[1]
        if isinstance(low_first, torch.Tensor):
            low_first = low_first[rows]
        v, o = sorted_rows(key[rows], largest, low_first)
        values[rows] = v[:, :k]
        order[rows] = o[:, :k]
