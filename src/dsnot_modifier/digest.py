"""
Digests of tensors' exact bytes: the report's digest of each refined layer's zero
mask (checked by ``dsnot verify``), and the distributed epoch's check that every
rank holds the same weights and statistics.

A digest is BLAKE2b (:mod:`hashlib`) of the tensor's bytes, copied to the host,
prefixed by what the bytes are (dtype and shape, or ``mask`` and shape): the same
tensor gives the same digest on every device. A zero mask is hashed as packed
bits (:func:`numpy.packbits`), an eighth of its bytes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["tensor_digest", "tensor_digests", "zero_mask_digest", "mask_digest", "zero_mask_matches"]

#: the tag of this digest's version in its text (a digest of another version never matches)
VERSION = "b2"


def _hash(data: bytes) -> str:
    return f"{VERSION}-" + hashlib.blake2b(data, digest_size=16).hexdigest()


def _bytes(tensor: torch.Tensor) -> bytes:
    """The exact bytes of ``tensor`` (contiguous, on the host)."""
    data = tensor.detach().contiguous().reshape(-1).cpu()
    if data.dtype == torch.bool:
        return np.packbits(data.numpy()).tobytes()
    return data.view(torch.uint8).numpy().tobytes()


def tensor_digests(tensors, masks=()) -> list[str]:
    """:func:`tensor_digest` of each tensor, then :func:`zero_mask_digest` of each zero mask."""
    return [tensor_digest(t) for t in tensors] + [zero_mask_digest(z) for z in masks]


def tensor_digest(tensor: torch.Tensor) -> str:
    """A digest of a tensor's exact bytes, with its dtype and shape, the same on any device."""
    return f"{tensor.dtype}{list(tensor.shape)}:{_hash(_bytes(tensor))}"


def zero_mask_digest(zero: torch.Tensor) -> str:
    """A digest of a zero mask (bool, True where the weight is exactly zero)."""
    return f"mask{list(zero.shape)}:{_hash(_bytes(zero.to(torch.bool)))}"


def mask_digest(weight: torch.Tensor) -> str:
    """A digest of a weight's zero mask (where it is exactly zero)."""
    return zero_mask_digest(weight == 0)


def zero_mask_matches(zero: torch.Tensor, digest: str) -> bool:
    """Whether ``digest`` (from :func:`zero_mask_digest`) is the digest of the zero mask ``zero``."""
    return zero_mask_digest(zero) == digest
