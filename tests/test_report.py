"""
``dsnot_modifier.report``: a layer's report made from its refinement (and weight update),
the run's report (its summary, its JSON and back), the report file (read with errors that
name the problem, written atomically with the permissions the umask gives), and the
``save_pretrained`` that writes it next to a checkpoint.
"""

import json
import os
import stat
import tempfile
from types import SimpleNamespace

import pytest
import torch
from llmcompressor.modifiers.pruning import WandaPruningModifier
from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained

from dsnot_harness.pipeline import load_model
from dsnot_modifier import DSnoTModifier
from dsnot_modifier import report as report_module
from dsnot_modifier.digest import mask_digest
from dsnot_modifier.report import (
    REPORT_FILE_NAME,
    DSnoTReport,
    LayerReport,
    SkippedLayer,
    attach_report,
    read_report,
    umask_permissions,
    write_json,
)
from helpers import COMMON, linears, run


def layer(name="model.layers.0.mlp.up_proj", before=2.0, after=1.5, swaps=3, seconds=0.25, **extra):
    return LayerReport(name=name, shape=[4, 8], structure="unstructured", objective="gram", initial="pruner",
                       zeros=16, sparsity=0.5, swaps=swaps, rows_changed=2, error_before=before,
                       error_after=after, seconds=seconds, **extra)


def full_report() -> DSnoTReport:
    return DSnoTReport(
        params={"objective": "gram", "max_cycles": 50, "min_tokens": 128},
        layers=[layer(pruner_structure="0:0", mask_digest="sha256:00ff"),
                layer("b", before=1.0, after=1.1, swaps=2, seconds=0.5, update_error_before=1.1,
                      update_error_after=0.9)],
        skipped=[SkippedLayer("c", "few tokens", 12, "fewer than min_tokens"), SkippedLayer("d", "never called")],
    )


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    """The process's umask for the test (put back after it)."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


# ------------------------------------------------------------------- LayerReport

def test_layer_report_of_a_refinement_and_its_update():
    g = torch.Generator().manual_seed(0)
    swapped = torch.randn(4, 8, generator=g)
    swapped[:, :3] = 0.0  # 12 zeros
    result = SimpleNamespace(weight=swapped, swaps=5, rows_changed=3, error_before=2.0, error_after=1.0)
    entry = LayerReport.of(result, name="x", structure="2:4", objective="gram", initial="pruner",
                           seconds=0.5, pruner_structure="2:4")
    assert (entry.name, entry.shape, entry.structure, entry.objective, entry.initial) == (
        "x", [4, 8], "2:4", "gram", "pruner")
    assert (entry.zeros, entry.sparsity, entry.swaps, entry.rows_changed) == (12, 12 / 32, 5, 3)
    assert (entry.error_before, entry.error_after, entry.seconds, entry.pruner_structure) == (2.0, 1.0, 0.5, "2:4")
    assert entry.mask_digest == mask_digest(swapped)
    assert (entry.update_error_before, entry.update_error_after, entry.update_reason) == (None, None, None)
    # the weight update moved values, not zeros: its weight is the one described
    updated = swapped * 2
    updated[0, 3] = 0.0  # (one more zero, to tell the two weights apart)
    update = SimpleNamespace(weight=updated, error_before=1.0, error_after=0.8, reason=None, seconds=0.25)
    entry = LayerReport.of(result, name="x", structure="2:4", objective="gram", initial="pruner",
                           seconds=0.5, update=update)
    assert (entry.zeros, entry.sparsity, entry.mask_digest) == (13, 13 / 32, mask_digest(updated))
    assert entry.mask_digest != mask_digest(swapped)
    assert (entry.swaps, entry.error_before, entry.error_after) == (5, 2.0, 1.0)  # the swaps' figures
    assert (entry.update_error_before, entry.update_error_after, entry.update_reason) == (1.0, 0.8, None)
    assert entry.update_seconds == 0.25
    assert entry.pruner_structure is None
    left = SimpleNamespace(weight=swapped, error_before=None, error_after=None, reason="singular",
                           seconds=0.0)
    entry = LayerReport.of(result, name="x", structure="2:4", objective="gram", initial="pruner",
                           seconds=0.5, update=left)
    assert entry.update_reason == "singular" and entry.zeros == 12


def test_error_change():
    assert layer(before=2.0, after=1.5).error_change == -0.25
    assert layer(before=2.0, after=3.0).error_change == 0.5
    assert layer(before=0.0, after=0.0).error_change == 0.0
    assert layer(before=0.0, after=1.0).error_change == 0.0  # no relative change from zero


def test_line():
    assert layer().line() == (
        "model.layers.0.mlp.up_proj: 3 swaps in 2/4 rows, unstructured at 50.0% sparsity, "
        "gram error 2 -> 1.5 (-25.0%), 0.25s")
    assert layer(update_error_before=1.5, update_error_after=1.25).line() == (
        "model.layers.0.mlp.up_proj: 3 swaps in 2/4 rows, unstructured at 50.0% sparsity, "
        "gram error 2 -> 1.5 (-25.0%), weight update: gram error 1.5 -> 1.25, 0.25s")
    assert layer(update_reason="no rows to update").line() == (
        "model.layers.0.mlp.up_proj: 3 swaps in 2/4 rows, unstructured at 50.0% sparsity, "
        "gram error 2 -> 1.5 (-25.0%), weights not updated (no rows to update), 0.25s")


# ------------------------------------------------------------------- DSnoTReport

def test_add_sorts_and_logs(infos):
    """Refined layers are logged after the prefix given (none: not logged), skipped ones are listed."""
    report = DSnoTReport()
    report.add(layer("a"))
    report.add(layer("b"), log="DSnoT rank 1")
    report.add(layer("c"), log=None)
    report.add(SkippedLayer("d", "not pruned"))
    report.add(None)
    assert [x.name for x in report.layers] == ["a", "b", "c"]
    assert report.skipped == [SkippedLayer("d", "not pruned")]
    assert len([m for m in infos if f"DSnoT {layer('a').line()}" in m]) == 1
    assert len([m for m in infos if f"DSnoT rank 1 {layer('b').line()}" in m]) == 1
    assert not [m for m in infos if layer("c").line() in m]
    assert report.skipped_names("not pruned") == ["d"] and report.skipped_names("few tokens") == []


def test_summary():
    report = DSnoTReport(layers=[layer("a"), layer("b", before=1.0, after=1.1, swaps=2, seconds=0.5)])
    assert report.summary() == {"layers": 2, "swaps": 5, "mean_error_change": pytest.approx((-0.25 + 0.1) / 2),
                                "layers_error_lowered": 1, "seconds": 0.75}
    assert report.summary_line() == (
        "DSnoT refined 2 layers with 5 swaps in 0.8s; error lowered in 1/2 layers, by 7.5% on average")
    assert DSnoTReport().summary() == {"layers": 0, "swaps": 0, "mean_error_change": 0.0,
                                       "layers_error_lowered": 0, "seconds": 0}
    # with update_weights: the layers updated, and the update's mean change of the gram error
    report.layers += [layer("c", update_error_before=2.0, update_error_after=1.0),
                      layer("d", update_error_before=1.0, update_error_after=1.0, update_reason="singular")]
    summary = report.summary()
    assert (summary["layers"], summary["swaps"], summary["layers_error_lowered"]) == (4, 11, 3)
    assert summary["layers_updated"] == 1
    assert summary["mean_update_error_change"] == pytest.approx((-0.5 + 0.0) / 2)


def test_to_dict_save_and_load_round_trip(tmp_path):
    report = full_report()
    data = report.to_dict()
    assert list(data) == ["params", "summary", "layers", "skipped"]
    assert data["summary"] == report.summary()
    assert data["layers"][1]["update_error_after"] == 0.9 and data["layers"][0]["mask_digest"] == "sha256:00ff"
    assert data["skipped"] == [{"name": "c", "reason": "few tokens", "tokens": 12, "detail": "fewer than min_tokens"},
                               {"name": "d", "reason": "never called", "tokens": None, "detail": ""}]
    path = report.save(tmp_path)
    assert path == os.path.join(tmp_path, REPORT_FILE_NAME)
    assert json.loads((tmp_path / REPORT_FILE_NAME).read_text()) == data
    assert DSnoTReport.load(tmp_path) == report  # the directory
    assert DSnoTReport.load(path) == report  # the file
    # a report written before skipped layers were listed
    del data["skipped"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = DSnoTReport.load(tmp_path / "old.json")
    assert old.skipped == [] and old.layers == report.layers and old.params == report.params


def test_report_written_next_to_checkpoint(tiny_model_dir, calib_windows, tmp_path):
    out = tmp_path / "pruned"
    dsnot = DSnoTModifier(**COMMON)
    model = run(tiny_model_dir, calib_windows,
                [WandaPruningModifier(sparsity=0.5, **COMMON), dsnot], output_dir=str(out))
    data = json.loads((out / "dsnot_report.json").read_text())
    assert len(data["layers"]) == 14 and data["params"]["objective"] == "gram"
    assert data["params"]["min_tokens"] == 128  # the rule behind the report's skipped layers
    assert data["summary"]["swaps"] == sum(layer.swaps for layer in dsnot.report.layers) > 0
    reloaded = linears(load_model(str(out)))
    for name, w in linears(model).items():
        assert torch.equal(reloaded[name], w), name


# ------------------------------------------------------------------- read_report

def test_read_report_names_what_is_wrong(tmp_path):
    good = {"layers": [{"name": "a", "shape": [4, 8], "structure": "2:4", "zeros": 16}]}
    (tmp_path / REPORT_FILE_NAME).write_text(json.dumps(good))
    assert read_report(tmp_path) == good == read_report(tmp_path / REPORT_FILE_NAME)
    with pytest.raises(FileNotFoundError):
        read_report(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        read_report(tmp_path / "missing.json")
    cases = {
        "{not json": r"^JSONDecodeError: ",
        json.dumps({"params": {}}): r"^KeyError: 'layers'$",
        json.dumps({"layers": [{"name": "a", "shape": [4, 8], "structure": "2:4"}]}): r"^KeyError: 'zeros'$",
        json.dumps({"layers": [{"shape": [4, 8], "structure": "2:4", "zeros": 1}]}): r"^KeyError: 'name'$",
        json.dumps({"layers": [3]}): r"^TypeError: ",
        json.dumps([1, 2]): r"^TypeError: ",
    }
    for i, (text, match) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.json"
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_report(path)


# -------------------------------------------------------- write_json and permissions

def test_write_json_writes_atomically_with_the_umask_permissions(tmp_path, umask):
    path = tmp_path / "data.json"
    assert write_json(path, {"a": [1, 2]}) == str(path)
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert mode(path) == 0o666 & ~umask  # not mkstemp's 0600
    write_json(path, {"b": 3})  # replaced
    assert json.loads(path.read_text()) == {"b": 3}
    assert os.listdir(tmp_path) == ["data.json"]  # no temporary file left
    # a write that fails half-way leaves the file as it was, and no temporary file
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json(path, {"c": [1, 2, object()]})
    assert json.loads(path.read_text()) == {"b": 3}
    assert os.listdir(tmp_path) == ["data.json"]


def test_write_json_interrupted_leaves_nothing_behind(tmp_path, monkeypatch):
    path = tmp_path / "data.json"

    def dies(data, f, **kwargs):
        f.write('{"half": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module.json, "dump", dies)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"half": 1})
    assert os.listdir(tmp_path) == []


def test_umask_permissions_are_those_of_open_and_mkdir(tmp_path, umask):
    fd, file = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    folder = tempfile.mkdtemp(dir=tmp_path)
    assert (mode(file), mode(folder)) == (0o600, 0o700)  # private, as made
    umask_permissions(file)
    umask_permissions(folder)
    assert (mode(file), mode(folder)) == (0o666 & ~umask, 0o777 & ~umask)
    assert os.umask(umask) == umask  # read, then put back as it was


# ------------------------------------------------------------------ attach_report

def fake_model(writes: list):
    """A model whose save_pretrained writes a private weights file (as transformers does),
    marked as llm-compressor marks the save_pretrained it wraps."""

    def save_pretrained(directory, *args, **kwargs):
        writes.append((directory, args, kwargs))
        fd = os.open(os.path.join(directory, "model.safetensors"), os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
        return "saved"

    save_pretrained._overridden = True
    return SimpleNamespace(save_pretrained=save_pretrained)


def test_attach_report_wraps_llm_compressors_save(tmp_path, umask):
    writes = []
    model = fake_model(writes)
    original = model.save_pretrained
    report = full_report()
    attach_report(model, report)
    assert model.save_pretrained is not original
    assert model.save_pretrained._overridden is True  # llm-compressor does not wrap it again
    out = tmp_path / "out"
    out.mkdir()
    older = out / "notes.txt"  # a file this save did not write keeps its mode
    older.write_text("mine")
    os.chmod(older, 0o600)
    os.utime(older, (0, 0))
    assert model.save_pretrained(str(out), "arg", safe_serialization=True) == "saved"
    assert writes == [(str(out), ("arg",), {"safe_serialization": True})]
    assert DSnoTReport.load(out) == report
    assert mode(out / "model.safetensors") == mode(out / REPORT_FILE_NAME) == 0o666 & ~umask
    assert mode(older) == 0o600
    # a second run on the same model: the same wrapper, the new report
    wrapper = model.save_pretrained
    second = DSnoTReport(params={"objective": "mean"}, layers=[layer("z")])
    attach_report(model, second)
    assert model.save_pretrained is wrapper
    model.save_pretrained(str(out))
    assert DSnoTReport.load(out) == second and len(writes) == 2


def test_attach_report_leaves_a_plain_save_alone(tmp_path, infos):
    writes = []
    model = fake_model(writes)
    del model.save_pretrained._overridden  # not oneshot's: nothing is wrapped
    original = model.save_pretrained
    attach_report(model, full_report())
    assert model.save_pretrained is original
    assert [m for m in infos if "save the report with DSnoTModifier.report.save(directory)" in m]
    model.save_pretrained(str(tmp_path))
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_attach_report_on_llm_compressors_own_save(tiny_model_dir, tmp_path, umask):
    """The save_pretrained llm-compressor's oneshot leaves (transformers writes the weights 0600)."""
    model = load_model(tiny_model_dir)
    modify_save_pretrained(model)
    report = full_report()
    attach_report(model, report)
    model.save_pretrained(str(tmp_path / "out"))
    files = os.listdir(tmp_path / "out")
    assert {"model.safetensors", "config.json", REPORT_FILE_NAME} <= set(files)
    for name in files:
        assert mode(tmp_path / "out" / name) == 0o666 & ~umask, name
    assert DSnoTReport.load(tmp_path / "out") == report
