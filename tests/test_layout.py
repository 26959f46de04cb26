"""
The layout rules: the library (``dsnot_modifier``) holds no harness and no data and
imports nothing from the harness (``dsnot_harness``, installed apart from it), its
wheel carries no novels, and the math (statistics, masks, swaps and their kernels)
imports nothing from llm-compressor or compressed-tensors.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import dsnot_modifier

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(dsnot_modifier.__file__).parent
CORE = sorted(p for p in PACKAGE.glob("*.py"))
PURE = ("stats.py", "masks.py", "swaps.py", "_kernels.py")


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (at any depth of the file), absolute names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_layout_is_there():
    names = {p.name for p in CORE}
    assert {"modifier.py", "recipe_checks.py", "distributed.py", "report.py", "checkpoint.py"} <= names
    assert set(PURE) <= names
    assert "cli.py" in names  # `dsnot verify` is the library's command
    assert (ROOT / "harness" / "dsnot_harness" / "main_job.py").is_file()
    assert not names & {"bench.py", "pipeline.py", "evaluate.py", "models.py", "main_job.py"}


def test_the_library_holds_no_harness_and_no_data():
    assert not (PACKAGE / "experiments").exists()
    others = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".py"]
    assert not others, f"files that are not modules in the library: {others}"
    subpackages = [str(p.parent.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE]
    assert not subpackages, f"the library has subpackages: {subpackages}"


def test_core_imports_nothing_from_the_harness():
    for path in CORE:
        harness = [n for n in imported(path) if n.startswith("dsnot_harness")]
        assert not harness, f"{path.name} imports {harness}"


def test_the_math_imports_no_llm_compressor():
    for name in PURE:
        outside = [n for n in imported(PACKAGE / name)
                   if n.split(".")[0] in ("llmcompressor", "compressed_tensors")]
        assert not outside, f"{name} imports {outside}"


def test_importing_the_core_loads_no_harness_module():
    modules = ", ".join(f"dsnot_modifier.{p.stem}" for p in CORE if p.stem != "__init__")
    code = (f"import sys, {modules}\n"
            "print([m for m in sys.modules if m.startswith('dsnot_harness')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_library_wheel_carries_no_novels(tmp_path):
    """Build the library's wheel from a copy of its sources (offline: setuptools here, no pip)."""
    pytest.importorskip("setuptools.build_meta")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src" / "dsnot_modifier", source / "src" / "dsnot_modifier",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys, setuptools.build_meta as backend\n"
            "print('wheel:', backend.build_wheel(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=source,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    wheel = out.stdout.strip().splitlines()[-1].removeprefix("wheel: ")
    with zipfile.ZipFile(tmp_path / wheel) as archive:
        names = archive.namelist()
        scripts = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "dsnot_modifier/cli.py" in names and "dsnot_modifier/checkpoint.py" in names
    assert not [n for n in names if n.endswith(".gz") or "harness" in n or "experiments" in n]
    assert "dsnot = dsnot_modifier.cli:main" in scripts
