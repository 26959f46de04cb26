"""The kernels' device paths (the CPU-tuned steps on CPU only, one torch op elsewhere, seen
on the meta device), the pinned matrix-product precision, and that no kernel leaves a
process-wide torch setting changed."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dsnot_modifier import _kernels
from dsnot_modifier._kernels import (
    Workspace,
    argmin_rows,
    full_precision,
    or_inf,
    threads,
    topk_rows,
)


class CallLog(TorchFunctionMode):
    """The names of the torch functions and tensor methods called inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def called(fn, *args, **kwargs):
    with CallLog() as log:
        result = fn(*args, **kwargs)
    return result, set(log.names)


# ------------------------------------------------------------------ CPU-tuned steps on CPU only


def test_argmin_rows_is_one_argmin_off_cpu():
    x = torch.empty(6, 256, device="meta")
    _, names = called(argmin_rows, x)
    assert "argmin" in names and not names & {"amin", "gather", "view"}, names


def test_argmin_rows_on_cpu_is_tuned_and_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (33, 256), generator=g).float()  # many ties: the first minimum
    x[3, 100] = float("nan")
    got, names = called(argmin_rows, x)
    assert "amin" in names
    assert torch.equal(got, x.argmin(1))


def test_topk_rows_is_one_topk_off_cpu():
    key = torch.empty(4, 1024, device="meta")
    (values, indices), names = called(topk_rows, key, 8, True)
    assert names & {"topk"} and not names & {"amax", "amin", "gather"}, names
    assert values.shape == indices.shape == (4, 8)


@pytest.mark.parametrize("largest", [True, False])
def test_topk_rows_on_cpu_is_two_stage_and_exact(largest):
    g = torch.Generator().manual_seed(1)
    key = torch.randn(9, 1024, generator=g)
    (values, indices), names = called(topk_rows, key, 8, largest)
    assert ("amax" if largest else "amin") in names
    expected = torch.topk(key, 8, dim=1, largest=largest)
    assert torch.equal(values, expected.values)
    assert torch.equal(key.gather(1, indices), values)


def test_or_inf_is_one_where_off_cpu():
    x = torch.empty(5, 64, device="meta")
    keep = torch.empty(5, 64, dtype=torch.bool, device="meta")
    out, scratch = torch.empty_like(x), torch.empty_like(x)
    _, names = called(or_inf, keep, x, out, scratch)
    assert "where" in names and not names & {"maximum", "logical_not"}, names


def test_or_inf_on_cpu_is_the_bit_trick_and_exact():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(5, 64, generator=g)
    keep = torch.rand(5, 64, generator=g) > 0.5
    got, names = called(or_inf, keep, x)
    assert "maximum" in names
    assert torch.equal(got, torch.where(keep, x, float("inf")))


def test_workspace_reuses_cpu_buffers_only():
    ws = Workspace(reuse=True)
    a = ws.take("t", (4, 8), torch.float32, "cpu")
    assert ws.take("t", (2, 8), torch.float32, "cpu").data_ptr() == a.data_ptr()
    ws.take("t", (4, 8), torch.float32, "meta")
    assert [key[2].type for key in ws._held] == ["cpu"]


# ------------------------------------------------------------------ matrix-product precision


def test_full_precision_pins_highest_and_restores(high_precision):
    with full_precision():
        assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_full_precision_restores_after_an_exception(high_precision):
    with pytest.raises(KeyError):
        with full_precision():
            raise KeyError("inside")
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_full_precision_restores_mixed_settings(high_precision):
    """A caller that mixed torch's old and new settings (TF32 turned off after "high"):
    the backends' own settings come back as they were."""
    torch.backends.cuda.matmul.allow_tf32 = False
    with pytest.raises(RuntimeError):
        torch.get_float32_matmul_precision()  # torch itself refuses to read it
    with full_precision():
        assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.mkldnn.matmul.fp32_precision == "tf32"


# ------------------------------------------------------------------ no process-wide state changed


def test_threads_sets_and_restores_the_count():
    before = torch.get_num_threads()
    with threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(KeyError):
        with threads(1):
            raise KeyError("inside")
    assert torch.get_num_threads() == before
    with _kernels.at_most_threads(before + 4):
        assert torch.get_num_threads() == before


def test_importing_the_library_changes_no_torch_setting():
    import subprocess
    import sys

    code = ("import torch\n"
            "def state():\n"
            "    return (torch.get_num_threads(), torch.get_num_interop_threads(),\n"
            "            torch.get_float32_matmul_precision(), torch.get_default_dtype(),\n"
            "            torch.are_deterministic_algorithms_enabled(), torch.is_grad_enabled(),\n"
            "            torch.backends.cuda.matmul.fp32_precision,\n"
            "            torch.backends.mkldnn.matmul.fp32_precision)\n"
            "before = state()\n"
            "import dsnot_modifier, dsnot_modifier.stats, dsnot_modifier.swaps\n"
            "import dsnot_modifier.masks, dsnot_modifier.offload, dsnot_modifier._kernels\n"
            "print(before == state(), before, state())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1].startswith("True"), out.stdout
