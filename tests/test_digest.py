"""Digests of tensors and zero masks (:mod:`dsnot_modifier.digest`): BLAKE2b of the exact
bytes (a zero mask's packed bits), with what the bytes are; any change of a bit, a
place, the dtype or the shape changes them."""

import hashlib

import numpy as np
import pytest
import torch

from dsnot_modifier.digest import (
    mask_digest,
    tensor_digest,
    tensor_digests,
    zero_mask_digest,
    zero_mask_matches,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                   torch.int8, torch.float8_e4m3fn])
def test_digest_is_blake2b_of_the_bytes(dtype):
    t = torch.randn(5, 7, generator=torch.Generator().manual_seed(1)).to(dtype)
    raw = t.view(torch.uint8).numpy().tobytes()
    expected = hashlib.blake2b(raw, digest_size=16).hexdigest()
    assert tensor_digest(t) == f"{dtype}[5, 7]:b2-{expected}"


def test_mask_digest_is_blake2b_of_the_packed_bits():
    zero = torch.randn(3, 11, generator=torch.Generator().manual_seed(2)) > 0
    expected = hashlib.blake2b(np.packbits(zero.numpy().reshape(-1)).tobytes(),
                               digest_size=16).hexdigest()
    assert zero_mask_digest(zero) == f"mask[3, 11]:b2-{expected}"


def test_digest_is_the_same_whatever_the_layout():
    t = torch.randn(64, 300, generator=torch.Generator().manual_seed(2))
    strided = t.t().contiguous().t()  # same values, other strides
    assert tensor_digest(strided) == tensor_digest(t)
    assert mask_digest(strided) == mask_digest(t)


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


def test_digests_of_several():
    tensors = [torch.randn(16, 32), torch.randn(8, dtype=torch.float64)]
    zero = tensors[0] > 0
    assert tensor_digests(tensors, masks=[zero]) == [tensor_digest(t) for t in tensors] + [
        zero_mask_digest(zero)]


def test_zero_mask_matches():
    zero = torch.randn(6, 40, generator=torch.Generator().manual_seed(4)) > 0
    other = zero.clone()
    other[0, 3] = ~other[0, 3]
    assert zero_mask_matches(zero, zero_mask_digest(zero))
    assert not zero_mask_matches(other, zero_mask_digest(zero))
    # a digest of another kind or version never matches
    raw = zero.to(torch.uint8).numpy().tobytes()
    assert not zero_mask_matches(zero, f"mask[6, 40]:{hashlib.blake2b(raw, digest_size=16).hexdigest()}")
