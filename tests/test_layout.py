"""
The package's layout rules: the core imports nothing from the experiment harness,
and the math (statistics, masks, swaps and their kernels) nothing from
llm-compressor or compressed-tensors.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dsnot_modifier

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
    assert (PACKAGE / "experiments" / "cli.py").is_file()
    assert not names & {"bench.py", "pipeline.py", "evaluate.py", "models.py", "cli.py"}


def test_core_imports_nothing_from_the_harness():
    for path in CORE:
        harness = [n for n in imported(path) if n.startswith("dsnot_modifier.experiments")]
        assert not harness, f"{path.name} imports {harness}"


def test_the_math_imports_no_llm_compressor():
    for name in PURE:
        outside = [n for n in imported(PACKAGE / name)
                   if n.split(".")[0] in ("llmcompressor", "compressed_tensors")]
        assert not outside, f"{name} imports {outside}"


def test_importing_the_core_loads_no_harness_module():
    modules = ", ".join(f"dsnot_modifier.{p.stem}" for p in CORE if p.stem != "__init__")
    code = (f"import sys, {modules}\n"
            "print([m for m in sys.modules if m.startswith('dsnot_modifier.experiments')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
