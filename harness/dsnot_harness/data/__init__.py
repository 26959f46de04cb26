"""
Public-domain texts shipped with the package (six Jane Austen novels, from
Project Gutenberg, public domain) and the code that cuts them into token windows.

Calibration uses the novels other than Pride and Prejudice; evaluation uses
Pride and Prejudice, held out.
"""

from __future__ import annotations

import gzip
import os
from importlib import resources

import torch

__all__ = [
    "TEXTS",
    "EVAL_TEXT",
    "CALIBRATION_TEXTS",
    "read_text",
    "tokenize_text",
    "calibration_windows",
    "eval_windows",
]

TEXTS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
EVAL_TEXT = "prideprejudice"
CALIBRATION_TEXTS = tuple(t for t in TEXTS if t != EVAL_TEXT)


def read_text(name: str) -> str:
    """A shipped novel by name (see ``TEXTS``), or any UTF-8 text file by path."""
    if name in TEXTS:
        data = resources.files(__name__).joinpath(f"{name}.txt.gz").read_bytes()
        return gzip.decompress(data).decode("utf-8")
    if os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            return f.read()
    raise FileNotFoundError(
        f"no text {name!r}: give one of {', '.join(TEXTS)} or the path of a text file"
    )


def tokenize_text(tokenizer, name: str) -> torch.Tensor:
    """All tokens of a text, no special tokens added, as a 1-D long tensor."""
    ids = tokenizer(read_text(name), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(
    tokenizer,
    num_samples: int,
    seq_len: int,
    texts: tuple[str, ...] | list[str] = CALIBRATION_TEXTS,
    seed: int = 0,
) -> torch.Tensor:
    """
    ``num_samples`` windows of ``seq_len`` tokens at random offsets of ``texts``
    (every start offset of every text equally likely), ``[num_samples, seq_len]``.
    """
    streams = [tokenize_text(tokenizer, t) for t in texts]
    starts = [max(len(s) - seq_len + 1, 0) for s in streams]
    total = sum(starts)
    if total == 0:
        raise ValueError(f"the calibration texts are shorter than {seq_len} tokens")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, total, (num_samples,), generator=generator).tolist()
    bounds = torch.tensor(starts).cumsum(0).tolist()
    windows = []
    for pick in picks:
        i = next(k for k, b in enumerate(bounds) if pick < b)
        offset = pick - (bounds[i - 1] if i else 0)
        windows.append(streams[i][offset : offset + seq_len])
    return torch.stack(windows)


def eval_windows(tokenizer, name: str, num_windows: int | None, seq_len: int) -> torch.Tensor:
    """
    The first ``num_windows`` non-overlapping windows of ``seq_len`` tokens of a
    text, from its start, nothing prepended (all full windows if None).
    """
    ids = tokenize_text(tokenizer, name)
    available = len(ids) // seq_len
    if available == 0:
        raise ValueError(f"text {name!r} is shorter than one window of {seq_len} tokens")
    count = available if num_windows is None else min(num_windows, available)
    return ids[: count * seq_len].reshape(count, seq_len)
