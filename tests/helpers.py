"""
Helpers the test modules share (fixtures are in ``conftest.py``): the tiny models and
their tokenizer, calibration windows, a oneshot run, the target Linear weights of a
model, the zeros of N:M blocks, and a modifier that records weights between two others.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers import Modifier

from dsnot_harness.pipeline import calibration_dataset, load_model, load_tokenizer
from dsnot_modifier.masks import block_zero_counts

#: the repository's root (examples/, benchmarks/, recipes/)
ROOT = Path(__file__).resolve().parent.parent
#: the word-level vocabulary of every tiny model: token ids 0 (unknown) to 95
VOCAB = 96
#: DSnoT's and the pruners' targets: every Linear but the LM head
COMMON = dict(targets=["Linear"], ignore=["re:.*lm_head"])
#: hidden size of the models :func:`build` makes
HIDDEN = 64
#: OPT (from :func:`build`): MLP units that calibration never activates
DEAD_UNITS = 6


# ------------------------------------------------------------------ models and data

def tokenizer():
    """The word-level tokenizer of the tiny models: ``w1`` .. ``w95``, ``[UNK]`` (0) pads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(1, VOCAB)} | {"[UNK]": 0}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


def save_tiny_llama(path, hidden_size=64, intermediate_size=128, num_hidden_layers=2) -> str:
    """A tiny Llama (random weights, seed 0) saved in ``path`` with :func:`tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return str(path)


def random_windows(samples: int, length: int, seed: int = 1) -> torch.Tensor:
    """Calibration windows ``[samples, length]`` of random token ids (0, the pad, left out)."""
    return torch.randint(1, VOCAB, (samples, length), generator=torch.Generator().manual_seed(seed))


def _base(**extra):
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128,
                tie_word_embeddings=False) | extra


def build(arch: str) -> torch.nn.Module:
    """A tiny model of an architecture of the matrix (tests/test_architectures.py), built
    from its transformers config class (random weights, seed 0), MoE experts linearized."""
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


def load_offloaded(model_dir: str, where: str, folder=None):
    """The model of ``model_dir`` with its weights offloaded to the cpu or to disk (in
    ``folder``), by compressed-tensors' offload caches as llm-compressor 0.14 loads them."""
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM

    with load_offloaded_model():
        if where == "disk":
            return AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32, device_map={"": "disk"}, offload_folder=str(folder)
            )
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="auto_offload")


def load_script(relative_path: str):
    """Import a script of the repository (benchmarks/...) as a module, for its tests."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------ oneshot

def run(model_dir, windows, recipe, *, model=None, processor=None, dtype=torch.float32, **kwargs):
    """
    llm-compressor's sequential oneshot of ``recipe`` over the calibration ``windows``
    (``[samples, length]`` token ids, in order); the model it ran on.

    The model is ``model_dir``'s checkpoint loaded in ``dtype`` unless ``model`` is given
    (offloaded, edited or built), the tokenizer ``model_dir``'s unless ``processor`` is.
    ``kwargs`` go to oneshot and replace these defaults (``pipeline="independent"``, a
    ``dataset`` of one's own, ``output_dir``, ``batch_size``...).
    """
    if model is None:
        model = load_model(model_dir, dtype=dtype)
    args = dict(
        model=model, processor=load_tokenizer(model_dir) if processor is None else processor,
        dataset=calibration_dataset(windows), recipe=recipe, pipeline="sequential",
        num_calibration_samples=windows.shape[0], max_seq_length=windows.shape[1],
        shuffle_calibration_samples=False,
    )
    oneshot(**(args | kwargs))
    return model


def run_built(model, windows, recipe, directory, **kwargs):
    """:func:`run` on a model built from its config (no checkpoint, e.g. :func:`build`): the
    config saved in ``directory`` (oneshot reads it again), the tokenizer :func:`tokenizer`."""
    model.config.save_pretrained(directory)
    model.config.name_or_path = str(directory)
    return run(str(directory), windows, recipe, model=model, processor=tokenizer(), **kwargs)


def run_expecting(model_dir, windows, recipe, error, match, **kwargs):
    """:func:`run`, which must raise ``error`` matching ``match``; the model it ran on."""
    model = load_model(model_dir)
    with pytest.raises(error, match=match):
        run(model_dir, windows, recipe, model=model, **kwargs)
    return model


# ----------------------------------------------------------------------- weights

def linears(model) -> dict[str, torch.Tensor]:
    """The weight of every Linear layer but the LM head, by module name: copies, so that
    they stay as they are while the model changes (an offloaded weight is onloaded)."""
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in n}


def assert_untouched(model_dir, model):
    """Every target weight of ``model`` is still that of the checkpoint in ``model_dir``."""
    original = linears(load_model(model_dir))
    assert all(torch.equal(original[n], w) for n, w in linears(model).items())


def block_zeros(weight: torch.Tensor, m: int) -> torch.Tensor:
    """The number of zeros in every block of ``m`` columns of ``weight``: ``[rows, cols / m]``."""
    return block_zero_counts(weight == 0, m)


def blocks_hold(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every block of ``m`` columns of ``weight`` holds exactly ``n`` zeros."""
    return bool((block_zeros(weight, m) == n).all())


class Spy(Modifier):
    """
    Between two modifiers of a sequential oneshot: each target Linear's weight (the LM
    head aside) as the modifiers before it left it, recorded once, at the end of an epoch.

    By default the layers of the subgraph the epoch calibrated; ``pruned_only``: every
    layer of the model the first time it holds a zero (layers left dense are not recorded).
    """

    seen: dict = {}
    pruned_only: bool = False

    def on_initialize(self, state, **kwargs):
        self.seen.clear()
        self._model = state.model
        return True

    def on_sequential_epoch_end(self, state, event, modules=(), **kwargs):
        names = {m: n for n, m in self._model.named_modules()}
        for module in self._model.modules() if self.pruned_only else modules:
            name = names.get(module)
            if not isinstance(module, torch.nn.Linear) or "lm_head" in name or name in self.seen:
                continue
            if self.pruned_only and not bool((module.weight == 0).any()):
                continue
            self.seen[name] = module.weight.detach().clone()
