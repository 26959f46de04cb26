"""
Checkpoints of DSnoT-pruned (and quantized) models: oneshot(output_dir=...) and
model.save_pretrained(..., save_compressed=True) reload to exactly the weights that
were in memory; dsnot_report.json and recipe.yaml sit next to them; `dsnot verify`
passes on good checkpoints and fails on tampered ones and lying reports;
save_checkpoint never leaves a half-written or silently clobbered directory.
"""

import json
import os
import stat
import shutil

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.pruning import WandaPruningModifier
from llmcompressor.recipe import Recipe
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from dsnot_modifier import DSnoTModifier
from dsnot_modifier.checkpoint import CheckpointError, save_checkpoint, verify_checkpoint
from dsnot_modifier.cli import main
from dsnot_harness.pipeline import load_model, load_tokenizer
from test_modifier import COMMON, linears, run

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")


class Capture(Modifier):
    """Last in a recipe: at finalize, every weight as the model computes with it
    (a quantized Linear's fake-quantized, i.e. dequantized, weight)."""

    weights: dict = {}

    def on_initialize(self, state, **kwargs):
        self.weights.clear()
        self._model = state.model
        return True

    def on_finalize(self, state, **kwargs):
        for name, module in self._model.named_modules():
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.nn.Parameter):
                continue
            scheme = getattr(module, "quantization_scheme", None)
            with torch.no_grad():
                if scheme is not None and scheme.weights is not None:
                    w = forward_quantize(module, w.detach(), "weight", scheme.weights)
                self.weights[name] = w.detach().clone()
        return True


def recipe_from(name: str) -> list:
    return list(Recipe.create_instance(os.path.join(RECIPES, name)).modifiers) + [Capture()]


def reload(path) -> dict:
    """name -> weight of the checkpoint loaded by transformers, compressed layers decompressed."""
    with open(os.path.join(path, "config.json")) as f:
        quantized = "quantization_config" in json.load(f)
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if quantized else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True, **kwargs)
    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.nn.Parameter)}


def assert_reloads_exactly(path, in_memory: dict):
    loaded = reload(path)
    assert set(in_memory) <= set(loaded)
    for name, w in in_memory.items():
        assert loaded[name].dtype == w.dtype, name
        assert torch.equal(loaded[name], w), name  # bitwise, so the zero pattern too
        assert torch.equal(loaded[name] == 0, w == 0), name


def verify_cli(path, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["verify", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


def tampered(src, dst, edit) -> str:
    """A copy of checkpoint ``src`` whose model.safetensors ``edit(tensors)`` changed."""
    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata=metadata)
    return str(dst)


def lying(src, dst, edit) -> str:
    """A copy of checkpoint ``src`` whose dsnot_report.json ``edit(report)`` changed."""
    shutil.copytree(src, dst)
    file = os.path.join(dst, "dsnot_report.json")
    with open(file) as f:
        report = json.load(f)
    edit(report)
    with open(file, "w") as f:
        json.dump(report, f)
    return str(dst)


def first_zero(t: torch.Tensor, zero=0) -> tuple[int, int]:
    idx = (t == zero).nonzero()[0]
    return int(idx[0]), int(idx[1])


Q_PROJ = "model.layers.0.self_attn.q_proj"


# ------------------------------------------------------------------ dense 2:4


def assert_umask_permissions(directory):
    """Every file (and the directory) has the mode a plain open or mkdir gives."""
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o777 & ~mask
    names = os.listdir(directory)
    assert {"model.safetensors", "dsnot_report.json", "config.json"} <= set(names)
    for name in names:
        mode = stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)
        assert mode == 0o666 & ~mask, (name, oct(mode))


@pytest.fixture(scope="module")
def dense_checkpoint(tiny_model_dir, calib_windows, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "wanda-dsnot-2of4"
    dsnot = DSnoTModifier(**COMMON)
    model = run(tiny_model_dir, calib_windows,
                [WandaPruningModifier(sparsity=0.5, mask_structure="2:4", **COMMON), dsnot],
                output_dir=str(out))
    return out, model, dsnot


def test_dense_checkpoint_reloads_exactly_with_report_and_recipe(dense_checkpoint, capsys):
    out, model, dsnot = dense_checkpoint
    assert {"config.json", "model.safetensors", "recipe.yaml", "dsnot_report.json",
            "tokenizer.json"} <= set(os.listdir(out))
    recipe = (out / "recipe.yaml").read_text()
    assert "WandaPruningModifier" in recipe and "DSnoTModifier" in recipe
    report = json.loads((out / "dsnot_report.json").read_text())
    assert len(report["layers"]) == 14
    assert [layer["swaps"] for layer in report["layers"]] == [layer.swaps for layer in dsnot.report.layers]
    for layer in report["layers"]:
        assert layer["structure"] == "2:4" and layer["sparsity"] == 0.5
        assert layer["swaps"] > 0 and layer["error_after"] < layer["error_before"]
    in_memory = {n: m.weight.detach() for n, m in model.named_modules()
                 if isinstance(getattr(m, "weight", None), torch.nn.Parameter)}
    assert_reloads_exactly(out, in_memory)

    assert_umask_permissions(out)
    code, text, _ = verify_cli(out, capsys)
    assert code == 0, text
    assert "OK: the checkpoint holds" in text
    rows = [line for line in text.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 14 and all(" 2:4 " in r and "50.00%" in r and r.endswith("ok") for r in rows)


def test_verify_fails_on_an_unzeroed_weight(dense_checkpoint, tmp_path, capsys):
    out = dense_checkpoint[0]

    def unzero(tensors):
        w = tensors[f"{Q_PROJ}.weight"]
        w[first_zero(w)] = 0.01

    code, text, _ = verify_cli(tampered(out, tmp_path / "t", unzero), capsys)
    assert code == 1
    (row,) = [line for line in text.splitlines() if line.startswith(Q_PROJ + " ")]
    assert "FAIL" in row and "1 blocks of 4 hold fewer than 2 zeros" in row and "fewer than the report's" in row
    assert "FAILED: 1 layers" in text


def test_verify_checks_the_mask_digest(dense_checkpoint, tmp_path, capsys):
    """The same number of zeros in other places fails; so does a digest of another kind."""
    out = dense_checkpoint[0]

    def moved(tensors):  # one zero of q_proj moved inside its block: same counts
        w = tensors[f"{Q_PROJ}.weight"]
        i, j = first_zero(w)
        k = next(c for c in range(j // 4 * 4, j // 4 * 4 + 4) if w[i, c] != 0)
        w[i, j], w[i, k] = w[i, k], 0.0

    code, text, _ = verify_cli(tampered(out, tmp_path / "t", moved), capsys)
    assert code == 1 and "the zero mask differs" in text

    def unknown(report):
        for layer in report["layers"]:
            assert layer["mask_digest"].split(":")[1].startswith("b2-")
            layer["mask_digest"] = layer["mask_digest"].replace(":b2-", ":v2-")

    code, text, _ = verify_cli(lying(out, tmp_path / "old", unknown), capsys)
    assert code == 1 and "the zero mask differs" in text


@pytest.mark.parametrize("edit,match", [
    (lambda r: r["layers"][0].update(structure="3:4"), "blocks of 4 hold fewer than 3 zeros"),
    (lambda r: r["layers"][0].update(zeros=r["layers"][0]["zeros"] + 1), "fewer than the report's"),
    (lambda r: r["layers"][0].update(zeros=r["layers"][0]["zeros"] - 1), "more than the report's"),
    (lambda r: r["layers"][0].update(name="model.layers.0.self_attn.nothing"), "no weight of that name"),
    (lambda r: r["layers"][0].update(shape=[32, 128]), "differs from the report's"),
], ids=["structure", "more-zeros", "fewer-zeros", "name", "shape"])
def test_verify_fails_on_a_report_that_lies(dense_checkpoint, tmp_path, capsys, edit, match):
    code, text, _ = verify_cli(lying(dense_checkpoint[0], tmp_path / "l", edit), capsys)
    assert code == 1 and match in text


def test_verify_refuses_what_it_cannot_check(dense_checkpoint, tiny_model_dir, tmp_path, capsys):
    out = dense_checkpoint[0]
    # a checkpoint without its report (not DSnoT's, or a save that died before the report)
    code, _, err = verify_cli(tiny_model_dir, capsys)
    assert code == 2 and "no dsnot_report.json" in err and "save_checkpoint" in err
    # a truncated weights file
    shutil.copytree(out, tmp_path / "cut")
    file = tmp_path / "cut" / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    code, _, err = verify_cli(tmp_path / "cut", capsys)
    assert code == 2 and "incomplete or corrupt" in err
    # pickle weights only
    (tmp_path / "bin").mkdir()
    shutil.copy(out / "dsnot_report.json", tmp_path / "bin")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not loaded")
    code, _, err = verify_cli(tmp_path / "bin", capsys)
    assert code == 2 and "never loads" in err
    # a malformed report
    bad = lying(out, tmp_path / "bad", lambda r: r.pop("layers"))
    code, _, err = verify_cli(bad, capsys)
    assert code == 2 and "is not a DSnoT report" in err


# ------------------------------------------------------- quantized checkpoints


def test_w8a8_checkpoint_from_oneshot_reloads_exactly(tiny_model_dir, calib_windows, tmp_path, capsys):
    out = tmp_path / "w8a8"
    recipe = recipe_from("wanda_dsnot_2of4_quant_w8a8.yaml")
    run(tiny_model_dir, calib_windows, recipe, output_dir=str(out))
    in_memory = recipe[-1].weights
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor(f"{Q_PROJ}.weight").dtype == torch.int8
        assert f.get_tensor(f"{Q_PROJ}.weight_scale").shape == (64, 1)
    assert "QuantizationModifier" in (out / "recipe.yaml").read_text()
    assert_reloads_exactly(out, in_memory)

    result = verify_checkpoint(out)
    assert result.ok and result.quantization == "int-quantized"
    assert {c.stored for c in result.layers} == {"int8"}
    assert all(c.structure == "2:4" and c.extra_zeros == 0 for c in result.layers)

    def unzero(tensors):
        w = tensors[f"{Q_PROJ}.weight"]
        w[first_zero(w)] = 3

    code, text, _ = verify_cli(tampered(out, tmp_path / "t", unzero), capsys)
    assert code == 1 and "1 blocks of 4 hold fewer than 2 zeros" in text


def test_w4a16_packed_checkpoint_from_save_pretrained(tiny_model_dir, calib_windows, tmp_path, capsys):
    recipe = recipe_from("wanda_dsnot_unstructured_quant_w4a16.yaml")
    model = run(tiny_model_dir, calib_windows, recipe)
    in_memory = {k: v.clone() for k, v in recipe[-1].weights.items()}
    out = tmp_path / "w4a16"
    model.save_pretrained(str(out), save_compressed=True)
    assert {"dsnot_report.json", "recipe.yaml"} <= set(os.listdir(out))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor(f"{Q_PROJ}.weight_packed").dtype == torch.int32
        assert f"{Q_PROJ}.weight" not in f.keys()
    assert_reloads_exactly(out, in_memory)

    result = verify_checkpoint(out)
    assert result.ok and result.quantization == "pack-quantized"
    report = {x["name"]: x for x in json.loads((out / "dsnot_report.json").read_text())["layers"]}
    for check in result.layers:
        assert check.stored == "pack-quantized int4" and check.structure == "unstructured"
        # the zeros verify reads from the packed int4 values are those of the dequantized weight
        assert check.zeros == int((in_memory[check.name] == 0).sum())
        assert check.extra_zeros == check.zeros - report[check.name]["zeros"] >= 0

    def scramble(tensors):  # every 4-bit value of one packed word becomes 1
        tensors[f"{Q_PROJ}.weight_packed"][0, 0] = 0x11111111

    code, text, _ = verify_cli(tampered(out, tmp_path / "t", scramble), capsys)
    assert code == 1 and "fewer than the report's" in text
    lie = lying(out, tmp_path / "l", lambda r: r["layers"][0].update(structure="2:4"))
    code, text, _ = verify_cli(lie, capsys)
    assert code == 1 and "hold fewer than 2 zeros" in text


# --------------------------------------------------------------- save_checkpoint


def test_save_checkpoint_is_atomic_and_never_clobbers(tiny_model_dir, calib_windows, tmp_path):
    recipe = recipe_from("wanda_dsnot_2of4_quant_fp8.yaml")
    model = run(tiny_model_dir, calib_windows, recipe)
    in_memory = {k: v.clone() for k, v in recipe[-1].weights.items()}
    tokenizer = load_tokenizer(tiny_model_dir)
    out = tmp_path / "ckpt"

    def leftovers():
        return [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]

    class Dies:
        """A tokenizer whose save is interrupted, as a process killed mid-save."""

        def save_pretrained(self, directory):
            assert os.path.isfile(os.path.join(directory, "model.safetensors"))
            assert not out.exists() or (out / "marker").exists()  # the target is untouched so far
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, out, Dies())
    assert not out.exists() and leftovers() == []

    assert save_checkpoint(model, out, tokenizer) == out.resolve()
    assert {"model.safetensors", "dsnot_report.json", "recipe.yaml", "tokenizer.json"} <= set(os.listdir(out))
    assert_umask_permissions(out)
    assert_reloads_exactly(out, in_memory)
    assert verify_checkpoint(out).ok

    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(model, out, tokenizer)
    (out / "marker").write_text("the first save")
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, out, Dies(), overwrite=True)
    assert (out / "marker").is_file() and leftovers() == []  # the old checkpoint is intact
    save_checkpoint(model, out, tokenizer, overwrite=True)  # the model is compressed in memory now
    assert not (out / "marker").exists() and leftovers() == []
    assert_reloads_exactly(out, in_memory)

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a model checkpoint directory"):
        save_checkpoint(model, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_save_checkpoint_refuses_the_input_model_dir_and_a_model_without_report(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    before = sorted(os.listdir(tiny_model_dir))
    for target in (tiny_model_dir, os.path.join(tiny_model_dir, "pruned")):
        with pytest.raises(CheckpointError, match="input model's directory"):
            save_checkpoint(model, target, overwrite=True)
    assert sorted(os.listdir(tiny_model_dir)) == before
    with pytest.raises(CheckpointError, match="pass report="):
        save_checkpoint(model, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    assert linears(model)  # the model itself is left as it was
