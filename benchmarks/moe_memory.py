"""
DSnoT's peak state on a Qwen3-MoE-shaped decoder layer, by number of experts
(issue 13): ``DSnoTModifier.peak_state_bytes`` (its dense copies and input
statistics at their largest during calibration), against the layer's own weight
bytes and against what sharing promises:

- the hidden-size statistics (the Gram matrix of the attention's input, and of
  the experts' input, which every expert's gate_proj and up_proj read under
  all-expert calibration) held once, whatever the number of experts;
- beyond them only each expert's dense copy and its down_proj statistics.

One decoder layer (Qwen3MoeConfig, random weights, experts linearized), Wanda 50%
then DSnoT (``gram``), sequential oneshot with all-expert calibration, on the CPU.
The widths are scaled down from Qwen3-30B-A3B (hidden 2048, expert width 768, 128
experts) by ``--scale`` (default 8: hidden 256, expert width 96) so that 128
experts fit a small machine; the bytes scale as the widths squared. Prints a table
and writes JSON (``--out``).

    python benchmarks/moe_memory.py --out benchmarks/results/moe_memory.json
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from dsnot_modifier.report import write_json

EXPERTS = (8, 32, 128)


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(1, vocab)} | {"[UNK]": 0}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


def measure(experts: int, hidden: int, inter: int, heads: int = 8, samples: int = 8,
            length: int = 32, vocab: int = 128) -> dict:
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from dsnot_modifier import DSnoTModifier
    from dsnot_harness.pipeline import calibration_dataset

    torch.manual_seed(0)
    head_dim = hidden // heads
    config = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
        moe_intermediate_size=inter, num_hidden_layers=1, num_attention_heads=heads,
        num_key_value_heads=heads // 2, head_dim=head_dim, num_experts=experts,
        num_experts_per_tok=min(8, experts), max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = Qwen3MoeForCausalLM(config).eval()
    linearize_moe(model)
    common = dict(targets=["Linear"], ignore=["re:.*lm_head", "re:.*mlp.gate$"])
    targets = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n and not n.endswith("mlp.gate")}
    layer_bytes = sum(p.nbytes for p in model.model.layers[0].parameters())
    dense_bytes = sum(m.weight.nbytes for m in targets.values())
    dsnot = DSnoTModifier(**common)
    windows = torch.randint(1, vocab, (samples, length), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        model.config.name_or_path = tmp
        oneshot(model=model, processor=_tokenizer(vocab), dataset=calibration_dataset(windows),
                recipe=[WandaPruningModifier(sparsity=0.5, mask_structure="0:0", **common), dsnot],
                pipeline="sequential", num_calibration_samples=samples, max_seq_length=length,
                shuffle_calibration_samples=False, moe_calibrate_all_experts=True)
    f32 = 4
    attn_out = heads * head_dim
    hidden_stats = 2 * hidden * hidden * f32  # attention input, experts' input: once each
    per_expert_stats = inter * inter * f32  # its down_proj's Gram
    expected = dense_bytes + hidden_stats + attn_out * attn_out * f32 + experts * per_expert_stats
    # an estimate of the state without sharing across experts: one more hidden-size Gram
    # per expert (measured on the code before issue 13: within one Gram of this)
    unshared = dense_bytes + hidden_stats + attn_out * attn_out * f32 + experts * (
        per_expert_stats + hidden * hidden * f32)
    return dict(
        experts=experts, hidden=hidden, expert_width=inter,
        layer_weight_bytes=layer_bytes, dense_copy_bytes=dense_bytes,
        peak_state_bytes=dsnot.peak_state_bytes, expected_shared_bytes=expected,
        unshared_bytes=unshared, refined_layers=len(dsnot.report.layers),
        peak_over_layer=dsnot.peak_state_bytes / layer_bytes,
        hidden_stats_once=dsnot.peak_state_bytes == expected,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=8, help="Qwen3-30B-A3B widths divided by this")
    parser.add_argument("--experts", type=int, nargs="+", default=list(EXPERTS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    hidden, inter = 2048 // args.scale, 768 // args.scale
    rows = [measure(e, hidden, inter) for e in args.experts]
    mib = 2**20
    print(f"hidden {hidden}, expert width {inter} (Qwen3-30B-A3B / {args.scale}), float32")
    print(f"{'experts':>7} {'layer MiB':>10} {'DSnoT peak MiB':>15} {'peak/layer':>10} "
          f"{'expected MiB':>13} {'unshared MiB':>13} {'hidden stats once':>18}")
    for r in rows:
        print(f"{r['experts']:7d} {r['layer_weight_bytes'] / mib:10.2f} "
              f"{r['peak_state_bytes'] / mib:15.2f} {r['peak_over_layer']:10.2f} "
              f"{r['expected_shared_bytes'] / mib:13.2f} {r['unshared_bytes'] / mib:13.2f} "
              f"{str(r['hidden_stats_once']):>18}")
    if args.out:
        write_json(args.out, dict(args=vars(args), rows=rows))
    return rows


if __name__ == "__main__":
    main()
