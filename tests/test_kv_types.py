"""KV cache element types (model/kv_types.py, kernels/qkv.h, the fused step's attention in kernels/qattn.h).

References and tolerances:
- stores: the C++ store of a row (`kv_store`) is byte-identical to `kv_types.encode` for every type, ties of
  q8_0's rounding included; encode's q8_0 equals llama.cpp's reference quantizer (`quantize_numpy`, byte-identical
  to ggml's) on random rows, where no value falls on a rounding tie;
- q8_0 scores are int8 dot products per block times d_q * d_k: with scales that are powers of two every product
  and sum is exact in float32, so the kernel's scores equal the reference exactly;
- attention over each type against float64 PyTorch over the decoded rows: within 1e-5 relative (another
  summation order, exp256 against exp);
- the fused step with each cache type against the modules with the same cache type: logits within 1e-4
  relative, as tests/test_fused_decode.py states for float32;
- a row's result in the fused step does not depend on its batch: exact.
No test asserts on time.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from llamaforge import kernels
from llamaforge.errors import ConfigError
from llamaforge.model import KVCache, ModelArgs, StepInput, Transformer, kv_types
from llamaforge.runtime import DecodeStep

CPU = torch.device("cpu")
TYPES = ("float32", "float16", "bfloat16", "q8_0")
needs_kernels = pytest.mark.skipif(kernels.get_extension() is None, reason="the C++ kernels are not available here")


def like(kv_type: str) -> torch.Tensor:
    return torch.empty(0, dtype=kv_types.storage_dtype(kv_type))


# -- the PyTorch side --------------------------------------------------------------------------------------

def test_names_and_aliases():
    assert [kv_types.check_kv_type(x) for x in ("f32", "F16", "bf16", "q8_0", torch.float16, None)] == \
        ["float32", "float16", "bfloat16", "q8_0", "float16", None]


@pytest.mark.parametrize("bad", ["q4_0", "int8", "", 8])
def test_a_bad_kv_type_names_the_argument(bad):
    with pytest.raises(ConfigError, match="kv_type must be one of float32, float16, bfloat16, q8_0"):
        kv_types.check_kv_type(bad)


def test_q8_0_needs_whole_blocks():
    with pytest.raises(ConfigError, match="head_dim a multiple of 32; this model's head_dim is 48"):
        KVCache(1, 1, 8, 1, 48, device=CPU, kv_type="q8_0")


def test_q8_0_encode_is_ggml_block_q8_0():
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0)) * 3
    ours = kv_types.encode(x, "q8_0")
    assert ours.shape == (7, 2 * 34) and ours.dtype == torch.uint8
    ref = kernels.quantize_numpy(x, "Q8_0")  # llama.cpp's reference quantizer (gguf-py), rows of blocks
    assert np.array_equal(ours.numpy().reshape(-1), np.asarray(ref).reshape(-1))
    back = kv_types.decode(ours, "q8_0", torch.float32)
    d = x.reshape(7, 2, 32).abs().amax(-1, keepdim=True) / 127
    # half a step, plus the fp16 rounding of d times |q| <= 127: 2^-11 * 127 < 0.07 steps
    assert ((back - x).reshape(7, 2, 32).abs() <= d * 0.57).all()


def test_the_default_kv_type():
    assert kv_types.choose_kv_type(None, model_dtype=torch.float32, gguf_weights=False) == "float32"
    assert kv_types.choose_kv_type(None, model_dtype=torch.bfloat16, gguf_weights=False) == "bfloat16"
    assert kv_types.choose_kv_type(None, model_dtype=torch.float32, gguf_weights=True) == \
        kv_types.GGUF_DEFAULT
    assert kv_types.choose_kv_type("q8_0", model_dtype=torch.float32, gguf_weights=False) == "q8_0"


@pytest.mark.parametrize("kv_type", TYPES)
def test_cache_update_stores_in_its_type_and_returns_the_model_dtype(kv_type):
    cache = KVCache(2, 3, 16, 2, 32, device=CPU, kv_type=kv_type)
    assert cache.k.dtype == kv_types.storage_dtype(kv_type)
    k = torch.randn(1, 2, 4, 32)  # (B, Hkv, T, hd)
    step = StepInput.make(torch.arange(4)[None], 1, 4, device=CPU, cache_len=16, slots=torch.tensor([2]), kv_len=8)
    k_out, v_out = cache.update(1, step, k, -k)
    assert k_out.shape == (1, 2, 8, 32) and k_out.dtype == torch.float32
    expect = kv_types.decode(kv_types.encode(k, kv_type), kv_type, torch.float32)
    assert torch.equal(k_out[:, :, :4], expect) and torch.equal(v_out[:, :, :4], -expect)
    assert not k_out[:, :, 4:].any()


# -- the C++ kernels ---------------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("kv_type", TYPES)
def test_the_cpp_store_is_kv_types_encode(kv_type):
    ext = kernels.get_extension()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 64, generator=g) * torch.logspace(-3, 3, 9)[:, None]
    x[0] = 0  # an all-zero block: scale 0
    # q8_0 rounding ties: amax 127 gives 127 / amax = 1, so x * id is x, and halves round to even
    x[1, :32] = torch.tensor([127.0] + [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5] * 4 + [4.5, -126.5, 5.5])
    assert torch.equal(ext.kv_store(x, like(kv_type)), kv_types.encode(x, kv_type))


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_type: str) -> torch.Tensor:
    """float64 attention of q (G, hd) over stored rows k, v (n, row), as the modules see them."""
    qq = kv_types.round_query(q, kv_type).double()
    kd, vd = kv_types.decode(k, kv_type, torch.float64), kv_types.decode(v, kv_type, torch.float64)
    return torch.softmax(qq @ kd.T / math.sqrt(q.shape[1]), dim=-1) @ vd


@needs_kernels
@pytest.mark.parametrize("kv_type", TYPES)
@pytest.mark.parametrize("G,hd,n", [(1, 64, 150), (3, 32, 65), (4, 64, 200), (8, 128, 64), (9, 32, 7)])
def test_attention_over_each_type_matches_pytorch(kv_type, G, hd, n):
    ext = kernels.get_extension()
    g = torch.Generator().manual_seed(G * 1000 + n)
    q = torch.randn(G, hd, generator=g) * 2
    k = kv_types.encode(torch.randn(n, hd, generator=g) * 2, kv_type)
    v = kv_types.encode(torch.randn(n, hd, generator=g), kv_type)
    ours, ref = ext.kv_attend(q, k, v).double(), reference_attention(q, k, v, kv_type)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5


@needs_kernels
@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_q8_0_scores_are_exact_int8_dot_products(G):
    """Scales that are powers of two (amax = 127 * 2^-e) make d_q * d_k * sum(q_q * q_k) exact in float32."""
    ext = kernels.get_extension()
    hd, n = 64, 130
    g = torch.Generator().manual_seed(G)

    def rows(m: int, e: int) -> torch.Tensor:
        x = torch.randint(-127, 128, (m, hd), generator=g).float()
        x[:, 0], x[:, 32] = 127, -127  # each block's amax is 127: d = 2^-e after the scaling below
        return x * 2.0 ** -e

    q, kx = rows(G, 3), rows(n, 5)
    k = kv_types.encode(kx, "q8_0")
    assert torch.equal(kv_types.decode(k, "q8_0", torch.float32), kx)  # exact in q8_0
    ref = (q.double() @ kx.double().T) / math.sqrt(hd)  # exact: integers times powers of two
    assert torch.equal(ext.kv_scores(q, k).double(), ref)



@needs_kernels
@pytest.mark.parametrize("kv_type", TYPES)
@pytest.mark.parametrize("G,hd,n", [
    (3, 64, [61, 62, 63, 64, 65, 66, 67, 68, 69]),  # the default model's heads; rows across a tile's end
    (1, 32, [200, 197, 198, 199, 129, 130]),  # any order; a row ending on a tile, one past it
    (4, 64, [1, 2, 9]),
    (8, 96, [70, 71]),  # hd not a multiple of 64: passes of 2 and 1 vectors
    (9, 32, [33, 40, 64, 64]),  # G > 8; rows of equal length
])
def test_attention_of_several_rows_is_each_rows_own(kv_type, G, hd, n):
    """kv_attend_rows (the fused step's verification rows, sharing each tile's reads) gives every row exactly
    what kv_attend gives that row alone, at every element type, over tiles every row shares and each row's own
    last tile."""
    ext = kernels.get_extension()
    g = torch.Generator().manual_seed(G * 100 + hd)
    q = torch.randn(len(n), G, hd, generator=g) * 2
    k = kv_types.encode(torch.randn(max(n), hd, generator=g) * 2, kv_type)
    v = kv_types.encode(torch.randn(max(n), hd, generator=g), kv_type)
    rows = ext.kv_attend_rows(q, k, v, torch.tensor(n))
    for r, nr in enumerate(n):
        assert torch.equal(rows[r], ext.kv_attend(q[r], k[:nr], v[:nr])), f"row {r} of {nr} keys"


# -- the fused step against the modules, same cache type -----------------------------------------------------

def model_for(n_heads: int = 4, n_kv_heads: int = 2, head_dim: int = 32) -> Transformer:
    torch.manual_seed(7)
    model = Transformer(ModelArgs(dim=n_heads * head_dim, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                  vocab_size=60, hidden_dim=96, max_seq_len=160))
    with torch.no_grad():  # sharper attention than the default init: softmax maxima matter
        for block in model.layers:
            block.attention.wq.weight.mul_(4)
            block.attention.wk.weight.mul_(4)
    return model.eval()


@needs_kernels
@pytest.mark.parametrize("kv_type", TYPES)
def test_fused_step_equals_the_modules_with_the_same_cache_type(kv_type):
    model = model_for()
    fused = DecodeStep(model, fused=True, kv_type=kv_type)
    cache = fused.new_cache(2, 160)
    assert cache.kv_type == kv_type
    ref_cache = copy.deepcopy(cache)
    prompt = torch.randint(0, 60, (2, 100), generator=torch.Generator().manual_seed(3))  # a tile and a part
    with torch.inference_mode():
        model(prompt, 0, cache)
        model(prompt, 0, ref_cache)
        tok = prompt[:, -1:]
        for start in (100, 101, 140):
            at = StepInput.make(start, 2, 1, device=CPU, cache_len=160)
            ours, ref = fused(tok, at, cache), model(tok, start, ref_cache, last_only=True)
            assert fused.ran_fused
            assert ((ours - ref).norm() / ref.norm()).item() < 1e-4
            tok = ref[:, -1].argmax(-1, keepdim=True)
    # the C++ step stored the new rows as the modules did: k in float32 differs in its last bits between the two,
    # which can move a rounding to f16 / bf16 / q8_0 by one step on a few values, hence 1e-3
    ours_k, ref_k = (kv_types.decode(c.k, kv_type, torch.float32) for c in (cache, ref_cache))
    assert ((ours_k - ref_k).norm() / ref_k.norm()).item() < 1e-3


@needs_kernels
@pytest.mark.parametrize("kv_type", TYPES)
def test_a_rows_result_does_not_depend_on_its_batch(kv_type):
    model = model_for()
    decode = DecodeStep(model, fused=True, kv_type=kv_type)
    cache = decode.new_cache(3, 160)
    g = torch.Generator().manual_seed(6)
    with torch.inference_mode():
        for slot, n in enumerate((70, 129, 3)):
            model(torch.randint(0, 60, (1, n), generator=g), 0, cache, slots=torch.tensor([slot]))
        tokens, pos = torch.tensor([[7], [8], [9]]), torch.tensor([[70], [129], [3]])
        alone_cache = copy.deepcopy(cache)
        batch = decode(tokens, StepInput.make(pos, 3, 1, device=CPU, cache_len=160, slots=torch.arange(3),
                                              kv_len=160), cache)
        assert decode.ran_fused
        for r in range(3):
            alone = decode(tokens[r : r + 1], StepInput.make(pos[r : r + 1], 1, 1, device=CPU, cache_len=160,
                                                             slots=torch.tensor([r]), kv_len=160), alone_cache)
            assert torch.equal(alone[0], batch[r])
    assert torch.equal(cache.k, alone_cache.k)


# -- Llama.build(kv_type=) and --kv-type -------------------------------------------------------------------

def test_build_refuses_a_bad_kv_type_before_loading_anything(tmp_path):
    from llamaforge import Llama

    with pytest.raises(ConfigError, match="kv_type must be one of"):
        Llama.build(tmp_path / "not-there", kv_type="q4_0")


def test_the_cli_names_the_flag(tiny_checkpoints, capsys):
    from llamaforge.cli.main import main

    assert main(["generate", str(tiny_checkpoints.gguf), "-p", "x", "-n", "2", "--kv-type", "q4"]) == 1
    assert "--kv-type must be one of float32, float16, bfloat16, q8_0" in capsys.readouterr().err
    # head_dim 16 holds no q8_0 block: said in the flag's words, with what to use instead
    assert main(["generate", str(tiny_checkpoints.gguf), "-p", "x", "-n", "2", "--kv-type", "q8_0"]) == 1
    err = capsys.readouterr().err
    assert "--kv-type q8_0 stores blocks of 32 values" in err and "use --kv-type float16" in err


def test_build_chooses_and_reports_the_kv_type(tiny_checkpoints, tmp_path, capsys):
    from llamaforge import Llama, checkpoints
    from llamaforge.cli.main import main

    t = tiny_checkpoints
    floats = Llama.build(t.gguf, max_seq_len=64, max_batch_size=2, device="cpu")
    assert floats.kv_type == "float32"  # a float checkpoint keeps the exact reference cache
    q8 = checkpoints.save_gguf(t.args, t.state_dict, tmp_path / "tiny-q8_0.gguf", dtype="q8_0",
                               tokenizer_metadata=checkpoints.load(t.gguf).gguf_metadata)
    quantized = Llama.build(q8, max_seq_len=64, max_batch_size=2, device="cpu")
    assert quantized.kv_type == kv_types.GGUF_DEFAULT  # GGUF blocks: llama.cpp's f16 cache
    f16 = checkpoints.save_gguf(t.args, t.state_dict, tmp_path / "tiny-f16.gguf", dtype="f16",
                                tokenizer_metadata=checkpoints.load(t.gguf).gguf_metadata)
    assert Llama.build(f16, max_seq_len=64, max_batch_size=2, device="cpu").kv_type == kv_types.GGUF_DEFAULT
    assert Llama.build(f16, max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32").kv_type == "float32"
    asked = Llama.build(q8, max_seq_len=64, max_batch_size=2, device="cpu", kv_type="bf16")
    assert asked.kv_type == "bfloat16"
    rows, _ = asked.generate([[1, 5, 9]], max_gen_len=6, temperature=0)
    assert asked.engine.cache.k.dtype == torch.bfloat16 and len(rows[0]) == 6  # the generated tokens
    assert main(["info", str(q8)]) == 0
    assert f"kv cache:    {kv_types.GGUF_DEFAULT} by default on the CPU (--kv-type)" in capsys.readouterr().out


def test_perplexity_through_each_kv_type():
    from llamaforge.training.eval import perplexity

    model = model_for()
    ids = torch.randint(0, 60, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    plain = perplexity(model, ids, window=64).nll
    assert perplexity(model, ids, window=64, kv_type="float32").nll == pytest.approx(plain, rel=1e-6)
    for t in ("float16", "bfloat16", "q8_0"):  # what the type loses: small, and not nothing
        nll = perplexity(model, ids, window=64, kv_type=t).nll
        assert nll != plain and nll == pytest.approx(plain, rel=1e-2)
