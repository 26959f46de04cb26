"""
The README's commands and the examples, run as a user would (the same entry points,
the shipped Austen texts), on a tiny model with few, short windows: ``dsnot run`` (the
main job), ``examples/main_job.py``, ``examples/prune_quantize_export.py``,
``examples/prune_with_recipe.py`` with a shipped recipe, ``examples/evaluate.py``, and
``examples/distributed_torchrun.py`` under torchrun on two CPU ranks, whose result must
equal one process's bit for bit (the README's claim for the test model).

The vLLM examples (make_serving_checkpoints.py, serve_vllm.py) are run by the opt-in
``pytest -m vllm tests/test_vllm.py``.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import COMMON, ROOT, blocks_hold, linears, load_script, run

#: the tiny model's tokenizer knows these words of the novels (lower-cased), the rest
#: is [UNK]: about half the tokens of the texts are known, so inputs vary
WORDS = (
    "the to and of a her i in was it she not be that he you had as his for with but have "
    "is my at so all on by which me very could mr been this no would they him will said "
    "from there more or what any than were must such do much mrs miss lady an one only "
    "should if did your when am we are their know think elinor how now them might can"
).split()


@pytest.fixture(scope="module")
def austen_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama of conftest with a word-level tokenizer for the shipped novels."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-austen") / "model"
    shutil.copytree(tiny_model_dir, path)
    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate(dict.fromkeys(WORDS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[UNK]").save_pretrained(path)
    return str(path)


def script_env():
    return os.environ | dict(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def run_example_main(relative_path, argv, monkeypatch):
    """Run an example as ``python examples/x.py ARGV`` (in this process); its exit code."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / relative_path), *argv])
    try:
        runpy.run_path(str(ROOT / relative_path), run_name="__main__")
    except SystemExit as done:
        return done.code or 0
    return 0


def test_dsnot_run_the_main_job(austen_model_dir, tmp_path):
    """The main job's command (scripts/run-main execs `dsnot run`), console script and all."""
    out = tmp_path / "main.json"
    dsnot = Path(sys.executable).with_name("dsnot")
    argv = [str(dsnot), "run", "--model", austen_model_dir, "--calib-samples", "4", "--seq-len", "32",
            "--eval-windows", "3", "--threads", "1", "--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, env=script_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "wanda", "wanda+dsnot (mean)", "wanda+dsnot (gram)"]
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rows)
    assert rows[0]["sparsity"] == 0.0
    # Wanda prunes int(0.6 · cols) of every row (64 and 128 columns): 38/64 = 76/128
    assert all(r["sparsity"] == pytest.approx(38 / 64) for r in rows[1:])
    for row in rows[2:]:
        assert row["dsnot"]["layers"] == 14 and row["dsnot"]["swaps"] > 0
        assert row["ppl"] != rows[1]["ppl"]  # DSnoT changed Wanda's model
    assert "| wanda+dsnot (gram) |" in done.stdout


def test_main_job_example(austen_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "main.json"
    code = run_example_main("examples/main_job.py",
                            ["--model", austen_model_dir, "--sparsity", "2:4", "--objectives", "gram",
                             "--calib-samples", "4", "--seq-len", "32", "--eval-windows", "2",
                             "--json", str(out)], monkeypatch)  # 128 tokens: min_tokens
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "wanda", "wanda+dsnot (gram)"]
    assert rows[2]["sparsity"] == 0.5 and rows[2]["dsnot"]["swaps"] > 0


def test_prune_quantize_export_example(austen_model_dir, tmp_path, capsys):
    from dsnot_modifier.checkpoint import verify_checkpoint

    out = tmp_path / "ckpt"
    example = load_script("examples/prune_quantize_export.py")
    code = example.main(["--model", austen_model_dir, "--out", str(out), "--calib-samples", "4",
                         "--seq-len", "32", "--eval-windows", "2"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert {"dsnot_report.json", "recipe.yaml", "config.json", "tokenizer.json"} <= set(os.listdir(out))
    recipe = (out / "recipe.yaml").read_text()
    assert "DSnoTModifier" in recipe and "W8A8" in recipe
    result = verify_checkpoint(str(out))
    assert result.ok
    report = json.loads((out / "dsnot_report.json").read_text())
    assert len(report["layers"]) == 14 and all(layer["structure"] == "2:4" for layer in report["layers"])
    assert sum(layer["swaps"] for layer in report["layers"]) > 0
    assert "perplexity of the pruned W8A8 model" in text
    # an existing checkpoint is not replaced without --overwrite
    assert example.main(["--model", austen_model_dir, "--out", str(out), "--calib-samples", "4",
                         "--seq-len", "32"]) == 2  # 128 tokens: DSnoT's min_tokens


def test_prune_with_recipe_and_evaluate_examples(austen_model_dir, tmp_path, monkeypatch, capsys):
    from dsnot_harness.pipeline import load_model

    out = tmp_path / "pruned"
    code = run_example_main("examples/prune_with_recipe.py",
                            [str(ROOT / "recipes" / "wanda_dsnot_2of4.yaml"), str(out),
                             "--model", austen_model_dir, "--calib-samples", "4", "--seq-len", "32"],
                            monkeypatch)
    assert code == 0
    report = json.loads((out / "dsnot_report.json").read_text())
    assert len(report["layers"]) == 14 and report["summary"]["swaps"] > 0
    for name, w in linears(load_model(str(out))).items():
        assert blocks_hold(w, 2, 4), name
    capsys.readouterr()
    scores = tmp_path / "eval.json"
    code = run_example_main("examples/evaluate.py",
                            [str(out), "--text", "prideprejudice", "--seq-len", "32", "--windows", "2",
                             "--json", str(scores)], monkeypatch)
    assert code == 0
    assert "prideprejudice" in capsys.readouterr().out
    assert scores.exists()


def test_distributed_torchrun_example_equals_one_process(austen_model_dir, tmp_path):
    """
    torchrun, two CPU ranks over Gloo, each on its half of the windows: the saved model
    equals, bit for bit, the one a single process makes from all the windows.
    """
    from dsnot_modifier import DSnoTModifier
    from dsnot_harness.data import calibration_windows
    from dsnot_harness.pipeline import load_model, load_tokenizer

    out = tmp_path / "distributed"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(ROOT / "examples" / "distributed_torchrun.py"), "--model", austen_model_dir,
            "--sparsity", "2:4", "--samples", "4", "--seq-len", "32", "--output", str(out),
            "--timeout", "300"]
    done = subprocess.run(argv, capture_output=True, text=True, env=script_env(), timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "rank 0 of 2" in done.stdout and "14 layers refined" in done.stdout
    report = json.loads((out / "dsnot_report.json").read_text())
    assert len(report["layers"]) == 14

    tokenizer = load_tokenizer(austen_model_dir)
    windows = calibration_windows(tokenizer, 4, 32)
    single = run(austen_model_dir, windows, [DSnoTModifier(initial="wanda", mask_structure="2:4", **COMMON)],
                 processor=tokenizer)
    saved = load_model(str(out))
    compared = 0
    for name, module in single.named_modules():
        if isinstance(module, torch.nn.Linear):
            other = saved.get_submodule(name).weight
            assert torch.equal(module.weight, other), name
            compared += 1
    assert compared == 15  # 14 refined layers and lm_head


def test_profile_oneshot_script(austen_model_dir, tmp_path):
    """benchmarks/profile_oneshot.py on the tiny model: its steps nest, and it leaves the
    product's functions as they were (no timing is checked)."""
    import dsnot_modifier.modifier as modifier_module
    from dsnot_modifier import DSnoTModifier

    before = (modifier_module.refine_mask, DSnoTModifier.__dict__["calibrate_module"])
    script = load_script("benchmarks/profile_oneshot.py")
    out = tmp_path / "profile.json"
    runs = script.main(["--model", austen_model_dir, "--calib-samples", "4", "--seq-len", "32",
                        "--threads", "1", "--objectives", "gram", "--json", str(out)])
    assert (modifier_module.refine_mask, DSnoTModifier.__dict__["calibrate_module"]) == before
    assert [r["method"] for r in runs] == ["wanda", "wanda+dsnot (gram)"]
    assert runs[0]["steps_s"] == {}  # Wanda alone runs no DSnoT step
    steps, calls = runs[1]["steps_s"], runs[1]["calls"]
    assert steps["hook: all per-batch work"] >= steps["hook: statistics update (Gram product or moments)"] > 0
    assert steps["epoch end: all"] >= steps["epoch end: refine_mask"] > 0
    # every pruned Linear of the tiny model, q/k/v and gate/up each in one call (stacked)
    assert calls["epoch end: refine_mask"] == 8
    assert calls["refine by kind: q_proj+k_proj+v_proj"] == calls["refine by kind: gate_proj+up_proj"] == 2
    assert sum(v for k, v in calls.items() if k.startswith("refine by kind")) == 8
    assert calls["epoch end: write-back"] == 14
    assert json.loads(out.read_text())["runs"] == json.loads(json.dumps(runs))
