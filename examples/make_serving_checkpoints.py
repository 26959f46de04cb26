"""
Make DSnoT-pruned checkpoints of SmolLM2-135M-Instruct that vLLM can serve.
Run it in the project's environment (llm-compressor), not in vLLM's:

    python examples/make_serving_checkpoints.py --out serving/

It prunes the embedded SmolLM2 (or ``--model``) with Wanda 2:4 + DSnoT once, on
a small calibration set (16 windows x 256 tokens by default, a few minutes on
a CPU), then writes into ``--out``:

- ``wanda-dsnot-2of4-bfloat16/`` (and ``-float32/`` with ``--dtypes``): the pruned
  model as an ordinary dense checkpoint (half its Linear weights are zeros, 2 of
  every 4; nothing on disk says so, as vLLM has no sparse kernels and refuses
  checkpoints that declare sparsity);
- ``wanda-dsnot-2of4-w8a8/`` (and ``-fp8/``, ``-w4a16/`` with ``--quant``): the
  same pruned weights quantized with llm-compressor's ``QuantizationModifier``
  (W8A8: int8 weights per output channel, int8 activations per token at run time;
  FP8_DYNAMIC: the same in e4m3; W4A16: int4 weights in groups of 64 or 128 input
  columns; every Linear but ``lm_head``), saved compressed (``save_compressed=True``)
  in the compressed-tensors format vLLM loads. They are made from the pruned model
  loaded in ``--activation-dtype`` (default bfloat16), which their config.json then
  names: vLLM's quantized kernels take 16-bit activations on GPUs and on CPUs with
  AMX (its CPU INT8 kernel there, ``int8_scaled_mm_with_quant``, refuses float32),
  and bfloat16 everywhere else too; float16 is for GPUs without bfloat16;
- ``serving.json``: what was made, for ``examples/serve_vllm.py``.

The quantization starts from the saved float32 pruned checkpoint, so that every
variant has exactly the same mask and DSnoT runs once. Every checkpoint is
written to a temporary directory first and renamed into place when complete;
an existing directory is replaced only if this script made it. The input
model's files are only read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: the dtypes quantized checkpoints are made and served in (float16 for GPUs without bfloat16)
ACTIVATION_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: quantized variants: (llm-compressor scheme, description)
QUANT = {
    "w8a8": ("W8A8", "INT8 W8A8: int8 weights per channel, dynamic int8 activations per token"),
    "fp8": ("FP8_DYNAMIC", "FP8 dynamic: e4m3 weights per channel, dynamic FP8 activations per token"),
    "w4a16": ("W4A16", "W4A16: int4 weights in groups of input columns, 16-bit activations"),
}
MARKER = ".dsnot-serving"
MANIFEST = "serving.json"


def _fail(message: str) -> None:
    raise SystemExit(f"make_serving_checkpoints: {message}")


def linear_sparsity(checkpoint: Path) -> dict:
    """
    Zeros and 2:4 blocks of the decoder's Linear weights, read from the safetensors files
    (float, int8/FP8 and packed int4 weights alike, as ``dsnot verify`` reads them).
    """
    from dsnot_modifier.checkpoint import CheckpointTensors, read_zero_mask

    tensors = CheckpointTensors(checkpoint)
    quant_config = json.loads((checkpoint / "config.json").read_text()).get("quantization_config")
    layers = sorted({key.rsplit(".", 1)[0] for key in tensors.keys()
                     if key.endswith((".weight", ".weight_packed")) and "layers." in key and "norm" not in key})
    zeros = total = blocks = blocks_24 = 0
    for layer in layers:
        found = read_zero_mask(tensors, layer, quant_config)
        if found is None or found[0].dim() != 2 or found[0].shape[1] % 4:
            continue
        zero = found[0]
        zeros += int(zero.sum())
        total += zero.numel()
        groups = zero.reshape(zero.shape[0], -1, 4).sum(-1)
        blocks += groups.numel()
        blocks_24 += int((groups >= 2).sum())
    if total == 0:
        raise ValueError(f"no decoder Linear weights in the safetensors files of {checkpoint}")
    return {"sparsity": zeros / total, "blocks_2of4": blocks_24 / blocks, "weights": total}


class _Target:
    """A checkpoint directory written under a temporary name and renamed into place."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists() and not (path / MARKER).is_file():
            _fail(f"{path} exists and was not made by this script; remove it or choose another --out")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))

    def commit(self, note: str) -> Path:
        (self.tmp / MARKER).write_text(note + "\n")
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _set_config_dtype(checkpoint: Path, dtype: str) -> None:
    # llm-compressor rewrites config.json from the input model's (float32) config
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _save(model, tokenizer, target: _Target, note: str, dtype: str | None = None) -> Path:
    try:
        model.save_pretrained(str(target.tmp), save_compressed=True)
        tokenizer.save_pretrained(str(target.tmp))
        if dtype is not None:
            _set_config_dtype(target.tmp, dtype)
        return target.commit(note)
    except BaseException:
        target.discard()
        raise


def w4a16_group_size(model) -> int:
    """The largest of 128, 64, 32 dividing every quantized Linear's input width (SmolLM2's 576: 64)."""
    widths = {m.in_features for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}
    for size in (128, 64, 32):
        if all(w % size == 0 for w in widths):
            return size
    _fail(f"W4A16 needs Linear input widths divisible by 32 (vLLM's CPU kernel); this model has "
          f"{sorted(widths)}: leave w4a16 out of --quant")


def quant_recipe(kind: str, model) -> list:
    """llm-compressor's QuantizationModifier for ``kind`` (every Linear but ``lm_head``)."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if kind == "w4a16":  # int4 weights, symmetric, one scale per group of input columns
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                   "group_size": w4a16_group_size(model)}
        return [QuantizationModifier(ignore=["lm_head"],
                                     config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})]
    return [QuantizationModifier(targets="Linear", scheme=QUANT[kind][0], ignore=["lm_head"])]


def quantize(source: Path, kind: str, target: _Target, note: str, activation_dtype: str = "bfloat16",
             verbose: bool = False) -> Path:
    """
    ``kind`` (w8a8, fp8, w4a16) of a saved checkpoint, loaded in ``activation_dtype``, which
    config.json then names: the dtype vLLM's quantized kernels take on GPUs and on CPUs alike
    (on CPUs with AMX its INT8 kernel takes only bfloat16/float16).
    """
    from llmcompressor import oneshot

    from dsnot_harness.pipeline import load_model, load_tokenizer, quiet_llmcompressor

    model = load_model(str(source), dtype=ACTIVATION_DTYPES[activation_dtype])
    tokenizer = load_tokenizer(str(source))
    with quiet_llmcompressor(verbose):
        # static weight scales and dynamic activation scales need no calibration data
        oneshot(model=model, processor=tokenizer, recipe=quant_recipe(kind, model))
    return _save(model, tokenizer, target, note, activation_dtype)


def make_checkpoints(
    out: str | Path,
    model: str | None = None,
    dtypes: tuple[str, ...] = ("bfloat16",),
    quant: tuple[str, ...] = ("w8a8",),
    activation_dtype: str = "bfloat16",
    sparsity: str = "2:4",
    calib_samples: int = 16,
    seq_len: int = 256,
    verbose: bool = False,
) -> dict:
    """Prune once, save the requested variants into ``out``; returns the manifest."""
    from dsnot_harness.data import calibration_windows
    from dsnot_harness.models import resolve_model
    from dsnot_harness.pipeline import load_tokenizer, make_recipe, run_oneshot

    for dtype in dtypes:
        if dtype not in DTYPES:
            _fail(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    for kind in quant:
        if kind not in QUANT:
            _fail(f"unknown quantization {kind!r}: choose from {', '.join(QUANT)}")
    if activation_dtype not in ACTIVATION_DTYPES:
        _fail(f"unknown activation dtype {activation_dtype!r}: choose from {', '.join(ACTIVATION_DTYPES)} "
              "(vLLM's quantized kernels take 16-bit activations on GPUs and on CPUs with AMX)")
    if calib_samples < 1 or seq_len < 8:
        _fail("--calib-samples must be at least 1 and --seq-len at least 8")
    source = resolve_model(model)
    out = Path(out).resolve()
    if Path(source).is_dir():
        src = Path(source).resolve()
        if out == src or src in out.parents or out in src.parents:
            _fail(f"--out {out} overlaps the input model {src}; choose a directory of its own")
    tag = "wanda-dsnot-" + sparsity.replace(":", "of")
    names = {d: out / f"{tag}-{d}" for d in dtypes}
    targets = {d: _Target(p) for d, p in names.items()}  # fail early on a foreign directory
    quant_targets = {k: _Target(out / f"{tag}-{k}") for k in quant}
    started = time.perf_counter()
    scratch = None
    try:
        tokenizer = load_tokenizer(source)
        windows = calibration_windows(tokenizer, calib_samples, seq_len)
        print(f"pruning {source} with Wanda {sparsity} + DSnoT on {calib_samples}x{seq_len} tokens",
              flush=True)
        run = run_oneshot(source, make_recipe("wanda+dsnot", sparsity), windows, verbose=verbose)
        pruned = run.model
        note = f"Wanda {sparsity} + DSnoT of {source}, {calib_samples}x{seq_len} calibration tokens"
        manifest = {
            "source": str(source), "method": "wanda+dsnot", "sparsity": sparsity,
            "calib_samples": calib_samples, "seq_len": seq_len,
            "prune_seconds": round(run.seconds, 1), "checkpoints": {},
        }
        # float32 first: the quantization starts from it (a scratch copy if not asked for)
        if "float32" in targets:
            f32_path = _save(pruned, tokenizer, targets.pop("float32"), note + ", float32", "float32")
            manifest["checkpoints"]["float32"] = {"path": str(f32_path), "dtype": "float32"}
        elif quant:
            scratch = Path(tempfile.mkdtemp(dir=out, prefix=".pruned-float32."))
            f32_path = _save(pruned, tokenizer, _Target(scratch / "checkpoint"), note, "float32")
        for dtype, target in targets.items():
            pruned.to(DTYPES[dtype])
            path = _save(pruned, tokenizer, target, f"{note}, {dtype}", dtype)
            manifest["checkpoints"][dtype] = {"path": str(path), "dtype": dtype}
        del pruned, run
        for kind, target in quant_targets.items():
            scheme, description = QUANT[kind]
            print(f"quantizing the pruned checkpoint to {description}, in {activation_dtype}", flush=True)
            path = quantize(f32_path, kind, target, f"{note}, {description} (llm-compressor), "
                            f"{activation_dtype}", activation_dtype, verbose)
            # the activation dtype around the quantized matmuls (norms, embeddings, scales)
            manifest["checkpoints"][kind] = {"path": str(path), "dtype": activation_dtype,
                                             "quantization": scheme}
    except BaseException:
        for target in list(targets.values()) + list(quant_targets.values()):
            target.discard()
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    for entry in manifest["checkpoints"].values():
        entry.update(linear_sparsity(Path(entry["path"])))
        entry["megabytes"] = round(sum(f.stat().st_size for f in Path(entry["path"]).iterdir()) / 2**20, 1)
    manifest["seconds"] = round(time.perf_counter() - started, 1)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the checkpoints (made if missing)")
    parser.add_argument("--model", default=None,
                        help="model id or local checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtypes", default="bfloat16",
                        help="dense variants to save, comma-separated: bfloat16, float32 (default bfloat16)")
    parser.add_argument("--quant", default="w8a8",
                        help=f"quantized variants, comma-separated: {', '.join(QUANT)} (default w8a8; "
                             "empty for none)")
    parser.add_argument("--no-w8a8", action="store_true", help="no quantized variants (as --quant '')")
    parser.add_argument("--activation-dtype", default="bfloat16", choices=tuple(ACTIVATION_DTYPES),
                        help="dtype of the quantized checkpoints' activations and unquantized tensors, "
                             "written into their config.json (default bfloat16; float16 for GPUs "
                             "older than compute capability 8.0)")
    parser.add_argument("--sparsity", default="2:4", help="N:M or a fraction (default 2:4)")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--verbose", action="store_true", help="keep llm-compressor's logs and bars")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = make_checkpoints(
        args.out, model=args.model, dtypes=tuple(d for d in args.dtypes.split(",") if d),
        quant=() if args.no_w8a8 else tuple(k for k in args.quant.split(",") if k),
        activation_dtype=args.activation_dtype, sparsity=args.sparsity, calib_samples=args.calib_samples,
        seq_len=args.seq_len, verbose=args.verbose,
    )
    for name, entry in manifest["checkpoints"].items():
        print(f"{name}: {entry['path']} ({entry['megabytes']} MB on disk, "
              f"{entry['sparsity']:.1%} zeros in the decoder's Linear weights, "
              f"{entry['blocks_2of4']:.1%} of blocks of 4 with at least 2 zeros)")
    print(f"done in {manifest['seconds']:.0f}s; manifest {Path(args.out) / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
