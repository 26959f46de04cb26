"""
The per-layer report of a DSnoT run: swaps made, error before and after, and
the structure kept; as Python objects, as log lines, and as JSON next to a
saved checkpoint (written atomically, and by ``model.save_pretrained`` once
:func:`attach_report` has hooked it).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from loguru import logger

from dsnot_modifier.digest import mask_digest
from dsnot_modifier.upstream import is_compressor_save, mark_compressor_save

__all__ = [
    "LayerReport",
    "SkippedLayer",
    "DSnoTReport",
    "REPORT_FILE_NAME",
    "attach_report",
    "read_report",
    "write_json",
    "umask_permissions",
]

REPORT_FILE_NAME = "dsnot_report.json"


@dataclass
class LayerReport:
    """
    What DSnoT did to one layer.

    :param name: module name in the model
    :param shape: ``[rows, cols]`` of the weight
    :param structure: ``"unstructured"`` or ``"N:M"``
    :param objective: ``"gram"`` or ``"mean"``
    :param initial: where the mask came from (``"pruner"``, ``"wanda"``, ``"magnitude"``)
    :param zeros: number of zero weights (the same before and after)
    :param sparsity: ``zeros / (rows * cols)``
    :param swaps: swaps made (one grow and one prune each)
    :param rows_changed: rows with at least one swap
    :param error_before: the objective's error summed over rows before refinement
        (``mean``: Σ|r_i| with r_i the expected output error of row i;
        ``gram``: Σ e_iᵀ H e_i, the expected squared output error)
    :param error_after: the same after refinement
    :param seconds: time spent refining the layer (of layers refined stacked in one
        call, see :mod:`dsnot_modifier.stacking`: its share of the call's time, by rows)
    :param pruner_structure: the ``mask_structure`` the pruner was given (``"2:4"``,
        ``"0:0"``); None for standalone DSnoT or a report made before it was recorded
    :param mask_digest: a digest of the layer's zero mask after refinement (see
        :func:`dsnot_modifier.digest.mask_digest`), checked by ``dsnot verify``
    :param update_error_before: with ``update_weights``: the layer's squared output error
        ``Σ e_iᵀ H e_i`` after the swaps, before the weight update (None without it)
    :param update_error_after: the same after the weight update
    :param update_reason: why the update left the layer as the swaps did (None if it ran)
    :param update_seconds: the time of the weight update (part of ``seconds``)
    """

    name: str
    shape: list[int]
    structure: str
    objective: str
    initial: str
    zeros: int
    sparsity: float
    swaps: int
    rows_changed: int
    error_before: float
    error_after: float
    seconds: float
    pruner_structure: str | None = None
    mask_digest: str | None = None
    update_error_before: float | None = None
    update_error_after: float | None = None
    update_reason: str | None = None
    update_seconds: float | None = None

    @classmethod
    def of(cls, result, *, name: str, structure: str, objective: str, initial: str,
           seconds: float, pruner_structure: str | None = None, update=None) -> "LayerReport":
        """
        The report of a layer refined into ``result`` (a :class:`~dsnot_modifier.swaps.RefineResult`),
        then updated into ``update`` (an :class:`~dsnot_modifier.update.UpdateResult`), if given.
        """
        weight = result.weight if update is None else update.weight
        zeros = int((weight == 0).sum())
        return cls(
            name=name,
            shape=list(weight.shape),
            structure=structure,
            objective=objective,
            initial=initial,
            zeros=zeros,
            sparsity=zeros / weight.numel(),
            swaps=result.swaps,
            rows_changed=result.rows_changed,
            error_before=result.error_before,
            error_after=result.error_after,
            seconds=seconds,
            pruner_structure=pruner_structure,
            mask_digest=mask_digest(weight),
            update_error_before=None if update is None else update.error_before,
            update_error_after=None if update is None else update.error_after,
            update_reason=None if update is None else update.reason,
            update_seconds=None if update is None else update.seconds,
        )

    @property
    def error_change(self) -> float:
        """Relative change of the error, ``after / before - 1`` (0 if before is 0)."""
        if self.error_before == 0:
            return 0.0
        return self.error_after / self.error_before - 1.0

    def line(self) -> str:
        if self.update_reason is not None:
            update = f", weights not updated ({self.update_reason})"
        elif self.update_error_after is not None:
            update = (f", weight update: gram error {self.update_error_before:.4g} -> "
                      f"{self.update_error_after:.4g}")
        else:
            update = ""
        return (
            f"{self.name}: {self.swaps} swaps in {self.rows_changed}/{self.shape[0]} rows, "
            f"{self.structure} at {self.sparsity:.1%} sparsity, {self.objective} error "
            f"{self.error_before:.4g} -> {self.error_after:.4g} "
            f"({self.error_change:+.1%}){update}, {self.seconds:.2f}s"
        )


@dataclass
class SkippedLayer:
    """
    A target layer DSnoT left exactly as it was, and why.

    :param name: module name in the model
    :param reason: ``"never called"`` (no forward during calibration: a vision tower
        under text data, an expert no token reached), ``"not pruned"`` (the pruner
        left it dense or does not target it), ``"few tokens"`` (fewer calibration
        tokens than ``min_tokens``: left as the pruner left it)
    :param tokens: calibration tokens the layer saw (None if never called)
    :param detail: a sentence for people
    """

    name: str
    reason: str
    tokens: int | None = None
    detail: str = ""


@dataclass
class DSnoTReport:
    """All layers of one run, with the settings used, and the layers left alone."""

    params: dict = field(default_factory=dict)
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)

    def skipped_names(self, reason: str) -> list[str]:
        return [s.name for s in self.skipped if s.reason == reason]

    def add(self, entry: "LayerReport | SkippedLayer | None", log: str | None = "DSnoT"):
        """Add a refined layer (logged after ``log``, unless None) or one left alone."""
        if isinstance(entry, SkippedLayer):
            self.skipped.append(entry)
        elif entry is not None:
            self.layers.append(entry)
            if log is not None:
                logger.info(f"{log} {entry.line()}")

    def summary(self) -> dict:
        n = len(self.layers)
        changes = [layer.error_change for layer in self.layers]
        summary = {
            "layers": n,
            "swaps": sum(layer.swaps for layer in self.layers),
            "mean_error_change": sum(changes) / n if n else 0.0,
            "layers_error_lowered": sum(c < 0 for c in changes),
            "seconds": sum(layer.seconds for layer in self.layers),
        }
        updated = [layer for layer in self.layers if layer.update_error_after is not None]
        if updated:  # with update_weights: the gram error's change by the update
            summary["layers_updated"] = sum(layer.update_reason is None for layer in updated)
            summary["update_seconds"] = sum(layer.update_seconds or 0.0 for layer in updated)
            summary["mean_update_error_change"] = sum(
                layer.update_error_after / layer.update_error_before - 1
                for layer in updated if layer.update_error_before) / len(updated)
        return summary

    def summary_line(self) -> str:
        s = self.summary()
        return (
            f"DSnoT refined {s['layers']} layers with {s['swaps']} swaps in "
            f"{s['seconds']:.1f}s; error lowered in {s['layers_error_lowered']}/{s['layers']} "
            f"layers, by {-s['mean_error_change']:.1%} on average"
        )

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "summary": self.summary(),
            "layers": [asdict(layer) for layer in self.layers],
            "skipped": [asdict(layer) for layer in self.skipped],
        }

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``dsnot_report.json`` into ``directory`` (atomically) and return its path."""
        path = os.path.join(directory, REPORT_FILE_NAME)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DSnoTReport":
        """The report at ``path`` (the JSON file, or the directory that holds it)."""
        data = read_report(path)
        return cls(
            params=data["params"],
            layers=[LayerReport(**x) for x in data["layers"]],
            skipped=[SkippedLayer(**x) for x in data.get("skipped", [])],
        )


def umask_permissions(path: str | os.PathLike):
    """
    Give ``path`` the permissions a plain ``open`` or ``mkdir`` would (0666 or 0777
    less the umask): temporary files and directories are made private (0600, 0700),
    and a checkpoint must be readable by whoever reads its neighbours (a vLLM server
    running as another user).
    """
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def _umask() -> int:
    """The process's umask: read where Linux shows it, else set and put back at once
    (the only portable way to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data) -> str:
    """
    Write ``data`` as JSON to ``path`` atomically (a temporary file, then a rename),
    with the permissions the umask gives.
    """
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        umask_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return str(path)


def read_report(path: str | os.PathLike) -> dict:
    """
    The JSON of a DSnoT report: ``path`` is the file or the directory holding it.

    :raises FileNotFoundError: if there is no report there
    :raises ValueError: if it is not JSON, or not a report (``layers``, each with at
        least ``name``, ``shape``, ``structure`` and ``zeros``); the message names
        the error found
    """
    if os.path.isdir(path):
        path = os.path.join(path, REPORT_FILE_NAME)
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
        for layer in data["layers"]:
            for key in ("name", "shape", "structure", "zeros"):
                layer[key]  # noqa: B018  (must be there)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{type(err).__name__}: {err}") from None
    return data


def attach_report(model: torch.nn.Module, report: DSnoTReport):
    """
    Make ``model.save_pretrained(dir)`` also write ``dsnot_report.json`` into ``dir``
    (wrapping whatever ``save_pretrained`` the model has, llm-compressor's included).
    A second DSnoT run on the same model replaces the report. Outside oneshot (whose
    pre-processing wraps ``save_pretrained`` first, :func:`.upstream.is_compressor_save`)
    nothing is wrapped: the report is ``DSnoTModifier.report`` and
    ``report.save(dir)`` writes it.
    """
    from compressed_tensors.distributed import is_source_process

    save = model.save_pretrained
    if getattr(save, "_dsnot_report", None) is not None:
        save._dsnot_report[0] = report
        return
    if not is_compressor_save(save):
        logger.info("DSnoT: save the report with DSnoTModifier.report.save(directory)")
        return
    holder = [report]

    def save_pretrained_with_dsnot_report(save_directory, *args, **kwargs):
        started = time.time()
        result = save(save_directory, *args, **kwargs)
        if is_source_process():  # under torchrun, rank 0 writes (as it saves the model)
            path = holder[0].save(save_directory)
            logger.info(f"DSnoT report written to {path}")
            # the files this save wrote (transformers makes model.safetensors private)
            for entry in os.scandir(save_directory):
                if entry.is_file() and entry.stat().st_mtime >= started - 1:
                    umask_permissions(entry.path)
        return result

    save_pretrained_with_dsnot_report._dsnot_report = holder
    model.save_pretrained = mark_compressor_save(save_pretrained_with_dsnot_report)
