"""
DSnoT's swap machinery in plain torch: refine a pruning mask by swapping pruned
weights back in for kept ones, row by row, so that every row (and, for N:M, every
block of M input columns) keeps its number of zeros exactly.

Two objectives share the machinery (see docs/algorithm.md):

- ``mean``: the paper's rule. It steers the expected error of each row,
  ``r_i = Σ_c (W_ic − Wc_ic)·mean_c``: grow the pruned weight with the largest
  ``sign(r_i)·W_ic·mean_c / var_c^p``, prune the kept weight of least Wanda score
  ``|Wc_ic|·sqrt(sqnorm_c)`` among those whose removal also moves ``r_i`` toward
  zero (for N:M: the least Wanda score in the grown weight's block). Candidate
  lists are made once per layer and walked with a pointer per end, so each
  weight changes state at most once. A swap is made only if it shrinks ``|r_i|``.
  A row makes at most ``max_cycles`` swaps, so only that many entries of each
  list are made (top-k's, not sorts; exactly the entries a stable sort would put
  there, ties included).
- ``gram``: the exact squared error ``L_i = e_iᵀ H e_i`` with ``e_i = W_i − Wc_i``
  and the inputs' Gram matrix ``H = E[x xᵀ]``. Greedy: the grow that lowers
  ``L_i`` most, then the best prune given it (cross term included; for N:M in the
  same block). A swap is made only if it lowers ``L_i``, so ``L_i`` decreases
  monotonically and needs no threshold. Here too each weight changes state at
  most once.

A row stops for good at its first refused swap, when its candidates run out,
or at the cycle limit. All rows advance together (no Python loop over rows);
rows are processed in chunks so that memory stays bounded (``mean`` makes its
lists chunk by chunk, then cycles on all rows at once); the math is float32
(float64 for float64 weights) whatever the weight dtype, and the result has the
weight's dtype. Kept values are never changed and a regrown weight gets its
dense value, so the result holds only values of the two inputs, exactly.
The chunk size depends on the device (:func:`chunk_rows_for`): on CPU, chunks
sized for its caches; on an accelerator, the whole layer at once if its working
memory fits the budget stated there, else the fewest chunks that fit.

Host syncs: a cycle syncs once (the indices of the rows that swap, which also
tells when no row is active); nothing that a cycle calls (``propose``,
``apply``, ``select``, ``write``) syncs. Outside the cycles: making the ``mean``
lists syncs a few times per chunk (to settle ties, see :func:`fix_ties`), the
``mean`` statistics twice per layer (the variance floor, whether ``mean/var^p``
is finite), and the result once per layer (its counts and errors).
On CPU the number of threads is capped for small layers and
for the ``gram`` cycles (see ``ELEMENTS_PER_THREAD``).

Layers that share their inputs' statistics (q/k/v, gate/up, every expert's
gate/up) can be refined in one call, stacked (``segments``): rows are
independent, so their cycles run together (``mean``: all at once; ``gram``: the
small chunks together), while everything whose rounding could depend on the
rows around (the chunks' matrix products, the thread counts) is done per layer as
its own call does it, and a layer's errors are correctly rounded sums of its
rows' errors, so each layer's result is the same, bit for bit.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import torch

from dsnot_modifier._kernels import (
    ELEMENTS_PER_THREAD,
    INF,
    argmin_rows,
    at_most_threads,
    block_columns,
    first_k,
    fix_ties,
    full_precision,
    or_inf,
    Workspace,
    take,
    threads,
)

__all__ = [
    "Objective",
    "OBJECTIVES",
    "DEFAULT_THRESHOLD",
    "RefineResult",
    "refine_mask",
    "chunk_rows_for",
    "DEVICE_CHUNK_BYTES",
    "mean_error",
    "gram_error",
]

#: what a swap lowers: the exact squared output error, or the paper's mean error
Objective = Literal["gram", "mean"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)

#: The paper stops a row at |r| <= 0.1 with r summed over 2048-token sequences;
#: r here is a per-token mean, so the same point is 0.1 / 2048.
DEFAULT_THRESHOLD = 0.1 / 2048

#: target number of weights in one chunk of rows (``mean``: its cycles work on
#: ``[rows, max_cycles]`` lists, the chunk bounds the memory of making them, about 7
#: buffers of the chunk's size). 1M was measured faster than 4M on 7B-sized layers,
#: with the same masks (BENCHMARKS.md, refinement speed)
DEFAULT_CHUNK_ELEMENTS = 1 << 20

#: the same for ``gram``, whose every cycle makes several passes over the chunk: small
#: enough that the chunk's state stays in the CPU's caches across cycles, but at
#: least ``GRAM_CHUNK_MIN_ROWS`` rows so that the chunk's ``E H`` is an efficient
#: matrix product
GRAM_CHUNK_ELEMENTS = 1 << 20
GRAM_CHUNK_MIN_ROWS = 256

#: the cycles drop the rows that stopped once the active ones are at most this share
_COMPACT_AT = 0.5

#: on an accelerator, a chunk's working memory is at most this, whatever the device has
#: free: the chunking (and so the rounding of the chunks' products) depends on the
#: layer's shape alone, and the same layer gets the same mask on every run
DEVICE_CHUNK_BYTES = 4 << 30

#: working memory of a chunk, per weight: (buffers of the compute dtype, extra bytes).
#: ``gram``: the state's w, wc, e, 2·u, e·diag(H), two penalties and two scratch
#: buffers, plus one transient product when it is made, or the rows written out (10),
#: and its boolean masks (4 bytes). ``mean``: w and wc (copies unless float32), the
#: grow key, the Wanda score, ``Wc·mean``, two prune keys and the +inf penalty of one
#: (8); then, at worst (every row tied, :func:`fix_ties`), the full stable sort of one
#: list (its key's rows, their flip, the sorted values: 3, the int64 order and its
#: reversal: 16 bytes) while the previous list's sorted values and order are still held
#: (1 and 8 bytes), and the mask (1 byte). The whole peak of a layer, these included:
#: :func:`dsnot_modifier.memory.estimate_peak_bytes`
_WORKING_MEMORY = {"gram": (10, 4), "mean": (12, 25)}


def chunk_bytes_per_row(objective: str, cols: int, dtype: torch.dtype) -> int:
    """The working memory of one row of a chunk (see ``_WORKING_MEMORY``)."""
    buffers, extra = _WORKING_MEMORY[objective]
    return cols * (buffers * torch.empty((), dtype=dtype).element_size() + extra)


def chunk_rows_for(objective: str, rows: int, cols: int, device, dtype: torch.dtype) -> int:
    """
    Rows refined at once by :func:`refine_mask` when ``chunk_rows`` is not given.

    - CPU: chunks sized for its caches: ``mean``, about ``DEFAULT_CHUNK_ELEMENTS``
      (1M) weights; ``gram``, about ``GRAM_CHUNK_ELEMENTS`` (1M) weights and at least
      ``GRAM_CHUNK_MIN_ROWS`` (256) rows (its cycles make several passes over the
      chunk, which then stays in the caches).
    - Any other device (CUDA, XPU, MPS...): the whole layer in one chunk if its
      working memory (:func:`chunk_bytes_per_row` times ``rows``) fits
      ``DEVICE_CHUNK_BYTES`` (4 GiB), else the fewest chunks that fit, of equal size
      (at least one row each). Never from the free memory, so that the result does
      not depend on it: on a device with less room, pass ``chunk_rows``.

    Rows are independent, so the chunking changes the time and memory, never the result.

    :param dtype: the compute dtype (float32, or float64 for float64 weights)
    """
    device = torch.device(device)
    if device.type == "cpu":
        chunk_elements = DEFAULT_CHUNK_ELEMENTS if objective == "mean" else GRAM_CHUNK_ELEMENTS
        chunk = max(1, chunk_elements // max(cols, 1))
        return max(chunk, GRAM_CHUNK_MIN_ROWS) if objective == "gram" else chunk
    fit = max(1, DEVICE_CHUNK_BYTES // max(chunk_bytes_per_row(objective, cols, dtype), 1))
    if fit >= rows:
        return max(rows, 1)
    chunks = -(-rows // fit)
    return -(-rows // chunks)




@dataclass
class RefineResult:
    """
    :param weight: the refined weight, same shape, dtype and device as the input
    :param swaps: number of swaps made (each one grow and one prune)
    :param rows_changed: rows with at least one swap
    :param error_before: the objective's error summed over rows, before
        (``mean``: Σ|r_i|; ``gram``: Σ L_i)
    :param error_after: the same, after
    :param cycles: cycles run (the most of any chunk)
    :param segments: with ``refine_mask(..., segments=...)``, the result of each
        segment of rows (its ``weight`` a view of its rows of ``weight``), each
        exactly what refining that segment alone would give; else None
    """

    weight: torch.Tensor
    swaps: int
    rows_changed: int
    error_before: float
    error_after: float
    cycles: int
    segments: list["RefineResult"] | None = None


def mean_error(dense: torch.Tensor, current: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Expected error of every row, ``r_i = Σ_c (W_ic − Wc_ic)·mean_c`` (float64)."""
    return (dense.double() - current.double()) @ mean.double()


def gram_error(dense: torch.Tensor, current: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Squared error of every row, ``L_i = e_iᵀ H e_i`` (float64)."""
    e = dense.double() - current.double()
    return ((e @ gram.double()) * e).sum(1)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


#: integer types as wide as M bools, for the blocks' test of :func:`_blocks_without_kept`
_BLOCK_INTS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _blocks_without_kept(pruned: torch.Tensor, m: int) -> torch.Tensor:
    """
    ``[rows, cols // m, 1]`` (to broadcast over a ``[rows, cols // m, m]`` view): True
    for the blocks of M columns that hold no kept weight (``pruned``: the weight's
    zeros; all pruned, e.g. SparseGPT N:M on inputs calibration never activates). A
    weight grown there has no kept weight of its block to prune in exchange: it is
    no candidate (else a row whose best growth lies there would stop for good).
    For M of 2, 4 or 8 the M bools of a block (bytes 0 or 1) are read as one integer,
    all true when it equals 0x01...01: exact, and a fraction of ``all``'s time.
    """
    rows, cols = pruned.shape
    itype = _BLOCK_INTS.get(m)
    if itype is not None and pruned.is_contiguous() and pruned.storage_offset() % m == 0:
        ones = int.from_bytes(b"\x01" * m, "little")
        return (pruned.view(itype) == ones).unsqueeze(2)
    return pruned.view(rows, cols // m, m).all(-1, keepdim=True)


def _fill_blocks(x: torch.Tensor, blocks: torch.Tensor, value: float) -> torch.Tensor:
    """Fill ``x`` (``[rows, cols]``, contiguous) with ``value`` in ``blocks`` (see above)."""
    rows, cols = x.shape
    x.view(rows, blocks.shape[1], -1).masked_fill_(blocks, value)
    return x


class _Objective:
    """
    One chunk of rows under one objective: what a cycle proposes, what a swap does.
    Every tensor named in ``row_fields`` has one entry per row, so that the rows
    that stopped can be dropped (:meth:`select`) and the cycles get cheaper.
    """

    row_fields = ()

    def propose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:return: grow column, prune column and whether the swap is worth making"""
        raise NotImplementedError

    def apply(self, idx: torch.Tensor, g: torch.Tensor, p: torch.Tensor):
        """Make the swaps of rows ``idx`` (grow ``g``, prune ``p``)."""
        raise NotImplementedError

    def write(self, out: torch.Tensor, live: torch.Tensor, rows: torch.Tensor | None):
        """Write the current rows ``rows`` (all if None) to ``out[live[rows]]``."""

    def row_error(self) -> torch.Tensor:
        """The objective's error of every row (``mean``: |r_i|; ``gram``: L_i)."""
        raise NotImplementedError

    @classmethod
    def merged(cls, parts: list["_Objective"]) -> "_Objective":
        """The rows of several states in one (its cycles then run on all at once)."""
        if len(parts) == 1:
            return parts[0]
        state = copy.copy(parts[0])  # the settings shared by all parts; the rows below
        for name in cls.row_fields:
            values = [getattr(part, name) for part in parts]
            if isinstance(values[0], tuple):
                setattr(state, name, tuple(torch.cat(v) for v in zip(*values)))
            else:
                setattr(state, name, torch.cat(values))
        return state

    def select(self, keep: torch.Tensor):
        """Keep only the rows ``keep`` (indices into the current rows)."""
        for name in self.row_fields:
            value = getattr(self, name)
            if isinstance(value, (tuple, list)):
                setattr(self, name, type(value)(v[keep] for v in value))
            elif value is not None:
                setattr(self, name, value[keep])


class _MeanObjective(_Objective):
    """
    Each row makes at most ``max_cycles`` swaps, so only the first ``max_cycles``
    entries of each end of its candidate lists can ever be reached: those are taken
    with top-k's (no full sort), and the cycles work on them alone: per row, the two
    ends of the grow list side by side (``[rows, 2k]``), the same for the two prune
    lists, or for N:M the Wanda scores of the blocks of the grow candidates
    (``[rows, 2k·M]``). With the sign check, ``r`` keeps its sign, so each row only
    ever walks the end of its sign: one list per row (``[rows, k]``), half the work.
    Swaps are written straight into the result (``target``), so the weights are only
    read. The lists are made chunk by chunk (which bounds the memory), then the
    cycles run on all the rows at once (:meth:`merged`): a cycle is a few dozen
    operations on ``[rows]`` vectors, whatever the number of rows.
    """

    row_fields = ("rows", "r", "grow", "prune", "ptr")

    def __init__(self, w, wc, nm, *, target, first_row, max_cycles, mean, q, q_finite,
                 score_col, threshold, sign_check, product_threads=None, workspace=None):
        rows, cols = w.shape
        self.nm, self.target = nm, target
        self.mean, self.threshold, self.sign_check = mean, threshold, sign_check
        self.single = sign_check  # one list per row: the end of the sign of its r
        device = w.device
        # the chunk's temporaries (the same values in fresh tensors or reused buffers)
        ws = workspace if workspace is not None else Workspace(reuse=False)
        self._buf = lambda name, dtype=w.dtype: ws.take(name, w.shape, dtype, device)  # noqa: E731
        # the rows of `target` (the result) still refined
        self.rows = torch.arange(first_row, first_row + rows, device=device)
        pruned = torch.eq(wc, 0, out=self._buf("mask", torch.bool))
        with threads(product_threads):
            self.r = torch.sub(w, wc, out=self._buf("v")) @ mean
        k = max(1, min(max_cycles, cols))
        pos = self.r > 0
        grow, tied = self._grow_lists(w, pruned, q, q_finite, k, pos)
        del pruned  # its buffer is reused below
        prune = []
        if nm is None:
            prune, tied_prune = self._prune_lists(wc, score_col, k, pos)
            tied |= tied_prune
        fix_ties(tied, grow + prune)  # rows where a top-k left a tie: full stable sorts
        # per row: the grow list's ends side by side (or the end of its sign)
        grow_ok = torch.cat([v > 0 if largest else v < 0 for _, largest, _, v, _ in grow], 1)
        grow_i = torch.cat([i for *_, i in grow], 1)
        self.k = grow[0][4].shape[1]
        self.grow = (grow_ok, grow_i, w.gather(1, grow_i))
        if nm is None:
            prune_i = torch.cat([i for *_, i in prune], 1)
            self.prune = (torch.cat([v < INF for *_, v, _ in prune], 1), prune_i, wc.gather(1, prune_i))
        else:
            self.prune = self._block_scores(wc, score_col, grow_i)
        del grow, prune
        zeros = torch.zeros(rows, dtype=torch.long, device=device)
        # swaps made (one list per row), or: grow+, grow-, prune (r>0), prune (r<0)
        self.ptr = (zeros,) if sign_check else tuple(zeros.clone() for _ in range(4))
        self.pos = self.r_new = self.w_g = None
        del self._buf

    def _grow_lists(self, w, pruned, q, q_finite, k, pos):
        """
        The grow list: pruned weights by ``W·mean/var^p``, largest first; the positive ones
        (for r > 0) are walked from the front, the negative ones (r < 0) from the back
        (ties: the front in index order, the back in reverse index order). Kept weights
        get 0 (a product by the mask is faster than a masked fill); for N:M, so do the
        blocks without a kept weight. With the sign check, one end per row: the back of
        a row is the front of its negated keys.

        :return: the lists' ``(key, largest, low_first, values, indices)`` and the rows
            whose top-k's a tie leaves undecided inside the walked part
        """
        if q_finite:
            key = torch.mul(w, pruned, out=self._buf("grow")).mul_(q)
        else:
            key = (w * q).masked_fill_(~pruned, 0)
        if self.nm is not None:
            _fill_blocks(key, _blocks_without_kept(pruned, self.nm[1]), 0)
        if self.sign_check:
            key.mul_(torch.where(pos, 1.0, -1.0).to(key.dtype).unsqueeze(1))
            values, order, tied = first_k(key, k, largest=True, low_first=pos)
            return [(key, True, pos, values, order)], tied & (values[:, -1] > 0)
        front_v, front_i, tied = first_k(key, k, largest=True, low_first=True)
        back_v, back_i, tied_back = first_k(key, k, largest=False, low_first=False)
        tied = (tied & (front_v[:, -1] > 0)) | (tied_back & (back_v[:, -1] < 0))
        return [(key, True, True, front_v, front_i), (key, False, False, back_v, back_i)], tied

    def _prune_lists(self, wc, score_col, k, pos):
        """
        The prune lists (unstructured): kept weights whose removal moves r toward zero,
        least Wanda score ``|Wc|·sqrt(sqnorm)`` first: ``Wc·mean < 0`` for r > 0 (ties:
        reverse index order), ``Wc·mean > 0`` for r < 0 (ties: index order); the others
        get +inf. With the sign check, one list per row, for the sign of its r.

        :return: as :meth:`_grow_lists`
        """
        buf = self._buf
        score = torch.abs(wc, out=buf("score")).mul_(score_col)
        v = torch.mul(wc, self.mean, out=buf("v"))
        mask, penalty = buf("mask", torch.bool), buf("penalty")
        if self.sign_check:
            v.mul_(torch.where(pos, 1.0, -1.0).to(v.dtype).unsqueeze(1))
            key = or_inf(torch.lt(v, 0, out=mask), score, buf("key"), penalty)
            values, order, tied = first_k(key, k, largest=False, low_first=~pos)
            return [(key, False, ~pos, values, order)], tied & (values[:, -1] < INF)
        key_neg = or_inf(torch.lt(v, 0, out=mask), score, buf("key"), penalty)
        key_pos = or_inf(torch.gt(v, 0, out=mask), score, buf("key_pos"), penalty)
        neg_v, neg_i, tied_neg = first_k(key_neg, k, largest=False, low_first=False)
        pos_v, pos_i, tied_pos = first_k(key_pos, k, largest=False, low_first=True)
        tied = (tied_neg & (neg_v[:, -1] < INF)) | (tied_pos & (pos_v[:, -1] < INF))
        return [(key_neg, False, False, neg_v, neg_i), (key_pos, False, True, pos_v, pos_i)], tied

    def _block_scores(self, wc, score_col, grow_i):
        """N:M: the Wanda scores of the blocks of the grow candidates, +inf where pruned."""
        m = self.nm[1]
        rows = wc.shape[0]
        block = grow_i // m  # [rows, 2k] (or [rows, k])
        columns = (block.unsqueeze(2) * m + torch.arange(m, device=wc.device)).view(rows, -1)
        wc_b = wc.gather(1, columns)
        score = wc_b.abs().mul_(score_col[columns]).masked_fill_(wc_b == 0, INF)
        return block, score, wc_b

    def _slot(self, pos, ptr_pos, ptr_neg):
        """Each row's place in its two lists side by side, and whether it is inside."""
        k = self.k
        ptr = torch.where(pos, ptr_pos, ptr_neg)
        return torch.where(pos, ptr_pos, ptr_neg + k).clamp_(max=2 * k - 1), ptr < k

    def propose(self):
        mean, r = self.mean, self.r
        pos = r > 0
        if self.single:
            (made,) = self.ptr
            slot, inside = made.clamp(max=self.k - 1), made < self.k
            at, p_inside = slot, inside
        else:
            gp, gn, qn, qp = self.ptr
            slot, inside = self._slot(pos, gp, gn)
            if self.nm is None:
                at, p_inside = self._slot(pos, qn, qp)
        valid, cols, values = self.grow
        g_ok = take(valid, slot) & inside
        g = take(cols, slot)
        w_g = take(values, slot)
        if self.nm is None:
            valid, cols, values = self.prune
            p_ok = take(valid, at) & p_inside
            p = take(cols, at)
            wc_p = take(values, at)
        else:
            m = self.nm[1]
            block, score, wc_b = self.prune
            at = slot.unsqueeze(1) * m + torch.arange(m, device=slot.device)
            s = score.gather(1, at)
            best = s.argmin(1)
            p = take(block, slot) * m + best
            p_ok = torch.isfinite(take(s, best))
            wc_p = take(wc_b, take(at, best))
        r_new = r - w_g * mean[g] + wc_p * mean[p]
        ok = g_ok & p_ok & (r.abs() > self.threshold) & (r_new.abs() < r.abs())
        if self.sign_check:
            ok &= (r_new * r) >= 0
        self.pos, self.r_new, self.w_g = pos, r_new, w_g
        return g, p, ok

    def apply(self, idx, g, p):
        rows = self.rows[idx]
        self.target[rows, g] = self.w_g[idx].to(self.target.dtype)
        self.target[rows, p] = 0
        self.r[idx] = self.r_new[idx]
        if self.single:
            self.ptr[0][idx] += 1
        else:
            pos = self.pos[idx].long()
            gp, gn, qn, qp = self.ptr
            gp[idx] += pos
            gn[idx] += 1 - pos
            qn[idx] += pos
            qp[idx] += 1 - pos
        if self.nm is not None:
            # p is pruned now: +inf in every candidate block that holds it
            m = self.nm[1]
            block, score, _ = self.prune
            width = score.shape[1]
            same = block[idx] == (p // m).unsqueeze(1)
            at = ((idx * width).unsqueeze(1) + torch.arange(0, width, m, device=p.device)
                  + (p % m).unsqueeze(1))
            flat = score.view(-1)
            flat[at] = torch.where(same, INF, flat[at])

    def row_error(self):
        return self.r.abs()


class _GramObjective(_Objective):
    """
    Per cycle and row: ``d_grow`` and ``d_prune`` over the row (a few in-place passes
    into scratch buffers), two row minima, and the update of ``u`` by two rows of H.
    Same arithmetic as the plain formulas, in fewer passes: ``u`` is kept doubled
    (``2 H e``, doubling is exact) and ``e ⊙ diag(H)`` kept up to date, and a +inf
    penalty ``q`` is added with the product before it (``q + x·y`` in one pass, the
    same sum as ``x·y`` then ``+ q``).
    """

    row_fields = ("w", "wc", "e", "ehd", "u2", "loss", "grow_penalty", "prune_penalty")

    def __init__(self, w, wc, nm, *, gram, h_diag, rtol, product_threads=None):
        self.w, self.wc, self.nm = w.contiguous(), wc.contiguous(), nm
        w, wc = self.w, self.wc
        self.h, self.h_diag = gram, h_diag
        self.rtol = rtol
        self.e = w - wc
        with threads(product_threads):
            u = self.e @ gram
        self.loss = (self.e * u).sum(1)
        self.u2 = u.mul_(2)
        self.ehd = self.e * h_diag
        # each weight changes state at most once: a pruned weight may be grown, a kept
        # one pruned, never back (so kept values are always the pruner's). Excluded
        # candidates carry +inf, added to their score (an add is much faster on CPU
        # than a masked fill)
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        self.grow_penalty = torch.where((wc != 0) | (w == 0), INF, zero)
        if nm is not None:
            _fill_blocks(self.grow_penalty, _blocks_without_kept(wc == 0, nm[1]), INF)
        self.prune_penalty = torch.where(wc == 0, INF, zero)
        self._scratch = torch.empty_like(w)  # d_grow, d_prune, then the update of u
        self._rows_h = torch.empty_like(w)  # rows g of H
        self.total = self.h_g = None

    @classmethod
    def merged(cls, parts):
        state = super().merged(parts)
        if len(parts) > 1:
            state._scratch, state._rows_h = torch.empty_like(state.w), torch.empty_like(state.w)
        return state

    def propose(self):
        wc, e, h_diag = self.wc, self.e, self.h_diag
        rows = e.shape[0]
        # growing g (e_g -> 0): dL = e_g (e_g H_gg - 2 u_g)
        d = torch.sub(self.ehd, self.u2, out=self._scratch[:rows])
        d_grow = torch.addcmul(self.grow_penalty, d, e, out=d)
        g = argmin_rows(d_grow)
        d_g = take(d_grow, g)
        delta_g2 = take(e, g).mul_(-2)  # 2·delta_g, exact
        # pruning p (e_p -> e_p + Wc_p) after growing g:
        # dL = Wc_p (2 (u_p + delta_g H_gp) + Wc_p H_pp)
        if self.nm is None:
            h_g = torch.index_select(self.h, 0, g, out=self._rows_h[:rows])  # H symmetric
            d = torch.addcmul(self.u2, h_g, delta_g2.unsqueeze(1), out=d).addcmul_(wc, h_diag)
            d_prune = torch.addcmul(self.prune_penalty, d, wc, out=d)
            p = argmin_rows(d_prune)
            total = d_g + take(d_prune, p)
        else:
            h_g = None  # rows of H gathered in apply, for the rows that swap
            cols = block_columns(g, self.nm[1])
            wc_p = wc.gather(1, cols)
            d = torch.addcmul(self.u2.gather(1, cols), self.h[g.unsqueeze(1), cols],
                              delta_g2.unsqueeze(1)).addcmul_(wc_p, h_diag[cols])
            d_prune = torch.addcmul(self.prune_penalty.gather(1, cols), d, wc_p)
            best = d_prune.argmin(1)
            p = take(cols, best)
            total = d_g + take(d_prune, best)
        ok = total < -self.rtol * self.loss.clamp_min(0)
        self.total, self.h_g = total, h_g
        return g, p, ok

    def apply(self, idx, g, p):
        n = idx.numel()
        every = n == self.e.shape[0]
        flat = idx * self.e.shape[1]
        at_g, at_p = flat + g, flat + p  # flat positions: 1-D indexing is much faster
        w, wc, e, ehd = (t.view(-1) for t in (self.w, self.wc, self.e, self.ehd))
        delta_g2 = e[at_g].mul_(-2)
        delta_p2 = wc[at_p].mul_(2)
        if self.h_g is None:
            h_g = torch.index_select(self.h, 0, g, out=self._rows_h[:n])
        else:
            h_g = self.h_g if every else self.h_g[idx]
        update = torch.index_select(self.h, 0, p, out=self._scratch[:n])
        update.mul_(delta_p2.unsqueeze(1)).addcmul_(h_g, delta_g2.unsqueeze(1))
        if every:
            self.u2.add_(update)
        else:
            self.u2.index_add_(0, idx, update)
        w_g, w_p = w[at_g], w[at_p]
        zero = torch.zeros_like(w_g)
        e[at_g] = zero
        e[at_p] = w_p
        ehd[at_g] = zero * self.h_diag[g]
        ehd[at_p] = w_p * self.h_diag[p]
        self.loss[idx] += self.total[idx]
        self.grow_penalty.view(-1)[at_g] = INF
        self.prune_penalty.view(-1)[at_p] = INF
        wc[at_g] = w_g
        wc[at_p] = zero

    def write(self, out, live, rows):
        if rows is None:
            out[live] = self.wc.to(out.dtype)
        else:
            out[live[rows]] = self.wc[rows].to(out.dtype)

    def row_error(self):
        # tracked incrementally; tests recompute it exactly with gram_error
        return self.loss.clamp_min(0)


def _check_inputs(dense, current, objective, mean, var, sqnorm, gram, nm, max_cycles):
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    if dense.dim() != 2 or dense.shape != current.shape:
        raise ValueError(
            f"dense and current weights must be 2-D of the same shape, got "
            f"{tuple(dense.shape)} and {tuple(current.shape)}"
        )
    cols = dense.shape[1]
    needed = {"mean": (mean, var, sqnorm), "gram": (gram,)}[objective]
    if any(t is None for t in needed):
        names = "mean, var and sqnorm" if objective == "mean" else "gram"
        raise ValueError(f"objective {objective!r} needs the statistics {names}")
    for t in needed:
        if t.shape[-1] != cols:
            raise ValueError(f"statistics of {t.shape[-1]} columns for a weight of {cols}")
    if nm is not None and cols % nm[1]:
        raise ValueError(f"{cols} columns are not a multiple of the N:M block size {nm[1]}")
    if max_cycles < 0:
        raise ValueError("max_cycles must be >= 0")


@torch.no_grad()
def refine_mask(
    dense: torch.Tensor,
    current: torch.Tensor,
    *,
    objective: str = "gram",
    nm: tuple[int, int] | None = None,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
    sqnorm: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
    max_cycles: int = 50,
    threshold: float = DEFAULT_THRESHOLD,
    var_power: float = 1.0,
    sign_check: bool | None = None,
    rtol: float = 1e-6,
    chunk_rows: int | None = None,
    segments: Sequence[int] | None = None,
) -> RefineResult:
    """
    Refine the mask of ``current`` (zeros are pruned) toward ``dense``.

    :param dense: the layer's weight before pruning, ``[rows, cols]``
    :param current: the pruned weight (kept values as the pruner left them)
    :param objective: ``"gram"`` (exact squared error) or ``"mean"`` (the paper's)
    :param nm: ``(N, M)`` to keep the zeros of every block of M columns, or None
    :param mean: per-column input mean (``mean`` objective)
    :param var: per-column input variance (``mean`` objective)
    :param sqnorm: per-column input mean square (``mean`` objective, Wanda score)
    :param gram: the inputs' Gram matrix ``E[x xᵀ]`` (``gram`` objective)
    :param max_cycles: at most this many swaps per row
    :param threshold: ``mean`` only: a row stops once ``|r_i|`` is at most this
        (per-token units; the paper's 0.1 at 2048 tokens is 0.1/2048)
    :param var_power: ``mean`` only: exponent p of the variance in the grow score
    :param sign_check: ``mean`` only: refuse swaps that flip the sign of ``r_i``;
        None means the paper's choice: off for unstructured, on for N:M
    :param rtol: ``gram`` only: a swap must lower ``L_i`` by more than
        ``rtol · L_i``, so that float rounding never passes for a gain
    :param chunk_rows: rows per chunk (default: :func:`chunk_rows_for` the device;
        on CPU, about 1M weights a chunk, and for ``gram`` at least 256 rows; on an
        accelerator, the whole layer within a fixed memory budget)
    :param segments: the numbers of rows of several layers stacked in ``dense`` and
        ``current`` (in order, summing to their rows), layers that share their inputs'
        statistics (q/k/v, gate/up). Their rows are refined together, and the
        result's ``segments`` holds each layer's result, bit for bit what refining it
        alone gives: its chunks, matrix products and thread counts are those of its
        own call; only the cycles, whose every operation is row by row and exact
        whatever the rows beside it, are shared; its errors are correctly rounded
        sums of its rows' errors (:func:`_segment_result`). The totals are the sums
        over the segments (``cycles``: the most)
    """
    _check_inputs(dense, current, objective, mean, var, sqnorm, gram, nm, max_cycles)
    rows, cols = dense.shape
    stacked = segments is not None
    segments = _check_segments(segments, rows)
    dtype = _compute_dtype(current)
    device = current.device
    if objective == "mean":
        check = (nm is not None) if sign_check is None else bool(sign_check)
        options = _mean_options(mean, var, sqnorm, var_power, device, dtype)
        options.update(threshold=threshold, sign_check=check, max_cycles=max_cycles)
    else:
        gram = gram.to(device, dtype)
        options = dict(gram=gram, h_diag=gram.diagonal().contiguous(), rtol=rtol)
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(objective, rows, cols, device, dtype)
    caps = None
    if device.type == "cpu":
        options["product_threads"] = torch.get_num_threads()
        caps = lambda n: _thread_caps(objective, n, cols, chunk_rows)  # noqa: E731
    with full_precision(), at_most_threads(caps(rows)[0] if caps else None):
        result = _refine(dense, current, objective, nm, options, chunk_rows, max_cycles,
                         caps, segments)
    if not stacked:
        result.segments[0].weight = result.weight
        return result.segments[0]
    return result


def _mean_options(mean, var, sqnorm, var_power, device, dtype) -> dict:
    """
    ``mean``'s per-column statistics in the compute dtype: the mean, the grow score's
    factor ``q = mean / var^p`` (zero variances floored, so that no score is infinite
    or NaN) and the Wanda score's ``sqrt(sqnorm)``.
    """
    mean = mean.to(device, dtype)
    var = var.to(device, dtype)
    if var_power:
        floor = torch.finfo(dtype).tiny + 1e-12 * float(var.max().clamp_min(0))
        var_p = var.clamp_min(floor).pow(var_power)
    else:
        var_p = torch.ones_like(var)
    q = mean / var_p
    return dict(mean=mean, q=q, q_finite=bool(torch.isfinite(q).all()),
                score_col=sqnorm.to(device, dtype).clamp_min(0).sqrt(),
                workspace=Workspace(reuse=device.type == "cpu"))


def _check_segments(segments, rows: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of each segment (one of all the rows if None)."""
    if segments is None:
        return [(0, rows)]
    sizes = [int(n) for n in segments]
    if any(n < 1 for n in sizes) or sum(sizes) != rows:
        raise ValueError(f"segments must be positive numbers of rows summing to {rows}, "
                         f"got {list(segments)}")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(start, start + n) for start, n in zip(starts, sizes)]


def _thread_caps(objective: str, rows: int, cols: int, chunk_rows: int) -> tuple[int, int]:
    """
    On CPU, the intra-op threads of a refinement of ``rows`` rows: at most one per
    ``ELEMENTS_PER_THREAD`` weights of the layer, and of a chunk for the ``gram``
    cycles (``mean``: one, its cycles work on [rows, 2·max_cycles] lists, a few % of
    the weight).
    """
    layer_threads = max(1, rows * cols // ELEMENTS_PER_THREAD)
    cycle_threads = 1 if objective == "mean" else max(
        1, min(chunk_rows, rows) * cols // ELEMENTS_PER_THREAD)
    return layer_threads, cycle_threads


def _chunks(segments, chunk_rows):
    """Each segment's chunks, ``(segment, start, stop)``, as its own call would cut them."""
    return [(k, begin, min(begin + chunk_rows, stop))
            for k, (start, stop) in enumerate(segments)
            for begin in range(start, stop, chunk_rows)]


def _bins(chunks, chunk_rows):
    """
    The ``gram`` chunks grouped into the states cycled on: a full chunk alone, the
    smaller ones (a layer's last chunk, small layers) together up to ``chunk_rows``
    rows. Alone (one segment), every chunk is its own state.
    """
    open_bin, size = [], 0
    for chunk in chunks:
        rows = chunk[2] - chunk[1]
        if rows >= chunk_rows:
            yield [chunk]
            continue
        if size + rows > chunk_rows:
            yield open_bin
            open_bin, size = [], 0
        open_bin.append(chunk)
        size += rows
    if open_bin:
        yield open_bin


def _states(dense, current, out, objective, nm, options, chunk_rows, segments, caps):
    """
    The objective's states to cycle on, each with its rows (indices into ``dense``).
    Each chunk's state is made as the chunk's own call would make it (the same rows,
    products and thread count); ``mean`` then cycles on all the rows at once, ``gram``
    on the bins of :func:`_bins`.
    """
    dtype = _compute_dtype(current)
    chunks = _chunks(segments, chunk_rows)

    def made(k, start, stop):
        start_k, stop_k = segments[k]
        with at_most_threads(caps(stop_k - start_k)[0] if caps else None):
            if objective == "mean":
                # reads the chunks (views if the weight is float32), writes swaps into `out`
                return _MeanObjective(dense[start:stop].to(dtype), current[start:stop].to(dtype),
                                      nm, target=out, first_row=start, **options)
            return _GramObjective(dense[start:stop].to(dtype),
                                  current[start:stop].to(dtype, copy=True), nm, **options)

    device = current.device
    if objective == "mean":
        yield _MeanObjective.merged([made(*c) for c in chunks]), torch.arange(
            dense.shape[0], device=device)
        return
    for group in _bins(chunks, chunk_rows):
        rows = torch.cat([torch.arange(start, stop, device=device) for _, start, stop in group])
        yield _GramObjective.merged([made(*c) for c in group]), rows


def _refine(dense, current, objective, nm, options, chunk_rows, max_cycles, caps, segments):
    rows = dense.shape[0]
    device = current.device

    out = current.clone()
    swaps = torch.zeros(rows, dtype=torch.long, device=device)
    # every row's error before and after (float64)
    before = torch.zeros(rows, dtype=torch.float64, device=device)
    after = torch.zeros(rows, dtype=torch.float64, device=device)
    cycle_threads = caps(rows)[1] if caps else None
    for state, live in _states(dense, current, out, objective, nm, options, chunk_rows,
                               segments, caps):
        before[live] = state.row_error().double()
        active = torch.ones(live.numel(), dtype=torch.bool, device=device)
        with at_most_threads(cycle_threads):
            for cycle in range(max_cycles):
                g, p, ok = state.propose()
                ok &= active
                idx = ok.nonzero().squeeze(1)  # the cycle's one host sync
                if idx.numel() == 0:
                    break
                state.apply(idx, g[idx], p[idx])
                swaps.index_add_(0, live[idx], torch.ones_like(idx))
                active = ok
                if idx.numel() <= _COMPACT_AT * live.numel():
                    # drop the rows that stopped: write them out, keep the active ones.
                    # Their indices, in order, without a second sync: a stable sort
                    # puts them first, and their number is known
                    order = torch.sort(ok.to(torch.uint8), stable=True).indices
                    done = order[: live.numel() - idx.numel()]
                    state.write(out, live, done)
                    after[live[done]] = state.row_error()[done].double()
                    state.select(idx)
                    live = live[idx]
                    active = torch.ones(idx.numel(), dtype=torch.bool, device=device)
        state.write(out, live, None)
        after[live] = state.row_error().double()
        del state
    parts = [_segment_result(out, swaps, before, after, start, stop)
             for start, stop in segments]
    return RefineResult(
        weight=out,
        swaps=sum(part.swaps for part in parts),
        rows_changed=sum(part.rows_changed for part in parts),
        error_before=sum(part.error_before for part in parts),
        error_after=sum(part.error_after for part in parts),
        cycles=max(part.cycles for part in parts),
        segments=parts,
    )


def _segment_result(out, swaps, before, after, start: int, stop: int) -> RefineResult:
    """
    The result of rows ``start:stop`` (one layer of a stack, or the whole layer). Its
    errors are correctly rounded sums (``math.fsum``) of the rows' errors, so they do
    not depend on how the rows were grouped: a layer reports the same numbers stacked
    or alone.
    """
    made = swaps[start:stop]
    # one sync for the counts and the rows' errors
    counts, rows = torch.stack([made.sum(), (made > 0).sum(), made.max()]).tolist(), \
        torch.stack([before[start:stop], after[start:stop]]).tolist()
    n_swaps, n_changed, cycles = counts
    return RefineResult(
        weight=out[start:stop],
        swaps=n_swaps,
        rows_changed=n_changed,
        error_before=math.fsum(rows[0]),
        error_after=math.fsum(rows[1]),
        cycles=cycles,
    )
