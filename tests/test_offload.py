"""
DSnoT on offloaded models: weights in CPU memory or on disk (compressed-tensors'
offload caches, loaded with load_offloaded_model as llm-compressor 0.14 does) and
onloaded one subgraph at a time by the sequential pipeline.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest
import torch

from dsnot_modifier import DSnoTConfigError, DSnoTModifier
from helpers import COMMON, linears, load_offloaded, run
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.pruning import WandaPruningModifier

pytestmark = pytest.mark.offload


def wanda_dsnot():
    dsnot = DSnoTModifier(**COMMON)
    return [WandaPruningModifier(sparsity=0.5, **COMMON), dsnot], dsnot


def standalone():
    dsnot = DSnoTModifier(initial="wanda", mask_structure="2:4", objective="mean", **COMMON)
    return [dsnot], dsnot


RECIPES = {"wanda+dsnot": wanda_dsnot, "dsnot": standalone}


SPIED: list = []  # [the DSnoTModifier to look at, then what was seen]


class SnapshotSpy(Modifier):
    """At each epoch end, before DSnoT refines: where DSnoT keeps its dense copies."""

    def on_initialize(self, state, **kwargs):
        return True

    def on_sequential_epoch_end(self, state, event, **kwargs):
        dsnot = SPIED[0]
        for module, layer in dsnot._layers.items():
            dense = layer.dense
            SPIED.append((dense.device.type, dense.data_ptr() == module.weight.data_ptr()))


def one_layer_bytes(model) -> int:
    """DSnoT's state for one decoder layer (gram objective): the 7 dense weights and
    a float32 Gram matrix per distinct input (q/k/v, o, gate/up, down)."""
    layer = model.model.layers[0]
    weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    attn = layer.self_attn.o_proj.in_features
    return 4 * (weights + 2 * hidden**2 + attn**2 + inter**2)


@pytest.fixture(scope="module")
def in_memory(tiny_model_dir, calib_windows):
    """Each recipe on the model in plain memory (the sequential pipeline's default)."""
    results = {}
    for name, make in RECIPES.items():
        recipe, dsnot = make()
        model = run(tiny_model_dir, calib_windows, recipe)
        results[name] = (linears(model), [(l.name, l.swaps) for l in dsnot.report.layers], dsnot.peak_state_bytes)
    return results


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_offloaded_run_equals_the_in_memory_run(tiny_model_dir, calib_windows, in_memory, tmp_path, where, recipe):
    checkpoint = os.path.join(tiny_model_dir, "model.safetensors")
    before = hashlib.sha256(open(checkpoint, "rb").read()).hexdigest()
    model = load_offloaded(tiny_model_dir, where, tmp_path / "offload")
    cache = type(model.model.layers[0].mlp.down_proj._parameters).__name__
    assert cache == {"cpu": "CPUCache", "disk": "DiskCache"}[where]

    steps, dsnot = RECIPES[recipe]()
    SPIED[:] = [dsnot]
    run(tiny_model_dir, calib_windows, steps[:-1] + [SnapshotSpy(), dsnot], model=model)

    weights, layers, peak = in_memory[recipe]
    got = linears(model)  # onloaded from the cpu or read back from disk
    for name, weight in weights.items():
        assert torch.equal(got[name], weight), name
    assert [(l.name, l.swaps) for l in dsnot.report.layers] == layers
    # DSnoT held at most one decoder layer's state, and nothing afterwards
    assert dsnot.peak_state_bytes == peak
    assert dsnot.state_bytes == 0 and not dsnot._layers
    # the dense copies waited on the cpu, as copies (not the onloaded weights)
    copies = SPIED[1:]
    assert len(copies) == 14 and all(device == "cpu" and not shared for device, shared in copies)
    if where == "disk":
        # the refined weights went to new files in the offload folder; the checkpoint
        # the offload pointed at is untouched
        files = os.listdir(tmp_path / "offload")
        assert files and any(not os.path.islink(tmp_path / "offload" / f) for f in files)
        assert hashlib.sha256(open(checkpoint, "rb").read()).hexdigest() == before


def test_state_is_one_layer_whatever_the_depth(tiny_model_dir, calib_windows, tmp_path):
    """DSnoT's peak memory is that of one decoder layer: 2 layers or 4, the same."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    deep_dir = tmp_path / "deep"
    AutoModelForCausalLM.from_config(config).save_pretrained(deep_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_model_dir, f), deep_dir / f)

    peaks = {}
    for path in (tiny_model_dir, str(deep_dir)):
        recipe, dsnot = wanda_dsnot()
        model = run(path, calib_windows, recipe, model=load_offloaded(path, "disk", tmp_path / f"offload{len(peaks)}"))
        peaks[path] = (dsnot.peak_state_bytes, len(dsnot.report.layers))
        expected = one_layer_bytes(model)
    (small, n_small), (deep, n_deep) = peaks.values()
    assert (n_small, n_deep) == (14, 28)
    assert small == deep == expected == 262144  # 256 KiB: 147,456 of weights + 114,688 of Gram
    print(f"DSnoT peak state: {deep} bytes for 2 or 4 layers "
          f"(all target weights of the 4-layer model: {4 * 4 * 36864} bytes)")


# ----------------------------------------------------------- unwritable offload

def make_unwritable(path) -> callable | None:
    """Make a directory unwritable, even for root (chattr +i); None if impossible."""
    os.chmod(path, 0o555)
    undo = [lambda: os.chmod(path, 0o755)]
    probe = os.path.join(path, ".probe")
    try:
        open(probe, "w").close()
        os.remove(probe)
    except OSError:
        return undo[0]  # chmod was enough (not root)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        undo.insert(0, lambda: subprocess.run(["chattr", "-i", str(path)], check=True))
        return lambda: [u() for u in undo]
    undo[0]()
    return None


def test_unwritable_offload_folder_is_refused_before_pruning(tiny_model_dir, calib_windows, tmp_path):
    folder = tmp_path / "offload"
    model = load_offloaded(tiny_model_dir, "disk", folder)
    dense = linears(model)
    undo = make_unwritable(folder)
    if undo is None:
        pytest.skip("cannot make a directory unwritable here (root without chattr)")
    try:
        with pytest.raises(DSnoTConfigError, match="cannot be written") as info:
            run(tiny_model_dir, calib_windows, wanda_dsnot()[0], model=model)
    finally:
        undo()
    assert str(folder) in str(info.value) and "offload_folder" in str(info.value)
    assert all(torch.equal(dense[n], w) for n, w in linears(model).items())  # nothing pruned


def test_offload_folder_becoming_unwritable_mid_run(tiny_model_dir, calib_windows, tmp_path):
    """The write itself fails (the folder turned read-only after the checks)."""
    folder = tmp_path / "offload"
    model = load_offloaded(tiny_model_dir, "disk", folder)
    undos = []

    class LockFolder(Modifier):
        def on_initialize(self, state, **kwargs):
            return True

        def on_sequential_epoch_end(self, state, event, **kwargs):
            if not undos:
                undos.append(make_unwritable(folder))

    dsnot = DSnoTModifier(initial="wanda", sparsity=0.5, **COMMON)
    try:
        with pytest.raises(DSnoTConfigError, match="writing the refined weight of") as info:
            run(tiny_model_dir, calib_windows, [LockFolder(), dsnot], model=model)
    finally:
        if undos and undos[0] is not None:
            undos[0]()
    if undos[0] is None:
        pytest.skip("cannot make a directory unwritable here (root without chattr)")
    assert str(folder) in str(info.value)
