"""Dense snapshots (dsnot_modifier.offload.snapshot_weight) without a GPU: where they go,
the pinned, non-blocking copy chosen for a CUDA-executed layer kept on the cpu (faked),
and the error for a weight left on the meta device by accelerate's own hooks."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dsnot_modifier import offload
from dsnot_modifier.errors import DSnoTConfigError
from dsnot_modifier.offload import snapshot_weight, wait_for_snapshots

CUDA, CPU = torch.device("cuda:0"), torch.device("cpu")


@pytest.mark.parametrize("source,target,pinned", [
    (CUDA, CPU, True), (torch.device("cuda:1"), CPU, True), (CPU, CPU, False),
    (CUDA, CUDA, False), (torch.device("xpu"), CPU, False)])
def test_pinned_only_from_cuda_to_the_cpu(source, target, pinned):
    assert offload._pinned_copy(source, target) is pinned


@pytest.mark.parametrize("where,expected", [("cpu", CPU), ("execution", CUDA)])
def test_snapshot_device_of_a_cuda_layer(where, expected):
    layer = torch.nn.Linear(4, 3)
    assert offload._snapshot_device(layer, CUDA, where) == expected


class CopyLog(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "copy_":
            self.copies.append(dict(kwargs or {}))
        return func(*args, **(kwargs or {}))


class FakeEvent:
    def __init__(self, stream):
        self.stream, self.waited = stream, False

    def synchronize(self):
        self.waited = True


@pytest.fixture
def fake_cuda(monkeypatch):
    """A layer taken as executed on CUDA: pinned buffers and stream events recorded."""
    pinned, events = [], []
    monkeypatch.setattr(offload, "_PENDING", {})
    monkeypatch.setattr(offload, "_pinned_copy", lambda source, target: target.type == "cpu")

    def pinned_empty(like):
        pinned.append(like.shape)
        return torch.empty_like(like)

    def copy_event(weight):
        events.append(FakeEvent("stream 0"))
        return "stream 0", events[-1]

    monkeypatch.setattr(offload, "_pinned_empty", pinned_empty)
    monkeypatch.setattr(offload, "_copy_event", copy_event)
    return pinned, events


def test_non_blocking_snapshot_to_pinned_memory(fake_cuda):
    pinned, events = fake_cuda
    layers = [torch.nn.Linear(8, 5), torch.nn.Linear(8, 6)]
    with CopyLog() as log:
        copies = [snapshot_weight(layer, "cpu", non_blocking=True) for layer in layers]
    assert pinned == [(5, 8), (6, 8)]
    assert log.copies == [{"non_blocking": True}] * 2
    for layer, copy in zip(layers, copies):
        assert torch.equal(copy, layer.weight) and copy.data_ptr() != layer.weight.data_ptr()
    # one pending event per stream, the latest: waiting on it waits for both copies
    assert list(offload._PENDING.values()) == [events[-1]]
    wait_for_snapshots()
    assert events[-1].waited and not offload._PENDING


def test_blocking_snapshot_to_pinned_memory_leaves_nothing_pending(fake_cuda):
    pinned, events = fake_cuda
    with CopyLog() as log:
        snapshot_weight(torch.nn.Linear(8, 5), "cpu")
    assert pinned == [(5, 8)] and log.copies == [{"non_blocking": False}]
    assert not events and not offload._PENDING


@pytest.mark.parametrize("where", ["cpu", "execution", "auto"])
def test_cpu_layers_are_copied_as_before(monkeypatch, where):
    def no_pinning(like):
        raise AssertionError("pinned memory for a CPU layer")

    monkeypatch.setattr(offload, "_pinned_empty", no_pinning)
    layer = torch.nn.Linear(8, 5)
    copy = snapshot_weight(layer, where, non_blocking=True)
    assert torch.equal(copy, layer.weight) and copy.data_ptr() != layer.weight.data_ptr()
    assert not offload._PENDING


class FakeAccelerateHook:
    """What accelerate's AlignDevicesHook leaves: the module's weight on meta after forward."""


def meta_layer(hook):
    layer = torch.nn.Linear(8, 5, device="meta")
    if hook:
        layer._hf_hook = FakeAccelerateHook()
    return layer


def test_a_layer_driven_by_accelerate_hooks_is_named_with_the_fix():
    with pytest.raises(DSnoTConfigError) as err:
        snapshot_weight(meta_layer(hook=True), "auto", name="model.layers.3.mlp.down_proj")
    message = str(err.value)
    assert "model.layers.3.mlp.down_proj" in message and "meta device" in message
    assert "accelerate" in message and "_hf_hook" in message
    assert "from_accelerate" in message and "remove_hook_from_module" in message


def test_a_meta_weight_without_hooks_says_it_was_never_loaded():
    with pytest.raises(DSnoTConfigError, match="Linear.*never loaded"):
        snapshot_weight(meta_layer(hook=False))


def test_a_hook_with_the_weight_present_is_fine():
    layer = torch.nn.Linear(8, 5)
    layer._hf_hook = FakeAccelerateHook()
    assert torch.equal(snapshot_weight(layer, "auto", name="layer"), layer.weight)
