"""Smoke test of benchmarks/refine_speed.py on tiny layers: it runs, and its JSON has
the documented schema (no timing is checked)."""

import json
import math

import pytest
from helpers import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/refine_speed.py")


def test_main_on_tiny_shapes_writes_the_json_schema(bench, tmp_path, capsys, monkeypatch):
    # the memory pass would fix this process's mmap threshold for the rest of the suite
    monkeypatch.setattr(bench, "fixed_mmap_threshold", lambda: False)
    out = tmp_path / "speed.json"
    oneshot = tmp_path / "main.json"
    oneshot.write_text(json.dumps({"meta": {"model": "tiny"}, "rows": [
        {"method": "wanda", "oneshot_s": 10.0, "dsnot_s": 0.0},
        {"method": "wanda+dsnot (gram)", "oneshot_s": 12.0, "dsnot_s": 1.5},
    ]}))
    # the second shape is wider than --sparsegpt-max-cols: the extrapolated path runs too
    rows = bench.main(["--shapes", "24x64,16x128", "--threads", "1", "--baseline-rows", "8",
                       "--sparsegpt-max-cols", "64", "--json", str(out),
                       "--oneshot-json", str(oneshot)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(rows))
    assert len(data) == 2 * 2 * 2  # shapes × structures × objectives (one thread count)
    seen = set()
    for row in data:
        assert set(bench.REQUIRED_KEYS) <= set(row)
        assert isinstance(row["shape"], list) and len(row["shape"]) == 2
        assert all(isinstance(x, int) for x in row["shape"])
        assert row["structure"] in ("60%", "2:4")
        assert row["objective"] in ("mean", "gram")
        assert row["threads"] == 1
        for key in ("refine_s", "baseline_s", "wanda_s", "sparsegpt_s"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] >= 0
        mem = row["extra_mem_ratio"]
        assert mem is None or (isinstance(mem, float) and math.isfinite(mem))
        assert row["extra_mem_method"] == "rss"
        assert row["sparsegpt_extrapolated"] == (row["shape"][1] > 64)
        seen.add((tuple(row["shape"]), row["structure"], row["objective"]))
    assert len(seen) == len(data)
    printed = capsys.readouterr().out
    assert "| shape | structure | objective | threads |" in printed
    assert "| wanda+dsnot (gram) | 12.0 | 1.5 | 12.5% | met |" in printed


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("objective", ["mean", "gram"])
def test_per_row_baseline_makes_the_same_masks(bench, objective, nm):
    from dsnot_modifier.swaps import refine_mask

    layer = bench.make_layer(48, 128, seed=3)
    current, _ = bench.wanda_step(layer["w"], layer["sqnorm"], nm)
    stats = bench._refine_stats(layer, objective)
    ours = refine_mask(layer["w"], current, objective=objective, nm=nm, **stats)
    rows = bench.baseline_rows(48, 16)
    base, _, _ = bench.baseline_refine(layer["w"], current, objective, nm, stats, rows)
    assert ours.swaps > 0
    # the baseline's products H·e_i round differently from refine's E·H: allow a rare row
    same = (base == ours.weight[rows]).all(1)
    assert int(same.sum()) >= len(rows) - 1


def test_oneshot_share_reads_dsnot_bench_rows(bench, tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps([
        {"method": "wanda", "sparsity": "0.6", "time_s": {"oneshot": 100.0, "dsnot": 0.0},
         "params": {"model": "m", "threads": 1, "date": "d"}},
        {"method": "wanda+dsnot", "sparsity": "0.6", "time_s": {"oneshot": 120.0, "dsnot": 30.0}},
        {"method": "wanda+dsnot", "sparsity": "2:4", "time_s": {"oneshot": 110.0, "dsnot": 11.0}},
    ]))
    lines = bench.oneshot_share(path)
    assert "| wanda+dsnot 0.6 | 120.0 | 30.0 | 25.0% | MISSED |" in lines
    assert "| wanda+dsnot 2:4 | 110.0 | 11.0 | 10.0% | met |" in lines
    assert not any(line.startswith("| wanda 0.6") for line in lines)
    assert "model m, 1 threads, d" in lines[0]


def test_device_option_runs_the_table_there_and_names_it(bench, tmp_path, capsys):
    out = tmp_path / "speed.json"
    rows = bench.main(["--device", "cpu", "--shapes", "16x64", "--threads", "1",
                       "--baseline-rows", "4", "--no-memory", "--json", str(out),
                       "--oneshot-json", str(tmp_path / "missing.json")])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(rows)) and len(data) == 4
    name = bench.device_name(bench.torch.device("cpu"))
    assert name and all(r["device"] == "cpu" and r["device_name"] == name for r in data)
    printed = capsys.readouterr().out
    assert f"cpu: {name}, float32 weights" in printed
    assert "peak resident set" in printed  # the CPU's memory note


def test_unknown_device_is_refused(bench):
    with pytest.raises(RuntimeError):
        bench.main(["--device", "nodevice", "--shapes", "16x64"])


def test_memory_pass_measures_the_live_tensors_after_the_timings(tmp_path):
    """In a process of its own (it fixes glibc's mmap threshold): the result weight alone
    is 1x the weight, so the extra memory is at least that; a 4096x2048 layer is 8 of
    mean's chunks and 8 of gram's, whose working memory (about 7 and 11 chunk-sized
    buffers: 2.1x to 2.5x the weight in all, measured) keeps both under the 4x goal, where the
    allocator's cached blocks did not."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "refine_speed.py"
    out = tmp_path / "speed.json"
    subprocess.run([sys.executable, str(script), "--shapes", "4096x2048", "--threads", "1",
                    "--baseline-rows", "2", "--json", str(out),
                    "--oneshot-json", str(tmp_path / "missing.json")],
                   check=True, capture_output=True)
    data = json.loads(out.read_text())
    assert len(data) == 4
    for row in data:
        if sys.platform.startswith("linux"):
            assert row["extra_mem_method"] == "rss, mmap threshold 128 KiB"
            assert 1.0 <= row["extra_mem_ratio"] <= 4.0, row


def test_syncs_and_update_options_add_their_columns(bench, tmp_path, capsys):
    out = tmp_path / "speed.json"
    bench.main(["--shapes", "24x64", "--threads", "1", "--baseline-rows", "4", "--no-memory",
                "--syncs", "--update", "--json", str(out),
                "--oneshot-json", str(tmp_path / "missing.json")])
    data = json.loads(out.read_text())
    assert len(data) == 4
    for row in data:
        # the cycle's one sync (ok.nonzero), counted op by op; CUDA's own count only on CUDA
        assert row["host_syncs_per_cycle"] == 1 and row["sync_cycles_counted"] >= 1
        assert row["host_syncs_total"] > row["sync_cycles_counted"]
        assert row["cuda_syncs_per_cycle"] is None and row["cuda_syncs_total"] is None
        if row["objective"] == "gram":
            assert row["update_s"] >= 0 and row["update_status"] in ("updated", "unchanged")
            assert row["update_extra_mem_ratio"] is None  # CPU: not measured
        else:
            assert "update_s" not in row
    printed = capsys.readouterr().out
    assert "| host syncs / cycle (most) | CUDA syncs / cycle (most) | update s |" in printed


def test_cycle_syncs_sees_a_sync_added_to_a_cycle(bench, monkeypatch):
    from dsnot_modifier.swaps import _GramObjective

    layer = bench.make_layer(32, 64, seed=2)
    current, _ = bench.wanda_step(layer["w"], layer["sqnorm"], None)
    stats = bench._refine_stats(layer, "gram")
    clean = bench.count_syncs(layer["w"], current, "gram", None, stats)
    propose = _GramObjective.propose

    def propose_with_item(self):
        g, p, ok = propose(self)
        ok.sum().item()  # one more sync in every cycle
        return g, p, ok

    monkeypatch.setattr(_GramObjective, "propose", propose_with_item)
    more = bench.count_syncs(layer["w"], current, "gram", None, stats)
    assert clean["host_syncs_per_cycle"] == 1 and more["host_syncs_per_cycle"] == 2
    assert _GramObjective.propose is propose_with_item  # put back as it was
