import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

VOCAB = 96

#: markers whose tests run only when `-m` names them (they need a large environment)
OPT_IN_MARKERS = ("vllm",)


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
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    vocab = {f"w{i}": i for i in range(1, VOCAB)} | {"[UNK]": 0}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[UNK]").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def calib_windows():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, VOCAB, (8, 32), generator=g)


def load_script(relative_path: str):
    """Import a script of the repository (benchmarks/...) as a module, for its tests."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def warnings_seen():
    """The loguru warnings (and worse) logged during the test, as text."""
    from loguru import logger

    seen = []
    handle = logger.add(lambda m: seen.append(str(m)), level="WARNING")
    yield seen
    logger.remove(handle)
