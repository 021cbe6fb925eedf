"""`Llama.build` pauses Python's cyclic garbage collector while it reads the checkpoint and builds the model and
tokenizer (api/build.collector_paused: one full collection there was a quarter of the default model's load), and
leaves it as it found it, on error too."""

from __future__ import annotations

import gc

import pytest

from llamaforge import Llama, checkpoints
from llamaforge.errors import LlamaforgeError
from llamaforge.tokenizer import Tokenizer


@pytest.fixture
def seen(monkeypatch):
    """Whether the collector was on in checkpoints.load and Tokenizer.from_source, each time they ran."""
    calls: list[tuple[str, bool]] = []
    load, from_source = checkpoints.load, Tokenizer.from_source.__func__

    def recording_load(*a, **k):
        calls.append(("load", gc.isenabled()))
        return load(*a, **k)

    def recording_from_source(cls, *a, **k):
        calls.append(("tokenizer", gc.isenabled()))
        return from_source(cls, *a, **k)

    monkeypatch.setattr(checkpoints, "load", recording_load)
    monkeypatch.setattr(Tokenizer, "from_source", classmethod(recording_from_source))
    return calls


def build(path, **kw):
    return Llama.build(path, max_seq_len=32, max_batch_size=1, device="cpu", progress=False, **kw)


def test_the_collector_is_off_while_the_load_allocates_and_on_again_after(tiny_checkpoints, seen):
    assert gc.isenabled()
    build(tiny_checkpoints.gguf)
    assert seen == [("load", False), ("tokenizer", False)]
    assert gc.isenabled()


def test_a_collector_the_caller_turned_off_stays_off(tiny_checkpoints, seen):
    gc.disable()
    try:
        build(tiny_checkpoints.gguf)
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert seen == [("load", False), ("tokenizer", False)]


def test_a_failed_build_turns_the_collector_back_on(tiny_checkpoints, tmp_path, seen):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a tokenizer")
    with pytest.raises(LlamaforgeError):
        build(tiny_checkpoints.gguf, tokenizer_path=bad)
    assert ("tokenizer", False) in seen and gc.isenabled()
