"""
Checkpoints of DSnoT-pruned models: save them safely, and check them.

- :func:`save_checkpoint` writes a checkpoint (dense, or quantized and compressed by
  llm-compressor) into a temporary sibling directory, checks it, and renames it into
  place: a process that dies mid-save leaves only a hidden ``.NAME.partial-*``
  directory, never a half-written ``NAME``. An existing directory is replaced only
  with ``overwrite=True``.
- :func:`verify_checkpoint` (the command ``dsnot verify PATH``, in
  :mod:`dsnot_modifier.cli`) reads the safetensors files of
  a saved checkpoint (never pickles) and checks every layer of ``dsnot_report.json``:
  its zeros (a float, int8 or FP8 zero in the stored weight; packed int4 weights are
  decompressed with compressed-tensors first), its N:M structure, and its number of
  zeros against the report's.

A quantized layer may hold more zeros than DSnoT left: rounding turns kept weights
under half a quantization step into zeros (INT8 and W4A16 do, now and then). Those
are reported, not refused. Failures: fewer zeros than the report counts (pruned
weights made non-zero again, e.g. by GPTQ), an N:M block with fewer than N zeros, a
dense (unquantized) layer whose number of zeros differs from the report's, a layer
of the report missing from the checkpoint or of another shape, and a zero mask
other than the report's digest of it (:mod:`dsnot_modifier.digest`), checked when the
stored layer holds exactly the report's number of zeros.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from loguru import logger

from dsnot_modifier.masks import (
    MaskStructureError,
    block_zero_counts,
    format_structure,
    infer_structure,
    parse_mask_structure,
)
from dsnot_modifier.digest import zero_mask_matches
from dsnot_modifier.report import REPORT_FILE_NAME, read_report, umask_permissions
from dsnot_modifier.upstream import is_compressor_save

__all__ = [
    "CheckpointError",
    "LayerCheck",
    "VerifyResult",
    "save_checkpoint",
    "verify_checkpoint",
    "read_zero_mask",
    "CheckpointTensors",
]

RECIPE_FILE_NAME = "recipe.yaml"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or verified as asked; the message names the fix."""


# ------------------------------------------------------------------------ reading


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err}); re-save the checkpoint") from None
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{path} is incomplete: its index names {missing}, which are missing; "
                "re-save the checkpoint"
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (
            f" (it holds {pickles}: pickle files, which verify never loads; re-save with "
            "save_pretrained, which writes safetensors)" if pickles else ""
        )
        raise CheckpointError(f"no .safetensors files in {path}{hint}")
    return files


class CheckpointTensors:
    """Name -> tensor over the safetensors files of a checkpoint, read lazily."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        self._open = safe_open
        for file in _safetensors_files(path):
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        self._where[key] = file
            except Exception as err:  # truncated or corrupt file
                raise CheckpointError(
                    f"cannot read {file} ({err}): the file is incomplete or corrupt; "
                    "re-save the checkpoint"
                ) from None

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        """The names of the tensors, over all the files."""
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        file = self._where[key]
        try:
            with self._open(str(file), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as err:
            raise CheckpointError(
                f"cannot read {key} from {file} ({err}): the file is incomplete or corrupt; "
                "re-save the checkpoint"
            ) from None


def _expand_columns(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A per-tensor, per-row or per-group tensor (zero points) broadcast to ``[rows, cols]``."""
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(1, 1).expand(rows, cols)
    t = t.reshape(rows, -1)
    if t.shape[1] == 1 or t.shape[1] == cols:
        return t.expand(rows, cols)
    group = math.ceil(cols / t.shape[1])
    return t.repeat_interleave(group, dim=1)[:, :cols]


_LINEAR = None


def _scheme_for(name: str, quant_config: dict | None):
    """The compressed-tensors scheme (and format) that config.json gives layer ``name``."""
    global _LINEAR
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils import is_match

    if not quant_config:
        raise CheckpointError(
            f"{name} is stored compressed but config.json has no quantization_config; "
            "the checkpoint is incomplete, re-save it"
        )
    config = QuantizationConfig.model_validate(quant_config)
    if _LINEAR is None:
        _LINEAR = torch.nn.Linear(1, 1, device="meta")  # DSnoT refines Linear layers only
    for group in config.config_groups.values():
        if is_match(name, _LINEAR, group.targets, config.ignore or []):
            return group, group.format or config.format
    raise CheckpointError(
        f"no quantization config group of config.json matches {name}, which is stored "
        "compressed; the checkpoint's config does not belong to its weights"
    )


def read_zero_mask(
    tensors: CheckpointTensors, name: str, quant_config: dict | None = None
) -> tuple[torch.Tensor, str] | None:
    """
    The zeros of layer ``name``'s stored weight, as a bool ``[rows, cols]`` mask, and
    how the weight is stored (``float32``, ``int8``, ``float8_e4m3fn``,
    ``pack-quantized int4``...). ``None`` if the checkpoint has no such weight.

    - float weights: ``w == 0``;
    - int8/FP8 weights (compressed-tensors ``int-quantized``/``float-quantized``): the
      stored value equals the zero point (0 unless asymmetric); an FP8 ``-0`` is a zero;
    - packed weights (``weight_packed``): decompressed with compressed-tensors, ``== 0``.
    """
    if f"{name}.weight" in tensors:
        w = tensors.get(f"{name}.weight")
        if w.dim() != 2:
            raise CheckpointError(f"{name}.weight has shape {list(w.shape)}, not a 2-D Linear weight")
        if w.dtype in _FLOAT_DTYPES:
            return w == 0, str(w.dtype).removeprefix("torch.")
        if w.is_floating_point():  # float8 (and other narrow floats): compare in float32
            return w.float() == 0, str(w.dtype).removeprefix("torch.")
        zp_key = f"{name}.weight_zero_point"
        if zp_key in tensors:
            zp = _expand_columns(tensors.get(zp_key).to(torch.int32), *w.shape)
            return w.to(torch.int32) == zp, f"{str(w.dtype).removeprefix('torch.')} (zero point)"
        return w == 0, str(w.dtype).removeprefix("torch.")
    if f"{name}.weight_packed" in tensors:
        from compressed_tensors.compressors import BaseCompressor

        scheme, fmt = _scheme_for(name, quant_config)
        prefix = f"{name}."
        local = {
            key[len(prefix):]: tensors.get(key)
            for key in tensors.keys()
            if key.startswith(prefix) and "." not in key[len(prefix):]
        }
        try:
            compressor = BaseCompressor.get_value_from_registry(str(getattr(fmt, "value", fmt)))
            weight = compressor.decompress(local, scheme)["weight"]
        except Exception as err:
            raise CheckpointError(
                f"compressed-tensors could not decompress {name} ({type(err).__name__}: {err}); "
                "the checkpoint is corrupt or its config does not match its weights"
            ) from None
        bits = getattr(scheme.weights, "num_bits", "?")
        return weight == 0, f"{fmt} int{bits}"
    return None


# ----------------------------------------------------------------------- checking


@dataclass
class LayerCheck:
    """One layer of ``dsnot_report.json`` checked against the checkpoint's weights."""

    name: str
    stored: str
    shape: list[int]
    zeros: int
    sparsity: float
    structure: str  # found: "n:M" (at least n zeros in every block of M) or "unstructured"
    report_structure: str
    report_zeros: int
    swaps: int | None
    error_change: float | None
    extra_zeros: int = 0  # more than the report (quantized layers: rounding)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerifyResult:
    """Every layer of the report, checked; ``ok`` if none has a problem."""

    path: str
    quantization: str
    recipe: bool
    layers: list[LayerCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(layer.ok for layer in self.layers)

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "quantization": self.quantization,
                "recipe": self.recipe, "problems": self.problems,
                "layers": [asdict(layer) | {"ok": layer.ok} for layer in self.layers]}

    def table(self) -> str:
        header = ["layer", "stored", "shape", "sparsity", "structure", "report", "swaps",
                  "error", "status"]
        rows = []
        for c in self.layers:
            status = "ok" if c.ok else "FAIL: " + "; ".join(c.problems)
            if c.ok and c.extra_zeros:
                status += f" (+{c.extra_zeros} zeros from rounding)"
            rows.append([
                c.name, c.stored, "x".join(map(str, c.shape)), f"{c.sparsity:.2%}", c.structure,
                c.report_structure, "" if c.swaps is None else str(c.swaps),
                "" if c.error_change is None else f"{c.error_change:+.1%}", status,
            ])
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header) - 1)]
        lines = []
        for r in [header] + rows:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
        zeros = sum(c.zeros for c in self.layers)
        total = sum(c.shape[0] * c.shape[1] for c in self.layers)
        failed = sum(not c.ok for c in self.layers)
        lines.append("")
        lines.append(
            f"{self.path}: {len(self.layers)} layers, {zeros / max(total, 1):.2%} sparsity, "
            f"weights {self.quantization}; recipe.yaml {'present' if self.recipe else 'absent'}"
        )
        lines.extend(f"problem: {p}" for p in self.problems)
        lines.append("OK: the checkpoint holds the zeros and structure its DSnoT report states"
                     if self.ok else f"FAILED: {failed} layers do not match {REPORT_FILE_NAME}")
        return "\n".join(lines)


def _parse_structure(text: str, where: str) -> tuple[int, int] | None:
    try:
        return parse_mask_structure(text)
    except MaskStructureError as err:
        raise CheckpointError(f"{where}: {err}") from None


def _load_report(path: Path) -> dict:
    file = path / REPORT_FILE_NAME
    if not file.is_file():
        raise CheckpointError(
            f"no {REPORT_FILE_NAME} in {path}: either the checkpoint was not made by a recipe "
            f"with DSnoTModifier, or its save did not complete ({REPORT_FILE_NAME} is written "
            "after the weights). Save it again with dsnot_modifier.checkpoint.save_checkpoint "
            "(or model.save_pretrained after oneshot)"
        )
    try:
        data = read_report(file)
    except ValueError as err:
        raise CheckpointError(f"{file} is not a DSnoT report ({err})") from None
    if not data["layers"]:
        raise CheckpointError(f"{file} lists no layer: DSnoT refined nothing, nothing to verify")
    return data


def _found_structure(zero: torch.Tensor, nm: tuple[int, int] | None) -> str:
    """
    Reported N:M: ``"n:M"`` with n the fewest zeros of any block of M (``n >= N`` holds
    the structure). Reported unstructured: N:M only if every block holds exactly N
    zeros (as :func:`dsnot_modifier.masks.infer_structure` reads it), else unstructured.
    """
    if nm is not None:
        n, m = nm
        if zero.shape[1] % m:
            return "unstructured"
        return f"{int(block_zero_counts(zero, m).min())}:{m}"
    return format_structure(infer_structure((~zero).to(torch.float32)))


def _check_layer(entry: dict, tensors: CheckpointTensors, quant_config: dict | None) -> LayerCheck:
    name = entry["name"]
    nm = _parse_structure(entry["structure"], f"{REPORT_FILE_NAME}, {name}")
    before, after = entry.get("error_before"), entry.get("error_after")
    change = (after / before - 1.0) if before and after is not None else None
    check = LayerCheck(
        name=name, stored="missing", shape=list(entry["shape"]), zeros=0, sparsity=0.0,
        structure="-", report_structure=str(entry["structure"]), report_zeros=int(entry["zeros"]),
        swaps=entry.get("swaps"), error_change=change,
    )
    found = read_zero_mask(tensors, name, quant_config)
    if found is None:
        check.problems.append("no weight of that name in the checkpoint")
        return check
    zero, check.stored = found
    quantized = check.stored.split(" ")[0] not in [str(d).removeprefix("torch.") for d in _FLOAT_DTYPES]
    if list(zero.shape) != check.shape:
        check.problems.append(f"shape {list(zero.shape)} differs from the report's {check.shape}")
        check.shape = list(zero.shape)
        return check
    check.zeros = int(zero.sum())
    check.sparsity = check.zeros / zero.numel()
    check.structure = _found_structure(zero, nm)
    if nm is not None:
        n, m = nm
        if zero.shape[1] % m:
            check.problems.append(f"{zero.shape[1]} columns are not a multiple of {m}")
        else:
            short = int((block_zero_counts(zero, m) < n).sum())
            if short:
                check.problems.append(f"{short} blocks of {m} hold fewer than {n} zeros")
    if check.zeros < check.report_zeros:
        check.problems.append(
            f"{check.zeros} zeros, fewer than the report's {check.report_zeros}: weights "
            "DSnoT pruned are non-zero here (changed after DSnoT, e.g. by GPTQ or by hand)"
        )
    elif check.zeros == check.report_zeros and entry.get("mask_digest"):
        # the same count is not the same mask (a zero moved elsewhere)
        if not zero_mask_matches(zero, entry["mask_digest"]):
            check.problems.append(
                "the zero mask differs from the one DSnoT left (same number of zeros, other "
                "places): the weights were changed after DSnoT"
            )
    elif check.zeros > check.report_zeros:
        if quantized:
            check.extra_zeros = check.zeros - check.report_zeros
        else:
            check.problems.append(
                f"{check.zeros} zeros, more than the report's {check.report_zeros}: the "
                "weights are not the ones DSnoT left"
            )
    return check


def verify_checkpoint(path: str | os.PathLike) -> VerifyResult:
    """
    Check the saved checkpoint at ``path`` against its ``dsnot_report.json``.

    :return: the per-layer result (``result.ok``, ``result.table()``)
    :raises CheckpointError: if the report is missing or malformed, or the weights
        cannot be read (no safetensors, a truncated file, a config that does not fit)
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory: give the checkpoint directory")
    report = _load_report(path)
    config_file = path / "config.json"
    quant_config = None
    if config_file.is_file():
        try:
            quant_config = json.loads(config_file.read_text()).get("quantization_config")
        except ValueError as err:
            raise CheckpointError(f"{config_file} is not valid JSON ({err}); re-save the checkpoint") from None
    tensors = CheckpointTensors(path)
    result = VerifyResult(
        path=str(path),
        quantization=(quant_config or {}).get("format", "dense") if quant_config else "dense",
        recipe=(path / RECIPE_FILE_NAME).is_file(),
    )
    for entry in report["layers"]:
        result.layers.append(_check_layer(entry, tensors, quant_config))
    return result


# ------------------------------------------------------------------------ writing


def _source_dir(model) -> Path | None:
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if source and os.path.isdir(source):
        return Path(source).resolve()
    return None


def _settle_tree(directory: Path):
    """The permissions the umask gives (the writers make some files private), then fsync."""
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            umask_permissions(os.path.join(root, name))
        for name in files:
            umask_permissions(os.path.join(root, name))
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    umask_permissions(directory)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_destination(path: Path, source: Path | None, overwrite: bool):
    """``path`` may be written: outside the input model's directory, and new or (with
    ``overwrite``) a model checkpoint directory."""
    if source is not None and (path == source or source in path.parents or path in source.parents):
        raise CheckpointError(
            f"{path} overlaps the input model's directory {source}; the input model's files "
            "are never written: choose a directory outside it"
        )
    if not path.exists():
        return
    if not overwrite:
        raise FileExistsError(
            f"{path} already exists; pass overwrite=True to replace it, or choose another path"
        )
    if not path.is_dir() or (
        any(path.iterdir())
        and not ((path / "config.json").is_file() or (path / REPORT_FILE_NAME).is_file())
    ):
        raise CheckpointError(
            f"{path} exists and is not a model checkpoint directory, so overwrite=True "
            "will not replace it; remove it yourself or choose another path"
        )


def save_checkpoint(
    model: torch.nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    *,
    overwrite: bool = False,
    save_compressed: bool = True,
    report=None,
    verify: bool = True,
) -> Path:
    """
    Save a DSnoT-pruned (and maybe quantized) model so that ``path`` is either
    complete or absent: everything is written into a temporary sibling directory
    (``.NAME.partial-*``), synced, checked with :func:`verify_checkpoint`, then
    renamed to ``path``.

    After ``oneshot`` the model's ``save_pretrained`` is llm-compressor's (which
    compresses quantized layers, in memory too: they decompress on the next forward,
    and writes ``recipe.yaml``) wrapped by DSnoT's (which writes ``dsnot_report.json``).

    :param model: the model after oneshot with DSnoTModifier
    :param path: the checkpoint directory to make
    :param tokenizer: saved alongside if given
    :param overwrite: replace an existing checkpoint directory at ``path`` (the old one
        is removed only once the new one is in place)
    :param save_compressed: passed to llm-compressor's ``save_pretrained``
    :param report: a :class:`~dsnot_modifier.report.DSnoTReport` to write; needed when
        the model did not go through oneshot (``DSnoTModifier.report``)
    :param verify: check the written checkpoint against its report before committing
    :return: ``path``
    :raises FileExistsError: if ``path`` exists and ``overwrite`` is False
    :raises CheckpointError: if ``path`` is inside the input model's directory, no
        report is available, or the written checkpoint fails verification
    """
    path = Path(path).resolve()
    _check_destination(path, _source_dir(model), overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        save = model.save_pretrained
        if is_compressor_save(save):  # llm-compressor's (maybe DSnoT's on top)
            save(str(tmp), save_compressed=save_compressed)
        else:
            save(str(tmp))
        if report is not None:
            report.save(tmp)
        elif not (tmp / REPORT_FILE_NAME).is_file():
            raise CheckpointError(
                f"no {REPORT_FILE_NAME} was written: the model's save_pretrained is not the one "
                "oneshot with DSnoTModifier leaves; pass report=<DSnoTModifier>.report"
            )
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if verify:
            result = verify_checkpoint(tmp)
            if not result.ok:
                raise CheckpointError(
                    "the checkpoint written does not hold what its DSnoT report states; "
                    f"nothing was saved at {path}:\n{result.table()}"
                )
        _settle_tree(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / "checkpoint")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"Checkpoint saved to {path}")
    return path
