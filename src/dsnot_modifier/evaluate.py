"""
Perplexity of a causal language model on token windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    desc: str = "perplexity",
    progress: bool = True,
) -> float:
    """
    ``exp`` of the mean next-token negative log-likelihood over all windows
    ``[num_windows, seq_len]``: each window is scored on its own (no context
    carried over, nothing prepended), so a window of n tokens scores n − 1 of them.
    The log-softmax is taken in float32.
    """
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    was_training = model.training
    model.eval()
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += targets.numel()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)
