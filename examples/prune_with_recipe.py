"""
Prune a model with one of the shipped YAML recipes through llm-compressor's
oneshot, save it, and print DSnoT's summary. The checkpoint directory gets
dsnot_report.json (per-layer swaps and error change) beside the weights.

    .venv/bin/python examples/prune_with_recipe.py recipes/wanda_dsnot_2of4.yaml out/smollm2-2of4
"""

import argparse
import os

import dsnot_modifier  # noqa: F401  (registers DSnoTModifier for the YAML recipe)
from dsnot_harness.data import calibration_windows
from dsnot_harness.models import resolve_model
from dsnot_harness.pipeline import calibration_dataset, load_model, load_tokenizer
from llmcompressor import oneshot


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("output_dir")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    if os.path.exists(args.output_dir) and os.listdir(args.output_dir):
        parser.error(f"{args.output_dir} exists and is not empty; choose a new directory")

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    windows = calibration_windows(tokenizer, args.calib_samples, args.seq_len)
    model = load_model(path)
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=calibration_dataset(windows),
        recipe=args.recipe,
        pipeline="sequential",  # DSnoT must see each layer before the pruner zeroes it
        num_calibration_samples=windows.shape[0],
        max_seq_length=windows.shape[1],
        shuffle_calibration_samples=False,
        output_dir=args.output_dir,
    )
    print(f"saved to {args.output_dir}; DSnoT report: {os.path.join(args.output_dir, 'dsnot_report.json')}")


if __name__ == "__main__":
    main()
