"""Digests of tensors and zero masks: computed on the tensor's device in exact integer
arithmetic (so the same on every device), equal to a plain Python computation of their
definition, with one host sync; digests of the earlier version still check."""

import hashlib

import pytest
import torch

from dsnot_modifier import masks
from dsnot_modifier.masks import (
    mask_digest,
    tensor_digest,
    tensor_digests,
    zero_mask_digest,
    zero_mask_matches,
)
from host_syncs import SyncCounter


def python_digest(t: torch.Tensor) -> str:
    """The definition, in Python integers: Σ w_k·g^k mod p over the signed 16-bit words
    w_k of the bytes (an odd last byte a word of its own)."""
    raw = t.detach().contiguous().reshape(-1)
    if raw.dtype == torch.bool:
        raw = raw.to(torch.uint8)
    data = raw.view(torch.uint8).numpy().tobytes()
    words = [int.from_bytes(data[i:i + 2], "little", signed=len(data[i:i + 2]) == 2)
             for i in range(0, len(data), 2)]
    out = ""
    for p, g in zip(masks._DIGEST_PRIMES, masks._DIGEST_BASES):
        h, x = 0, 1
        for w in words:
            h = (h + w * x) % p
            x = x * g % p
        out += f"{h:08x}"
    return "v2-" + out


def test_the_primes_are_safe_primes():
    def prime(n):
        return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))

    assert all(prime(p) and prime((p - 1) // 2) and p < 1 << 29 for p in masks._DIGEST_PRIMES)


@pytest.mark.parametrize("shape", [(7, 93), (8, 64), (1,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                   torch.int8, torch.uint8, torch.int64, torch.bool])
def test_digest_is_its_definition_exactly(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 100  # large words, negatives: the top bits set
    t = (x > 0) if dtype == torch.bool else x.to(dtype)
    assert tensor_digest(t) == f"{t.dtype}{list(t.shape)}:{python_digest(t)}"


def test_digest_of_a_view_at_an_odd_byte_offset():
    base = torch.arange(64, dtype=torch.uint8)
    t = base[1:32]  # contiguous, odd storage offset, odd length
    assert tensor_digest(t) == f"torch.uint8[31]:{python_digest(t)}"
    zero = (torch.arange(40) % 3 == 0)[1:]
    assert zero_mask_digest(zero) == f"mask[39]:{python_digest(zero)}"


def test_digest_spans_several_passes(monkeypatch):
    """A tensor longer than one pass (made short here) carries the powers across passes."""
    monkeypatch.setattr(masks, "_DIGEST_ROWS", 2)
    masks._digest_tables.cache_clear()
    try:
        t = torch.randn(5, 301, generator=torch.Generator().manual_seed(1))
        assert tensor_digest(t).endswith(python_digest(t))
        zero = t > 0.5  # 1505 bytes: an odd last byte in the last pass
        assert zero_mask_digest(zero) == f"mask[5, 301]:{python_digest(zero)}"
        zero = torch.randn(2, 1024, generator=torch.Generator().manual_seed(5)) > 0
        assert zero_mask_digest(zero) == f"mask[2, 1024]:{python_digest(zero)}"  # 2 full passes
    finally:
        masks._digest_tables.cache_clear()


def test_digest_is_the_same_whatever_the_layout_and_threads():
    t = torch.randn(64, 300, generator=torch.Generator().manual_seed(2))
    strided = t.t().contiguous().t()  # same values, other strides
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tensor_digest(strided)
    finally:
        torch.set_num_threads(before)
    assert one == tensor_digest(t)


def test_digest_sees_every_change():
    t = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    base = tensor_digest(t)
    flipped = t.clone()
    flipped.view(torch.int32)[5, 7] ^= 1  # the lowest bit of one weight
    assert tensor_digest(flipped) != base
    assert tensor_digest(t.to(torch.float64)) != tensor_digest(t)
    assert tensor_digest(t.view(64, 32)) != base  # the shape is part of it
    w = t.masked_fill(t.abs() < 0.5, 0)
    moved = w.clone()
    i = int((w[0] == 0).nonzero()[0])
    j = int((w[0] != 0).nonzero()[0])
    moved[0, i], moved[0, j] = w[0, j], 0.0  # the same count of zeros, one moved
    assert mask_digest(moved) != mask_digest(w)
    assert mask_digest(w) == zero_mask_digest(w == 0)
    assert zero_mask_digest(torch.zeros(4, 8, dtype=torch.bool)) != zero_mask_digest(
        torch.zeros(4, 16, dtype=torch.bool))
    assert tensor_digest(torch.zeros(0)) == "torch.float32[0]:v2-" + "0" * 32


def test_digests_cross_to_the_host_once():
    tensors = [torch.randn(16, 32), torch.randn(8, dtype=torch.float64)]
    zero = tensors[0] > 0
    with SyncCounter() as syncs:
        digests = tensor_digests(tensors, masks=[zero])
    assert syncs.total == 1, syncs.ops
    assert digests == [tensor_digest(t) for t in tensors] + [zero_mask_digest(zero)]


def legacy(zero: torch.Tensor) -> str:
    """The digest before v2, as the earlier reports hold it."""
    raw = zero.to(torch.uint8).contiguous().reshape(-1).numpy().tobytes()
    return f"mask{list(zero.shape)}:{hashlib.blake2b(raw, digest_size=16).hexdigest()}"


def test_earlier_digests_still_check():
    zero = torch.randn(6, 40, generator=torch.Generator().manual_seed(4)) > 0
    other = zero.clone()
    other[0] = ~other[0]
    assert zero_mask_matches(zero, legacy(zero))
    assert not zero_mask_matches(other, legacy(zero))
    assert zero_mask_matches(zero, zero_mask_digest(zero))
    assert not zero_mask_matches(other, zero_mask_digest(zero))
