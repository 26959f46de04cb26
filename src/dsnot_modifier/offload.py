"""
Weights of target layers that may be offloaded (to the cpu or to disk, by
compressed-tensors): where DSnoT keeps a layer's dense copy until its refinement,
how it writes the refined weight, and the check, before any pruning, that disk
offload folders can be written. One message names the fix for an unwritable folder.

Snapshots of a layer executed on CUDA and kept on the cpu go to pinned (page-locked)
host memory, copied without blocking the host if asked (see :func:`wait_for_snapshots`).
"""

from __future__ import annotations

import tempfile

import torch
from compressed_tensors.offload import get_offloaded_device, update_offload_parameter
from compressed_tensors.offload.cache import DiskCache

from dsnot_modifier.errors import DSnoTConfigError
from dsnot_modifier.upstream import offload_cache

__all__ = ["snapshot_weight", "wait_for_snapshots", "write_weight", "check_offload_writable",
           "offload_fix"]

#: per CUDA stream, an event recorded after its latest snapshot copied without blocking
_PENDING: dict = {}


def snapshot_weight(module: torch.nn.Module, where: str = "auto", name: str | None = None,
                    non_blocking: bool = False) -> torch.Tensor:
    """
    A copy of the layer's (onloaded) weight: on its execution device (``execution``),
    on the cpu (``cpu``), or (``auto``) on the offload device of a layer offloaded to
    the cpu, on the cpu for one offloaded to disk, else on the execution device.

    A copy from CUDA to the cpu goes to pinned host memory; with ``non_blocking`` it
    does not wait for the device, and may still be under way when this returns:
    copies back to that device are ordered after it (same stream), but reading it on
    the host needs :func:`wait_for_snapshots` first.

    :param name: the layer's name, for the error
    :raises DSnoTConfigError: for a weight on the meta device (not loaded, or left
        there by accelerate's own offloading hooks), naming the fix
    """
    weight = module.weight.detach()
    if weight.device.type == "meta":
        raise DSnoTConfigError(_meta_weight_message(module, name))
    device = _snapshot_device(module, weight.device, where)
    if _pinned_copy(weight.device, device):
        return _to_pinned_host(weight, non_blocking)
    return weight.to(device, copy=True)


def wait_for_snapshots():
    """Wait until every snapshot copied without blocking is complete (before reading
    such snapshots on the host; one wait per stream that copied)."""
    while _PENDING:
        _PENDING.popitem()[1].synchronize()


def _snapshot_device(module: torch.nn.Module, execution: torch.device, where: str) -> torch.device:
    if where == "cpu":
        return torch.device("cpu")
    if where == "auto":
        offloaded = get_offloaded_device(module)
        if offloaded == "disk":
            return torch.device("cpu")
        if offloaded is not None and torch.device(offloaded) != execution:
            return torch.device(offloaded)
    return execution


def _pinned_copy(source: torch.device, target: torch.device) -> bool:
    """Whether a copy from ``source`` to ``target`` goes to pinned host memory."""
    return source.type == "cuda" and target.type == "cpu"


def _to_pinned_host(weight: torch.Tensor, non_blocking: bool) -> torch.Tensor:
    host = _pinned_empty(weight)
    host.copy_(weight, non_blocking=non_blocking)
    if non_blocking:
        stream, event = _copy_event(weight)
        _PENDING[stream] = event
    return host


def _pinned_empty(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)


def _copy_event(weight: torch.Tensor):
    """The current stream of the weight's device and an event recorded on it after the
    copy; the weight's memory is not reused before the stream gets there."""
    stream = torch.cuda.current_stream(weight.device)
    weight.record_stream(stream)
    event = torch.cuda.Event()
    event.record(stream)
    return stream, event


def _meta_weight_message(module: torch.nn.Module, name: str | None) -> str:
    layer = name or type(module).__name__
    if getattr(module, "_hf_hook", None) is not None:
        return (
            f"the weight of {layer} is on the meta device: the layer is still driven by "
            "accelerate's own offloading hooks (_hf_hook), which give it its weight only "
            "inside its forward, so DSnoT cannot read it. Use llm-compressor's offloading "
            "instead, whose layers give their weight whenever it is read "
            "(align_module_device): convert the model with "
            "compressed_tensors.offload.from_accelerate(model) before oneshot (oneshot does "
            "it only for a model loaded with a device_map), or load it inside "
            "compressed_tensors.offload.load_offloaded_model(); or remove accelerate's hooks "
            "(accelerate.hooks.remove_hook_from_module(model, recurse=True)) and put the "
            "model on a device"
        )
    return (
        f"the weight of {layer} is on the meta device (it was never loaded): load the "
        "model's weights before running DSnoT, or load it with llm-compressor's offloading "
        "(compressed_tensors.offload.load_offloaded_model)"
    )


def write_weight(module: torch.nn.Module, name: str, weight: torch.Tensor):
    """Write ``weight`` into ``module`` (and its offload); a failure names the fix."""
    try:
        update_offload_parameter(module, "weight", weight)
    except OSError as err:
        where = getattr(offload_cache(module), "offload_dir", None)
        fix = (
            offload_fix(where)
            if where is not None
            else "check the memory or disk the model is offloaded to"
        )
        raise DSnoTConfigError(
            f"writing the refined weight of {name} failed ({err}); {fix}"
        ) from err


def offload_fix(directory) -> str:
    """What to do when a layer offloaded to disk in ``directory`` cannot be written."""
    return (
        f"the layer is offloaded to disk in {directory}: make that directory writable, "
        "with room for the model, or load the model with another, writable "
        "offload_folder (from_pretrained(..., offload_folder=...))"
    )


def check_offload_writable(names: dict[torch.nn.Module, str]):
    """DSnoT (and a pruner before it) write weights offloaded to disk in place."""
    dirs: dict[str, list[str]] = {}
    for module, name in names.items():
        cache = offload_cache(module)
        if isinstance(cache, DiskCache):
            dirs.setdefault(str(cache.offload_dir), []).append(name)
    for directory, layers in dirs.items():
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".dsnot-probe-"):
                pass
        except OSError as err:
            raise DSnoTConfigError(
                f"{len(layers)} target layers (e.g. {layers[0]}) are offloaded to disk in "
                f"{directory}, which cannot be written ({err.strerror or err}); "
                + offload_fix(directory)
            ) from None
