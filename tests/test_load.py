"""Loading as a user waits for it (api/build.py, runtime.populate_in_place): the tokenizer and chat format are
made while the weights are prepared, with the same errors as when they were made one after the other; F16
weights read in place have their file pages mapped in at load."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from llamaforge import Llama, checkpoints, runtime
from llamaforge.checkpoints.gguf import GGUFQuantTensor
from llamaforge.errors import ChatFormatError, ConfigError
from llamaforge.model import ModelArgs, Transformer

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def mapped_kib(address: int) -> int:
    """Resident KiB of this process's mapping that holds `address` (/proc/self/smaps)."""
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                found = start <= address < end
            elif found and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError("no mapping holds that address")


@pytest.fixture(scope="module")
def f16_gguf(tiny_checkpoints, tmp_path_factory):
    t = tiny_checkpoints
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=t.args.vocab_size, hidden_dim=1024,
                     max_seq_len=64)
    torch.manual_seed(0)
    sd = {k: v.detach().clone() for k, v in Transformer(args).state_dict().items()}
    vocab = checkpoints.load(t.gguf).gguf_metadata
    return checkpoints.save_gguf(args, sd, tmp_path_factory.mktemp("load") / "m-f16.gguf", dtype="f16",
                                 tokenizer_metadata=vocab), vocab, args, sd


@linux
def test_populate_maps_the_weights_pages_in(f16_gguf):
    weights = {k: v for k, v in checkpoints.load(f16_gguf[0], keep_quantized=True).state_dict.items()
               if isinstance(v, GGUFQuantTensor)}
    w1 = weights["layers.0.feed_forward.w1.weight"]
    assert w1.qtype == "F16" and w1.nbytes == 256 * 1024 * 2
    before = mapped_kib(w1.raw.data_ptr())
    assert w1.populate()
    assert mapped_kib(w1.raw.data_ptr()) - before >= w1.nbytes // 1024 - 8  # all of it, but the pages at its ends
    # The selection: every weight but the embedding table (read a row per token) unless the output shares it.
    assert runtime.populate_in_place(weights, tied=False) in (0, sum(  # 0: no C++ kernels
        w.nbytes for k, w in weights.items() if not k.startswith("tok_embeddings.")))
    assert runtime.populate_in_place(weights, tied=True) in (0, sum(w.nbytes for w in weights.values()))


def test_an_f16_model_built_with_populated_pages_computes_as_before(f16_gguf):
    path, _, args, sd = f16_gguf
    llm = Llama.build(path, max_seq_len=32, max_batch_size=1, device="cpu", progress=False)
    tokens = torch.tensor([[1, 7, 42, 3]])
    with torch.inference_mode():
        got = llm.model(tokens, 0)
        ref = Llama.build(path, max_seq_len=32, max_batch_size=1, device="cpu", dtype="float32",
                          progress=False).model(tokens, 0)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)  # F16 weights in the kernels vs dequantized: fp32 sums


def no_loader_left() -> bool:
    return not any(t.name.startswith("llamaforge-load") for t in threading.enumerate())


def test_a_broken_chat_template_is_an_error_at_build(f16_gguf, tmp_path):
    _, vocab, args, sd = f16_gguf
    bad = checkpoints.save_gguf(args, sd, tmp_path / "bad-template.gguf", dtype="f16",
                                tokenizer_metadata={**vocab, "tokenizer.chat_template": "{% for %}"})
    with pytest.raises(ChatFormatError, match="chat template of .*bad-template.gguf.*does not compile"):
        Llama.build(bad, max_seq_len=32, max_batch_size=1, device="cpu", progress=False)
    assert no_loader_left()  # the weights' thread finished before the error came out


def test_a_tokenizer_too_big_for_the_model_is_an_error_at_build(f16_gguf, default_gguf):
    with pytest.raises(ConfigError, match="the tokenizer has 49152 tokens but the model's vocabulary has"):
        Llama.build(f16_gguf[0], tokenizer_path=default_gguf, max_seq_len=32, max_batch_size=1, device="cpu",
                    progress=False)
    assert no_loader_left()
