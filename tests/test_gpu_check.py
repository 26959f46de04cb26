"""scripts/gpu-check (benchmarks/gpu_check.py), the GPU check of issue 29, kept from rotting
on machines without a GPU: its ``--smoke`` run (every part, tiny shapes, CPU) and the JSON it
writes, the stop without CUDA, the wheels (named with their pip download line when missing,
installed without network when carried, within the 60 MB) and the checks of the targets."""

import json
import math
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from helpers import ROOT, load_script

SCRIPT = ROOT / "scripts" / "gpu-check"


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("benchmarks/gpu_check.py")


def run_script(*args, **env):
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable, **env}, timeout=600)


def numbers(value):
    """Every number in a JSON value."""
    if isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.slow
def test_smoke_run_writes_the_json_and_the_table(tmp_path, gpu_check):
    out = tmp_path / "check.json"
    run = run_script("--smoke", "--json", str(out), "--wheels", str(tmp_path / "no-wheels"),
                     "--site", str(tmp_path / "site"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data) >= {"meta", "parts", "tests", "refine", "agreement", "oneshot", "checks"}
    assert data["meta"]["smoke"] and data["meta"]["device"] == "cpu"
    assert list(data["parts"]) == gpu_check.SMOKE_PARTS
    assert all(part["status"] == "ok" for part in data["parts"].values()), data["parts"]
    assert all(math.isfinite(x) for x in numbers(data))
    # the device tests ran (through the --device option) and passed
    assert data["tests"]["finished"] and data["tests"]["passed"] == len(gpu_check.SMOKE_TESTS)
    assert data["tests"]["failed"] == data["tests"]["errors"] == 0
    # per layer: both shapes x structures x objectives, with syncs and the update
    refine = data["refine"]
    assert len(refine) == len(gpu_check.REFINE_SHAPES["smoke"]) * 2 * 2
    for row in refine:
        for key in ("refine_s", "wanda_s", "sparsegpt_s", "host_syncs_per_cycle", "sync_cycles_counted"):
            assert row[key] is not None and row[key] >= 0, (key, row)
        assert row["cuda_syncs_per_cycle"] is None  # CPU
        assert (row.get("update_s") is not None) == (row["objective"] == "gram")
    assert len(data["agreement"]) == 4
    assert all(r["fraction_same"] == 1.0 and r["zero_counts_equal"] for r in data["agreement"])
    oneshot = data["oneshot"]
    assert [(r["method"], r["sparsity"], r["objective"]) for r in oneshot] == [
        (m, s, p.get("objective")) for m, s, p in gpu_check.ONESHOT_RUNS]
    for row in oneshot:
        assert row["oneshot_s"] > 0 and row["layers"] == 14
        assert (row["dsnot_s"] is None) == ("dsnot" not in row["method"])
        assert row["dsnot_swaps"] is None or row["dsnot_swaps"] > 0
        assert row["peak_device_bytes"] is None  # CPU
    # every target checked; those that do not depend on the clock hold on the CPU too
    checks = {c["name"]: c for c in data["checks"]}
    assert all(c["ok"] in (True, False, None) and c["detail"] for c in checks.values())
    names = list(checks)
    for prefix in ("device tests pass", "refine <= 0.5x SparseGPT: ", "refine <= 2x Wanda: ",
                   "<= 1 host sync per cycle: ", "CPU = cpu: ", "oneshot Wanda + DSnoT (gram) <= 1.3x",
                   "exact zeros: ", "N:M: ", "rows keep their pruner's zero count: "):
        assert any(n.startswith(prefix) for n in names), prefix
    for name, check in checks.items():
        if not name.startswith(("refine <= ", "oneshot ")):
            assert check["ok"] is True, check
    printed = run.stdout
    assert "Targets (issue 29):" in printed and "PASS device tests pass" in printed
    assert "| shape | structure | objective | refine s |" in printed
    assert out.with_suffix(".md").read_text().strip() == printed.split("\n(JSON:")[0].strip()


def test_without_cuda_it_stops_at_once(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out, site = tmp_path / "check.json", tmp_path / "site"
    run = run_script("--json", str(out), "--wheels", str(tmp_path), "--site", str(site))
    assert run.returncode == 2
    assert "no CUDA device here" in run.stderr and "--smoke" in run.stderr
    assert not out.exists() and not site.exists()  # nothing installed, nothing run


def test_a_missing_wheel_is_named_with_its_download_line(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "WHEELS", [("no-such-dist", "1.2.3", 1000, "a test")])
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--smoke", "--wheels", str(tmp_path), "--site", str(tmp_path / "site"),
                        "--json", str(tmp_path / "check.json")])
    assert stop.value.code == 3
    err = capsys.readouterr().err
    python = "{}.{}".format(*sys.version_info[:2])
    assert gpu_check.download_line("no-such-dist", "1.2.3", python) in err
    assert f"pip download --no-deps --only-binary=:all: --python-version {python} " in err
    assert not (tmp_path / "check.json").exists()


def fake_wheel(folder, dist="no_such_dist", version="1.2.3", module="no_such_module"):
    """A minimal pure-Python wheel of ``dist``: one module and its metadata."""
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{module}/__init__.py", "VALUE = 42\n")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


def test_carried_wheels_are_installed_without_network(gpu_check, tmp_path, monkeypatch):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    wheel = fake_wheel(wheels)
    (wheels / "no_such_dist-9.9-py3-none-any.whl").write_bytes(b"")  # another version: not taken
    monkeypatch.setattr(gpu_check, "WHEELS", [("no-such-dist", "1.2.3", 1000, "a test"),
                                              ("torch", torch.__version__, 0, "installed here")])
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert gpu_check.plan_install(wheels) == ([wheel], [])
    done = gpu_check.prepare_packages(wheels, site, log=lambda text: None)
    assert done["installed"] == [wheel.name] and done["datasets_stub"] is False
    probe = subprocess.run([sys.executable, "-c", "import no_such_module; print(no_such_module.VALUE)"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert probe.stdout.strip() == "42"
    # a second run finds it installed there: nothing to do
    assert gpu_check.plan_install(wheels) == ([], [])


def test_the_datasets_stub_has_the_names_llmcompressor_imports(gpu_check, tmp_path):
    gpu_check.write_datasets_stub(tmp_path)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import datasets; "
            "from datasets import Dataset, DatasetDict, IterableDataset, load_dataset; "
            "from datasets.formatting.formatting import LazyRow; print(datasets.__file__)")
    probe = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == str(tmp_path / "datasets" / "__init__.py")


def test_the_wheels_fit_and_are_documented(gpu_check):
    assert sum(size for _, _, size, _ in gpu_check.WHEELS) <= gpu_check.WHEELS_LIMIT_BYTES
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    for dist, version, size, _ in gpu_check.WHEELS:
        for text in (gpu_check.__doc__, docs):
            assert f"{dist}=={version}" in text and f"{size:,}" in text, (dist, version)
    assert gpu_check.PIP_DOWNLOAD in docs  # the one-line command, and in --help:
    assert "pip download --no-deps --only-binary=:all: --python-version 3.12" in gpu_check.__doc__
    assert set(gpu_check.PART_LIMITS) >= {"tests", "agreement", "oneshot"}
    assert sum(gpu_check.PART_LIMITS.values()) <= 540 - 30  # installs and the report fit too


def test_targets_fail_and_go_unmeasured_as_they_should(gpu_check):
    refine = {"shape": [8, 16], "structure": "60%", "objective": "gram", "refine_s": 1.0,
              "sparsegpt_s": 4.0, "wanda_s": 0.25, "host_syncs_per_cycle": 1,
              "cuda_syncs_per_cycle": 2, "sync_cycles_counted": 9, "family": "7b"}
    agree = {"shape": [8, 16], "structure": "2:4", "objective": "mean", "rows": 1000,
             "rows_same_mask": 998, "fraction_same": 0.998, "zero_counts_equal": True,
             "device": "cuda"}
    result = {"tests": None, "refine": [refine], "refine_families": ["7b", "70b"],
              "agreement": [agree], "oneshot": []}
    checks = {c["name"]: c["ok"] for c in gpu_check.evaluate(result)}
    assert checks["refine <= 0.5x SparseGPT: 8×16 60% gram"] is True  # 0.25x
    assert checks["refine <= 2x Wanda: 8×16 60% gram"] is False  # 4x
    assert checks["<= 1 host sync per cycle: 8×16 60% gram"] is False  # CUDA saw 2
    assert checks["CPU = cuda: 8×16 2:4 mean"] is False  # 99.8% of the rows
    assert checks["refine targets, 70b shapes"] is None
    assert checks["device tests pass"] is None
    assert checks["oneshot Wanda + DSnoT (gram) <= 1.3x Wanda (60%)"] is None
