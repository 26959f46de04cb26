"""
A slow, plain statement of OWL's rule (see docs/algorithm.md), written independently of
``dsnot_modifier.owl``: Python loops over every weight, float64, lists.
"""

from __future__ import annotations

import math


def outlier_ratio(weights, sqnorms, m):
    """Share of the layer's weights whose |W_ij|·sqrt(sqnorm_j) is above m × their mean."""
    scores = []
    for w, s in zip(weights, sqnorms):
        rows = w.double().tolist()
        norms = [math.sqrt(max(float(v), 0.0)) for v in s.double().tolist()]
        for row in rows:
            for j, value in enumerate(row):
                scores.append(abs(value) * norms[j])
    mean = sum(scores) / len(scores)
    return sum(1 for x in scores if x > m * mean) / len(scores)


def layer_sparsities(ratios, sparsity, lmbda):
    """D scaled onto [0, 2λ] (min to 0, max to 2λ); layer l at S − (scaled D_l − mean)."""
    low, high = min(ratios), max(ratios)
    scaled = [(d - low) / (high - low) * 2 * lmbda for d in ratios]
    mean = sum(scaled) / len(scaled)
    return [sparsity - (x - mean) for x in scaled]


def dense_sqnorms(model, windows):
    """Mean of x_j² over all calibration tokens at every Linear's input, dense model, plain torch."""
    import torch

    sums, counts, handles = {}, {}, []

    def hook(name):
        def record(_module, args, _output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            handles.append(module.register_forward_hook(hook(name)))
    with torch.no_grad():
        for window in windows:
            model(input_ids=window[None])
    for h in handles:
        h.remove()
    return {name: sums[name] / counts[name] for name in sums}
