"""
Weights of target layers that may be offloaded (to the cpu or to disk, by
compressed-tensors): where DSnoT keeps a layer's dense copy until its refinement,
how it writes the refined weight, and the check, before any pruning, that disk
offload folders can be written. One message names the fix for an unwritable folder.
"""

from __future__ import annotations

import tempfile

import torch
from compressed_tensors.offload import get_offloaded_device, update_offload_parameter
from compressed_tensors.offload.cache import DiskCache

from dsnot_modifier.errors import DSnoTConfigError

__all__ = ["snapshot_weight", "write_weight", "check_offload_writable", "offload_fix"]


def snapshot_weight(module: torch.nn.Module, where: str = "auto") -> torch.Tensor:
    """
    A copy of the layer's (onloaded) weight: on its execution device (``execution``),
    on the cpu (``cpu``), or (``auto``) on the offload device of a layer offloaded to
    the cpu, on the cpu for one offloaded to disk, else on the execution device.
    """
    weight = module.weight.detach()
    device = weight.device
    if where == "cpu":
        device = torch.device("cpu")
    elif where == "auto":
        offloaded = get_offloaded_device(module)
        if offloaded == "disk":
            device = torch.device("cpu")
        elif offloaded is not None and torch.device(offloaded) != weight.device:
            device = torch.device(offloaded)
    return weight.to(device, copy=True)


def write_weight(module: torch.nn.Module, name: str, weight: torch.Tensor):
    """Write ``weight`` into ``module`` (and its offload); a failure names the fix."""
    try:
        update_offload_parameter(module, "weight", weight)
    except OSError as err:
        where = getattr(module._parameters, "offload_dir", None)
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
        cache = module._parameters
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
