import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

#: markers whose tests run only when `-m` names them (they need a large environment)
OPT_IN_MARKERS = ("vllm",)


def pytest_addoption(parser):
    parser.addoption(
        "--device", default="cpu",
        help="where the tests that take the `device` fixture (swaps, stats) run their math: "
             "cpu (default), cuda, cuda:1, ... (scripts/gpu-check runs them on cuda)")


@pytest.fixture(scope="session")
def device(request):
    """The ``--device`` the device-aware tests run on (CPU unless told)."""
    import torch

    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device}: CUDA is not available on this machine")
    return device


def pytest_collection_modifyitems(config, items):
    expression = config.getoption("-m") or ""
    for marker in OPT_IN_MARKERS:
        if marker in expression:
            continue
        skip = pytest.mark.skip(reason=f"opt-in: run with `pytest -m {marker}`")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama (2 layers, hidden 64) saved with a word-level tokenizer."""
    from helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def calib_windows():
    """8 calibration windows of 32 random token ids."""
    from helpers import random_windows

    return random_windows(8, 32)


@pytest.fixture(scope="module")
def dense(tiny_model_dir):
    """The tiny Llama's target weights as saved (before any pruning), by name."""
    from helpers import linears
    from dsnot_harness.pipeline import load_model

    return linears(load_model(tiny_model_dir))


def _logged(level: str):
    """The loguru messages at ``level`` and above logged while the generator is open."""
    from loguru import logger

    seen = []
    handle = logger.add(lambda m: seen.append(str(m)), level=level)
    yield seen
    logger.remove(handle)


@pytest.fixture
def warnings_seen():
    """The loguru warnings (and worse) logged during the test, as text."""
    yield from _logged("WARNING")


@pytest.fixture
def infos():
    """The loguru messages at INFO and above logged during the test, as text."""
    yield from _logged("INFO")


@pytest.fixture
def high_precision():
    """The caller's matmul precision set to "high" (TF32 on CUDA), put back after the test."""
    import torch

    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    legacy = torch.get_float32_matmul_precision()
    own = [b.fp32_precision for b in backends]
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(legacy)
    for backend, value in zip(backends, own):
        backend.fp32_precision = value
