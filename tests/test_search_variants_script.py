"""The layer study's per-row searches (benchmarks/search_variants.py): its `greedy` search is
our rule (same errors as refine_mask), and the wider searches never end worse on one swap."""

import pytest
import torch
from helpers import load_script

from dsnot_modifier.swaps import gram_error, refine_mask


@pytest.fixture(scope="module")
def study():
    return load_script("benchmarks/search_variants.py")


def _layer(seed=0, rows=12, cols=48):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = torch.randn(256, cols, generator=g, dtype=torch.float64) * torch.rand(cols, generator=g, dtype=torch.float64)
    return w, x.t() @ x / 256


def test_greedy_search_is_refine_masks_rule(study):
    w, h = _layer()
    wc = study.wanda_prune(w, h, 0.6)
    assert ((wc == 0).sum(1) == int(48 * 0.6)).all()
    ours = gram_error(w, refine_mask(w, wc, objective="gram", gram=h, max_cycles=20).weight, h)
    for i in range(w.shape[0]):
        assert study.search_row(w[i], wc[i], h, 20, "greedy") == pytest.approx(float(ours[i]), rel=1e-9)


def test_one_optimal_swap_is_at_least_as_good_as_one_greedy_swap(study):
    w, h = _layer(seed=1)
    wc = study.wanda_prune(w, h, 0.5)
    before = gram_error(w, wc, h)
    for i in range(w.shape[0]):
        greedy = study.search_row(w[i], wc[i], h, 1, "greedy")
        opt = study.search_row(w[i], wc[i], h, 1, "opt")
        assert opt <= greedy + 1e-12 and greedy <= float(before[i]) + 1e-12
    total_alt = sum(study.search_row(w[i], wc[i], h, 30, "alt") for i in range(w.shape[0]))
    total_greedy = sum(study.search_row(w[i], wc[i], h, 30, "greedy") for i in range(w.shape[0]))
    assert total_alt <= total_greedy + 1e-9
