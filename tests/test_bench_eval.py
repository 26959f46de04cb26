"""`dsnot bench` and `dsnot eval` on the tiny model: JSON schema, exact sparsity, plot, errors."""

import importlib
import json
import math

import pytest
import torch

from dsnot_harness import bench
from dsnot_modifier.cli import main as cli_main
from helpers import VOCAB, blocks_hold


def _words(path, n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
    path.write_text(" ".join(f"w{i}" for i in ids))
    return str(path)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    return _words(d / "calib.txt", 2000, 0), _words(d / "held_out.txt", 400, 1)


@pytest.mark.slow
def test_bench_rows_schema_plot_resume(tiny_model_dir, texts, tmp_path, capsys):
    calib, held_out = texts
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--model", tiny_model_dir, "--methods", "dense,magnitude,wanda,wanda+dsnot",
            "--sparsities", "2:4", "--calib-text", calib, "--calib-samples", "4", "--seq-len", "32",
            "--eval-text", held_out, "--eval-windows", "3", "--recon-windows", "2", "--threads", "1",
            "--json", str(out), "--plot", str(png)]
    assert cli_main(argv + ["--in-process"]) == 0
    rows = json.loads(out.read_text())
    assert [(r["method"], r["sparsity"]) for r in rows] == [
        ("dense", "0"), ("magnitude", "2:4"), ("wanda", "2:4"), ("wanda+dsnot", "2:4")]
    for r in rows:
        assert set(r) == {"method", "sparsity", "ppl", "time_s", "recon_error", "peak_rss_mb", "params"}
        assert set(r["ppl"]) == {"held_out"} and all(math.isfinite(v) and v > 1 for v in r["ppl"].values())
        assert set(r["time_s"]) == {"oneshot", "dsnot"}
        assert isinstance(r["recon_error"], float) and r["peak_rss_mb"] > 50
        assert r["params"]["calib_samples"] == 4 and r["params"]["seq_len"] == 32
        expected = 0.0 if r["method"] == "dense" else 0.5
        assert r["params"]["layer_sparsity"] == pytest.approx(expected, abs=1e-9)
    by = {r["method"]: r for r in rows}
    assert by["dense"]["recon_error"] == 0.0
    assert 0 < by["wanda"]["recon_error"] < 1 and 0 < by["wanda+dsnot"]["recon_error"] < 1
    assert by["wanda"]["time_s"]["dsnot"] == 0.0 and by["wanda+dsnot"]["time_s"]["dsnot"] > 0
    summary = by["wanda+dsnot"]["params"]["dsnot_summary"]
    assert summary["swaps"] > 0 and summary["layers_error_lowered"] > 0 and summary["mean_error_change"] < 0
    # a different mask: DSnoT changed Wanda's model, so its perplexity differs
    assert by["wanda+dsnot"]["ppl"] != by["wanda"]["ppl"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| wanda+dsnot |" in table
    # --resume keeps the rows and runs nothing new
    before = out.read_text()
    assert cli_main(argv + ["--resume"]) == 0
    assert out.read_text() == before


@pytest.mark.slow
def test_bench_row_in_its_own_process(tiny_model_dir, texts, tmp_path):
    calib, held_out = texts
    out = tmp_path / "one.json"
    rows = bench.bench(model=tiny_model_dir, methods=["wanda+dsnot"], sparsities=["0.5"], calib_texts=[calib],
                       calib_samples=4, seq_len=32, eval_texts=[held_out], eval_windows=2, recon_windows=2,
                       threads=1, json_path=str(out), dsnot={"max_cycles": 3})
    assert json.loads(out.read_text()) == rows
    (row,) = rows
    assert row["params"]["layer_sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert row["params"]["dsnot"] == {"max_cycles": 3} and row["time_s"]["dsnot"] > 0
    assert row["params"]["date"] and row["params"]["machine"]
    # the versions that decide the numbers (a new transformers can move Wanda's masks)
    assert row["params"]["versions"]["torch"] == torch.__version__
    assert row["params"]["versions"]["llmcompressor"] == "0.14.0.1"


def test_run_row_standalone_exact_sparsity(tiny_model_dir, texts):
    calib, held_out = texts
    spec = dict(model=tiny_model_dir, method="dsnot", sparsity="0.5", calib_texts=[calib], calib_samples=4,
                seq_len=32, eval_texts=[held_out], eval_windows=2, recon_windows=2, threads=1,
                dsnot={"objective": "gram", "max_cycles": 5})
    row = bench.run_row(spec)
    assert row["params"]["layer_sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert row["params"]["dsnot"] == {"objective": "gram", "max_cycles": 5}
    assert row["params"]["dsnot_summary"]["layers"] == 14


def test_owl_row_records_the_lambda_it_ran_with(tiny_model_dir, texts):
    """λ unset: the row says which value OWL took (its default, 0.3), not nothing."""
    calib, held_out = texts
    spec = dict(model=tiny_model_dir, method="owl-sparsegpt", sparsity="0.6", calib_texts=[calib],
                calib_samples=4, seq_len=32, eval_texts=[held_out], eval_windows=2, recon_windows=2, threads=1,
                owl={"m": 3})
    row = bench.run_row(spec)
    assert row["params"]["owl"] == {"m": 3.0, "lmbda": 0.3}
    assert row["params"]["layer_sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_magnitude_prune_exact():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 16))
    bench.magnitude_prune(model, "0.6")
    for layer in model:
        assert int((layer.weight == 0).sum()) == int(layer.weight.numel() * 0.6)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 16))
    bench.magnitude_prune(model, "4:8")
    assert all(blocks_hold(layer.weight, 4, 8) for layer in model)


def test_reconstruction_error_matches_definition():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4, bias=False)
    model = torch.nn.Sequential(lin)
    model.forward = lambda input_ids: lin(input_ids)  # windows are the inputs themselves here
    dense = {"0": lin.weight.detach().clone()}
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        lin.weight[:, :3] = 0
    expected = torch.linalg.norm((x @ dense["0"].T) - (x @ lin.weight.T)) / torch.linalg.norm(x @ dense["0"].T)
    assert bench.reconstruction_error(model, dense, x, batch_size=2) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(methods=["wanda", "obc"]), "unknown methods"),
        (dict(sparsities=["1.2"]), "strictly between 0 and 1"),
        (dict(sparsities=["4:2"]), "0 < N < M"),
        (dict(sparsities=["half"]), "fraction such as 0.6"),
        (dict(calib_texts=["emma", "persuasion"], eval_texts=["persuasion"]), "both a calibration and an evaluation"),
    ],
)
def test_bench_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.bench(model="unused", **kwargs)


def test_eval_command(tiny_model_dir, texts, tmp_path, capsys):
    from dsnot_harness.evaluate import perplexity
    from dsnot_harness.pipeline import load_model, load_tokenizer

    _, held_out = texts
    out = tmp_path / "eval.json"
    assert cli_main(["eval", tiny_model_dir, "--text", held_out, "--windows", "3", "--seq-len", "16",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["perplexity"][0]
    assert row["windows"] == 3 and row["tokens_scored"] == 3 * 15 and row["bos"] is False
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer(open(held_out).read(), add_special_tokens=False)["input_ids"][:48]
    direct = perplexity(load_model(tiny_model_dir), torch.tensor(ids).reshape(3, 16), progress=False)
    assert row["perplexity"] == pytest.approx(direct, rel=1e-6)
    assert "nothing prepended" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no BOS token"):
        cli_main(["eval", tiny_model_dir, "--text", held_out, "--windows", "1", "--seq-len", "16", "--bos"])


def test_eval_tasks_without_lm_eval(tiny_model_dir, texts):
    pytest.importorskip("transformers")
    try:
        importlib.import_module("lm_eval")
        pytest.skip("lm-eval is installed")
    except ImportError:
        pass
    _, held_out = texts
    with pytest.raises(RuntimeError, match="pip install lm-eval"):
        cli_main(["eval", tiny_model_dir, "--text", held_out, "--windows", "1", "--seq-len", "16",
                  "--tasks", "hellaswag"])


def test_plot_draws_nm_points_in_their_methods_colour(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to inspect it
    rows = [{"method": m, "sparsity": s, "ppl": {"t": p}}
            for m, s, p in [("dense", "0", 10.0), ("wanda", "0.6", 50.0), ("wanda", "2:4", 60.0),
                            ("wanda+dsnot", "0.6", 30.0), ("wanda+dsnot", "0.7", 40.0),
                            ("wanda+dsnot", "4:8", 35.0), ("wanda+dsnot", "2:4", 45.0)]]
    path = bench.plot(rows, str(tmp_path / "p.png"), "t")
    assert (tmp_path / "p.png").stat().st_size > 0 and path.endswith("p.png")
    lines = [ln for ln in figures[0].axes[0].get_lines() if len(ln.get_xdata())]
    by_method = {}
    for ln in lines[1:]:  # after the dense line
        if ln.get_marker() == "o":
            by_method[ln.get_label()] = ln.get_color()
    assert list(by_method) == ["wanda", "wanda+dsnot"] and len(set(by_method.values())) == 2
    points = [(ln.get_ydata()[0], ln.get_marker(), ln.get_color()) for ln in lines
              if ln.get_marker() in ("s", "D")]
    assert sorted(points) == sorted([(60.0, "s", by_method["wanda"]),
                                     (35.0, "D", by_method["wanda+dsnot"]),
                                     (45.0, "s", by_method["wanda+dsnot"])])
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert legend == ["dense", "wanda", "wanda+dsnot", "2:4", "4:8"]


def test_cpu_description_names_the_model_and_the_features_that_move_timings(tmp_path):
    from dsnot_harness.pipeline import cpu_description, environment

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some Xeon\n"
                    "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert cpu_description(str(info)) == "Some Xeon (avx2, fma, avx512f, avx512_bf16, amx_tile, amx_bf16)"
    info.write_text("model name\t: Old\nflags\t\t: fpu sse2\n")
    assert cpu_description(str(info)).startswith("Old (none of avx2/")
    assert isinstance(environment()["cpu"], str)


def test_update_methods_turn_on_the_weight_update(tiny_model_dir, texts):
    """``+update`` after DSnoT: DSnoTModifier(update_weights=True), with or without OWL; the
    row's summary says how much the update lowered the layers' gram error."""
    from dsnot_modifier import DSnoTModifier, OWLModifier
    from dsnot_harness.pipeline import make_recipe

    recipe = make_recipe("owl-sparsegpt+dsnot+update", "0.7")
    assert [type(m).__name__ for m in recipe] == ["OWLModifier", "SparseGPTModifier", "DSnoTModifier"]
    assert isinstance(recipe[0], OWLModifier) and recipe[2].update_weights
    assert isinstance(make_recipe("wanda+dsnot", "2:4")[1], DSnoTModifier)
    assert not make_recipe("wanda+dsnot", "2:4")[1].update_weights
    with pytest.raises(ValueError, match="the update follows DSnoT"):
        make_recipe("wanda+update", "0.6")
    calib, held_out = texts
    spec = dict(model=tiny_model_dir, method="wanda+dsnot+update", sparsity="2:4", calib_texts=[calib],
                calib_samples=4, seq_len=32, eval_texts=[held_out], eval_windows=2, recon_windows=2,
                threads=1)
    row = bench.run_row(spec)
    summary = row["params"]["dsnot_summary"]
    assert summary["layers"] == summary["layers_updated"] == 14
    assert -1 < summary["mean_update_error_change"] < 0
    assert row["params"]["layer_sparsity"] == pytest.approx(0.5, abs=1e-9)
