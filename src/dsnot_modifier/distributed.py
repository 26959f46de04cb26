"""
DSnoT under ``torchrun``: collectives with a timeout, layer assignment, digests
that let the ranks check they agree, and writing a weight received from another
rank into this rank's (possibly offloaded) copy of a layer.

Plain ``torch.distributed`` plus compressed-tensors' offload caches, as
llm-compressor 0.14 uses them: in a distributed run, a model offloaded to CPU
memory (which the sequential pipeline does to every model) lives in *shared*
memory, one copy for all the ranks of a host, and a disk offload is one set of
files; only a layer's owner writes those, the others refresh their onloaded copy.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any, Callable, Hashable, Sequence, TypeVar

import torch
import torch.distributed as dist
from compressed_tensors.offload import disable_onloading, update_offload_parameter
from compressed_tensors.offload.cache import (
    DistributedCPUCache,
    DistributedDiskCache,
    OffloadCache,
)
from loguru import logger

__all__ = [
    "DSnoTDistributedError",
    "RankGroup",
    "world_size",
    "assign_layers",
    "tensor_digest",
    "mask_digest",
    "receive_weight",
]

T = TypeVar("T", bound=Hashable)

#: seconds a DSnoT collective waits for the other ranks by default
DEFAULT_TIMEOUT = 1800.0


class DSnoTDistributedError(RuntimeError):
    """The ranks of a distributed DSnoT run failed to work together (a rank
    failed, hung, or saw other weights); the message names the cause and the fix."""


def world_size() -> int:
    """Number of ranks of the default process group (1 if not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class RankGroup:
    """
    DSnoT's own process group: the ranks of the default group, with a timeout on
    every collective, so that a rank that died or hangs makes the others fail
    with :class:`DSnoTDistributedError` instead of waiting forever. Tensors go
    through a group of the default backend (NCCL on GPUs, Gloo on CPUs), Python
    objects through a Gloo group.

    Every rank must create the group and call its collectives in the same order.

    :param timeout: seconds a collective waits for all the ranks
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        if world_size() < 2:
            raise ValueError("RankGroup needs an initialized torch.distributed with 2+ ranks")
        self.timeout = float(timeout)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        wait = timedelta(seconds=self.timeout)
        self.group = self.run("creating DSnoT's process group", dist.new_group, timeout=wait)
        if dist.get_backend(self.group) == "gloo":
            self.object_group = self.group
        else:
            self.object_group = self.run(
                "creating DSnoT's Gloo group", dist.new_group, backend="gloo", timeout=wait
            )

    def run(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:  # DistError, DistBackendError, gloo timeouts
            raise DSnoTDistributedError(
                f"DSnoT rank {self.rank}/{getattr(self, 'world_size', '?')}: {what} with "
                f"the other ranks failed ({type(err).__name__}: {str(err).strip()[:500]}). "
                "Another rank has most likely failed or hangs: see its log. If the ranks "
                f"are only slow (a large layer to refine), raise DSnoTModifier's "
                f"dist_timeout (now {getattr(self, 'timeout', '?')} s)"
            ) from err

    def all_reduce_(self, tensors: Sequence[torch.Tensor], what: str):
        """Sum tensors over the ranks, in place."""
        for tensor in tensors:
            self.run(what, dist.all_reduce, tensor, op=dist.ReduceOp.SUM, group=self.group)

    def broadcast_(self, tensor: torch.Tensor, src: int, what: str):
        """Send ``tensor`` from rank ``src`` into ``tensor`` of every other rank."""
        self.run(what, dist.broadcast, tensor, src=src, group=self.group)

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        """``obj`` of every rank, in rank order (picklable objects)."""
        gathered = [None] * self.world_size
        self.run(what, dist.all_gather_object, gathered, obj, group=self.object_group)
        return gathered

    def agree(self, error: BaseException | None, what: str):
        """
        Make every rank fail if any rank failed: each rank passes the exception it
        met (or None). The failing rank re-raises its own exception; the others
        raise :class:`DSnoTDistributedError` naming the failing rank.
        """
        message = None if error is None else f"{type(error).__name__}: {error}"
        failures = [
            (rank, msg)
            for rank, msg in enumerate(self.all_gather_object(message, what))
            if msg is not None
        ]
        if not failures:
            return
        if error is not None:
            raise error
        rank, msg = failures[0]
        raise DSnoTDistributedError(
            f"DSnoT: rank {rank} failed while {what} ({msg}); this rank "
            f"({self.rank}) stops as well. Fix the error of rank {rank}"
        )

    def destroy(self):
        for group in {id(self.group): self.group, id(self.object_group): self.object_group}.values():
            try:
                dist.destroy_process_group(group)
            except Exception as err:  # noqa: BLE001 - cleanup only
                logger.debug(f"DSnoT: destroying a process group failed: {err}")


def assign_layers(
    costs: dict[T, float],
    loads: list[float],
    allowed: dict[T, Sequence[int]] | None = None,
) -> dict[T, int]:
    """
    Give every item (a layer) to one rank: greedy, the costliest item first, each
    to the rank with the least load so far (``loads``, one per rank, updated in
    place so that the balance carries over from one subgraph to the next), among
    the ranks ``allowed`` for the item (all if None). Ties go by the order of
    ``costs`` and the lowest rank, so every rank computes the same assignment.
    With more ranks than items some ranks get nothing.
    """
    order = sorted(enumerate(costs.items()), key=lambda item: (-item[1][1], item[0]))
    owners = {}
    for _, (item, cost) in order:
        ranks = range(len(loads)) if allowed is None else allowed[item]
        rank = min(ranks, key=lambda r: (loads[r], r))
        owners[item] = rank
        loads[rank] += cost
    return {item: owners[item] for item in costs}


def _digest(data: torch.Tensor) -> str:
    data = data.detach().contiguous().cpu()
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    raw = data.reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(raw.tobytes(), digest_size=16).hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """A digest of a tensor's exact bytes (with its dtype and shape)."""
    return f"{tensor.dtype}{list(tensor.shape)}:{_digest(tensor)}"


def mask_digest(weight: torch.Tensor) -> str:
    """A digest of a weight's zero mask (where it is exactly zero)."""
    return f"mask{list(weight.shape)}:{_digest(weight == 0)}"


def _shares_offload(module: torch.nn.Module) -> bool:
    """The module's weight is offloaded to storage shared by all ranks (shared CPU
    memory or disk files made by compressed-tensors in a distributed run)."""
    return isinstance(module._parameters, (DistributedCPUCache, DistributedDiskCache))


def receive_weight(module: torch.nn.Module, weight: torch.Tensor):
    """
    Write ``weight``, which another rank (the layer's owner) computed, wrote and
    broadcast, into this rank's copy of ``module``. If the offload is shared
    between ranks, the owner has written it already: only this rank's onloaded
    copy (a device copy, or one read from disk, kept while offloading is disabled)
    is refreshed. Otherwise this rank's copy is written as the owner's was.
    """
    if not _shares_offload(module):
        update_offload_parameter(module, "weight", weight)
        return
    cache = module._parameters
    with disable_onloading():
        offloaded = cache["weight"]
    onloaded = OffloadCache.keep_onloaded_values.get(offloaded)
    if onloaded is not None and onloaded.data_ptr() != offloaded.data_ptr():
        with torch.no_grad():
            onloaded.copy_(weight)
