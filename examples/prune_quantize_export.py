"""
Prune with Wanda 2:4 + DSnoT, quantize to INT8 W8A8, save a compressed checkpoint,
and verify it from its safetensors files:

    python examples/prune_quantize_export.py --out ckpt/smollm2-2of4-w8a8
    python examples/prune_quantize_export.py --model path/to/model --calib-samples 8 --out ckpt/x

The recipe is that of ``recipes/wanda_dsnot_2of4_quant_w8a8.yaml``: Wanda 2:4 and
DSnoT on every Linear but ``lm_head``, then llm-compressor's ``QuantizationModifier``
with scheme ``W8A8`` (int8 weights per output channel, int8 activations per token at
run time; vLLM's CPU backend runs it). One oneshot pass, ``pipeline="sequential"``.

The model (the embedded SmolLM2-135M-Instruct by default) is only read. The
checkpoint is written by :func:`dsnot_modifier.checkpoint.save_checkpoint`: into a
temporary sibling directory, verified, then renamed into place, so ``--out`` is
either complete or absent; an existing ``--out`` is replaced only with ``--overwrite``.
It holds the compressed-tensors weights (int8 ``weight`` + ``weight_scale``), the
tokenizer, llm-compressor's ``recipe.yaml`` and DSnoT's ``dsnot_report.json``;
``dsnot verify OUT`` checks it again at any time.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="model id or local checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration windows (default 16)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    parser.add_argument("--eval-windows", type=int, default=0,
                        help="held-out windows to score the quantized model's perplexity on (default 0: skip)")
    parser.add_argument("--verbose", action="store_true", help="keep llm-compressor's logs and bars")
    args = parser.parse_args(argv)
    if args.calib_samples < 1 or args.seq_len < 8:
        parser.error("--calib-samples must be at least 1 and --seq-len at least 8")

    from llmcompressor.modifiers.quantization import QuantizationModifier

    from dsnot_modifier.checkpoint import CheckpointError, save_checkpoint, verify_checkpoint
    from dsnot_harness.data import EVAL_TEXT, calibration_windows, eval_windows
    from dsnot_harness.evaluate import perplexity
    from dsnot_harness.models import resolve_model
    from dsnot_harness.pipeline import layer_sparsity, load_tokenizer, make_recipe, run_oneshot

    started = time.perf_counter()
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    windows = calibration_windows(tokenizer, args.calib_samples, args.seq_len)
    recipe = make_recipe("wanda+dsnot", "2:4") + [
        QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=["re:.*lm_head"])
    ]
    print(f"Wanda 2:4 + DSnoT + INT8 W8A8 of {source} on {args.calib_samples}x{args.seq_len} tokens",
          flush=True)
    run = run_oneshot(source, recipe, windows, verbose=args.verbose)
    print(f"oneshot {run.seconds:.0f}s; {run.report.summary_line()}", flush=True)
    print(f"decoder Linear sparsity {layer_sparsity(run.model):.1%}", flush=True)
    if args.eval_windows:
        evals = eval_windows(tokenizer, EVAL_TEXT, args.eval_windows, args.seq_len)
        # fake-quantized forward: the weights and activations the int8 kernels would see
        ppl = perplexity(run.model, evals, desc="W8A8 perplexity")
        print(f"perplexity of the pruned W8A8 model on {evals.shape[0]} windows of {EVAL_TEXT}: {ppl:.2f}",
              flush=True)
    try:
        path = save_checkpoint(run.model, args.out, tokenizer, overwrite=args.overwrite)
    except (FileExistsError, CheckpointError) as err:
        print(f"prune_quantize_export: {err}", file=sys.stderr)
        return 2
    print(f"saved {path}\n", flush=True)
    result = verify_checkpoint(path)
    print(result.table())
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
