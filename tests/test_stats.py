"""The Gram products of the input statistics: 16-bit products with float32 sums for 16-bit
inputs (automatic ``gram_dtype``), float32 products otherwise and on CPU (unchanged, bit for
bit), the fallback where the float32-output product is missing (one warning; out of memory
raised), and full float32 precision whatever the caller set."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dsnot_modifier import stats as stats_mod
from dsnot_modifier.stats import InputStats, batch_gram


def activations(tokens, cols, seed):
    """bfloat16 inputs shaped like an LLM's: columns of very different scales, a few huge."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) * torch.exp(torch.randn(cols, generator=g) * 0.7)
    x[:, :3] *= 50
    return (x + torch.randn(cols, generator=g) * 0.5).bfloat16()


def gram_stats(gram_dtype, device="cpu", cols=64):
    return InputStats(cols, device=device, with_moments=False, with_gram=True,
                      gram_dtype=gram_dtype)


# ------------------------------------------------------------------ automatic dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_moments", [False, True])
def test_automatic_gram_on_cpu_is_the_float32_one_bit_for_bit(dtype, with_moments):
    xs = [activations(37, 48, seed).to(dtype).view(1, 37, 48) for seed in range(3)]
    auto = InputStats(48, with_moments=with_moments, with_gram=True, gram_dtype=None)
    full = InputStats(48, with_moments=with_moments, with_gram=True)
    for x in xs:
        auto.update(x)
        full.update(x)
    for a, b in zip(auto.tensors(), full.tensors()):
        assert torch.equal(a, b)


class ProductLog(TorchFunctionMode):
    """The dtype of the inputs of every matrix product, and torch's matmul precision then."""

    PRODUCTS = {"mm", "addmm_", "matmul", "__matmul__"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.PRODUCTS:
            self.seen.append((args[-1].dtype, torch.get_float32_matmul_precision()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype,product", [(torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float16),
                                           (torch.float32, torch.float32)])
def test_automatic_gram_off_cpu_multiplies_in_the_inputs_dtype(dtype, product, device):
    """On a device with float32-output 16-bit products (the meta device, or the tests'
    ``--device`` off the CPU): one product in the inputs' 16-bit dtype with a float32
    result, no float32 copy."""
    where = "meta" if device.type == "cpu" else device
    stats = gram_stats(None, device=where)
    with ProductLog() as log:
        stats.update(torch.randn(2, 10, 64, device=where).to(dtype))
    assert [d for d, _ in log.seen] == [product]
    assert stats.gram_sum.dtype == torch.float32


def test_explicit_float32_off_cpu_keeps_float32_products(device):
    where = "meta" if device.type == "cpu" else device
    stats = gram_stats(torch.float32, device=where)
    with ProductLog() as log:
        stats.update(torch.randn(2, 10, 64, device=where).bfloat16())
    assert [d for d, _ in log.seen] == [torch.float32]


def test_gram_dtype_values():
    assert gram_stats(None).gram_dtype is None
    assert gram_stats(torch.bfloat16).gram_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="None"):
        gram_stats(torch.float16)


def test_bfloat16_products_match_float32_up_to_the_order_of_the_sums(device):
    """A bfloat16 model's Gram from bfloat16 products with float32 sums against the float32
    product of the same inputs: each product of two bfloat16 numbers is exact in float32,
    so the two differ only by the order of the float32 sums. Here the sums are taken in
    another order (blocks of 64 tokens, as a GPU's tiles would), entry by entry relative to
    the Cauchy-Schwarz scale sqrt(G_ii G_jj)."""
    xs = [activations(1024, 256, seed) for seed in range(3)]
    w = xs[0].float()[:128, :32]
    assert torch.equal((w.unsqueeze(2) * w.unsqueeze(1)).double(),
                       w.double().unsqueeze(2) * w.double().unsqueeze(1))
    full = InputStats(256, device=device, with_moments=False, with_gram=True, gram_dtype=None)
    blocked = torch.zeros(256, 256)
    for x in xs:
        full.update(x.to(device))
        for start in range(0, x.shape[0], 64):
            part = x[start:start + 64].float()
            blocked += part.t() @ part
    exact = sum(x.double().t() @ x.double() for x in xs)
    scale = torch.sqrt(torch.outer(exact.diagonal(), exact.diagonal()))
    got = full.gram_sum.double().cpu()
    assert ((got - blocked.double()).abs() / scale).max() < 1e-5
    assert ((got - exact).abs() / scale).max() < 1e-5
    # a product rounded to bfloat16 (the CPU's bfloat16 option) is a thousand times further
    rounded = sum(torch.mm(x.t(), x).float() for x in xs).double()
    assert ((rounded - exact).abs() / scale).max() > 1e-4


# ------------------------------------------------------------------ the fallback


@pytest.fixture
def float32_output(monkeypatch):
    """CPU taken for a device with float32-output products, whose product raises ``error``."""
    monkeypatch.setattr(stats_mod, "_MISSING_PRODUCTS", set())
    monkeypatch.setattr(stats_mod, "_has_float32_output", lambda device: True)
    tries = []

    def raising(error):
        def product(x):
            tries.append(x.dtype)
            raise error
        monkeypatch.setattr(stats_mod, "_float32_output_product", product)
        return tries
    return raising


UNSUPPORTED = [
    NotImplementedError("Could not run 'aten::mm.dtype' with arguments from the 'CPU' backend"),
    RuntimeError("out_dtype must be the same as input dtype or fp32 for fp16/bf16 inputs"),
    RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmEx( ... )`"),
    TypeError("mm() got an unexpected keyword argument 'out_dtype'"),
]


@pytest.mark.parametrize("error", UNSUPPORTED, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unsupported_product_falls_back_with_one_warning(float32_output, warnings_seen, error,
                                                         dtype):
    tries = float32_output(error)
    x = activations(40, 24, seed=4).to(dtype)
    for _ in range(3):
        got = batch_gram(x)
        wide = x.float()
        assert torch.equal(got, wide.t() @ wide)  # float32 products, no 16-bit rounding
    assert tries == [dtype]  # found missing once, not tried again
    assert len([w for w in warnings_seen if "float32 result" in w]) == 1, warnings_seen


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
], ids=["OutOfMemoryError", "oom-message", "illegal-access", "alloc-failed"])
def test_other_errors_are_raised(float32_output, warnings_seen, error):
    float32_output(error)
    stats = gram_stats(torch.bfloat16, cols=24)
    with pytest.raises(type(error), match=str(error)[:20]):
        stats.update(activations(40, 24, seed=5))
    assert not warnings_seen


def test_cpu_bfloat16_option_is_unchanged():
    """gram_dtype=bfloat16 on CPU: the bfloat16 product, widened (as documented)."""
    x = activations(40, 24, seed=6)
    assert torch.equal(batch_gram(x), torch.mm(x.t(), x).float())


# ------------------------------------------------------------------ precision


@pytest.mark.parametrize("gram_dtype,device", [(torch.float32, "cpu"), (torch.bfloat16, "cpu"),
                                               (None, "meta")])
def test_gram_products_run_at_highest_precision(high_precision, gram_dtype, device):
    stats = gram_stats(gram_dtype, device=device, cols=24)
    x = activations(40, 24, seed=7).to(device)
    with ProductLog() as log:
        stats.update(x)
    assert log.seen and all(precision == "highest" for _, precision in log.seen), log.seen
    assert torch.get_float32_matmul_precision() == "high"
