"""
Perplexity of a causal language model on token windows, and ``dsnot eval``:
the perplexity of a saved or hub model on any text, and (with
lm-evaluation-harness installed) zero-shot tasks.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["perplexity", "text_perplexity", "lm_eval_tasks", "add_parser", "run"]


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


def text_perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    seq_len: int = 512,
    windows: int | None = 40,
    bos: bool = False,
    batch_size: int = 4,
) -> dict:
    """
    Perplexity on the first ``windows`` non-overlapping windows of ``seq_len``
    tokens of ``text`` (a shipped novel's name or a file path; None: all of it).
    Without ``bos`` nothing is prepended and a window scores its last
    ``seq_len − 1`` tokens; with ``bos`` the tokenizer's BOS token is put before
    each window and all ``seq_len`` of its tokens are scored.
    """
    from dsnot_harness.data import eval_windows

    ids = eval_windows(tokenizer, text, windows, seq_len)
    if bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("this tokenizer has no BOS token; run without --bos")
        ids = torch.cat([torch.full((ids.shape[0], 1), tokenizer.bos_token_id), ids], dim=1)
    ppl = perplexity(model, ids, batch_size=batch_size, desc=f"perplexity {text}")
    return {"text": text, "perplexity": ppl, "windows": int(ids.shape[0]), "seq_len": seq_len,
            "bos": bos, "tokens_scored": int(ids.shape[0] * (ids.shape[1] - 1))}


def lm_eval_tasks(model: torch.nn.Module, tokenizer, tasks: list[str], limit: int | None = None,
                  batch_size: int = 4) -> dict:
    """Zero-shot ``tasks`` through lm-evaluation-harness (``pip install lm-eval``)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise RuntimeError(
            "zero-shot tasks need lm-evaluation-harness: pip install lm-eval (in the repository: "
            "scripts/setup test,lm-eval); its task data comes from the Hugging Face hub"
        ) from None
    results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                              tasks=tasks, num_fewshot=0, limit=limit)
    return results["results"]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval", help="perplexity of a saved or hub model on a text (and lm-eval tasks)",
        description="Perplexity on the first --windows non-overlapping windows of --seq-len tokens of "
                    "each text, from its start. By default nothing is prepended (a window scores "
                    "seq_len - 1 tokens); --bos puts the tokenizer's BOS before each window.",
    )
    p.add_argument("model", help="a local checkpoint directory or a model id")
    p.add_argument("--text", action="append", default=None,
                   help="a shipped novel (e.g. prideprejudice) or a UTF-8 text file; repeatable "
                        "(default: prideprejudice)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=40, help="windows per text; 0 means all")
    p.add_argument("--bos", action="store_true", help="prepend the BOS token to each window")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-evaluation-harness tasks (e.g. hellaswag,arc_easy); needs lm-eval")
    p.add_argument("--limit", type=int, default=None, help="examples per lm-eval task")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", dest="json_path", default=None)
    return p


def run(args) -> int:
    from dsnot_harness.data import EVAL_TEXT
    from dsnot_harness.pipeline import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    out = {"model": args.model, "date": time.strftime("%Y-%m-%d"), "perplexity": []}
    for text in args.text or [EVAL_TEXT]:
        row = text_perplexity(model, tokenizer, text, args.seq_len, args.windows or None, args.bos,
                              args.batch_size)
        out["perplexity"].append(row)
        print(f"{text}: perplexity {row['perplexity']:.3f} ({row['windows']} windows x {args.seq_len} "
              f"tokens, {'BOS prepended' if args.bos else 'nothing prepended'})", flush=True)
    if args.tasks:
        out["tasks"] = lm_eval_tasks(model, tokenizer, [t for t in args.tasks.split(",") if t],
                                     args.limit, args.batch_size)
        for task, metrics in out["tasks"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"{task}: {shown}", flush=True)
    if args.json_path:
        from dsnot_modifier.report import write_json

        write_json(args.json_path, out)
    return 0
