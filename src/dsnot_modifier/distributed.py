"""
DSnoT under ``torchrun``: the distributed epoch (:class:`RankWork`: describe,
agree, sum the statistics, assign, refine or receive, verify), and its
parts: collectives with a timeout, layer assignment, digests that let the ranks
check they agree, and writing a weight received from another rank into this
rank's (possibly offloaded) copy of a layer.

Plain ``torch.distributed`` plus compressed-tensors' offload caches, as
llm-compressor 0.14 uses them: in a distributed run, a model offloaded to CPU
memory (which the sequential pipeline does to every model) lives in *shared*
memory, one copy for all the ranks of a host, and a disk offload is one set of
files; only a layer's owner writes those, the others refresh their onloaded copy.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Hashable, Sequence, TypeVar

import torch
import torch.distributed as dist
from compressed_tensors.distributed import is_distributed
from compressed_tensors.offload import disable_onloading, update_offload_parameter
from compressed_tensors.utils import align_module_device
from loguru import logger

from dsnot_modifier.errors import FIX_DISTRIBUTED, DSnoTConfigError, DSnoTDistributedError
from dsnot_modifier.digest import tensor_digest, tensor_digests
from dsnot_modifier.report import LayerReport, SkippedLayer
from dsnot_modifier.stats import InputStats, LayerState
from dsnot_modifier.upstream import offload_cache, onloaded_copy, shares_offload


__all__ = [
    "DSnoTDistributedError",
    "RankGroup",
    "world_size",
    "make_group",
    "RankWork",
    "describe_layers",
    "agreed_layers",
    "layer_cost",
    "assign_layers",
    "receive_weight",
]

T = TypeVar("T", bound=Hashable)

#: seconds a DSnoT collective waits for the other ranks by default
DEFAULT_TIMEOUT = 1800.0


def world_size() -> int:
    """Number of ranks of the default process group (1 if not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


class RankGroup:
    """
    DSnoT's own process group: the ranks of the default group, with a timeout on
    every collective, so that a rank that died or hangs makes the others fail
    with :class:`DSnoTDistributedError` instead of waiting forever. Tensors go
    through a group of the default backend (NCCL on GPUs, Gloo on CPUs), Python
    objects through a Gloo group.

    Under NCCL, the tensor collectives are waited on from the host with the same
    timeout (``Work.wait``), so that a dead peer raises here too. Where NCCL's own
    watchdog sees the timeout first, it ends the process instead (torch's
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default): the job stops within the
    timeout all the same, with NCCL's message in the log rather than this one (see
    docs/distributed-and-offload.md).

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

    def broadcast_(self, tensor: torch.Tensor, src: int, what: str):
        """Send ``tensor`` from rank ``src`` into ``tensor`` of every other rank."""
        def broadcast():
            work = dist.broadcast(tensor, src=src, group=self.group, async_op=True)
            work.wait(timedelta(seconds=self.timeout))

        self.run(what, broadcast)

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


def make_group(timeout: float, num_layers: int) -> RankGroup:
    """DSnoT's :class:`RankGroup` for a run over ``num_layers`` target layers, logged."""
    group = RankGroup(timeout)
    logger.info(
        f"DSnoT: distributed over {group.world_size} ranks (this is rank "
        f"{group.rank}); statistics are summed over the ranks, each layer is "
        "refined by one rank and broadcast"
    )
    if group.world_size > num_layers:
        logger.warning(
            f"DSnoT: {group.world_size} ranks but only {num_layers} target "
            "layers: some ranks will refine nothing (they still calibrate their share "
            "of the data)"
        )
    return group


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

    This is compressed-tensors' ``greedy_bin_packing`` (which GPTQModifier uses)
    with two things it lacks: the balance carried over between subgraphs (GPTQ
    packs each subgraph from empty bins, so with fewer layers than ranks rank 0
    would get the first layer of every subgraph) and the ranks allowed per layer
    (a layer only some ranks ran, e.g. an expert, must go to one of them).
    """
    order = sorted(enumerate(costs.items()), key=lambda item: (-item[1][1], item[0]))
    owners = {}
    for _, (item, cost) in order:
        ranks = range(len(loads)) if allowed is None else allowed[item]
        rank = min(ranks, key=lambda r: (loads[r], r))
        owners[item] = rank
        loads[rank] += cost
    return {item: owners[item] for item in costs}


def receive_weight(module: torch.nn.Module, weight: torch.Tensor):
    """
    Write ``weight``, which another rank (the layer's owner) computed, wrote and
    broadcast, into this rank's copy of ``module``. If the offload is shared
    between ranks, the owner has written it already: only this rank's onloaded
    copy (a device copy, or one read from disk, kept while offloading is disabled)
    is refreshed. Otherwise this rank's copy is written as the owner's was.
    """
    if not shares_offload(module):
        update_offload_parameter(module, "weight", weight)
        return
    with disable_onloading():
        offloaded = offload_cache(module)["weight"]
    onloaded = onloaded_copy(offloaded)
    if onloaded is not None and onloaded.data_ptr() != offloaded.data_ptr():
        with torch.no_grad():
            onloaded.copy_(weight)


# --------------------------------------------------------------- the epoch

#: refine a rank's layers: module -> its state (dense weight, input statistics; the
#: dict is emptied as the work goes) -> module -> its report (and the refined weight
#: written into the module) or the reason it was left as it is (a SkippedLayer)
Refine = Callable[[dict[torch.nn.Module, LayerState]], "dict[torch.nn.Module, LayerReport | SkippedLayer]"]


class RankWork:
    """
    DSnoT's work under ``torchrun`` for one calibration: its process group, the work
    each rank has done so far (the next subgraph's layers balance it) and the rank
    that refined each layer. One subgraph's refinement (:meth:`refine`), every rank
    calling the same collectives in the same order, a failure on one rank reaching
    all of them:

    1. every rank describes the layers it calibrated (digests of the dense snapshot,
       of the current weight and of its zero mask); all must agree;
    2. the statistics are summed over the ranks (all_reduce, one per group of layers
       sharing an input; a rank that never ran a layer adds zeros);
    3. the layers to refine go to the ranks, greedy by cost, balanced with the
       subgraphs before, each to a rank that calibrated it (:func:`assign_layers`);
    4. each rank refines its layers and writes them (stacked, :mod:`.stacking`: each
       layer gets the result it would get alone, so neither the assignment nor the
       weights depend on the stacking); failures are shared;
    5. the owners broadcast the refined weights, the others write them in, and all
       ranks check that they hold the same refined weights.
    """

    def __init__(self, group: RankGroup):
        self.group = group
        self.loads = [0.0] * group.world_size
        self.owners: dict[str, int] = {}

    def refine(
        self,
        layers: dict[torch.nn.Module, LayerState],
        names: dict[torch.nn.Module, str],
        refine: Refine,
        new_stats: Callable[[torch.nn.Module, int], InputStats],
        *,
        objective: str,
        refine_all: bool = False,
        track: Callable[[], None] = lambda: None,
    ) -> dict[str, tuple[LayerReport | SkippedLayer, int]]:
        """
        Refine one subgraph's layers over the ranks.

        :param layers: this rank's calibrated layers of the subgraph, in forward order;
            emptied (their state is freed as the work goes)
        :param names: module -> name, for every target layer of the model
        :param refine: refines this rank's layers (see :data:`Refine`)
        :param new_stats: empty statistics for a layer this rank never ran (module, columns)
        :param objective: the objective, for the cost of a layer
        :param refine_all: refine the layers no earlier pruner pruned too (``initial``)
        :param track: called once the statistics of every layer are held (memory accounting)
        :return: name -> (report, owner rank) of every layer refined or left alone
            (a SkippedLayer, not broadcast), in forward order
        """
        group = self.group
        by_name = {name: module for module, name in names.items()}
        agreed, seen_by = self._agreed(layers, names)
        todo = [name for name, entry in agreed.items() if entry["pruned"] or refine_all]
        costs = {name: layer_cost(agreed[name]["shape"], objective) for name in todo}
        owners = assign_layers(costs, self.loads, allowed=seen_by)
        mine = [name for name in todo if owners[name] == group.rank]
        logger.debug(f"DSnoT rank {group.rank} refines {mine or 'no layer of this subgraph'}")
        own = _summed_statistics(group, agreed, layers, by_name, new_stats, todo, mine, track)

        reports, error = {}, None
        try:
            reports = {names[module]: report for module, report in refine(own).items()}
        except Exception as err:  # noqa: BLE001 - shared with the other ranks below
            error = err
        own.clear()
        group.agree(error, "refining its layers")
        for gathered in group.all_gather_object(reports, "sharing the layer reports"):
            reports.update(gathered)

        # the layers refined (a layer left alone, e.g. with too few tokens, is as it was)
        written = [name for name in todo if isinstance(reports.get(name), LayerReport)]
        _share_weights(group, {name: by_name[name] for name in written}, owners)
        self.owners.update({name: owners[name] for name in written})
        return {name: (reports[name], owners[name]) for name in todo if name in reports}

    def _agreed(self, layers, names) -> tuple[dict, dict]:
        """The layers of the subgraph as all ranks agree on them (:func:`agreed_layers`);
        at the first subgraph, a warning if every rank saw the same inputs."""
        group = self.group
        gathered = group.all_gather_object(
            describe_layers(layers, names), "comparing the layers the ranks calibrated"
        )
        if not self.owners and gathered[0] and all(
            [e["inputs"] for e in summary] == [e["inputs"] for e in gathered[0]]
            for summary in gathered
        ):
            logger.warning(
                f"DSnoT: all {group.world_size} ranks calibrated on exactly the same inputs, "
                "so the run uses 1/world_size of the samples asked for. llm-compressor 0.14 "
                "hands every rank the same first samples when all ranks pass the same "
                "dataset: pass each rank its own shard instead (e.g. dataset[start:end] with "
                "start, end = n*rank//world, n*(rank+1)//world)"
            )
        return agreed_layers(gathered)

    def destroy(self):
        """Close the process group (the owners stay readable)."""
        self.group.destroy()


def _summed_statistics(group, agreed, layers, by_name, new_stats, todo, mine, track) -> dict:
    """
    The statistics of the layers to refine summed over the ranks; this rank's own
    layers (``mine``) with their dense weight and summed statistics. Empties ``layers``.
    """
    # one set of statistics per group of layers sharing an input (empty if this rank
    # never ran it: it adds zeros to the sum)
    group_stats: dict[str, InputStats] = {}
    for name, entry in agreed.items():
        module = by_name[name]
        if module not in layers:
            if entry["leader"] not in group_stats:
                group_stats[entry["leader"]] = new_stats(module, entry["columns"])
            layers[module] = LayerState(stats=group_stats[entry["leader"]])
        group_stats.setdefault(entry["leader"], layers[module].stats)
    track()
    needed = {agreed[name]["leader"] for name in todo}
    for leader, stats in group_stats.items():
        if leader in needed:
            group.run(f"summing the statistics of {leader}", stats.all_reduce_, group.group)
    own = {by_name[name]: LayerState(dense=layers[by_name[name]].dense,
                                     stats=group_stats[agreed[name]["leader"]]) for name in mine}
    layers.clear()
    return own


def _share_weights(group: RankGroup, written: dict[str, torch.nn.Module], owners: dict[str, int]):
    """The owners broadcast the refined weights; then every rank checks it holds the same."""
    for name, module in written.items():
        _receive_or_send(group, module, name, owners[name])
    digests = {}
    for name, module in written.items():
        with align_module_device(module):
            digests[name] = tensor_digest(module.weight)
    gathered = group.all_gather_object(digests, "comparing the refined weights")
    differ = [name for name in written if len({g[name] for g in gathered}) > 1]
    if differ:
        raise DSnoTDistributedError(
            f"after DSnoT the ranks hold different weights of {differ}: the broadcast "
            "of the refined weights did not reach every rank's copy of the model. "
            "Please report this with the way the model was loaded and offloaded"
        )


def describe_layers(layers: dict[torch.nn.Module, LayerState], names: dict) -> list[dict]:
    """This rank's view of the layers it calibrated in this subgraph, in forward order."""
    leaders: dict[int, str] = {}
    summary = []
    for module, state in layers.items():
        dense, stats = state.dense, state.stats
        with torch.no_grad(), align_module_device(module):
            current = module.weight.detach()
            # digests on the tensors' devices, one host sync for those on one device
            zero = current == 0
            digests = tensor_digests([dense, current, *stats.tensors()], masks=[zero])
            summary.append(dict(
                name=names[module],
                leader=leaders.setdefault(id(stats), names[module]),
                shape=list(dense.shape),
                columns=stats.num_columns,
                dense=digests[0],
                current=digests[1],
                mask=digests[-1],
                pruned=bool((zero & (dense.to(current.device) != 0)).any()),
                inputs="|".join(digests[2:-1]),
            ))
    return summary


def agreed_layers(gathered: list[list[dict]]) -> tuple[dict, dict]:
    """
    The union of the layers the ranks calibrated (rank 0's order first) and the
    ranks that calibrated each; raises on every rank alike if two ranks saw
    different weights, masks or statistics sharing for a layer.
    """
    layers: dict[str, dict] = {}
    seen_by: dict[str, list[int]] = {}
    differences = []
    for rank, summary in enumerate(gathered):
        for entry in summary:
            name = entry["name"]
            if name not in layers:
                layers[name], seen_by[name] = entry, [rank]
                continue
            first = seen_by[name][0]
            seen_by[name].append(rank)
            for key in ("shape", "leader", "dense", "mask", "current"):
                if entry[key] != layers[name][key]:
                    differences.append((key, name, first, rank))
                    break
    if not differences:
        return layers, seen_by
    key, name, first, rank = differences[0]
    where = f"{len(differences)} layer(s), e.g. {name} on ranks {first} and {rank}"
    if key == "mask":
        raise DSnoTConfigError(
            f"the ranks hold different pruning masks before DSnoT refines them ({where}): "
            "the masks were made on each rank from its own share of the data. Instead, "
            + FIX_DISTRIBUTED
        )
    if key in ("dense", "current"):
        raise DSnoTConfigError(
            f"the ranks hold different weights ({where}): every rank must load the same "
            "model (compressed_tensors.offload.load_offloaded_model shares rank 0's) and "
            "no other modifier may change them differently on different ranks"
        )
    raise DSnoTDistributedError(
        f"the ranks ran the layers differently ({key} differs for {where}); run the "
        "same model and recipe on every rank"
    )


def layer_cost(shape: Sequence[int], objective: str) -> float:
    """The relative cost of refining a ``[rows, cols]`` layer (``gram``: quadratic in cols)."""
    rows, cols = shape
    return float(rows) * cols * (cols if objective == "gram" else 1)


def _receive_or_send(group: RankGroup, module: torch.nn.Module, name: str, owner: int):
    with torch.no_grad(), align_module_device(module):
        weight = module.weight.detach()
        if group.rank == owner:
            group.broadcast_(weight.contiguous(), owner, f"broadcasting {name}")
            return
        buffer = torch.empty_like(weight, memory_format=torch.contiguous_format)
        group.broadcast_(buffer, owner, f"receiving {name} from rank {owner}")
        receive_weight(module, buffer)
