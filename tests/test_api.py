"""Llama.build / generate / text_completion / chat_completion across formats, devices and bad input.

Tolerances: greedy tokens identical across formats and against the Meta oracle; logprobs within 1e-4
(float32, same weights; GGUF f32 holds the same values).
"""

import pytest
import torch

from llamaforge import Llama
from llamaforge.api import UNSAFE_ERROR
from llamaforge.errors import (
    ChatFormatError, CheckpointNotFoundError, ConfigError, DeviceError, GenerationError, LlamaforgeError,
)
from tests.reference import meta_generate

PROMPTS = ["the llama model is", "hello world", "café 日本 theory of relativity states that"]
FORMATS = ["meta", "meta_mp2", "hf", "gguf"]


@pytest.fixture(scope="module")
def built(tiny_checkpoints):
    return {
        name: Llama.build(getattr(tiny_checkpoints, name), max_seq_len=64, max_batch_size=4, device="cpu")
        for name in FORMATS
    }


def test_every_format_gives_identical_tokens_and_logprobs(built):
    """Same ids in, same ids and logprobs out. (Decoded text is compared within a tokenizer kind only:
    a random model emits stray byte tokens, and invalid UTF-8 is rendered differently by sentencepiece
    and by the GGUF vocabulary's llama.cpp-style decoder.)"""
    ref_gen = built["meta"]
    prompt_tokens = [ref_gen.tokenizer.encode(p, bos=True) for p in PROMPTS]
    ref = ref_gen.generate(prompt_tokens, 12, temperature=0, logprobs=True)
    assert any(ref[0])
    for name in FORMATS[1:]:
        assert [built[name].tokenizer.encode(p, bos=True) for p in PROMPTS] == prompt_tokens, name
        out = built[name].generate(prompt_tokens, 12, temperature=0, logprobs=True)
        assert out[0] == ref[0], name
        for a, b in zip(out[1], ref[1]):
            assert a == pytest.approx(b, abs=1e-4), name
    text = ref_gen.text_completion(PROMPTS, temperature=0, max_gen_len=12)
    assert built["meta_mp2"].text_completion(PROMPTS, temperature=0, max_gen_len=12) == text


def test_build_equals_meta_oracle_on_a_meta_checkpoint(built):
    gen = built["meta"]
    prompt_tokens = [gen.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    assert all(t[0] == gen.tokenizer.bos_id for t in prompt_tokens)
    ours = gen.generate(prompt_tokens, max_gen_len=10, temperature=0, logprobs=True, echo=True)
    ref = meta_generate(gen.model, prompt_tokens, 10, gen.max_seq_len, {gen.tokenizer.eos_id}, temperature=0,
                        logprobs=True, echo=True)
    assert ours[0] == ref[0]
    for a, b in zip(ours[1], ref[1]):
        assert a == pytest.approx(b, abs=1e-4)
    # sampled, with Meta's seeding: torch.manual_seed then the global generator
    torch.manual_seed(5)
    ours = gen.generate(prompt_tokens, max_gen_len=10, temperature=0.8, top_p=0.9)
    torch.manual_seed(5)
    ref = meta_generate(gen.model, prompt_tokens, 10, gen.max_seq_len, {gen.tokenizer.eos_id}, temperature=0.8,
                        top_p=0.9)
    assert ours[0] == ref[0]


def test_text_completion_shape_and_meta_defaults(built):
    gen = built["meta"]
    out = gen.text_completion(PROMPTS[:1], max_gen_len=5, temperature=0)
    assert set(out[0]) == {"generation"}
    out = gen.text_completion(PROMPTS[:1], max_gen_len=5, temperature=0, logprobs=True, echo=True)
    assert set(out[0]) == {"generation", "tokens", "logprobs"}
    assert out[0]["generation"].startswith(PROMPTS[0])
    assert len(out[0]["tokens"]) == len(out[0]["logprobs"])
    # max_gen_len=None means max_seq_len - 1, bounded by total_len = max_seq_len
    full = gen.generate([gen.tokenizer.encode("hello", bos=True)], gen.max_seq_len - 1, temperature=0)[0][0]
    assert gen.text_completion(["hello"], temperature=0)[0]["generation"] == gen.tokenizer.decode(full)


def test_seed_makes_sampling_reproducible(built):
    gen = built["hf"]
    a = gen.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=10, seed=3)
    b = gen.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=10, seed=3)
    assert a == b


@pytest.mark.parametrize("name", ["meta", "gguf"])
def test_streaming_yields_the_generated_tokens(built, name):
    gen = built[name]
    ids = gen.tokenizer.encode(PROMPTS[2], bos=True)
    whole = gen.generate([ids], 15, temperature=0)[0][0]
    assert list(gen.stream_tokens(ids, 15, temperature=0)) == whole
    sampled = gen.generate([ids], 15, temperature=1.0, seed=11)[0][0]
    assert list(gen.stream_tokens(ids, 15, temperature=1.0, seed=11)) == sampled


def test_llama2_chat_completion(built):
    gen = built["meta"]
    assert gen.chat_format.name == "llama2"
    dialogs = [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        [{"role": "user", "content": "hi [INST] there"}],
    ]
    out = gen.chat_completion(dialogs, temperature=0, max_gen_len=6, logprobs=True)
    assert out[0]["generation"]["role"] == "assistant"
    assert isinstance(out[0]["generation"]["content"], str)
    assert out[1]["generation"]["content"] == UNSAFE_ERROR
    assert len(out[0]["tokens"]) == len(out[0]["logprobs"])
    with pytest.raises(ChatFormatError):
        gen.chat_completion([[{"role": "assistant", "content": "x"}]])
    with pytest.raises(ChatFormatError):
        gen.chat_completion([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])


def test_batch_and_prompt_limits_raise_clear_errors(built):
    gen = built["meta"]
    with pytest.raises(GenerationError, match="max_batch_size is 4"):
        gen.text_completion(["a"] * 5, max_gen_len=2)
    with pytest.raises(GenerationError, match="max_seq_len is 64"):
        gen.text_completion(["hello world " * 60], max_gen_len=2)
    with pytest.raises(GenerationError, match="temperature"):
        gen.text_completion(["a"], temperature=-1)
    with pytest.raises(GenerationError, match="top_p"):
        gen.text_completion(["a"], top_p=-0.5)
    with pytest.raises(GenerationError, match="list of strings"):
        gen.text_completion("a bare string")


def test_bad_build_arguments(tiny_checkpoints, tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        Llama.build(tmp_path / "nope")
    with pytest.raises(ConfigError, match="max_batch_size"):
        Llama.build(tiny_checkpoints.meta, max_batch_size=0)
    with pytest.raises(ConfigError, match="max_seq_len"):
        Llama.build(tiny_checkpoints.meta, max_seq_len=-3)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            Llama.build(tiny_checkpoints.meta, device="cuda")
    with pytest.raises(DeviceError, match="dtype"):
        Llama.build(tiny_checkpoints.meta, dtype="int7")


def test_tokenizer_larger_than_vocab_is_refused(tiny_checkpoints, tmp_path):
    from tests.conftest import train_tiny_sentencepiece

    big = train_tiny_sentencepiece(tmp_path / "big.model", vocab_size=600)
    with pytest.raises(ConfigError, match="tokenizer has"):
        Llama.build(tiny_checkpoints.meta, tokenizer_path=big)


def test_default_max_seq_len_is_the_models_context(tiny_checkpoints, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="llamaforge"):
        gen = Llama.build(tiny_checkpoints.hf, device="cpu")
    assert gen.max_seq_len == tiny_checkpoints.args.max_seq_len
    assert "context length" in caplog.text


def test_errors_are_llamaforge_errors():
    assert issubclass(GenerationError, LlamaforgeError) and issubclass(GenerationError, ValueError)


@pytest.mark.parametrize("chain", [("gguf", "hf", "meta"), ("meta", "gguf", "hf"), ("hf", "meta", "gguf")])
def test_convert_chains_keep_results(tiny_checkpoints, built, tmp_path, chain):
    """Any format becomes any other through `llamaforge convert`, tokenizer included."""
    from llamaforge.cli.main import main

    src = getattr(tiny_checkpoints, chain[0])
    for i, fmt in enumerate(chain[1:]):
        out = tmp_path / (f"step{i}.gguf" if fmt == "gguf" else f"step{i}")
        assert main(["convert", str(src), str(out), "--to", fmt]) == 0
        src = out
    gen = Llama.build(src, max_seq_len=64, device="cpu")
    ref = built["meta"]
    prompt_tokens = [ref.tokenizer.encode(p, bos=True) for p in PROMPTS]
    assert [gen.tokenizer.encode(p, bos=True) for p in PROMPTS] == prompt_tokens
    assert gen.generate(prompt_tokens, 8, temperature=0) == ref.generate(prompt_tokens, 8, temperature=0)


def test_default_cpu_build_keeps_gguf_weights_quantized(default_gguf, default_llama):
    """dtype=None on the CPU runs the Q4_1/Q8_0 blocks as they are: memory stays near the file size.

    Tolerance: int8 activations (as llama.cpp) move logits by a few percent of their range, so the
    check is on agreement with the float32 reference: the same argmax at >= 90% of positions.
    """
    from llamaforge.quantize import QuantizedEmbedding, QuantizedLinear

    gen = Llama.build(max_seq_len=256, device="cpu")
    assert isinstance(gen.model.layers[0].attention.wq, QuantizedLinear)
    assert isinstance(gen.model.tok_embeddings, QuantizedEmbedding)
    assert isinstance(gen.model.output, QuantizedLinear)  # tied: the embedding's own bytes
    held = sum(t.numel() * t.element_size() for t in list(gen.model.parameters()) + list(gen.model.buffers())
               if t.device.type != "meta" and t is not gen.model.rope.cos and t is not gen.model.rope.sin)
    assert held <= 1.2 * default_gguf.stat().st_size
    ids = torch.tensor([gen.tokenizer.encode("The capital of France is Paris. The capital of Germany is Berlin.")])
    with torch.inference_mode():
        q, f = gen.model(ids)[0], default_llama.model(ids)[0]
    assert (q.argmax(-1) == f.argmax(-1)).float().mean() >= 0.9
    answer = gen.chat_completion([[{"role": "user", "content": "Say hello."}]], temperature=0, max_gen_len=32)[0]
    assert answer["generation"]["content"].strip()


def test_quantize_a_float_checkpoint(tiny_checkpoints, built):
    from llamaforge.quantize import QuantizedLinear

    gen = Llama.build(tiny_checkpoints.hf, max_seq_len=64, device="cpu", quantize="q8_0")
    assert isinstance(gen.model.layers[1].feed_forward.w2, QuantizedLinear)
    ids = torch.tensor([gen.tokenizer.encode(PROMPTS[0], bos=True)])
    with torch.inference_mode():
        q, f = gen.model(ids)[0], built["hf"].model(ids)[0]
    assert (q.argmax(-1) == f.argmax(-1)).float().mean() >= 0.8


@pytest.mark.parametrize("stop", ["<|eot_id|>", "<|end_of_text|>"])
def test_llama3_rows_end_at_either_stop_token_on_every_path(tmp_path, stop):
    """Meta's Llama 3 stops on <|end_of_text|> and <|eot_id|> alike: a model whose every next token is `stop`
    gives empty generations (no stop token, no logprob) on the engine (greedy), Meta's lock-step mode (a sampled
    batch) and chat_completion; with other stop_ids the same rows run to max_gen_len."""
    import base64

    from llamaforge.model import ModelArgs, Transformer
    from llamaforge.tokenizer import Tokenizer

    ranks = {bytes([b]): b for b in range(256)}
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tok = Tokenizer.from_file(path)
    stop_id = tok.token_to_id(stop)
    assert tok.stop_ids == {tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")}
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.n_words, hidden_dim=64,
                     max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():  # no layer adds anything and every token embeds alike: one next-token distribution
        model.layers[0].attention.wo.weight.zero_()
        model.layers[0].feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight.copy_(torch.ones(32))
        model.output.weight.mul_(0.01)[stop_id] = torch.ones(32)
    llama = Llama(model, tok, max_seq_len=32, max_batch_size=2, device=torch.device("cpu"))
    for temperature in (0, 0.8):
        out = llama.text_completion(["a", "bcd"], temperature=temperature, max_gen_len=5, logprobs=True)
        assert out == [{"generation": "", "tokens": [], "logprobs": []}] * 2, temperature
    echoed = llama.text_completion(["bcd"], temperature=0, max_gen_len=5, echo=True, logprobs=True)[0]
    assert echoed["tokens"] == ["<|begin_of_text|>", "b", "c", "d"] and len(echoed["logprobs"]) == 4
    assert llama.chat_completion([[{"role": "user", "content": "hi"}]], temperature=0)[0]["generation"]["content"] == ""
    prompts = [tok.encode("a", bos=True), tok.encode("bcd", bos=True)]
    rows, _ = llama.generate(prompts, 5, temperature=0, stop_ids=[tok.token_to_id("<|start_header_id|>")])
    assert rows == [[stop_id] * 5] * 2
