"""
OWL's layer-wise sparsity (Outlier Weighed Layerwise sparsity, Yin et al., ICML 2024,
arXiv 2310.05175) in plain torch: outlier ratios, the layer sparsities, and the
per-row rounding that keeps a per-row pruner (Wanda) at the overall target.
:mod:`dsnot_modifier.owl_modifier` is the llm-compressor glue.

The rule, for decoder layers l = 1..L and a target sparsity S:

- D_l: the share of layer l's prunable weights (all its pruned Linear layers
  together) whose Wanda score ``|W_ij|·sqrt(sqnorm_j)`` exceeds ``M`` times the
  mean score of the layer (``sqnorm_j``: mean of x_j² over the calibration tokens
  of the dense model);
- the D_l scaled linearly onto [0, 2λ] (the smallest to 0, the largest to 2λ);
- layer l pruned at ``S − (scaled D_l − mean of the scaled D)``.

Layers of different sizes (not the case in the usual decoders): all layer
sparsities are shifted by one constant so that the size-weighted mean is S, so
the overall sparsity stays S; for equal sizes the shift is 0 (OWL exactly).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable, Sequence

import torch

__all__ = [
    "OWLError",
    "InputSqnorms",
    "outlier_ratio",
    "score_sum",
    "count_above",
    "owl_offsets",
    "owl_sparsities",
    "max_lambda",
    "per_row_sparsities",
    "per_row_zeros",
]

#: weights scored at once when counting outliers (bounds the temporary memory)
_CHUNK = 1 << 22


class OWLError(ValueError):
    """OWL's settings cannot give valid layer sparsities; the message names the bound."""


class InputSqnorms:
    """
    OWL's input statistics: per layer name, the sum of x_j² over the tokens seen (float64)
    and their count. ``add`` takes a layer's input (any leading dimensions);
    ``mean(name)`` is ``sqnorm``, the mean of x_j² over the tokens.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        sums = x.to(torch.float32).square().sum(0).to(torch.float64)
        if name in self.sums:
            self.sums[name] += sums
            self.tokens[name] += x.shape[0]
        else:
            self.sums[name], self.tokens[name] = sums, x.shape[0]

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[name] / max(self.tokens[name], 1)

    def all_reduce(self, names: Sequence[str]) -> None:
        """Sums over the ranks of torch.distributed (every rank must pass the same names in the same order)."""
        for name in names:
            sums = self.sums[name]
            count = torch.tensor([float(self.tokens[name])], dtype=torch.float64, device=sums.device)
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(count)
            self.tokens[name] = int(count.item())

    def clear(self) -> None:
        self.sums.clear()
        self.tokens.clear()


def _score_chunks(weights: Sequence[torch.Tensor], sqnorms: Sequence[torch.Tensor]):
    for weight, sqnorm in zip(weights, sqnorms):
        if weight.dim() != 2 or sqnorm.shape != (weight.shape[1],):
            raise ValueError(
                f"outlier_ratio: a weight of shape {list(weight.shape)} needs a sqnorm of "
                f"{weight.shape[-1]} columns, got {list(sqnorm.shape)}"
            )
        scale = sqnorm.to(weight.device, torch.float32).clamp_min(0).sqrt()
        rows = max(1, _CHUNK // max(weight.shape[1], 1))
        for start in range(0, weight.shape[0], rows):
            yield weight[start : start + rows].to(torch.float32).abs() * scale


def score_sum(weight: torch.Tensor, sqnorm: torch.Tensor) -> tuple[float, int]:
    """The sum of one Linear weight's Wanda scores ``|W_ij|·sqrt(sqnorm_j)``, and their number."""
    total = 0.0
    for scores in _score_chunks([weight], [sqnorm]):
        total += float(scores.sum(dtype=torch.float64))
    return total, weight.numel()


def count_above(weight: torch.Tensor, sqnorm: torch.Tensor, threshold: float) -> int:
    """How many of one Linear weight's Wanda scores are above ``threshold``."""
    return sum(int((scores > threshold).sum()) for scores in _score_chunks([weight], [sqnorm]))


def outlier_ratio(
    weights: Sequence[torch.Tensor], sqnorms: Sequence[torch.Tensor], m: float
) -> float:
    """
    OWL's D of one decoder layer: the share of all the entries of ``weights`` (the
    layer's pruned Linear weights, ``[rows, cols]`` each) whose Wanda score
    ``|W_ij|·sqrt(sqnorms[k][j])`` is above ``m`` times the mean score over all of them.
    Weights may also be callables returning the weight (one Linear in memory at a time).
    """
    if m <= 0:
        raise OWLError(f"OWL's M must be > 0 (e.g. 5), got {m}")
    get = [w if callable(w) else (lambda w=w: w) for w in weights]
    sums = [score_sum(g(), s) for g, s in zip(get, sqnorms)]
    count = sum(n for _, n in sums)
    if count == 0:
        raise ValueError("outlier_ratio: no weight given")
    threshold = m * (sum(t for t, _ in sums) / count)
    return sum(count_above(g(), s, threshold) for g, s in zip(get, sqnorms)) / count


def _unit_offsets(ratios: Sequence[float], sizes: Sequence[float] | None) -> list[float]:
    """The offsets for λ = 1: ``t_l − mean(t)`` with t = D scaled onto [0, 2], plus the shift."""
    ratios = [float(r) for r in ratios]
    if not ratios:
        return []
    low, high = min(ratios), max(ratios)
    if high == low:
        return [0.0] * len(ratios)
    scaled = [2.0 * (r - low) / (high - low) for r in ratios]
    if sizes is None:
        center = sum(scaled) / len(scaled)
    else:
        if len(sizes) != len(ratios) or min(sizes) <= 0:
            raise ValueError("owl: sizes must be positive, one per layer")
        center = sum(t * n for t, n in zip(scaled, sizes)) / sum(sizes)
    return [t - center for t in scaled]


def owl_offsets(
    ratios: Sequence[float], lmbda: float, sizes: Sequence[float] | None = None
) -> list[float]:
    """
    How much lower than S each layer's sparsity is: ``scaled D_l − mean(scaled D)``
    with D scaled onto [0, 2λ]; with ``sizes`` (weights per layer) the mean is
    size-weighted, so that the overall sparsity stays S. All D equal: all 0.
    """
    if lmbda < 0:
        raise OWLError(f"OWL's lambda must be >= 0 (e.g. 0.08), got {lmbda}")
    return [lmbda * a for a in _unit_offsets(ratios, sizes)]


def max_lambda(ratios: Sequence[float], sparsity: float, sizes: Sequence[float] | None = None) -> float:
    """The supremum of the λ whose layer sparsities all lie in (0, 1) (inf if all D are equal)."""
    bound = math.inf
    for a in _unit_offsets(ratios, sizes):
        if a > 0:
            bound = min(bound, sparsity / a)
        elif a < 0:
            bound = min(bound, (1.0 - sparsity) / -a)
    return bound


def owl_sparsities(
    ratios: Sequence[float],
    sparsity: float,
    lmbda: float,
    sizes: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> list[float]:
    """
    OWL's layer sparsities ``S − (scaled D_l − mean of the scaled D)`` for the
    outlier ratios ``ratios`` (one per decoder layer, in order). Raises
    :class:`OWLError` naming the largest valid λ if a sparsity would leave (0, 1).
    """
    if not 0 < sparsity < 1:
        raise OWLError(f"OWL needs a target sparsity strictly between 0 and 1, got {sparsity}")
    result = [sparsity - o for o in owl_offsets(ratios, lmbda, sizes)]
    bad = [i for i, s in enumerate(result) if not 0 < s < 1]
    if bad:
        i = bad[0]
        name = names[i] if names is not None else f"layer {i}"
        raise OWLError(
            f"OWL's lambda {lmbda} would prune {name} at sparsity {result[i]:.4f}, outside "
            f"(0, 1), for the target sparsity {sparsity}: lambda must be below "
            f"{max_lambda(ratios, sparsity, sizes):.4g} for this model and target (below "
            f"min(S, 1 - S) / 2 = {min(sparsity, 1 - sparsity) / 2:.4g} it is safe for any model)"
        )
    return result


# ------------------------------------------------------------- per-row rounding


def per_row_zeros(shapes: Iterable[tuple[int, int]], value: float) -> int:
    """Zeros a per-row pruner leaves: ``int(cols · value)`` in each row (Wanda's count)."""
    return sum(rows * int(cols * value) for rows, cols in shapes)


class _Unit:
    """One entry of a pruner's sparsity list: its Linear shapes and its current counts."""

    def __init__(self, shapes: list[tuple[int, int]], ideal: float):
        self.shapes = shapes
        self.size = sum(r * c for r, c in shapes)
        self.ideal = ideal * self.size
        exact = Fraction(ideal)
        self.counts = [math.floor(c * exact) for _, c in shapes]

    @property
    def zeros(self) -> int:
        return sum(r * k for (r, _), k in zip(self.shapes, self.counts))

    def _next(self) -> Fraction:
        return min(Fraction(k + 1, c) for (_, c), k in zip(self.shapes, self.counts))

    def step(self) -> tuple[int, list[int]] | None:
        """Zeros added by moving to the next per-row count, and the new counts (None at 1)."""
        nxt = self._next()
        if nxt >= 1:
            return None
        counts = [max(k, math.floor(c * nxt)) for (_, c), k in zip(self.shapes, self.counts)]
        return sum(r * (k1 - k0) for (r, _), k0, k1 in zip(self.shapes, self.counts, counts)), counts

    def value(self) -> float:
        """A sparsity strictly inside the interval whose ``int(cols·v)`` are the counts."""
        low = max(Fraction(k, c) for (_, c), k in zip(self.shapes, self.counts))
        value = float((low + self._next()) / 2)
        assert [int(c * value) for _, c in self.shapes] == self.counts
        return value


def per_row_sparsities(
    units: Sequence[Sequence[tuple[int, int]]], sparsities: Sequence[float], target: float
) -> list[float]:
    """
    Values to hand a per-row pruner (``int(cols · v)`` zeros in every row of each
    Linear, as Wanda does), one per unit (a unit: the Linear shapes one entry of
    its sparsity list covers), such that

    - each unit's zeros are its sparsity ``sparsities[u]`` rounded per row: the
      floor ``int(cols · s)`` in every row, raised by one zero per row (of the units
      furthest below their sparsity first) while that brings the total closer to
      ``target`` of all the weights;
    - so the overall sparsity is ``target`` to within half of one unit's step (one
      zero in each row of its narrowest Linear), where the floor alone loses up to
      one zero per row everywhere (up to 1/cols: 1.6% on 64 columns).
    """
    state = [_Unit([(int(r), int(c)) for r, c in shapes], float(s)) for shapes, s in zip(units, sparsities)]
    total = sum(u.size for u in state)
    deficit = round(target * total) - sum(u.zeros for u in state)
    while deficit > 0:
        best = None
        for unit in sorted(state, key=lambda u: (u.zeros - u.ideal) / max(u.size, 1)):
            step = unit.step()
            if step is not None and step[0] < 2 * deficit:  # closer to the target
                best = unit, step
                break
        if best is None:
            break
        unit, (added, counts) = best
        unit.counts = counts
        deficit -= added
    return [u.value() for u in state]
