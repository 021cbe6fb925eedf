"""The K-quant matmuls (Q4_K, Q5_K, Q6_K) on activations quantized as llama.cpp's Q8_K.

For K-quant weights the C++ kernels quantize each activation row per 256 columns (one float d, int8 q, int16
sums per 16: ggml's block_q8_K), so that the weights' sub-block scales and mins multiply integer sums.
- The quantizer against a numpy transcription of ggml-quants.c's quantize_row_q8_K_ref: exact (q, d, bsums).
- Every kernel path (x8 tiles, AVX2 and AVX-512 VNNI, one-group tiles M <= 4 and two-group tiles M > 4; GGUF-layout rows)
  against the float64 product of gguf-py's dequantized weight with the Q8_K-dequantized activations (q * d):
  the kernels' integer sums are exact and a super-block adds 2-3 float32 roundings, so the error is below
  1e-6 of sum |w| |x| (observed 2e-8; the 32-column form would be off by ~1e-3).
- The x8 tiles and the GGUF-layout rows make the same bits, and a fused decode step whose layers mix Q5_K,
  Q6_K and Q8_0 (activations quantized once per form) matches the modules (a row alone: exactly).
- Where llama-cpp-python is installed: ggml-cpu's own quantize_row_q8_K gives the same bytes, and its
  ggml_vec_dot_q*_K_q8_K the same products within 2e-6 of sum |w| |x| (float32 sums in another order).
No test asserts on time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamaforge import kernels
from llamaforge.quantize import QuantizedLinear, quantize_model_weights
from tests.test_gemv_kernels import run_tiles
from tests.test_quantize import make_raw, ref_dequant

EXT = kernels.get_extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="the C++ kernels are not available here")
KQUANTS = ["Q4_K", "Q5_K", "Q6_K"]
TILES = ["avx2", "vnni"]
REL_TOL = 1e-6


def q8k_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml-quants.c quantize_row_q8_K_ref, transcribed: float32 operations, nearest_int's 1.5 * 2^23 trick."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    m, k = x.shape
    xb = x.reshape(m, k // 256, 256)
    first = np.abs(xb).argmax(axis=-1)  # the first of the largest |x| (the C loop's strict >)
    vmax = np.take_along_axis(xb, first[..., None], axis=-1)
    zero = vmax == 0
    iscale = np.float32(-127.0) / np.where(zero, np.float32(1), vmax)  # float32 throughout
    val = iscale * xb + np.float32(12582912.0)
    v = (val.view(np.int32) & 0x007FFFFF) - 0x00400000
    q = np.where(zero, 0, np.minimum(127, v)).astype(np.int8)
    d = np.where(zero, np.float32(0), np.float32(1.0) / iscale)[..., 0]
    bsums = q.reshape(m, k // 256, 16, 16).astype(np.int32).sum(-1).astype(np.int16)
    return q.reshape(m, k), d, bsums.reshape(m, k // 16)


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    """Normal rows at mixed scales, with the quantizer's corner cases in the first rows' blocks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g) * 2)
    if m >= 3 and k >= 512:
        x[0, :256] = 0.0  # an all-zero block: d = 0, q = 0
        x[1, :256] = torch.randint(-127, 128, (256,), generator=g).float() / 2  # halves: ties round to even
        x[1, 7] = -127.0  # the largest magnitude negative, a positive twin later: the first one wins
        x[1, 200] = 127.0
        x[2, 256:512] *= 1e-30  # tiny values (iscale large)
    return x


def test_q8k_quantizer_matches_ggml() -> None:
    x = activations(7, 1024, seed=1)
    q, d, bs = EXT.quantize_q8k(x)
    rq, rd, rbs = q8k_reference(x.numpy())
    assert np.array_equal(q.numpy(), rq)
    assert np.array_equal(d.numpy().view(np.int32), rd.view(np.int32))  # same bits
    assert np.array_equal(bs.numpy(), rbs)
    assert d[0, 0] == 0 and not q[0, :256].any()
    assert d[1, 0] == 1.0 and q[1, 7] == -127 and q[1, 200] == 127  # iscale = -127 / x[7] = 1: q = x


def q8k_product(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x's Q8_K values) @ w.T in float64, and the bound sum |w| |x| that the tolerance scales."""
    q, d, _ = EXT.quantize_q8k(x)
    xq = (q.double().view(x.shape[0], -1, 256) * d.double()[..., None]).view_as(q)
    return xq @ w.double().T, xq.abs() @ w.double().abs().T


def within(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> bool:
    return bool(((y.double() - ref).abs() <= REL_TOL * bound + 1e-30).all())


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("qtype", KQUANTS)
def test_kquant_paths_match_the_q8k_reference(qtype: str, tiles: str) -> None:
    n, k = 45, 768  # 6 groups of 8 rows, the last partial; 3 super-blocks
    info = kernels.qtype_info(qtype)
    raw = make_raw(qtype, n, k, seed=4)
    w = ref_dequant(raw, qtype)
    packed, layout = kernels.repack(torch.from_numpy(raw), qtype, n, k)
    assert layout == "x8"
    x = activations(40, k, seed=5)
    for m in (1, 3, 8, 13, 40):  # decode tiles (M <= 8) and prefill tiles
        ref, bound = q8k_product(x[:m], w)
        for lid, wb in ((kernels.LAYOUT_IDS["x8"], packed), (kernels.LAYOUT_IDS["gguf"], torch.from_numpy(raw))):
            y = run_tiles(tiles, lambda: EXT.qlinear(x[:m], wb, info.type_id, n, k, None, 0, lid))
            assert within(y, ref, bound), (qtype, tiles, m, lid, float(((y.double() - ref).abs() / bound).max()))


@pytest.mark.parametrize("qtype", KQUANTS)
def test_x8_tiles_and_gguf_rows_give_the_same_bits(qtype: str) -> None:
    n, k = 21, 512
    info = kernels.qtype_info(qtype)
    raw = torch.from_numpy(make_raw(qtype, n, k, seed=6))
    packed, _ = kernels.repack(raw, qtype, n, k)
    x = activations(20, k, seed=7)
    rows = EXT.qlinear(x, raw, info.type_id, n, k, None, 0, kernels.LAYOUT_IDS["gguf"])
    for tiles in TILES:
        for m in (1, 2, 5, 6, 7, 8, 9, 15, 20):  # every tile size: one group (<= 4), two groups (5-8), 8 + rest
            y = run_tiles(tiles, lambda: EXT.qlinear(x[:m], packed, info.type_id, n, k, None, 0, kernels.LAYOUT_IDS["x8"]))
            assert torch.equal(y, rows[:m]), (qtype, tiles, m)


def test_fused_step_mixing_activation_forms_equals_the_modules() -> None:
    """A Q4_K_M-like mix: wq Q5_K, wv and w2 Q6_K, w1 Q4_K, the rest Q8_0 (blocks of 32), so the fused step
    quantizes each layer input in both forms; its logits match the modules' (each quantizing for itself) within
    test_fused_decode's tolerance, and a row alone equals that row in the batch."""
    import copy

    from tests.test_fused_decode import REL_TOL as FUSED_TOL, at, fused, rel
    from llamaforge.model import KVCache, ModelArgs, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=512,
                                  max_seq_len=16)).eval()
    model = quantize_model_weights(model, "q8_0")
    mix = {"attention.wq": "Q5_K", "attention.wv": "Q6_K", "feed_forward.w2": "Q6_K", "feed_forward.w1": "Q4_K"}
    for li, block in enumerate(model.layers):
        for path, qtype in mix.items():
            parent_name, attr = path.split(".")
            parent = getattr(block, parent_name)
            old = getattr(parent, attr)
            out_f, in_f = old.out_features, old.in_features
            layer = QuantizedLinear.from_gguf(torch.from_numpy(make_raw(qtype, out_f, in_f, seed=li)), qtype,
                                              (out_f, in_f))
            setattr(parent, attr, layer)
    step = fused(model)
    cache = KVCache.for_model(model.args, 2, 16, dtype=torch.float32, device=torch.device("cpu"))
    ref_cache = KVCache.for_model(model.args, 2, 16, dtype=torch.float32, device=torch.device("cpu"))
    tokens = torch.tensor([[3], [17]])
    with torch.inference_mode():
        for t in range(3):
            pos = torch.full((2, 1), t)
            alone_cache = copy.deepcopy(cache)
            ours = step(tokens, at(pos, cache, 2, [0, 1], t + 1), cache)
            assert step.ran_fused
            ref = model(tokens, pos, ref_cache, slots=torch.tensor([0, 1]), kv_len=t + 1, last_only=True)
            assert rel(ours, ref) < FUSED_TOL, t
            alone = step(tokens[1:], at(pos[1:], alone_cache, 1, [1], t + 1), alone_cache)
            assert torch.equal(alone[0], ours[1]), t
            tokens = ref[:, -1].argmax(-1, keepdim=True)


def _ggml_cpu():
    """llama.cpp's CPU library (from llama-cpp-python), or skip."""
    import ctypes
    from pathlib import Path

    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed")
    lib = Path(llama_cpp.__file__).parent / "lib"
    base, cpu = sorted(lib.glob("libggml-base.so*")), sorted(lib.glob("libggml-cpu.so*"))
    if not base or not cpu:
        pytest.skip("llama-cpp-python ships no libggml-cpu here")
    ctypes.CDLL(str(base[0]), mode=ctypes.RTLD_GLOBAL)
    so = ctypes.CDLL(str(cpu[0]))
    if hasattr(so, "ggml_cpu_init"):
        so.ggml_cpu_init()
    return so


@pytest.mark.parametrize("qtype", KQUANTS)
def test_q8k_and_dot_products_match_llama_cpp(qtype: str) -> None:
    """ggml-cpu's own quantize_row_q8_K (block_q8_K: float d, int8 qs[256], int16 bsums[16]) gives our bytes, and
    its ggml_vec_dot_q*_K_q8_K our products within the float64 bound above (both sum the same integers exactly)."""
    import ctypes

    so = _ggml_cpu()
    so.quantize_row_q8_K.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    dot = getattr(so, f"ggml_vec_dot_{qtype.lower().replace('_k', '_K')}_q8_K")
    dot.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                    ctypes.c_size_t, ctypes.c_int]
    n, k, m = 13, 768, 6
    info = kernels.qtype_info(qtype)
    raw = np.ascontiguousarray(make_raw(qtype, n, k, seed=8))
    w = ref_dequant(raw, qtype)
    x = activations(m, k, seed=9)
    q, d, bs = EXT.quantize_q8k(x)
    packed, _ = kernels.repack(torch.from_numpy(raw), qtype, n, k)
    y = EXT.qlinear(x, packed, info.type_id, n, k, None, 0, kernels.LAYOUT_IDS["x8"])
    _, bound = q8k_product(x, w)
    theirs = np.zeros((m, n), np.float32)
    out = np.zeros(1, np.float32)
    for r in range(m):
        row = np.ascontiguousarray(x[r].numpy())
        blocks = np.zeros((k // 256, 292), np.uint8)
        so.quantize_row_q8_K(row.ctypes.data, blocks.ctypes.data, k)
        assert np.array_equal(blocks[:, :4].copy().view(np.float32)[:, 0], d[r].numpy())
        assert np.array_equal(blocks[:, 4:260].view(np.int8).reshape(-1), q[r].numpy())
        assert np.array_equal(blocks[:, 260:].copy().view(np.int16).reshape(-1), bs[r].numpy())
        for c in range(n):
            dot(k, out.ctypes.data, 0, raw[c].ctypes.data, 0, blocks.ctypes.data, 0, 1)
            theirs[r, c] = out[0]
    err = float(((torch.from_numpy(theirs).double() - y.double()).abs() / bound).max())
    assert err <= 2 * REL_TOL, err  # observed 2e-8 (the 32-column activations of before: ~1e-3)
