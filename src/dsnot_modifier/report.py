"""
The per-layer report of a DSnoT run: swaps made, error before and after, and
the structure kept; as Python objects, as log lines, and as JSON next to a
saved checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field

__all__ = ["LayerReport", "SkippedLayer", "DSnoTReport", "REPORT_FILE_NAME"]

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
    :param seconds: time spent refining the layer
    :param pruner_structure: the ``mask_structure`` the pruner was given (``"2:4"``,
        ``"0:0"``); None for standalone DSnoT or a report made before it was recorded
    :param mask_digest: a digest of the layer's zero mask after refinement (see
        :func:`dsnot_modifier.distributed.mask_digest`), checked by ``dsnot verify``
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

    @property
    def error_change(self) -> float:
        """Relative change of the error, ``after / before - 1`` (0 if before is 0)."""
        if self.error_before == 0:
            return 0.0
        return self.error_after / self.error_before - 1.0

    def line(self) -> str:
        return (
            f"{self.name}: {self.swaps} swaps in {self.rows_changed}/{self.shape[0]} rows, "
            f"{self.structure} at {self.sparsity:.1%} sparsity, {self.objective} error "
            f"{self.error_before:.4g} -> {self.error_after:.4g} "
            f"({self.error_change:+.1%}), {self.seconds:.2f}s"
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

    def summary(self) -> dict:
        n = len(self.layers)
        changes = [layer.error_change for layer in self.layers]
        return {
            "layers": n,
            "swaps": sum(layer.swaps for layer in self.layers),
            "mean_error_change": sum(changes) / n if n else 0.0,
            "layers_error_lowered": sum(c < 0 for c in changes),
            "seconds": sum(layer.seconds for layer in self.layers),
        }

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
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".dsnot_report.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DSnoTReport":
        if os.path.isdir(path):
            path = os.path.join(path, REPORT_FILE_NAME)
        with open(path) as f:
            data = json.load(f)
        return cls(
            params=data["params"],
            layers=[LayerReport(**x) for x in data["layers"]],
            skipped=[SkippedLayer(**x) for x in data.get("skipped", [])],
        )
