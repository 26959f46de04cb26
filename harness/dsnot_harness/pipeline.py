"""
Shared steps of the main job, the benchmark and the examples: load a model,
make the calibration set, prune with a recipe through llm-compressor's oneshot.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import sys
import time
from dataclasses import dataclass

import torch
from loguru import logger

__all__ = [
    "environment",
    "load_model",
    "load_tokenizer",
    "calibration_dataset",
    "make_recipe",
    "run_oneshot",
    "OneshotRun",
    "quiet_llmcompressor",
    "linear_layers",
    "layer_sparsity",
]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(path: str, dtype: torch.dtype = torch.float32):
    """A causal LM from a local checkpoint or a hub id (safetensors only, no remote code)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)


def calibration_dataset(windows: torch.Tensor):
    """A ``datasets.Dataset`` of pre-tokenized windows, as oneshot takes it."""
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )


def make_recipe(method: str, sparsity: str, owl: dict | None = None, **dsnot_params) -> list:
    """
    Modifiers for a method name: ``wanda``, ``sparsegpt``, ``wanda+dsnot``,
    ``sparsegpt+dsnot``, ``dsnot`` (standalone, Wanda initial mask); a ``+update``
    suffix after DSnoT turns its weight update on (``update_weights``); an ``owl-``
    prefix puts an ``OWLModifier(**owl)`` first (unstructured sparsities only).
    ``sparsity`` is a fraction (``"0.6"``) or N:M (``"2:4"``).
    """
    if method.startswith("owl-"):
        from dsnot_modifier.owl_modifier import OWLModifier

        if ":" in sparsity:
            raise ValueError(f"{method}: OWL is for unstructured sparsities (such as 0.7), not {sparsity}")
        return [OWLModifier(**(owl or {}))] + make_recipe(method[4:], sparsity, **dsnot_params)
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    from dsnot_modifier import DSnoTModifier

    from dsnot_modifier.masks import parse_sparsity

    fraction, nm = parse_sparsity(sparsity)
    structure = "0:0" if nm is None else f"{nm[0]}:{nm[1]}"
    common = dict(targets=["Linear"], ignore=["re:.*lm_head"])
    pruners = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}
    if method.endswith("+update"):
        method, dsnot_params = method[: -len("+update")], {**dsnot_params, "update_weights": True}
        if not method.endswith("dsnot"):
            raise ValueError(f"unknown method {method}+update: the update follows DSnoT")
    base, _, extra = method.partition("+")
    dsnot = {**common, **dsnot_params}  # DSnoT's own targets may narrow the pruner's
    if base == "dsnot" and not extra:
        return [DSnoTModifier(initial="wanda", mask_structure=structure,
                              sparsity=None if nm else fraction, **dsnot)]
    if base not in pruners or extra not in ("", "dsnot"):
        raise ValueError(f"unknown method {method!r}")
    recipe = [pruners[base](sparsity=fraction, mask_structure=structure, **common)]
    if extra:
        recipe.append(DSnoTModifier(**dsnot))
    return recipe


@contextlib.contextmanager
def quiet_llmcompressor(verbose: bool = False):
    """
    Keep the console readable: llm-compressor's per-layer INFO and METRIC logs go
    (warnings and errors stay) and its per-subgraph progress bars vanish once done.
    """
    if verbose:
        yield
        return
    from llmcompressor.logger import LOGGER_CONFIG, configure_logger
    from tqdm.auto import tqdm

    patched = []
    module = sys.modules.get("llmcompressor.pipelines.sequential.pipeline")
    if module is not None and isinstance(getattr(module, "tqdm", None), type):
        patched.append((module, module.tqdm))
        module.tqdm = functools.partial(tqdm, leave=False)
    logger.remove()
    logger.add(
        sys.stderr,
        format="{level} - {message}",
        filter=lambda r: r["level"].no >= 30 and r["level"].name != "METRIC",
    )
    try:
        yield
    finally:
        for module, original in patched:
            module.tqdm = original
        configure_logger(LOGGER_CONFIG)


@dataclass
class OneshotRun:
    model: torch.nn.Module
    seconds: float
    dsnot_seconds: float
    report: object | None


def run_oneshot(path: str, recipe: list, windows: torch.Tensor, verbose: bool = False) -> OneshotRun:
    """Prune a fresh copy of the model at ``path`` with ``recipe``, sequential pipeline."""
    import llmcompressor.pipelines.sequential.pipeline  # noqa: F401  (so that it can be quieted)
    from llmcompressor import oneshot

    from dsnot_modifier import DSnoTModifier

    model = load_model(path)
    tokenizer = load_tokenizer(path)
    start = time.perf_counter()
    with quiet_llmcompressor(verbose):
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=calibration_dataset(windows),
            recipe=recipe,
            pipeline="sequential",
            num_calibration_samples=windows.shape[0],
            max_seq_length=windows.shape[1],
            shuffle_calibration_samples=False,
        )
    seconds = time.perf_counter() - start
    dsnot = [m for m in recipe if isinstance(m, DSnoTModifier)]
    report = dsnot[0].report if dsnot else None
    dsnot_seconds = report.summary()["seconds"] if report is not None else 0.0
    return OneshotRun(model=model, seconds=seconds, dsnot_seconds=dsnot_seconds, report=report)


def linear_layers(model: torch.nn.Module, ignore: str = "lm_head") -> list:
    """``(name, module)`` of the decoder's Linear layers (``lm_head`` left out)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ignore not in name
    ]


def layer_sparsity(model: torch.nn.Module, ignore: str = "lm_head") -> float:
    """Fraction of zeros over the Linear layers of the decoder (``lm_head`` left out)."""
    zeros = total = 0
    for _, module in linear_layers(model, ignore):
        zeros += int((module.weight == 0).sum())
        total += module.weight.numel()
    return zeros / max(total, 1)


#: the packages whose versions decide the numbers of a run (recorded with its results)
_RECORDED_PACKAGES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "gguf")


def environment() -> dict:
    """Machine, date and package versions, recorded beside a run's results."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in _RECORDED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {"machine": platform.platform(), "cpu": cpu_description(), "date": time.strftime("%Y-%m-%d"),
            "versions": versions}


#: the CPU features that move our timings (vector width, native bfloat16 and matrix units)
_CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve")


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model and which of ``_CPU_FEATURES`` it has, e.g. ``AMD EPYC (avx2, fma)``."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags = set(value.split())
                    break
    except OSError:
        pass
    present = [f for f in _CPU_FEATURES if f in flags]
    return f"{model} ({', '.join(present) or 'none of ' + '/'.join(_CPU_FEATURES)})"
