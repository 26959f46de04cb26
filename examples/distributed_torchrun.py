"""
DSnoT in a distributed oneshot, started with torchrun:

    torchrun --nproc-per-node 2 examples/distributed_torchrun.py \\
        --model smollm2 --sparsity 2:4 --samples 32 --seq-len 256 --output out/smollm2-2of4

Each rank calibrates on its own shard of the calibration windows. DSnoT (standalone:
it makes the initial Wanda mask itself) sums the input statistics of all the ranks,
refines every layer once, on one rank, and broadcasts the result, so that every
rank ends with the same model, the one a single process would make from all the
windows. Rank 0 saves it, with dsnot_report.json.

CPU ranks talk over Gloo, GPU ranks over NCCL (compressed_tensors' init_dist). The
model is loaded with compressed_tensors' load_offloaded_model: rank 0 reads the
checkpoint and the ranks share its weights (CPU shared memory, or --offload-folder
on disk if the model does not fit in memory).

Pass each rank its own shard, as here: with one dataset for all the ranks,
llm-compressor 0.14 calibrates every rank on the same first samples (DSnoT warns).
A pruner before DSnoT (WandaPruningModifier, SparseGPTModifier) is refused under
torchrun: llm-compressor 0.14 does not synchronise their masks across ranks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2",
                        help="hub id, local checkpoint, or 'smollm2' (the embedded model)")
    parser.add_argument("--sparsity", default="2:4", help="a fraction (0.5) or N:M (2:4)")
    parser.add_argument("--objective", choices=["gram", "mean"], default="gram")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows, all ranks together")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--output", default=None, help="directory to save the pruned model to")
    parser.add_argument("--offload-folder", default=None,
                        help="disk offload directory for weights that do not fit in memory "
                        "(default: a temporary directory, removed at the end)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds a DSnoT collective waits for the other ranks")
    return parser.parse_args()


def init_distributed():
    if "RANK" not in os.environ:
        raise SystemExit("start this script with torchrun, e.g. torchrun --nproc-per-node 2 " + __file__)
    if torch.accelerator.is_available():
        from compressed_tensors.offload import init_dist

        init_dist()  # one accelerator per rank, NCCL (or XCCL)
    else:
        dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size()


def main():
    args = parse_args()
    rank, world = init_distributed()

    from compressed_tensors.offload import load_offloaded_model
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from dsnot_modifier import DSnoTModifier
    from dsnot_harness.data import calibration_windows
    from dsnot_harness.models import resolve_model
    from dsnot_harness.pipeline import calibration_dataset, layer_sparsity, load_tokenizer

    # rank 0 converts the embedded model once (the others wait for it) and makes the
    # offload directory all ranks share
    holder = [None, args.offload_folder]
    if rank == 0:
        holder[0] = str(resolve_model(args.model))
        if args.offload_folder is None:
            holder[1] = tempfile.mkdtemp(prefix="dsnot-offload-")
    dist.broadcast_object_list(holder, src=0)
    path, folder = holder

    tokenizer = load_tokenizer(path)
    with load_offloaded_model():
        # as much as fits in (shared) cpu memory, the rest on disk in `folder`
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto", device_map="auto_offload", offload_folder=folder
        )

    # the same windows on every rank (fixed seed), then each rank takes its shard
    windows = calibration_windows(tokenizer, args.samples, args.seq_len)
    start, end = args.samples * rank // world, args.samples * (rank + 1) // world
    shard = windows[start:end]
    if shard.shape[0] == 0:
        raise SystemExit(f"--samples {args.samples} leaves rank {rank} of {world} without data")

    if ":" in args.sparsity:
        dsnot = DSnoTModifier(initial="wanda", mask_structure=args.sparsity, objective=args.objective,
                              dist_timeout=args.timeout)
    else:
        dsnot = DSnoTModifier(initial="wanda", sparsity=float(args.sparsity), objective=args.objective,
                              dist_timeout=args.timeout)

    began = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=calibration_dataset(shard),
        recipe=[dsnot],
        pipeline="sequential",
        num_calibration_samples=shard.shape[0],
        max_seq_length=args.seq_len,
        shuffle_calibration_samples=False,
        output_dir=args.output,
    )
    seconds = time.perf_counter() - began

    summary = dsnot.report.summary()
    if dsnot.owners:  # which rank refined which layer (empty in a single process)
        per_rank = [sum(1 for r in dsnot.owners.values() if r == k) for k in range(world)]
    else:
        per_rank = [summary["layers"]]
    if rank == 0:
        print(
            f"rank 0 of {world}: calibrated on windows {start}..{end - 1} of {args.samples}; "
            f"{summary['layers']} layers refined ({per_rank} per rank), {summary['swaps']} swaps, "
            f"sparsity {layer_sparsity(model):.3f}, {seconds:.1f}s"
            + (f"; saved to {args.output}" if args.output else "")
        )
    dist.barrier()
    if rank == 0 and args.offload_folder is None:
        shutil.rmtree(folder, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
