"""GGUF export others can load: llama.cpp's quantizers and tensor-type mix, `llamaforge quantize`, llama.cpp itself.

References: llama.cpp's own quantizer (`llama_model_quantize` of llama-cpp-python) for byte equality of
Q4_K / Q6_K / Q4_K_M files where llama-cpp-python is installed (skipped elsewhere; it is not a test
extra), gguf-py's dequantizers for the error bound of each block format everywhere, src/llama-quant.cpp's
rules for which tensor gets which type, and transformers for the logits llama.cpp computes from a file
llamaforge wrote (float32 weights and KV cache: atol 1e-3, llama.cpp's own kernels sum in another order).
Checked by hand with llama-cpp-python 0.3.36 built from source: all of them pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamaforge import checkpoints
from llamaforge.checkpoints.gguf import read_gguf
from llamaforge.checkpoints.gguf_quants import quantize
from llamaforge.checkpoints.gguf_write import tensor_qtype
from llamaforge.cli.main import main
from llamaforge.convert import convert
from llamaforge.errors import CheckpointError
from llamaforge.kernels import get_extension
from llamaforge.model.transformer import build_model
from tests.test_architectures import TOKENS, make_hf

try:
    import llama_cpp
except ImportError:  # pragma: no cover - depends on the machine
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def qwen2_256(tmp_path_factory):
    """A Qwen2-shaped model whose rows are whole 256-value K-quant blocks, as HF folder + F32 GGUF."""
    root = tmp_path_factory.mktemp("q256")
    ref = make_hf("qwen2", root / "hf", dim=256, hidden=512)
    return ref, root / "hf", convert(root / "hf", root / "f32.gguf", to="gguf", dtype="f32")


@pytest.mark.parametrize("qtype, rms_bound", [("Q4_K", 0.09), ("Q5_K", 0.045), ("Q6_K", 0.022)])
def test_k_quants_decode_within_the_formats_error(qtype, rms_bound):
    import gguf.quants
    from gguf.constants import GGMLQuantizationType

    x = np.random.default_rng(0).standard_normal((32, 512)).astype(np.float32)
    x[1, :256] = 0.0  # an all-zero block
    x[2, 256:] = 0.5  # a constant block
    blocks = quantize(x, qtype)
    y = gguf.quants.dequantize(blocks, GGMLQuantizationType[qtype])
    assert y.shape == x.shape
    assert np.sqrt(np.mean((y - x) ** 2)) < rms_bound  # observed 0.071 (Q4_K), 0.035 (Q5_K), 0.018 (Q6_K) on N(0, 1)
    assert np.all(y[1, :256] == 0)
    np.testing.assert_allclose(y[2, 256:], 0.5, atol=0.02)


def _ggml_base():
    import ctypes
    from pathlib import Path

    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))
    if not libs:
        pytest.skip("llama-cpp-python ships no libggml-base here")
    return ctypes.CDLL(str(libs[0]))


@needs_llama_cpp
@pytest.mark.parametrize("qtype, nbytes, block", [("Q4_K", 144, 256), ("Q5_K", 176, 256), ("Q6_K", 210, 256),
                                                  ("Q4_0", 18, 32),
                                                  ("Q5_0", 22, 32), ("Q8_0", 34, 32)])
def test_quantizers_are_byte_identical_to_ggml(qtype, nbytes, block):
    """Against ggml's own quantize_row_*_ref, on normal, heavy-tailed, tiny, zero, constant and positive rows."""
    import ctypes

    fn = getattr(_ggml_base(), f"quantize_row_{qtype[:2].lower()}{qtype[2:]}_ref")
    rng = np.random.default_rng(1)
    cases = [rng.standard_normal((32, 512)), rng.standard_normal((32, 512)) ** 3, rng.uniform(-1e-3, 1e-3, (8, 256)),
             np.zeros((2, 256)), np.full((2, 256), 0.5), rng.uniform(0, 2, (8, 256))]
    for x in (c.astype(np.float32) for c in cases):
        want = np.zeros(x.size // block * nbytes, np.uint8)
        fn(x.ctypes.data_as(ctypes.c_void_p), want.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
        assert np.array_equal(quantize(x, qtype).reshape(-1), want)


def test_quantize_refuses_partial_blocks():
    with pytest.raises(CheckpointError, match="not whole Q4_K blocks of 256"):
        quantize(np.zeros((2, 100), np.float32), "Q4_K")


def test_q4_k_m_mix_follows_llama_quant():
    # 16 layers: use_more_bits is true for layers 0, 1 (first eighth), 4, 7, 10, 13 and 14, 15 (last eighth)
    more = [i for i in range(16) if tensor_qtype(f"blk.{i}.attn_v.weight", (512, 256), "q4_k_m", 16, False) == "Q6_K"]
    assert more == [0, 1, 4, 7, 10, 13, 14, 15]
    assert tensor_qtype("blk.3.ffn_down.weight", (256, 512), "q4_k_m", 16, False) == "Q4_K"
    assert tensor_qtype("blk.4.ffn_down.weight", (256, 512), "q4_k_m", 16, False) == "Q6_K"
    assert tensor_qtype("blk.4.attn_q.weight", (256, 256), "q4_k_m", 16, False) == "Q4_K"
    assert tensor_qtype("output.weight", (300, 256), "q4_k_m", 16, False) == "Q6_K"
    assert tensor_qtype("token_embd.weight", (300, 256), "q4_k_m", 16, False) == "Q4_K"
    assert tensor_qtype("token_embd.weight", (300, 256), "q4_k_m", 16, True) == "Q6_K"  # tied: the output's type
    assert tensor_qtype("token_embd.weight", (300, 64), "q4_k_m", 16, True) == "Q8_0"  # rows not 256-divisible
    assert tensor_qtype("blk.0.attn_q.weight", (64, 96), "q4_k_m", 16, False) == "Q5_0"  # Q4_K's fallback
    assert tensor_qtype("blk.0.attn_q.weight", (64, 80), "q4_k_m", 16, False) == "F16"  # not even 32-divisible
    assert tensor_qtype("blk.0.attn_norm.weight", (256,), "q4_k_m", 16, False) is None
    assert tensor_qtype("blk.0.attn_q.bias", (256,), "q4_k_m", 16, False) is None
    assert tensor_qtype("output.weight", (300, 256), "q4_0", 16, False) == "Q6_K"  # llama.cpp does this too
    assert tensor_qtype("output.weight", (300, 256), "q8_0", 16, False) == "Q8_0"
    # what llama.cpp calls a 70B (80 layers, GQA) gets attn_v one step up where it would be Q4_K
    assert [tensor_qtype(f"blk.{i}.attn_v.weight", (1024, 8192), "q4_k_m", 80, False, True) for i in (9, 10)] == \
        ["Q6_K", "Q5_K"]  # layer 9 is in the first eighth; 10 is not


def test_convert_to_q4_k_m_types_and_logits(qwen2_256, tmp_path):
    ref, hf, _ = qwen2_256
    out = convert(hf, tmp_path / "q4km.gguf", to="gguf", dtype="q4_k_m")
    gf = read_gguf(out)
    types = {name: info.qtype for name, info in gf.tensors.items()}
    assert types["token_embd.weight"] == "Q6_K"  # tied embeddings take the output's type
    assert types["blk.0.attn_v.weight"] == "Q4_K" and types["blk.1.attn_v.weight"] == "Q6_K"  # 2 layers
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.attn_q.bias"] == "F32"
    assert gf.metadata["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    ckpt = checkpoints.load(out)
    model = build_model(ckpt.args, ckpt.state_dict, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        want, got = ref(TOKENS).logits, model(TOKENS)
    assert ((got - want).norm() / want.norm()).item() < 0.15  # 4-bit weights: observed ~0.05


def test_quantize_command_equals_convert_and_keeps_metadata(qwen2_256, tmp_path, capsys):
    _, hf, f32 = qwen2_256
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(f32), str(out), "Q4_K_M"]) == 0
    assert "wrote q4_k_m" in capsys.readouterr().out
    direct = read_gguf(convert(hf, tmp_path / "direct.gguf", to="gguf", dtype="q4_k_m"))
    requant = read_gguf(out)
    assert set(direct.tensors) == set(requant.tensors)
    for name, info in direct.tensors.items():
        assert bytes(direct.raw(info).numpy()) == bytes(requant.raw(requant.tensors[name]).numpy()), name
    for key in ("qwen2.context_length", "tokenizer.ggml.pre", "tokenizer.chat_template", "tokenizer.ggml.merges"):
        assert requant.metadata[key] == read_gguf(f32).metadata[key]
    assert main(["quantize", str(f32), str(out), "q4_k_m"]) == 1  # exists: refused, not overwritten
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="is the input file"):
        checkpoints.quantize_gguf(out, out, "q8_0", overwrite=True)
    assert main(["quantize", str(out), str(tmp_path / "q8.gguf"), "q8_0"]) == 1  # already 4-bit: as llama-quantize
    err = capsys.readouterr().err
    assert "is already Q" in err and "--allow-requantize" in err
    assert main(["quantize", "--allow-requantize", str(out), str(tmp_path / "q8.gguf"), "q8_0"]) == 0


def _llama_cpp_logits(path, tokens: list[int]) -> np.ndarray:
    # float32 keys and values (llama.cpp's default cache is F16, which alone moves logits by ~1e-3)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0, flash_attn=False)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)])


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_llama_cpp_runs_what_llamaforge_writes(kind, tmp_path):
    ref = make_hf(kind, tmp_path / kind, dim=256, hidden=512)
    f32 = convert(tmp_path / kind, tmp_path / "f32.gguf", to="gguf", dtype="f32")
    with torch.no_grad():
        want = ref(TOKENS).logits[0].numpy()
    np.testing.assert_allclose(_llama_cpp_logits(f32, TOKENS[0].tolist()), want, atol=1e-3, rtol=0)
    q = tmp_path / "q4km.gguf"
    assert main(["quantize", str(f32), str(q), "q4_k_m"]) == 0
    llm = llama_cpp.Llama(model_path=str(q), n_ctx=64, verbose=False, n_threads=1)
    text = llm.create_completion("hello world", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert isinstance(text, str) and llm.n_vocab() == ref.config.vocab_size


@needs_llama_cpp
@pytest.mark.parametrize("ftype", ["q4_k_m", "q4_0", "q8_0", "q6_k"])
def test_quantization_is_byte_identical_to_llama_cpp(qwen2_256, tmp_path, ftype):
    _, _, f32 = qwen2_256
    ours = read_gguf(checkpoints.quantize_gguf(f32, tmp_path / "ours.gguf", ftype))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": 15, "q4_0": 2, "q8_0": 7, "q6_k": 18}[ftype]
    params.nthread = 1
    theirs_path = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs_path).encode(), params) == 0
    theirs = read_gguf(theirs_path)
    assert set(ours.tensors) == set(theirs.tensors)
    for name, info in theirs.tensors.items():
        mine = ours.tensors[name]
        assert mine.qtype == info.qtype, name
        assert bytes(ours.raw(mine).numpy()) == bytes(theirs.raw(info).numpy()), name


@pytest.mark.parametrize("dtype, tol", [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2), ("q4_0", 0.2)])
def test_every_gguf_dtype_loads_back_close_to_the_float_model(qwen2_256, tmp_path, dtype, tol):
    ref, hf, _ = qwen2_256
    out = convert(hf, tmp_path / f"{dtype}.gguf", to="gguf", dtype=dtype)
    ckpt = checkpoints.load(out)
    model = build_model(ckpt.args, ckpt.state_dict, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        want, got = ref(TOKENS).logits, model(TOKENS)
    assert ((got - want).norm() / want.norm()).item() < tol


def test_quantized_qwen_gguf_chats_with_its_own_template(qwen2_256, tmp_path):
    from llamaforge import Llama

    _, _, f32 = qwen2_256
    q = checkpoints.quantize_gguf(f32, tmp_path / "q.gguf", "q4_k_m")
    gen = Llama.build(str(q), max_seq_len=64, max_batch_size=1, device="cpu")  # weights stay Q4_K / Q6_K
    assert type(gen.model.layers[0].attention.wq).__name__ == "QuantizedLinear"
    assert gen.model.layers[0].attention.wq.bias is not None
    dialog = [{"role": "user", "content": "hello"}]
    assert gen.chat_format.render(dialog) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = gen.chat_format.encode_dialog(dialog)
    assert ids[0] == gen.tokenizer.special_tokens["<|im_start|>"]  # a control token from the template, not text
    out = gen.chat_completion([dialog], max_gen_len=6, temperature=0)
    assert isinstance(out[0]["generation"]["content"], str)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_q8_0_qwen_gguf_runs_on_the_quantized_kernels_and_fused_step(kind, tmp_path):
    from llamaforge import Llama

    ref = make_hf(kind, tmp_path / kind, dim=256, hidden=512)
    q = convert(tmp_path / kind, tmp_path / "q8.gguf", to="gguf", dtype="q8_0")
    gen = Llama.build(str(q), max_seq_len=64, max_batch_size=1, device="cpu")
    with torch.no_grad():
        want, got = ref(TOKENS).logits, gen.model(TOKENS)
    assert ((got - want).norm() / want.norm()).item() < 0.05  # int8 weights and activations: observed 0.01-0.02
    tokens, _ = gen.generate([[5, 17, 99]], max_gen_len=4, temperature=0, stop_ids=[])
    assert len(tokens[0]) == 4
    if get_extension() is not None:  # the fused C++ step ran (it covers biases and q/k norms)
        assert gen.decode_step.ran_fused


def test_pre_tokenizer_is_named_from_its_regexes():
    from llamaforge.errors import TokenizerError
    from llamaforge.tokenizers.gguf_export import gguf_pre_name
    from llamaforge.tokenizers.gguf_pretok import PRE_TOKENIZERS
    from tests.test_architectures import QWEN2_REGEX

    split = {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    assert gguf_pre_name({"type": "Sequence", "pretokenizers": [split, byte_level]}) == "qwen2"
    llama3 = dict(split, pattern={"Regex": PRE_TOKENIZERS["llama-bpe"].regexes[0]})
    assert PRE_TOKENIZERS[gguf_pre_name({"type": "Sequence", "pretokenizers": [llama3, byte_level]})] == \
        PRE_TOKENIZERS["llama-bpe"]
    smollm = [{"type": "Digits", "individual_digits": True}, dict(byte_level, use_regex=True)]  # SmolLM2's
    assert PRE_TOKENIZERS[gguf_pre_name({"type": "Sequence", "pretokenizers": smollm})] == PRE_TOKENIZERS["smollm"]
    with pytest.raises(TokenizerError, match="matches none of the pre-tokenizers llama.cpp knows"):
        gguf_pre_name({"type": "Whitespace"})


def test_a_vocabulary_larger_than_the_model_is_refused(tmp_path):
    from llamaforge.errors import TokenizerError
    from llamaforge.tokenizer import Tokenizer
    from llamaforge.tokenizers.gguf_export import tokenizer_gguf_metadata
    from tests.test_architectures import write_qwen_tokenizer

    n = write_qwen_tokenizer(tmp_path)
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    md = tokenizer_gguf_metadata(tok, n + 5)
    assert md["tokenizer.ggml.tokens"][-1] == f"[PAD{n + 4}]" and md["tokenizer.ggml.token_type"][-1] == 5
    assert md["tokenizer.ggml.token_type"][tok.special_tokens["<|im_end|>"]] == 3  # control
    with pytest.raises(TokenizerError, match="embedding rows"):
        tokenizer_gguf_metadata(tok, n - 1)


def test_a_tokenization_difference_is_shown_where_it_is(tiny_checkpoints, caplog):
    """The warning printed the first 12 ids of both sides, identical when the difference came later (here the
    test's sentencepiece model drops a trailing newline that the GGUF vocabulary, as llama.cpp, keeps)."""
    import re

    from llamaforge.tokenizer import Tokenizer
    from llamaforge.tokenizers.gguf_export import tokenizer_gguf_metadata

    with caplog.at_level("WARNING"):
        tokenizer_gguf_metadata(Tokenizer.from_file(tiny_checkpoints.tokenizer), rebuild=Tokenizer.from_gguf_metadata)
    m = re.search(r"as (\d+) tokens where the source gives (\d+), apart from token (\d+) on: "
                  r"(\[.*?\]) against (\[.*?\])", caplog.text)
    assert m is not None, caplog.text
    assert m[1] != m[2] and m[4] != m[5]
