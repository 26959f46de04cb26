"""
How many calibration tokens must a layer see before DSnoT's swaps help on tokens
it did not see? (the default of DSnoTModifier's ``min_tokens``, issue 13)

A tiny Qwen3-MoE (random weights, built from its config, experts linearized) runs
on random tokens; the inputs of every expert's gate_proj (hidden size) and
down_proj (expert intermediate size) are captured. For each n, the first n
tokens an expert saw calibrate it (Wanda 50% mask from their mean squares, then
DSnoT ``gram`` refinement with their Gram matrix); the error ``eᵀHe`` is then
measured with the Gram matrix of held-out tokens, before and after DSnoT.
Prints a table and writes JSON (``--out``). CPU, about a minute.

    python benchmarks/min_tokens.py --out benchmarks/results/min_tokens.json
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dsnot_modifier.masks import initial_mask
from dsnot_modifier.report import write_json
from dsnot_modifier.swaps import gram_error, refine_mask

COUNTS = (2, 4, 8, 16, 32, 64, 128, 256)


def capture(hidden: int, inter: int, experts: int, tokens: int, seed: int = 0):
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
        moe_intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=hidden // 4, num_experts=experts,
        num_experts_per_tok=2, max_position_embeddings=256,
    )
    model = Qwen3MoeForCausalLM(config).eval()
    linearize_moe(model)
    inputs: dict[str, list[torch.Tensor]] = {}
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".experts." in n
              and n.endswith(("gate_proj", "down_proj"))}
    hooks = [m.register_forward_hook(
        lambda m, a, o, n=n: inputs.setdefault(n, []).append(a[0].detach().reshape(-1, a[0].shape[-1])))
        for n, m in layers.items()]
    ids = torch.randint(1, 128, (tokens // 64, 64), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():  # routed calibration: each expert sees its own tokens only
        for row in ids:
            model(row.unsqueeze(0))
    for h in hooks:
        h.remove()
    return {n: (layers[n].weight.detach().clone(), torch.cat(x).double()) for n, x in inputs.items()}


def measure(weight: torch.Tensor, x: torch.Tensor, n: int, held_out: int):
    """Held-out error after / before DSnoT, for n calibration tokens."""
    calib, test = x[:n].float(), x[-held_out:]
    h_test = (test.T @ test / test.shape[0]).float()
    sq = calib.square().mean(0)
    mask = initial_mask(weight, 0.5, None, "wanda", sq)
    pruned = weight.masked_fill(mask, 0)
    gram = calib.T @ calib / n
    out = refine_mask(weight, pruned, objective="gram", gram=gram).weight
    before = float(gram_error(weight, pruned, h_test).sum())
    after = float(gram_error(weight, out, h_test).sum())
    return after / before if before > 0 else 1.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--inter", type=int, default=32)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    captured = capture(args.hidden, args.inter, args.experts, args.tokens)
    rows = []
    for kind in ("gate_proj", "down_proj"):
        layers = {n: v for n, v in captured.items() if n.endswith(kind)}
        for n in COUNTS:
            ratios = []
            for weight, x in layers.values():
                held_out = x.shape[0] - max(COUNTS)
                if held_out < 64:
                    continue
                ratios.append(measure(weight, x, n, held_out))
            if ratios:
                rows.append(dict(layer=kind, columns=next(iter(layers.values()))[0].shape[1],
                                 tokens=n, layers=len(ratios),
                                 median_ratio=statistics.median(ratios),
                                 worse=sum(r > 1 for r in ratios) / len(ratios)))
    print(f"{'layer':10} {'cols':>5} {'tokens':>6} {'layers':>6} {'held-out after/before':>22} {'share worse':>12}")
    for r in rows:
        print(f"{r['layer']:10} {r['columns']:5d} {r['tokens']:6d} {r['layers']:6d} "
              f"{r['median_ratio']:22.3f} {r['worse']:12.0%}")
    if args.out:
        write_json(args.out, dict(args=vars(args), rows=rows))
    return rows


if __name__ == "__main__":
    main()
