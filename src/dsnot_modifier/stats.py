"""
Streaming statistics of a linear layer's inputs, one row per token.

Everything is kept as sums and counts, so the statistics are additive: two
``InputStats`` of the same layer (two batches, two processes) merge exactly by
adding their fields. Plain torch (and loguru for a warning); nothing here imports
llm-compressor.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch
from loguru import logger

from dsnot_modifier._kernels import Workspace, all_finite, full_precision

__all__ = ["InputStats", "LayerState", "SharedInputs", "NonFiniteStatisticsError", "batch_gram",
           "Variance", "VARIANCE_KINDS"]

#: how the variance of an input column is defined, see :meth:`InputStats.var`
Variance = Literal["per_sequence", "global"]
VARIANCE_KINDS: tuple[str, ...] = get_args(Variance)


class NonFiniteStatisticsError(ValueError):
    """The calibration inputs of a layer held NaN or inf."""


class InputStats:
    """
    Per-column statistics of the inputs ``x`` of one layer.

    - ``mean[c]``: the mean of x_c over all tokens;
    - ``sqnorm[c]``: the mean of x_c² over all tokens (Wanda's statistic);
    - ``var("global")[c]``: the variance of x_c over all tokens;
    - ``var("per_sequence")[c]``: the variance of x_c within each calibration
      sequence, averaged over sequences (spread between sequences left out), which
      is the definition of the DSnoT authors' code;
    - ``gram()``: ``E[x xᵀ]``, the C×C Gram matrix (only if ``with_gram``).

    Column sums are kept in float64, the Gram matrix in float32 (as SparseGPT's
    Hessian), on the device given. Its products run in full float32 precision,
    whatever the caller's matmul precision (:func:`~dsnot_modifier._kernels.full_precision`).

    :param num_columns: number of input features C
    :param with_moments: keep the sums behind mean, variance and mean square
    :param with_gram: keep the Gram matrix
    :param gram_dtype: the inputs' dtype in each batch's product ``xᵀx`` (the sum is
        float32 either way): float32; bfloat16 (see :func:`batch_gram`); or None,
        automatic: the inputs' own dtype where they are bfloat16 or float16 and the
        device has products of those with a float32 result (CUDA), else float32.
        A product of two 16-bit numbers is exact in float32, so automatic gives the
        float32 Gram of the inputs up to the order of the sums; on CPU it is the
        float32 product itself
    """

    def __init__(
        self,
        num_columns: int,
        device: torch.device | str = "cpu",
        with_moments: bool = True,
        with_gram: bool = False,
        gram_dtype: torch.dtype | None = torch.float32,
    ):
        if gram_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(
                f"gram_dtype must be float32, bfloat16 or None (automatic), not {gram_dtype}")
        self.num_columns = num_columns
        self.gram_dtype = gram_dtype
        self.tokens = 0
        self.sequences = 0
        zeros = lambda *shape, dtype=torch.float64: torch.zeros(  # noqa: E731
            *shape, dtype=dtype, device=device
        )
        self.sum = zeros(num_columns) if with_moments else None
        self.sumsq = zeros(num_columns) if with_moments or not with_gram else None
        self.seq_var_sum = zeros(num_columns) if with_moments else None
        self.gram_sum = zeros(num_columns, num_columns, dtype=torch.float32) if with_gram else None
        #: the sums were found finite and have not changed since (see check_finite)
        self._checked = False
        #: gram() divided ``gram_sum`` by the tokens in place: no more inputs (see gram)
        self._final = False

    @property
    def device(self) -> torch.device:
        any_field = self.sumsq if self.sumsq is not None else self.gram_sum
        return any_field.device

    def update(self, x: torch.Tensor, scratch: Workspace | None = None):
        """
        Add a batch of inputs: ``[batch, seq, C]`` (one sequence per batch row) or
        ``[tokens, C]`` (taken as one sequence). An input without tokens (an MoE
        expert no token was routed to is called with a 0-row input) changes nothing:
        it is not counted as a sequence, so no statistic becomes NaN.

        :param scratch: buffers for the temporaries, reused from batch to batch
            (:class:`~dsnot_modifier._kernels.Workspace`; CPU only, ignored
            elsewhere); the sums are the same
        """
        x = x.detach()
        if x.shape[-1] != self.num_columns:
            raise ValueError(
                f"input has {x.shape[-1]} features, the layer expects {self.num_columns}"
            )
        if x.numel() == 0:
            return
        self._still_open()
        self._checked = False
        x = x.reshape(1, -1, self.num_columns) if x.dim() <= 2 else x.reshape(
            -1, x.shape[-2], self.num_columns
        )
        product_dtype = self._product_dtype(x.dtype)
        low = x.to(device=self.device, dtype=product_dtype) if (
            self.gram_sum is not None and product_dtype != torch.float32) else None
        if self.device.type != "cpu":
            scratch = None
        if low is None or self.sum is not None or self.sumsq is not None:
            if (scratch is not None and x.device == self.device and x.dtype != torch.float32
                    and x.is_contiguous()):
                x = scratch.take("x", x.shape, torch.float32, "cpu").copy_(x)  # the same values as x.to(float32)
            else:
                x = x.to(device=self.device, dtype=torch.float32)
        flat = x.reshape(-1, self.num_columns)
        self.tokens += flat.shape[0]
        self.sequences += x.shape[0]
        if self.sum is not None:
            total = flat.sum(0)
            self.sum += total.double()
        if self.sumsq is not None:
            square = flat.square() if scratch is None else torch.square(flat, out=scratch.take("t", flat.shape, torch.float32, "cpu"))
            self.sumsq += square.sum(0).double()
            del square
        if self.seq_var_sum is not None:
            self.seq_var_sum += _sequence_variances(x, total / flat.shape[0], scratch).sum(0)
        if self.gram_sum is not None:
            with full_precision():
                if low is not None:
                    self.gram_sum += batch_gram(low.reshape(-1, self.num_columns))
                else:
                    self.gram_sum.addmm_(flat.t(), flat)

    def _product_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """The dtype the Gram products take the inputs in (see ``gram_dtype``)."""
        if self.gram_dtype is not None:
            return self.gram_dtype
        if input_dtype in _SIXTEEN_BIT and _has_float32_output(self.device):
            return input_dtype
        return torch.float32

    def merge_(self, other: "InputStats") -> "InputStats":
        """Add another set of statistics of the same layer into this one."""
        self._still_open()
        other._still_open()
        self._checked = False
        self.tokens += other.tokens
        self.sequences += other.sequences
        for field in ("sum", "sumsq", "seq_var_sum", "gram_sum"):
            mine = getattr(self, field)
            if mine is not None:
                mine += getattr(other, field).to(mine.device)
        return self

    def tensors(self) -> list[torch.Tensor]:
        """The additive fields, for a sum across processes (counts included)."""
        self._still_open()
        counts = torch.tensor(
            [self.tokens, self.sequences], dtype=torch.float64, device=self.device
        )
        fields = [self.sum, self.sumsq, self.seq_var_sum, self.gram_sum]
        return [counts] + [t for t in fields if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes held by the statistics' tensors (for memory accounting)."""
        fields = (self.sum, self.sumsq, self.seq_var_sum, self.gram_sum)
        return sum(t.nbytes for t in fields if t is not None)

    def all_reduce_(self, group=None) -> "InputStats":
        """
        Sum these statistics over the ranks of ``group`` (``torch.distributed``; the
        default group if None), in place: every rank ends with the statistics of all
        the ranks' inputs, as one process would have seen them (up to the order of
        float additions). Every rank of the group must call this, for the same
        layers in the same order, with statistics of the same kind and shape.
        """
        import torch.distributed as dist

        self._checked = False
        tensors = self.tensors()
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        self.tokens, self.sequences = (int(round(c)) for c in tensors[0].tolist())
        return self

    def _still_open(self):
        if self._final:
            raise RuntimeError(
                "these statistics are final: gram() divided the Gram sums by the number of "
                "tokens in place, so they take no more inputs")

    def _need_tokens(self):
        if self.tokens == 0:
            raise ValueError("no calibration inputs were seen by this layer")

    def mean(self) -> torch.Tensor:
        self._need_tokens()
        return (self.sum / self.tokens).float()

    def sqnorm(self) -> torch.Tensor:
        self._need_tokens()
        if self.sumsq is None:
            diagonal = self.gram_sum.diagonal()
            if self._final:  # divided already (the same division, entry by entry)
                return diagonal.clone(memory_format=torch.contiguous_format)
            return (diagonal / self.tokens).float()
        return (self.sumsq / self.tokens).float()

    def var(self, kind: str = "per_sequence") -> torch.Tensor:
        self._need_tokens()
        if kind == "per_sequence":
            return (self.seq_var_sum / self.sequences).float()
        if kind == "global":
            mean = self.sum / self.tokens
            return (self.sumsq / self.tokens - mean.square()).clamp_min(0).float()
        raise ValueError(f"variance must be one of {VARIANCE_KINDS}, not {kind!r}")

    def gram(self) -> torch.Tensor:
        """
        ``E[x xᵀ]``: at the first call, ``gram_sum`` divided by the tokens in place (the
        same values as ``gram_sum / tokens``, without a second C×C float32 copy: 3.3 GB
        for a 70B ``down_proj``); every later call returns that same tensor. The
        statistics are final then: ``update``, ``merge_``, ``tensors`` and
        ``all_reduce_`` raise. Callers only read the result.
        """
        self._need_tokens()
        if self.gram_sum is None:
            raise ValueError("these statistics were made without the Gram matrix")
        if not self._final:
            self.gram_sum.div_(self.tokens)
            self._final = True
        return self.gram_sum

    def for_objective(self, objective: str, variance: str = "per_sequence") -> dict:
        """The statistics an objective refines with, as keywords of ``refine_mask``."""
        if objective == "gram":
            return {"gram": self.gram()}
        return {"mean": self.mean(), "var": self.var(variance), "sqnorm": self.sqnorm()}

    def check_finite(self, name: str = "layer"):
        """
        :raises NonFiniteStatisticsError: if any statistic is NaN or inf. Once they
            pass, later calls return at once until the sums change (layers sharing
            these statistics, q/k/v, gate/up, check them once: one host sync each)
        """
        if self._checked:
            return
        for field in ("sum", "sumsq", "seq_var_sum", "gram_sum"):
            value = getattr(self, field)
            if value is not None and not all_finite(value):
                raise NonFiniteStatisticsError(
                    f"the calibration inputs of {name} hold NaN or inf values, so its "
                    "statistics are not finite. Run calibration in float32 or bfloat16 "
                    "(float16 overflows in many LLMs), and check the calibration data "
                    "and the layers before this one"
                )
        self._checked = True


_SIXTEEN_BIT = (torch.bfloat16, torch.float16)

#: (device type, dtype) pairs whose float32-output product was found missing (warned once)
_MISSING_PRODUCTS: set[tuple[str, torch.dtype]] = set()


def batch_gram(x: torch.Tensor) -> torch.Tensor:
    """
    ``xᵀx`` in float32 for ``x`` ``[tokens, C]`` in bfloat16 or float16: the product
    of the hardware's 16-bit units (tensor cores, AMX, AVX-512-BF16), accumulated in
    float32. Off CPU the result is torch's float32-output product, unrounded. On CPU
    (which has no such product) a bfloat16 product comes out in bfloat16 and is
    widened, so each batch's sum carries one bfloat16 rounding (relative 2⁻⁹) on top
    of the inputs' own. Where the float32-output product is not implemented (for that
    device or dtype), the product of the inputs widened to float32 (the same values
    up to the order of the sums, slower), after one warning; any other error, out
    of memory included, is raised.
    """
    if not _has_float32_output(x.device):
        if x.dtype == torch.bfloat16:
            return torch.mm(x.t(), x).float()
    elif (x.device.type, x.dtype) not in _MISSING_PRODUCTS:
        try:
            return _float32_output_product(x)
        except (TypeError, NotImplementedError, RuntimeError) as err:
            if not _unsupported(err):
                raise
            _MISSING_PRODUCTS.add((x.device.type, x.dtype))
            _warn_fallback(x, err)
    wide = x.float()
    return wide.t() @ wide


def _has_float32_output(device: torch.device) -> bool:
    """Whether torch may have a 16-bit product with a float32 result on ``device``."""
    return device.type != "cpu"


def _float32_output_product(x: torch.Tensor) -> torch.Tensor:
    return torch.mm(x.t(), x, out_dtype=torch.float32)


def _unsupported(err: Exception) -> bool:
    """The float32-output product is missing (not a failure of a product that exists)."""
    message = str(err).lower()
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in message:
        return False
    if isinstance(err, (TypeError, NotImplementedError)):
        return True
    return any(words in message for words in (
        "not implemented", "not supported", "not_supported", "out_dtype"))


def _warn_fallback(x: torch.Tensor, err: Exception):
    reason = str(err).partition("\n")[0][:200]
    logger.warning(
        f"DSnoT: torch has no {x.dtype} Gram product with a float32 result on "
        f"{x.device.type} ({type(err).__name__}: {reason}); the "
        "Gram matrices are computed from the inputs widened to float32 instead (the "
        "same values up to the order of the sums, slower)"
    )


def _sequence_variances(x: torch.Tensor, shift: torch.Tensor, scratch=None) -> torch.Tensor:
    """
    ``[batch, C]`` float64: the variance of every column within every sequence of
    ``x`` (``[batch, seq, C]`` float32), as ``x.var(dim=1, correction=0)``.

    Two column sums of the shifted input (``d = x − shift``) per sequence, in float32,
    finished in float64: ``E[d²] − E[d]²``. The shift (the batch's column means) is
    what keeps this exact enough: it is close to every sequence's mean, so the
    difference has no cancellation to speak of, even for columns whose mean dwarfs
    their spread (LLMs' massive activations). Two passes that vectorise along the
    columns, where ``var`` over the middle dimension makes one slow strided pass.
    With ``scratch`` (a :class:`~dsnot_modifier._kernels.Workspace`), ``d`` and its
    square are made in one of its buffers (the same values as without).
    """
    d = x - shift if scratch is None else torch.sub(x, shift, out=scratch.take("t", x.shape, torch.float32, "cpu"))
    tokens = x.shape[1]
    first = d.sum(1).double() / tokens
    second = (d.square() if scratch is None else d.square_()).sum(1).double() / tokens
    return (second - first.square()).clamp_min(0)


class SharedInputs:
    """
    Which statistics already accumulate a given input tensor, so that every layer
    reading the same input in the same batch shares one :class:`InputStats`
    (q/k/v; gate/up; under MoE all-expert calibration, the gate and up projections
    of every expert of a decoder layer), whatever the order of the calls in between.

    llm-compressor's linearized experts (``LinearExperts2D``) call each expert with
    the very tensor object they receive (``expert(hidden_states)``) under all-expert
    calibration, and with one fresh tensor per expert (``hidden_states[idx]``) under
    routed calibration, read by that expert's gate and up projections. An input is
    recognised by its memory: data pointer, shape, strides, dtype and device (so a
    view of the same memory with the same layout counts as the same input), while
    the first tensor seen with that layout is alive (a weak reference: freed memory
    may be reused by other data) and unchanged (the tensor's version counter,
    shared by its views, is the one recorded). An input without elements (an
    expert no token was routed to) has no memory of its own: it is recognised by
    object identity only. No content is read: a lookup costs O(1) whatever the size.
    """

    def __init__(self):
        self._entries: dict[tuple, tuple[weakref.ref, int, "InputStats"]] = {}
        #: the reused CPU buffers of the statistics' updates
        self.scratch = Workspace(reuse=True)

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        if x.numel() == 0:
            return ("object", id(x))
        return ("memory", x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)

    def lookup(self, x: torch.Tensor) -> "InputStats | None":
        """The statistics registered for this input, if it is the same, unchanged."""
        entry = self._entries.get(self._key(x))
        if entry is None:
            return None
        ref, version, stats = entry
        first = ref()
        if first is None or _version(first) != version or _version(x) != version:
            return None
        if x.numel() == 0 and first is not x:
            return None
        return stats

    def add(self, x: torch.Tensor, stats: "InputStats"):
        self._entries[self._key(x)] = (weakref.ref(x), _version(x), stats)
        # entries whose tensor is gone can never match again: drop them
        if len(self._entries) > 64:
            self._entries = {k: v for k, v in self._entries.items() if v[0]() is not None}

    def clear(self):
        self._entries.clear()
        self.scratch.clear()


def _version(x: torch.Tensor) -> int | None:
    """The tensor's version counter (None for inference tensors, which have none:
    they cannot be changed in place outside inference mode either)."""
    try:
        return x._version
    except RuntimeError:
        return None


@dataclass
class LayerState:
    """
    What DSnoT holds for one layer between its first forward and its refinement.

    :param dense: the layer's dense weight, copied at its first forward
    :param stats: the statistics of its inputs (one object for the layers that
        read the same input, see :class:`SharedInputs`)
    :param leader: this layer accumulates ``stats`` (the first of the layers sharing it)
    """

    dense: torch.Tensor | None = None
    stats: InputStats | None = None
    leader: bool = False

    def accumulate(
        self,
        inp: torch.Tensor,
        shared: SharedInputs,
        new_stats: Callable[[int], InputStats],
    ) -> bool:
        """
        Add one batch's input of the layer: at its first batch, share the statistics
        of an earlier layer that read the same input in this batch (``shared``) or
        start its own (``new_stats(columns)``); a leader adds the input (and
        registers it in ``shared``), a layer sharing another's adds nothing.

        NaN and inf are not looked for here (that would cost a host sync per batch):
        they reach the sums, which the refinement checks once per layer
        (:meth:`InputStats.check_finite`, naming the layer).

        :return: whether new statistics were made (their memory is new)
        """
        made = False
        if self.stats is None:
            found = shared.lookup(inp)
            if found is not None and found.num_columns == inp.shape[-1]:
                self.stats = found  # q/k/v, gate/up, every expert's gate/up: share
                return False
            self.stats, self.leader, made = new_stats(inp.shape[-1]), True, True
        if self.leader:
            self.stats.update(inp, shared.scratch)
            shared.add(inp, self.stats)
        return made
