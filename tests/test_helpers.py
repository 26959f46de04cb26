"""The shared test helpers count and copy what the other tests' assertions rely on
(their block counts come from the library's ``masks.block_zero_counts``: checked here
against counts made by hand)."""

import torch

from helpers import VOCAB, block_zeros, blocks_hold, linears, random_windows


def test_block_zeros_counts_each_block_by_hand():
    w = torch.tensor([[0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 0.0, 0.0],
                      [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]])
    assert block_zeros(w, 4).tolist() == [[2, 3], [0, 4]]
    assert block_zeros(w, 2).tolist() == [[2, 0, 1, 2], [0, 0, 2, 2]]
    assert block_zeros(w, 8).tolist() == [[5], [4]]
    two_four = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]])
    assert blocks_hold(two_four, 2, 4)
    assert not blocks_hold(two_four, 1, 4) and not blocks_hold(w, 2, 4)
    three = two_four.clone()
    three[0, 1] = 0.0  # one block with 3 zeros: not exactly 2
    assert not blocks_hold(three, 2, 4)


def test_linears_are_copies_of_the_target_weights():
    model = torch.nn.Module()
    model.q_proj = torch.nn.Linear(4, 3)
    model.inner = torch.nn.Module()
    model.inner.down = torch.nn.Linear(3, 4)
    model.lm_head = torch.nn.Linear(4, 8)
    model.norm = torch.nn.LayerNorm(4)
    weights = linears(model)
    assert list(weights) == ["q_proj", "inner.down"]
    assert torch.equal(weights["q_proj"], model.q_proj.weight)
    with torch.no_grad():
        model.q_proj.weight.zero_()
    assert not torch.equal(weights["q_proj"], model.q_proj.weight)  # a copy, not the live weight


def test_random_windows_are_reproducible_token_ids():
    w = random_windows(8, 32)
    assert w.shape == (8, 32) and w.dtype == torch.int64
    assert int(w.min()) >= 1 and int(w.max()) < VOCAB  # 0 is the pad
    assert torch.equal(w, random_windows(8, 32)) and not torch.equal(w, random_windows(8, 32, seed=2))
