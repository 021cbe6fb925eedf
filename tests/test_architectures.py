"""Qwen2 / Qwen3 / Mistral against transformers, through the HF loader and through GGUF files.

Reference: transformers' Qwen2ForCausalLM, Qwen3ForCausalLM and MistralForCausalLM with tiny random
weights (biases and norm weights randomised too, so their use and their layout are checked), and a
byte-level BPE tokenizer.json with Qwen2's pre-tokenizer and a ChatML template, made here. In float32
the logits must agree to atol 1e-4 (observed ~3e-7: the same maths in another summation order) and
greedy tokens must be equal. GGUF files are written by llamaforge's converter and, independently, by
the gguf package the way llama.cpp's convert_hf_to_gguf.py lays a qwen2/qwen3 file out (rotate-half
q/k rows), and must load to the same logits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llamaforge import Llama, checkpoints
from llamaforge.convert import convert
from llamaforge.model.transformer import build_model
from llamaforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
ATOL = 1e-4
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_qwen_tokenizer(folder: Path) -> int:
    """A Qwen2-style byte-level BPE tokenizer.json + tokenizer_config.json in `folder`; returns its size."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    words = "the a llama model token chat user assistant hello world 12 345 café naïve 日本 qwen".split()
    corpus = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(200)]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": CHATML,
    }))
    return tok.get_vocab_size()


def make_hf(kind: str, folder: Path, dim: int = 64, hidden: int = 96, vocab: int = 320, head_dim: int | None = None):
    """A tiny random transformers model of `kind`, saved with the tokenizer in `folder`; returns the model.

    Qwen3's head_dim defaults to twice dim / n_heads (as in the real models, where it is not dim / n_heads)."""
    n_tok = write_qwen_tokenizer(folder)
    assert n_tok <= vocab
    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    extra = {"qwen3": {"head_dim": head_dim or 2 * dim // 4}, "mistral": {"sliding_window": 64}}.get(kind, {})
    config = cls[0](vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    tie_word_embeddings=kind == "qwen2", eos_token_id=2, **extra)
    torch.manual_seed(0)
    model = cls[1](config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-1, 1)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
        model.lm_head.weight.mul_(8)  # peaked distributions: greedy choices far from ties
    model.save_pretrained(folder)
    return model


def our_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    ckpt = checkpoints.load(path)
    model = build_model(ckpt.args, ckpt.state_dict, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        return model(tokens)


TOKENS = torch.tensor([[5, 17, 99, 250, 3, 42, 7, 300, 11, 64, 1, 2]])


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_hf_checkpoint_matches_transformers(kind, tmp_path):
    ref = make_hf(kind, tmp_path / kind)
    with torch.no_grad():
        want = ref(TOKENS).logits
    torch.testing.assert_close(our_logits(tmp_path / kind, TOKENS), want, atol=ATOL, rtol=0)
    args = checkpoints.load(tmp_path / kind).args
    assert (args.qkv_bias, args.qk_norm) == (kind == "qwen2", kind == "qwen3")
    if kind == "mistral":  # exact within the window only, so the context is capped there, and says so
        assert args.max_seq_len == args.sliding_window == 64


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_greedy_tokens_equal_transformers(kind, tmp_path):
    """Through Llama.build (KV cache, fused decode step on CPU), from the HF folder and from its GGUF."""
    ref = make_hf(kind, tmp_path / kind)
    prompt = [5, 17, 99, 250, 3]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
    gguf_file = convert(tmp_path / kind, tmp_path / f"{kind}.gguf", to="gguf", dtype="f32")
    for path in (tmp_path / kind, gguf_file):
        gen = Llama.build(str(path), max_seq_len=64, max_batch_size=1, device="cpu", dtype="float32")
        got, _ = gen.generate([prompt], max_gen_len=10, temperature=0, stop_ids=[])
        assert got[0] == want, path


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_gguf_written_by_llamaforge_matches_transformers(kind, tmp_path):
    ref = make_hf(kind, tmp_path / kind)
    out = convert(tmp_path / kind, tmp_path / f"{kind}.gguf", to="gguf", dtype="f32")
    with torch.no_grad():
        want = ref(TOKENS).logits
    torch.testing.assert_close(our_logits(out, TOKENS), want, atol=ATOL, rtol=0)
    ckpt = checkpoints.load(out)
    md = ckpt.gguf_metadata
    assert md["general.architecture"] == kind
    assert md[f"{kind}.context_length"] == 128  # the round trip keeps the context length
    assert md["tokenizer.ggml.pre"] == "qwen2" and md["tokenizer.chat_template"] == CHATML
    assert len(md["tokenizer.ggml.tokens"]) == ckpt.args.vocab_size  # padded to the embedding rows
    hf_tok = Tokenizer.from_file(tmp_path / kind / "tokenizer.json")
    gguf_tok = Tokenizer.from_gguf_metadata(md)
    text = "hello world 12345, the llama's café! 日本"
    assert gguf_tok.encode(text, bos=False, eos=False) == hf_tok.encode(text, bos=False, eos=False)
    assert gguf_tok.eos_id == hf_tok.eos_id and gguf_tok.chat_template == CHATML
    back = convert(out, tmp_path / "back", to="hf")  # and back to a folder transformers reads
    again = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS).logits, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_transformers_reads_the_gguf_llamaforge_writes(kind, tmp_path):
    """A third reader of the file layout: transformers' own GGUF loader (which reads no head_dim for qwen3 and
    takes Qwen3Config's default, 128, so this model has that one)."""
    ref = make_hf(kind, tmp_path / kind, head_dim=128)
    convert(tmp_path / kind, tmp_path / f"{kind}.gguf", to="gguf", dtype="f32")
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f"{kind}.gguf").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS).logits, ref(TOKENS).logits, atol=ATOL, rtol=0)


def _write_like_convert_hf_to_gguf(ref, kind: str, path: Path) -> None:
    """A qwen2/qwen3 GGUF written with the gguf package as convert_hf_to_gguf.py lays it out (no q/k permutation)."""
    import gguf

    cfg = ref.config
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "q_proj": "attn_q", "k_proj": "attn_k",
             "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
             "down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
    w = gguf.GGUFWriter(str(path), kind)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    for key, t in ref.state_dict().items():
        if key == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            name = "output.weight"
        else:
            parts = key.split(".")
            if parts[1] == "layers":
                name = f"blk.{parts[2]}.{names[parts[4] if parts[3] in ('self_attn', 'mlp') else parts[3]]}.{parts[-1]}"
            else:
                name = f"{names[parts[1]]}.{parts[-1]}"
        w.add_tensor(name, t.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_gguf_written_by_the_gguf_package_matches_transformers(kind, tmp_path):
    ref = make_hf(kind, tmp_path / kind)
    _write_like_convert_hf_to_gguf(ref, kind, tmp_path / "m.gguf")
    with torch.no_grad():
        want = ref(TOKENS).logits
    torch.testing.assert_close(our_logits(tmp_path / "m.gguf", TOKENS), want, atol=ATOL, rtol=0)


def test_qwen_sliding_window_is_capped_only_when_used(tmp_path):
    from llamaforge.checkpoints.hf import args_from_config
    from llamaforge.errors import ConfigError
    from llamaforge.model import ModelArgs

    base = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 4096, "sliding_window": 1024}
    assert args_from_config({**base, "use_sliding_window": False}, "x").max_seq_len == 4096
    used = args_from_config({**base, "use_sliding_window": True}, "x")
    assert (used.max_seq_len, used.sliding_window) == (1024, 1024)
    with pytest.raises(ConfigError, match="exceeds the sliding window 1024"):
        ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=10, max_seq_len=2048, sliding_window=1024)


def test_fused_step_covers_qwen_blocks(tmp_path):
    from llamaforge.kernels import get_extension
    from llamaforge.runtime.fused import _build, _Watch

    if get_extension() is None:
        pytest.skip("the C++ kernels are not available here")
    for kind in ("qwen2", "qwen3"):  # numerics: tests/test_fused_decode.py::test_qwen_blocks_match_the_modules
        make_hf(kind, tmp_path / kind)
        ckpt = checkpoints.load(tmp_path / kind)
        model = build_model(ckpt.args, ckpt.state_dict, device=torch.device("cpu"), dtype=torch.float32)
        assert _build(model, _Watch()) is not None, kind


def test_unsupported_hf_architecture_is_refused_by_name():
    from llamaforge.checkpoints.hf import args_from_config
    from llamaforge.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"model_type='gemma2'.*'qwen2', 'qwen3'"):
        args_from_config({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}, "x")
    with pytest.raises(CheckpointError, match=r"attention_bias=true"):  # a bias on o_proj too: not Qwen2's
        args_from_config({"model_type": "qwen3", "attention_bias": True, "hidden_size": 64}, "x")


def test_numpy_is_float32_in_the_quantizers():  # guards the bit-exact arithmetic against silent upcasts
    from llamaforge.checkpoints.gguf_quants import make_qkx2_quants

    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    scale, mn, L = make_qkx2_quants(x, np.abs(x), 15, -1.0, 0.1, 20)
    assert scale.dtype == mn.dtype == np.float32 and L.max() <= 15


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_meta_and_hf_round_trips_keep_the_architecture(kind, tmp_path):
    """A trained checkpoint of these shapes is written as Meta (params.json names the extra parts) and HF."""
    ref = make_hf(kind, tmp_path / kind)
    ckpt = checkpoints.load(tmp_path / kind)
    hf = checkpoints.save_hf(ckpt.args, ckpt.state_dict, tmp_path / "hf")
    assert json.loads((hf / "config.json").read_text())["model_type"] == kind
    paths = [hf]
    if kind == "qwen3":  # this one's head_dim is not dim / n_heads, which params.json cannot say
        with pytest.raises(checkpoints.CheckpointError, match="cannot express head_dim=32"):
            checkpoints.save_meta(ckpt.args, ckpt.state_dict, tmp_path / "meta")
    else:
        paths.append(checkpoints.save_meta(ckpt.args, ckpt.state_dict, tmp_path / "meta"))
    with torch.no_grad():
        want = ref(TOKENS).logits
    for path in paths:
        assert checkpoints.load(path).args.qk_norm == (kind == "qwen3")
        torch.testing.assert_close(our_logits(path, TOKENS), want, atol=ATOL, rtol=0)
