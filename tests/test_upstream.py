"""The private parts of llm-compressor and compressed-tensors that :mod:`dsnot_modifier.upstream`
names: each test fails when upstream changes the one it checks."""

import inspect

import torch
from compressed_tensors.offload.cache import DistributedCPUCache, DistributedDiskCache, OffloadCache

from dsnot_modifier import upstream
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from llmcompressor.transformers.compression import compressed_tensors_utils


def test_llm_compressor_marks_its_save_pretrained_overridden():
    source = inspect.getsource(compressed_tensors_utils)
    assert "save_pretrained_wrapper._overridden = True" in source
    assert 'getattr(model.save_pretrained, "_overridden", False)' in source

    def save(directory):
        return directory

    assert not upstream.is_compressor_save(save)
    assert upstream.mark_compressor_save(save) is save and upstream.is_compressor_save(save)


def test_pruners_register_their_modules_by_name():
    for cls in (WandaPruningModifier, SparseGPTModifier):
        pruner = cls(sparsity=0.5)
        assert pruner._module_names == {}  # a dict, filled at calibration start
        linear = torch.nn.Linear(2, 2)
        pruner._module_names[linear] = "x"
        assert upstream.pruned_modules(pruner) == {linear: "x"}
    assert upstream.pruned_modules(object()) is None


def test_offload_caches_replace_the_parameter_dict():
    linear = torch.nn.Linear(2, 2)
    assert upstream.offload_cache(linear) is linear._parameters
    assert not upstream.shares_offload(linear)
    assert issubclass(DistributedCPUCache, OffloadCache) and issubclass(DistributedDiskCache, OffloadCache)
    assert hasattr(OffloadCache, "keep_onloaded_values")
    assert upstream.onloaded_copy(torch.zeros(1)) is None
