"""
The architecture matrix (issue 13): tiny models built from transformers config
classes (random weights, no download, CPU), each pruned by Wanda (unstructured
and 2:4) or SparseGPT 2:4 and then refined by DSnoTModifier in llm-compressor's
sequential oneshot. For every model and method:

- the structure: exact zeros per row (unstructured Wanda), per block counts kept
  and at least N zeros in every block (N:M, SparseGPT's extra zeros included);
- every pruned layer's error ``eᵀHe`` lowered or left equal, recomputed here from
  the inputs captured by hooks (not read from the report), and the report's
  figures equal to the recomputed ones;
- no non-finite weight; every pruned layer in the report (refined, or listed as
  left alone with its reason, then exactly as the pruner left it);
- a save and a reload giving the same weights, and the report's mask digests.
"""

import pytest
import torch

from dsnot_modifier import DSnoTModifier
from dsnot_modifier.digest import mask_digest
from dsnot_modifier.swaps import gram_error
from helpers import COMMON, DEAD_UNITS, Spy, block_zeros, build, linears, random_windows, run_built
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier


class Capture(Modifier):
    """Before the pruner: the calibration inputs of every target Linear (hooks are
    off while llm-compressor propagates, so these are the inputs DSnoT sees)."""

    inputs: dict = {}

    def on_initialize(self, state, **kwargs):
        self.inputs.clear()
        for name, module in state.model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                self.register_hook(module, self._hook(name), "forward")
        return True

    def _hook(self, name):
        def hook(module, args, _out):
            x = args[0].detach()
            self.inputs.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).double())
        return hook

    def on_finalize(self, state, **kwargs):
        self.remove_hooks()
        return True


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen3_moe_routed",
         "mixtral", "mixtral_routed", "gemma3", "phi3", "opt"]
METHODS = ["wanda", "wanda-2:4", "sparsegpt-2:4"]


def pruner(method):
    structure = "2:4" if method.endswith("2:4") else "0:0"
    cls = SparseGPTModifier if method.startswith("sparsegpt") else WandaPruningModifier
    return cls(sparsity=0.5, mask_structure=structure, **COMMON), structure


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_architecture(arch, method, tmp_path):
    model = build(arch)
    dense = linears(model)
    routed = arch.endswith("_routed")
    # as few batches as give each layer min_tokens (128) tokens; routed: each expert about half
    samples, length = (8, 64) if routed else (2, 64)
    windows = random_windows(samples, length)
    prune, structure = pruner(method)
    dsnot = DSnoTModifier(**COMMON)
    capture, spy = Capture(), Spy()
    run_built(model, windows, [capture, prune, spy, dsnot], tmp_path / "config",
              moe_calibrate_all_experts=not routed)
    out = linears(model)
    report = dsnot.report
    refined = {layer.name: layer for layer in report.layers}
    skipped = {s.name: s for s in report.skipped}
    pruned = {n for n, w in spy.seen.items() if bool(((w == 0) & (dense[n] != 0)).any())}
    if not routed:  # every target pruned (routed: an expert without tokens may not be)
        assert pruned == set(dense), sorted(set(dense) - pruned)
    assert len(pruned) >= 8, sorted(pruned)
    assert pruned <= set(refined) | set(skipped), sorted(pruned - set(refined) - set(skipped))
    assert len(refined) >= len(pruned) // 2
    nm = None if structure == "0:0" else (2, 4)
    for name in pruned:
        w, before = out[name], spy.seen[name]
        assert bool(torch.isfinite(w).all()), name
        zb, za = before == 0, w == 0
        if nm is None:
            assert torch.equal(za.sum(1), zb.sum(1)), name
        else:
            assert torch.equal(block_zeros(w, 4), block_zeros(before, 4)), name
            assert bool((block_zeros(w, 4) >= 2).all()), name
        # kept values are the pruner's, regrown ones the dense weight's
        kept, grown = ~za & ~zb, ~za & zb
        assert torch.equal(w[kept], before[kept]), name
        assert torch.equal(w[grown], dense[name][grown]), name
        if name in skipped:
            assert skipped[name].reason == "few tokens" and routed, (name, skipped[name])
            assert torch.equal(w, before), name
            continue
        layer = refined[name]
        assert layer.structure == ("unstructured" if nm is None else "2:4"), name
        assert layer.pruner_structure == structure, name
        assert layer.mask_digest == mask_digest(w), name
        # the error, recomputed from the captured inputs (float64)
        x = torch.cat(capture.inputs[name])
        assert x.shape[0] >= dsnot.min_tokens, name
        h = x.T @ x / x.shape[0]
        err_before = float(gram_error(dense[name].double(), before.double(), h).sum())
        err_after = float(gram_error(dense[name].double(), w.double(), h).sum())
        assert err_after <= err_before * (1 + 1e-5) + 1e-12, (name, err_before, err_after)
        assert err_before == pytest.approx(layer.error_before, rel=1e-3, abs=1e-9), name
        assert err_after == pytest.approx(layer.error_after, rel=1e-3, abs=1e-9), name
    if arch == "opt" and method.startswith("sparsegpt"):
        # the dead units' fc2 columns: SparseGPT zeroes them, blocks with 3 or 4 zeros
        fc2 = spy.seen["model.decoder.layers.0.fc2"]
        assert bool((fc2[:, :DEAD_UNITS] == 0).all())
        assert int(block_zeros(fc2, 4).max()) > 2
    if routed:
        assert all(s.reason == "few tokens" for s in skipped.values() if s.name in pruned)
    # save and reload
    if arch.startswith("mixtral"):
        # transformers' Mixtral loader reads only its packed expert tensors: repack
        # the linearized experts before saving, as llm-compressor documents
        from llmcompressor.modeling.moe.linearize import repack_moe

        repack_moe(model)
    model.save_pretrained(tmp_path / "saved")
    reloaded = reload(arch, tmp_path / "saved")
    again = linears(reloaded)
    for name in pruned:
        assert torch.equal(again[name], out[name]), name


def reload(arch, path):
    """The saved checkpoint as transformers loads it (experts: fused again by
    transformers' own conversion, then linearized as llm-compressor does)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    if "moe" in arch or "mixtral" in arch:
        from llmcompressor.modeling.moe.linearize import linearize_moe

        linearize_moe(model)
    return model
