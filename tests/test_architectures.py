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
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dsnot_modifier import DSnoTModifier
from dsnot_modifier.masks import mask_digest
from dsnot_modifier.experiments.pipeline import calibration_dataset
from dsnot_modifier.swaps import gram_error
from llmcompressor import oneshot
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

VOCAB = 96
HIDDEN = 64
COMMON = dict(targets=["Linear"], ignore=["re:.*lm_head"])
DEAD_UNITS = 6  # OPT: MLP units that calibration never activates


def _base(**extra):
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128,
                tie_word_embeddings=False) | extra


def build(arch: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    gqa = dict(num_key_value_heads=2, intermediate_size=128)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_base(**gqa)))
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**_base(**gqa, sliding_window=None)))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**_base(**gqa)))
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    elif arch == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**_base(**gqa, head_dim=16)))
    elif arch in ("qwen3_moe", "qwen3_moe_routed"):
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**_base(
            **gqa, head_dim=16, moe_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2, norm_topk_prob=True)))
    elif arch in ("mixtral", "mixtral_routed"):
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**_base(
            **gqa, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)))
    elif arch == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_base(
            **gqa, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)))
    elif arch == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**_base(**gqa, pad_token_id=0)))
    elif arch == "opt":
        model = tf.OPTForCausalLM(tf.OPTConfig(**_base(
            ffn_dim=128, word_embed_proj_dim=HIDDEN, pad_token_id=1)))
        with torch.no_grad():  # dead units: ReLU(fc1 x) is 0 on every token
            for layer in model.model.decoder.layers:
                layer.fc1.bias[:DEAD_UNITS] = -1e4
    else:
        raise ValueError(arch)
    if "moe" in arch or "mixtral" in arch:
        from llmcompressor.modeling.moe.linearize import linearize_moe

        linearize_moe(model)
    return model.eval()


def tokenizer():
    vocab = {f"w{i}": i for i in range(1, VOCAB)} | {"[UNK]": 0}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


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


class Spy(Modifier):
    """Between the pruner and DSnoT: each target's weight as the pruner left it."""

    seen: dict = {}

    def on_initialize(self, state, **kwargs):
        self.seen.clear()
        self._model = state.model
        return True

    def on_sequential_epoch_end(self, state, event, modules=(), **kwargs):
        names = {m: n for n, m in self._model.named_modules()}
        for module in modules:
            name = names.get(module)
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name and name not in self.seen:
                self.seen[name] = module.weight.detach().clone()


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen3_moe_routed",
         "mixtral", "mixtral_routed", "gemma3", "phi3", "opt"]
METHODS = ["wanda", "wanda-2:4", "sparsegpt-2:4"]


def pruner(method):
    structure = "2:4" if method.endswith("2:4") else "0:0"
    cls = SparseGPTModifier if method.startswith("sparsegpt") else WandaPruningModifier
    return cls(sparsity=0.5, mask_structure=structure, **COMMON), structure


def linears(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in n}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_architecture(arch, method, tmp_path):
    model = build(arch)
    model.config.save_pretrained(tmp_path / "config")  # oneshot reads the config again
    model.config.name_or_path = str(tmp_path / "config")
    dense = linears(model)
    routed = arch.endswith("_routed")
    # as few batches as give each layer min_tokens (128) tokens; routed: each expert about half
    samples, length = (8, 64) if routed else (2, 64)
    windows = torch.randint(1, VOCAB, (samples, length), generator=torch.Generator().manual_seed(1))
    prune, structure = pruner(method)
    dsnot = DSnoTModifier(**COMMON)
    capture, spy = Capture(), Spy()
    oneshot(model=model, processor=tokenizer(), dataset=calibration_dataset(windows),
            recipe=[capture, prune, spy, dsnot], pipeline="sequential",
            num_calibration_samples=samples, max_seq_length=length,
            shuffle_calibration_samples=False, moe_calibrate_all_experts=not routed)
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
            blocks = lambda z: z.reshape(z.shape[0], -1, 4).sum(-1)  # noqa: E731
            assert torch.equal(blocks(za), blocks(zb)), name
            assert bool((blocks(za) >= 2).all()), name
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
        assert int((fc2 == 0).reshape(fc2.shape[0], -1, 4).sum(-1).max()) > 2
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
