"""
Serving DSnoT-pruned checkpoints with vLLM, in vLLM's own environment.

The integration tests (marker ``vllm``, opt-in: ``pytest -m vllm tests/test_vllm.py``)
build or reuse that environment with scripts/setup-vllm, prune the embedded
SmolLM2-135M-Instruct with Wanda 2:4 + DSnoT (examples/make_serving_checkpoints.py,
a small calibration set) into dense float32 and bfloat16 checkpoints and INT8 W8A8
and W4A16 ones (made and saved in bfloat16), run vLLM on each in a subprocess of
the vLLM environment (examples/serve_vllm.py's functions, dtype ``auto``: each is
served in the dtype its config.json names, which is asserted), and compare with
transformers on the same checkpoint in the same dtype. The criteria, per
activation dtype:

(a) float32 (dense): vLLM's greedy continuation of every prompt equals
    transformers' token for token, and its prompt logprobs agree within
    ``F32_LOGPROB_ATOL``: both compute in float32, a fair bar.
(b) bfloat16 (dense): greedy equality is not a fair bar: vLLM's and torch's bf16
    matmuls round differently (different blocking and accumulation), and one flipped
    near-tie changes the rest of a greedy continuation. The criterion is over the
    prompt positions: mean NLL within ``BF16_NLL_ATOL`` of transformers' bf16, top-1
    agreement at least ``BF16_TOP1``, and the NLL within ``BF16_VS_FLOAT32_NLL_ATOL``
    of the float32 checkpoint's.
(c) INT8 W8A8 in bfloat16: vLLM runs real int8 matmuls (CPUInt8ScaledMMLinearKernel on
    CPU: oneDNN, or the AMX kernel int8_scaled_mm_with_quant), transformers
    (compressed-tensors) the same quantization simulated. Per token the two cannot
    agree closely: on this pruned SmolLM2, per-token int8 activations make the logits
    chaotic in the last bit of the activation scales (scaling every scale by 1.0001 in
    a float simulation moves the prompt tokens' logprobs by 0.2 nats on average and
    changes 10-15% of the top-1 tokens). So: mean NLL within ``W8A8_NLL_ATOL`` of
    transformers' on the same checkpoint, top-1 agreement at least ``W8A8_TOP1``, and
    the NLL within ``W8A8_VS_DENSE_NLL_ATOL`` of the dense bfloat16 checkpoint's (a
    loader that got the scales wrong fails all three by far).
(d) W4A16 in bfloat16: the same three bounds (``W4A16_NLL_ATOL``, ``W4A16_TOP1``,
    ``W4A16_VS_DENSE_NLL_ATOL``): vLLM's CPUWNA16 kernel dequantizes int4 groups in its
    own order, and on CPUs with AMX it runs bf16 W4A16 as W4A8 (dynamic int8
    activations, VLLM_CPU_INT4_W4A8=1, vLLM's default), so it is bounded like (c), not
    like (b). Round-to-nearest int4 costs this pruned model 0.27 nats on its own
    (transformers, measured), and W4A8 adds int8 activations' ~0.14 (as in (c)), hence
    0.5 from the dense checkpoint.

The OpenAI-compatible server is tested once (float32, greedy, loopback). The CPU
flags that decided the kernels (and vLLM's own answer to "AMX int8 kernel?",
check_cpu_sgl_kernel) are printed and recorded.

Environment: ``DSNOT_VLLM_VENV`` (vLLM's environment, default .venv-vllm),
``DSNOT_VLLM_CHECKPOINTS`` (an --out directory of make_serving_checkpoints.py: reused
if it holds serving.json with the four variants, else made there, so that a second
run does not prune again), ``DSNOT_VLLM_RESULTS`` (write the measurements there as JSON).

The tests without the marker check the dtype choice and the error messages with
fake CPU flags, and run in the default suite.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SETUP = ROOT / "scripts" / "setup-vllm"

MAX_TOKENS = 32
#: (a) float32
F32_LOGPROB_ATOL = 2e-3
#: (b) bfloat16 dense
BF16_NLL_ATOL = 0.05
BF16_TOP1 = 0.9
BF16_VS_FLOAT32_NLL_ATOL = 0.1
#: (c) INT8 W8A8, (d) W4A16, both in bfloat16
W8A8_NLL_ATOL = 0.15
W8A8_TOP1 = 0.75
W4A16_NLL_ATOL = 0.15
W4A16_TOP1 = 0.75
W8A8_VS_DENSE_NLL_ATOL = 0.3
W4A16_VS_DENSE_NLL_ATOL = 0.5
VARIANTS = ("float32", "bfloat16", "w8a8", "w4a16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_PROMPTS = (
    "The capital of France is",
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife.",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
)
#: plus the first 128 tokens of the held-out novel, for many prompt positions

RESULTS: dict = {"date": time.strftime("%Y-%m-%d %H:%M")}


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _venv() -> Path:
    venv = Path(os.environ.get("DSNOT_VLLM_VENV", ".venv-vllm"))
    return venv if venv.is_absolute() else ROOT / venv


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _record(key: str, value) -> None:
    RESULTS[key] = value
    if os.environ.get("DSNOT_VLLM_RESULTS"):
        Path(os.environ["DSNOT_VLLM_RESULTS"]).write_text(json.dumps(RESULTS, indent=2) + "\n")


# --- fixtures of the integration tests ---------------------------------------------------


@pytest.fixture(scope="module")
def vllm_python() -> str:
    """vLLM's interpreter, after scripts/setup-vllm made or reused its environment."""
    started = time.perf_counter()
    setup = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=3600)
    if setup.returncode != 0:
        pytest.fail(
            f"scripts/setup-vllm failed (exit {setup.returncode}); vLLM's environment is needed "
            f"for these tests. Run scripts/setup-vllm by hand to see why:\n"
            f"{_tail(setup.stdout + setup.stderr)}"
        )
    python = str(_venv() / "bin" / "python")
    check = subprocess.run(
        [python, "-c", f"import sys; sys.path.insert(0, {str(EXAMPLES)!r}); import serve_vllm; "
                       "print(serve_vllm.vllm_version())"],
        capture_output=True, text=True, timeout=600,
    )
    if check.returncode != 0:
        pytest.fail(f"vLLM in {_venv()} is not usable: {_tail(check.stderr + check.stdout, 5)}")
    _record("vllm", check.stdout.strip().splitlines()[-1])
    _record("setup_seconds", round(time.perf_counter() - started, 1))
    return python


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """The manifest of dense float32/bfloat16 and W8A8/W4A16 Wanda 2:4 + DSnoT SmolLM2 checkpoints."""
    keep = os.environ.get("DSNOT_VLLM_CHECKPOINTS")
    out = Path(keep) if keep else tmp_path_factory.mktemp("serving")
    if not (out / "serving.json").is_file():
        started = time.perf_counter()
        make = subprocess.run(
            [sys.executable, str(EXAMPLES / "make_serving_checkpoints.py"), "--out", str(out),
             "--dtypes", "float32,bfloat16", "--quant", "w8a8,w4a16", "--calib-samples", "8",
             "--seq-len", "128"],
            capture_output=True, text=True, timeout=5400,
        )
        assert make.returncode == 0, f"make_serving_checkpoints.py failed:\n{_tail(make.stdout + make.stderr)}"
        _record("make_checkpoints_seconds", round(time.perf_counter() - started, 1))
    manifest = json.loads((out / "serving.json").read_text())
    missing = set(VARIANTS) - set(manifest["checkpoints"])
    assert not missing, f"{out} has no {', '.join(sorted(missing))} checkpoint; remove it to make them again"
    _record("checkpoints", manifest)
    return manifest


@pytest.fixture(scope="module")
def prompts(checkpoints) -> list[list[int]]:
    """Token ids (the same ids go to vLLM and to transformers)."""
    from dsnot_harness.data import EVAL_TEXT, eval_windows
    from dsnot_harness.pipeline import load_tokenizer

    tokenizer = load_tokenizer(checkpoints["checkpoints"]["float32"]["path"])
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in TEXT_PROMPTS]
    ids.append(eval_windows(tokenizer, EVAL_TEXT, 1, 128)[0].tolist())
    return ids


WORKER = """\
import json, sys
def main():
    spec = json.load(open(sys.argv[1]))
    sys.path.insert(0, spec['examples'])
    import serve_vllm
    import torch
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel
    out = {'vllm': serve_vllm.vllm_version(), 'machine': serve_vllm.detect_machine().describe(), 'runs': {}}
    # vLLM's own choice for the int8 layers of this model (q/k/v 960x576, down 576x1536)
    out['vllm_int8_amx_kernel'] = bool(check_cpu_sgl_kernel(960, 576, torch.int8))
    print('machine:', json.dumps(out['machine']), flush=True)
    serve_vllm.cpu_environment()
    for name, entry in spec['checkpoints'].items():
        out['runs'][name] = serve_vllm.offline(
            entry['path'], 'auto', spec['prompts'], spec['max_tokens'],
            prompt_logprobs=1, enforce_eager=True)
        print(name, 'served in', out['runs'][name]['dtype'], '-', out['runs'][name]['dtype_reason'], flush=True)
    json.dump(out, open(sys.argv[2], 'w'))
if __name__ == '__main__':  # vLLM's engine process re-imports this file
    main()
"""


@pytest.fixture(scope="module")
def vllm_runs(vllm_python, checkpoints, prompts, tmp_path_factory) -> dict:
    """vLLM's greedy continuations and prompt logprobs of every checkpoint (one subprocess)."""
    work = tmp_path_factory.mktemp("vllm-run")
    spec = {
        "examples": str(EXAMPLES), "prompts": prompts, "max_tokens": MAX_TOKENS,
        "checkpoints": {k: checkpoints["checkpoints"][k] for k in VARIANTS},
    }
    (work / "spec.json").write_text(json.dumps(spec))
    (work / "worker.py").write_text(WORKER)
    started = time.perf_counter()
    run = subprocess.run(
        [vllm_python, str(work / "worker.py"), str(work / "spec.json"), str(work / "out.json")],
        capture_output=True, text=True, timeout=3600, cwd=str(work),
    )
    assert run.returncode == 0, f"vLLM failed:\n{_tail(run.stdout + run.stderr, 60)}"
    out = json.loads((work / "out.json").read_text())
    print(f"\nvLLM {out['vllm']} on {json.dumps(out['machine'])}; vLLM's AMX int8 kernel: "
          f"{out['vllm_int8_amx_kernel']}")
    _record("machine", out["machine"] | {"vllm_int8_amx_kernel": out["vllm_int8_amx_kernel"]})
    _record("vllm_offline_seconds", round(time.perf_counter() - started, 1))
    _record("vllm_offline", {
        name: {k: round(r[k], 2) for k in ("load_seconds", "generate_seconds", "tokens_per_second",
                                          "single_tokens_per_second")} | {"dtype": r["dtype"],
                                                                          "dtype_reason": r["dtype_reason"]}
        for name, r in out["runs"].items()
    })
    return out


def _hf_model(path: str, dtype: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype], use_safetensors=True)
    return model.eval()


@torch.no_grad()
def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy continuation, never stopping early (as vLLM with ignore_eos)."""
    out, past, x = [], None, torch.tensor([ids])
    for _ in range(n):
        step = model(input_ids=x, past_key_values=past, use_cache=True)
        past = step.past_key_values
        token = int(step.logits[0, -1].argmax())
        out.append(token)
        x = torch.tensor([[token]])
    return out


@torch.no_grad()
def _hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Log-softmax of the logits at every position but the last, ``[len - 1, vocab]``."""
    return model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


@pytest.fixture(scope="module")
def hf_runs(checkpoints, prompts, vllm_runs) -> dict:
    """transformers on each checkpoint, in the dtype vLLM served it in."""
    runs = {}
    for name in VARIANTS:
        dtype = vllm_runs["runs"][name]["dtype"]
        model = _hf_model(checkpoints["checkpoints"][name]["path"], dtype)
        started = time.perf_counter()
        greedy = [_hf_greedy(model, ids, MAX_TOKENS) for ids in prompts]
        seconds = time.perf_counter() - started
        runs[name] = {"greedy": greedy, "logprobs": [_hf_logprobs(model, ids) for ids in prompts],
                      "tokens_per_second": len(prompts) * MAX_TOKENS / seconds, "dtype": dtype}
        del model
    _record("transformers_tokens_per_second",
            {k: round(v["tokens_per_second"], 2) for k, v in runs.items()})
    return runs


def _compare_logprobs(vllm_prompt_logprobs, hf_logprobs, prompts) -> dict:
    """
    Over every prompt position: the mean negative log-likelihood of the prompt's own
    next token in vLLM and in transformers, the mean and largest absolute difference of
    that logprob, and how often the two top-1 tokens agree.
    """
    ours, theirs, agree = [], [], 0
    for positions, reference, ids in zip(vllm_prompt_logprobs, hf_logprobs, prompts):
        assert len(positions) == len(ids) - 1 == reference.shape[0]
        for i, entry in enumerate(positions):
            target = ids[i + 1]
            ours.append(entry[str(target)][0])
            theirs.append(float(reference[i, target]))
            top = [int(t) for t, (_, rank) in entry.items() if rank == 1]
            agree += int(top[0] == int(reference[i].argmax()))
    ours, theirs = torch.tensor(ours), torch.tensor(theirs)
    diffs = (ours - theirs).abs()
    return {"positions": len(diffs), "top1": agree / len(diffs), "mean_abs": float(diffs.mean()),
            "max_abs": float(diffs.max()), "nll_vllm": float(-ours.mean()),
            "nll_transformers": float(-theirs.mean())}


def _nll(hf_logprobs, prompts) -> float:
    picked = [lp.gather(-1, torch.tensor(ids[1:])[:, None]) for lp, ids in zip(hf_logprobs, prompts)]
    return float(-torch.cat(picked).mean())


def _common_prefix(got: list[int], want: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))


def _close_to_reference(name, vllm_runs, hf_runs, prompts, dense: str) -> tuple[dict, float]:
    """vLLM vs transformers on checkpoint ``name`` (same dtype), recorded; and the dense NLL."""
    ours, reference = vllm_runs["runs"][name], hf_runs[name]
    assert ours["prompt_token_ids"] == prompts
    assert [len(t) for t in ours["token_ids"]] == [MAX_TOKENS] * len(prompts)
    stats = _compare_logprobs(ours["prompt_logprobs"], reference["logprobs"], prompts)
    nll_dense = _nll(hf_runs[dense]["logprobs"], prompts)
    _record(f"{name}_vs_transformers", stats | {
        "dtype": ours["dtype"],
        "greedy_common_prefix": [_common_prefix(g, w) for g, w in zip(ours["token_ids"], reference["greedy"])],
        f"nll_transformers_{dense}": nll_dense})
    return stats, nll_dense


# --- the integration tests ---------------------------------------------------------------


@pytest.mark.vllm
def test_served_checkpoints_are_dense_files_with_2of4_zeros(checkpoints):
    """vLLM gets ordinary checkpoints: no sparsity declared, the 2:4 zeros in the weights."""
    for name, entry in checkpoints["checkpoints"].items():
        config = json.loads((Path(entry["path"]) / "config.json").read_text())
        declared = config.get("quantization_config", {}).get("sparsity_config")
        assert not declared, f"{name} declares sparsity {declared}; vLLM would refuse it"
        assert entry["blocks_2of4"] == 1.0 and entry["sparsity"] >= 0.5, entry
        assert ("quantization_config" in config) == (name in ("w8a8", "w4a16", "fp8"))
        assert config["dtype"] == entry["dtype"] == ("float32" if name == "float32" else "bfloat16")


@pytest.mark.vllm
def test_each_checkpoint_is_served_in_its_own_dtype_and_the_kernel_choice_is_recorded(vllm_runs, checkpoints):
    machine = vllm_runs["machine"]
    # serve_vllm's model of vLLM's INT8 kernel choice agrees with vLLM's own function here
    assert machine["amx"] == vllm_runs["vllm_int8_amx_kernel"], machine
    assert machine["device"] == "cpu" or "cuda_capability" in machine
    for name in VARIANTS:
        run = vllm_runs["runs"][name]
        assert run["dtype"] == checkpoints["checkpoints"][name]["dtype"], (name, run["dtype_reason"])
        assert run["dtype_reason"].startswith("the checkpoint's own dtype"), run["dtype_reason"]


@pytest.mark.vllm
def test_float32_greedy_and_logprobs_match_transformers(vllm_runs, hf_runs, prompts):
    ours, reference = vllm_runs["runs"]["float32"], hf_runs["float32"]
    assert ours["dtype"] == reference["dtype"] == "float32"
    assert ours["prompt_token_ids"] == prompts
    matches = [a == b for a, b in zip(ours["token_ids"], reference["greedy"])]
    _record("float32_greedy_match", f"{sum(matches)}/{len(matches)} prompts, {MAX_TOKENS} tokens each")
    for ids, got, want in zip(prompts, ours["token_ids"], reference["greedy"]):
        assert got == want, f"prompt {ids[:8]}...: vLLM {got} != transformers {want}"
    stats = _compare_logprobs(ours["prompt_logprobs"], reference["logprobs"], prompts)
    _record("float32_prompt_logprobs", stats)
    assert stats["max_abs"] <= F32_LOGPROB_ATOL, stats
    assert stats["top1"] == 1.0, stats


@pytest.mark.vllm
def test_bfloat16_logprobs_stay_close_to_transformers(vllm_runs, hf_runs, prompts):
    stats, nll_float32 = _close_to_reference("bfloat16", vllm_runs, hf_runs, prompts, dense="float32")
    assert hf_runs["bfloat16"]["dtype"] == "bfloat16"
    assert abs(stats["nll_vllm"] - stats["nll_transformers"]) <= BF16_NLL_ATOL, stats
    assert stats["top1"] >= BF16_TOP1, stats
    assert abs(stats["nll_vllm"] - nll_float32) <= BF16_VS_FLOAT32_NLL_ATOL, (stats, nll_float32)


@pytest.mark.vllm
@pytest.mark.parametrize("name, nll_atol, top1, dense_atol", [
    ("w8a8", W8A8_NLL_ATOL, W8A8_TOP1, W8A8_VS_DENSE_NLL_ATOL),
    ("w4a16", W4A16_NLL_ATOL, W4A16_TOP1, W4A16_VS_DENSE_NLL_ATOL),
])
def test_quantized_loads_generates_and_stays_close_to_transformers(vllm_runs, hf_runs, prompts, name,
                                                                   nll_atol, top1, dense_atol):
    stats, nll_dense = _close_to_reference(name, vllm_runs, hf_runs, prompts, dense="bfloat16")
    assert hf_runs[name]["dtype"] == "bfloat16"
    # the model as a whole: the same likelihood of the prompts
    assert abs(stats["nll_vllm"] - stats["nll_transformers"]) <= nll_atol, stats
    # token by token: mostly the same top-1 token (see the module's note on the noise floor)
    assert stats["top1"] >= top1, stats
    # and quantization has not broken the pruned model: close to its dense bfloat16 likelihood
    assert abs(stats["nll_vllm"] - nll_dense) <= dense_atol, (stats, nll_dense)


@pytest.mark.vllm
def test_openai_server_greedy_completion(vllm_python, checkpoints, hf_runs, prompts, tmp_path):
    """examples/serve_vllm.py --mode server: loopback server, /v1/completions, stopped after."""
    from dsnot_harness.pipeline import load_tokenizer

    path = checkpoints["checkpoints"]["float32"]["path"]
    out = tmp_path / "server.json"
    started = time.perf_counter()
    run = subprocess.run(
        [vllm_python, str(EXAMPLES / "serve_vllm.py"), path, "--mode", "server", "--enforce-eager",
         "--max-tokens", str(MAX_TOKENS), "--prompt", TEXT_PROMPTS[0], "--json", str(out)],
        capture_output=True, text=True, timeout=3600,
    )
    assert run.returncode == 0, f"the server example failed:\n{_tail(run.stdout + run.stderr, 60)}"
    reply = json.loads(out.read_text())["server"][Path(path).name]
    _record("server", {k: reply[k] for k in ("startup_seconds", "request_seconds", "completion_tokens",
                                             "tokens_per_second", "dtype")}
            | {"seconds": time.perf_counter() - started})
    assert reply["status"] == 200 and reply["completion_tokens"] == MAX_TOKENS
    assert reply["dtype"] == "float32"
    want = load_tokenizer(path).decode(hf_runs["float32"]["greedy"][0])
    assert reply["text"] == want


# --- error messages (default suite, no vLLM needed) ---------------------------------------


def test_serve_example_names_the_install_command_without_vllm():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this environment")
    run = subprocess.run([sys.executable, str(EXAMPLES / "serve_vllm.py"), str(ROOT)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "vLLM is not installed" in run.stderr and "scripts/setup-vllm" in run.stderr


def test_serve_example_rejects_an_old_vllm(monkeypatch):
    serve = _load_example("serve_vllm")
    real = importlib.metadata.version
    monkeypatch.setattr(serve.importlib.metadata, "version",
                        lambda dist: "0.8.5" if dist == "vllm" else real(dist))
    with pytest.raises(SystemExit, match=r"vLLM 0\.8\.5 is older than 0\.32.*scripts/setup-vllm"):
        serve.vllm_version()


def test_serve_example_rejects_a_directory_without_checkpoints(tmp_path):
    serve = _load_example("serve_vllm")
    with pytest.raises(SystemExit, match="neither serving.json nor config.json"):
        serve.find_checkpoints(str(tmp_path))
    (tmp_path / "serving.json").write_text(json.dumps({"checkpoints": {"w8a8": {}}}))
    with pytest.raises(SystemExit, match="no variant bfloat16 .* it has w8a8"):
        serve.find_checkpoints(str(tmp_path), ["bfloat16"])


def test_make_checkpoints_never_writes_into_the_input_model(tiny_model_dir, tmp_path):
    make = _load_example("make_serving_checkpoints")
    before = sorted(p.name for p in Path(tiny_model_dir).iterdir())
    with pytest.raises(SystemExit, match="overlaps the input model"):
        make.make_checkpoints(Path(tiny_model_dir) / "served", model=tiny_model_dir)
    foreign = tmp_path / "wanda-dsnot-2of4-bfloat16"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not a checkpoint of make_serving_checkpoints.py")
    with pytest.raises(SystemExit, match="exists and was not made by this script"):
        make.make_checkpoints(tmp_path, model=tiny_model_dir)
    assert (foreign / "mine.txt").is_file()
    assert sorted(p.name for p in Path(tiny_model_dir).iterdir()) == before
    with pytest.raises(SystemExit, match="unknown dtype 'float16'"):
        make.make_checkpoints(tmp_path / "x", model=tiny_model_dir, dtypes=("float16",))


# --- the serving dtype: chosen from the checkpoint and the machine (default suite) ---------

#: /proc/cpuinfo lines of three kinds of x86 CPU (flags abridged to those that matter)
CPUINFO = {
    "amx": "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse2 avx avx2 "
           "avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n",
    "avx512": "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx avx2 avx512f "
              "avx512_vnni avx512_bf16\n",
    "avx2": "processor\t: 0\nmodel name\t: Intel(R) Core(TM) i7-8700\nflags\t\t: fpu sse2 avx avx2\n",
}


def _cpu(serve, kind: str):
    flags, name = serve.read_cpu_flags(CPUINFO[kind])
    return serve.Machine(device="cpu", cpu_flags=flags, cpu_name=name)  # amx from the flags


@pytest.fixture(scope="module")
def quantized_configs(tiny_model_dir, tmp_path_factory) -> dict:
    """config.json of each quantized variant as make_serving_checkpoints.py writes it, and a dense one."""
    make = _load_example("make_serving_checkpoints")
    out = tmp_path_factory.mktemp("quantized")
    configs = {"dense-float32": json.loads((Path(tiny_model_dir) / "config.json").read_text())}
    for kind in ("w8a8", "fp8", "w4a16"):
        path = make.quantize(Path(tiny_model_dir), kind, make._Target(out / kind), "test", "bfloat16")
        configs[kind] = json.loads((path / "config.json").read_text())
    return configs


def test_quantized_checkpoints_name_a_16bit_activation_dtype(quantized_configs):
    serve = _load_example("serve_vllm")
    assert serve.saved_dtype(quantized_configs["dense-float32"]) == "float32"
    for kind, fmt in (("w8a8", "int8"), ("fp8", "fp8"), ("w4a16", "wna16")):
        config = quantized_configs[kind]
        assert config["dtype"] == "bfloat16" and "torch_dtype" not in config, kind
        assert serve.quantization_format(config) == fmt, kind
    assert serve.quantization_format(quantized_configs["dense-float32"]) == "dense"


def test_serving_dtype_per_format_cpu_and_gpu(quantized_configs):
    serve = _load_example("serve_vllm")
    old_w8a8 = quantized_configs["w8a8"] | {"dtype": "float32"}  # as this script wrote it before
    dense_bf16 = quantized_configs["dense-float32"] | {"dtype": "bfloat16"}
    machines = {kind: _cpu(serve, kind) for kind in CPUINFO} | {
        f"sm{major}{minor}": serve.Machine(device="cuda", cuda_capability=(major, minor), gpu_name="GPU")
        for major, minor in ((9, 0), (8, 0), (7, 5))
    }
    assert machines["amx"].has_amx and not machines["avx512"].has_amx
    want = {  # (config, machine): dtype chosen by auto
        "dense-float32": {"amx": "float32", "avx512": "float32", "avx2": "float32", "sm90": "float32",
                          "sm80": "float32", "sm75": "float32"},
        "dense-bfloat16": {"amx": "bfloat16", "avx512": "bfloat16", "avx2": "bfloat16", "sm90": "bfloat16",
                           "sm80": "bfloat16", "sm75": "float16"},
        "old-w8a8-float32": {"amx": "bfloat16", "avx512": "float32", "avx2": "float32", "sm90": "bfloat16",
                             "sm80": "bfloat16", "sm75": "float16"},
    } | {kind: {"amx": "bfloat16", "avx512": "bfloat16", "avx2": "bfloat16", "sm90": "bfloat16",
                "sm80": "bfloat16", "sm75": "float16"} for kind in ("w8a8", "fp8", "w4a16")}
    configs = quantized_configs | {"dense-bfloat16": dense_bf16, "old-w8a8-float32": old_w8a8}
    got = {name: {m: serve.choose_dtype(configs[name], machines[m])[0] for m in machines} for name in want}
    assert got == want
    dtype, reason = serve.choose_dtype(old_w8a8, machines["amx"])
    assert "says float32" in reason and "AMX" in reason and "int8_scaled_mm_with_quant" in reason
    assert "bfloat16 needs compute capability 8.0" in serve.choose_dtype(configs["w8a8"], machines["sm75"])[1]
    # what is recorded with a run: the flags that decided the kernel
    described = machines["amx"].describe()
    assert described["amx"] and "amx_tile" in described["cpu_flags"] and "sgl" in described["int8_kernel"]
    assert "oneDNN" in machines["avx2"].describe()["int8_kernel"]
    assert machines["avx2"].describe()["vllm_cpu_build"] == "_C_AVX2"


def test_a_dtype_the_kernels_refuse_is_an_error_with_the_fix(quantized_configs):
    serve = _load_example("serve_vllm")
    amx, avx512 = _cpu(serve, "amx"), _cpu(serve, "avx512")
    old_w8a8 = quantized_configs["w8a8"] | {"dtype": "float32"}
    with pytest.raises(serve.ServingDtypeError,
                       match=r"saved in float32\) cannot be served in float32 here: this CPU has AMX.*"
                             r"int8_scaled_mm_with_quant.*--dtype bfloat16.*make_serving_checkpoints\.py"):
        serve.choose_dtype(old_w8a8, amx, "float32")
    assert serve.choose_dtype(old_w8a8, avx512, "float32")[0] == "float32"  # oneDNN takes it
    for machine in (amx, avx512):  # cpu_gemm_wna16 has no float32 build, AMX or not
        with pytest.raises(serve.ServingDtypeError, match=r"W4A16.*cannot be served in float32.*cpu_gemm_wna16"):
            serve.choose_dtype(quantized_configs["w4a16"], machine, "float32")
    assert serve.choose_dtype(quantized_configs["w4a16"] | {"dtype": "float32"}, avx512)[0] == "bfloat16"
    for kind in ("w8a8", "fp8", "w4a16"):
        with pytest.raises(serve.ServingDtypeError, match=r"cannot be served in float32.*GPU kernels.*16-bit"):
            serve.choose_dtype(quantized_configs[kind], serve.Machine(device="cuda", cuda_capability=(9, 0)),
                               "float32")
    with pytest.raises(serve.ServingDtypeError, match=r"--dtype float16"):
        serve.choose_dtype(quantized_configs["w8a8"], serve.Machine(device="cuda", cuda_capability=(7, 5)),
                           "bfloat16")
    with pytest.raises(serve.ServingDtypeError, match=r"compute capability 7\.5 or newer.*has 7\.0"):
        serve.choose_dtype(quantized_configs["w4a16"], serve.Machine(device="cuda", cuda_capability=(7, 0)))


def test_serve_example_refuses_before_vllm_loads(quantized_configs, tmp_path, monkeypatch, capsys):
    serve = _load_example("serve_vllm")
    checkpoint = tmp_path / "old-w8a8"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(quantized_configs["w8a8"] | {"dtype": "float32"}))
    monkeypatch.setattr(serve, "detect_machine", lambda: _cpu(serve, "amx"))
    # offline() checks before it imports vLLM (not installed here: the import would fail otherwise)
    with pytest.raises(serve.ServingDtypeError, match="cannot be served in float32"):
        serve.offline(str(checkpoint), "float32", ["x"])
    # the command line refuses every variant before it serves any
    monkeypatch.setattr(serve, "vllm_version", lambda: "0.32.0")
    served = []
    monkeypatch.setattr(serve, "offline", lambda path, dtype, *a, **k: served.append(dtype) or {
        "load_seconds": 0, "tokens_per_second": 0, "single_tokens_per_second": 0, "texts": []})
    with pytest.raises(SystemExit, match=r"serve_vllm: .*cannot be served in float32.*--dtype bfloat16"):
        serve.main([str(checkpoint), "--mode", "offline", "--dtype", "float32"])
    assert served == []
    serve.main([str(checkpoint), "--mode", "offline"])
    assert served == ["bfloat16"]
    out = capsys.readouterr().out
    assert "serving in bfloat16: the checkpoint says float32, but this CPU has AMX" in out
    assert '"amx_tile"' in out  # the flags that decided it are printed


def test_cpu_flags_are_read_from_proc_cpuinfo_formats():
    serve = _load_example("serve_vllm")
    flags, name = serve.read_cpu_flags(CPUINFO["amx"] + "processor\t: 1\nflags\t\t: fpu\n")
    assert name.startswith("Intel(R) Xeon") and {"amx_tile", "avx512_bf16"} <= flags and "fpu" in flags
    arm, _ = serve.read_cpu_flags("processor\t: 0\nFeatures\t: fp asimd bf16\nCPU part\t: 0xd4f\n")
    assert arm == {"fp", "asimd", "bf16"}
    assert serve.Machine(cpu_flags=flags, amx=False).has_amx is False  # torch's answer wins
