"""The quantized prefill tiles (kernels/qx8_tiles.h) at prefill sizes: M > 4 activation rows.

With AVX-512 VNNI, more than 4 rows take tiles of two groups of 8 weight rows in 512-bit vectors; every
tile (any width, any number of activation rows) applies the same integer sums and the same float
operations to each output, so a row of a prefill must equal that row computed alone (decode), bit for
bit, and the AVX2 tiles must give the same numbers. References: exact equality for those; F.linear
with gguf-py's dequantized weight within 3e-2 of the output norm (activations are int8 per 32 values, per 256 for the K-quants,
as llama.cpp's). Sizes M = 1..300 around the tile edges (8 rows, or 6 in Q6_K's 512-bit tiles, then 4, 3,
2, 1; pairs of groups; an odd last group, a partial last group). No test asserts on time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llamaforge import kernels
from llamaforge.quantize import QuantizedLinear
from tests.test_quantize import INT8_REL_TOL, make_raw, ref_dequant, rel_err

ext = kernels.get_extension()
pytestmark = pytest.mark.skipif(ext is None, reason="the C++ kernels are not available here")
SIZES = [*range(1, 40), 63, 64, 65, 127, 128, 129, 255, 256, 300]


def rows_alone(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([layer(x[m : m + 1]) for m in range(x.shape[0])])


@pytest.mark.parametrize("qtype", list(kernels.X8_FORMATS))
@pytest.mark.parametrize("out_f", [45, 64])  # 6 groups (the last partial) and 8 whole groups
def test_prefill_rows_equal_rows_alone(qtype: str, out_f: int) -> None:
    in_f = 512
    raw = make_raw(qtype, out_f, in_f, seed=out_f)
    layer = QuantizedLinear.from_gguf(torch.from_numpy(raw), qtype, (out_f, in_f))
    assert layer.layout == "x8"
    x = torch.randn(300, in_f, generator=torch.Generator().manual_seed(1))
    alone = rows_alone(layer, x)
    assert rel_err(alone, F.linear(x, ref_dequant(raw, qtype))) <= INT8_REL_TOL
    for m in SIZES:
        assert torch.equal(layer(x[:m]), alone[:m]), (qtype, m)


@pytest.mark.parametrize("qtype", list(kernels.X8_FORMATS))
def test_prefill_avx2_vnni_and_threads_agree(qtype: str) -> None:
    raw = make_raw(qtype, 85, 256, seed=3)  # 11 groups: five pairs and one partial group alone
    layer = QuantizedLinear.from_gguf(torch.from_numpy(raw), qtype, (85, 256))
    x = torch.randn(70, 256, generator=torch.Generator().manual_seed(2))
    want = layer(x)
    was = ext.use_vnni(False)
    try:
        assert torch.equal(layer(x), want)
    finally:
        ext.use_vnni(was)
    was = ext.min_bytes_per_thread(1)  # threads split at every group: pairs form differently
    try:
        assert torch.equal(layer(x), want)
    finally:
        ext.min_bytes_per_thread(was)


def test_q6k_integer_sums_at_their_bounds() -> None:
    """Q6_K's tiles sum scale * (value - 32) * x in int32 (AVX2: int16 pairs first): at the extremes (every 6-bit
    value 63 or 0, half scales -128 / 127, activations +-127, which int8 quantization keeps exactly) nothing may
    wrap or saturate. Every tile (decode rows alone, prefill, AVX2, VNNI) must give the same numbers, within
    1e-6 of the float64 product (the int32 sum is rounded once to float32 beyond 2^24)."""
    n, k = 20, 512
    rng = np.random.default_rng(7)
    raw = np.zeros((n, k // 256, 210), dtype=np.uint8)
    raw[:, :, 0:192] = np.where(rng.random((n, k // 256, 192)) < 0.5, 0xFF, 0x00)  # values 63 or 0 (+32 offset)
    raw[:, :, 192:208] = np.where(rng.random((n, k // 256, 16)) < 0.5, -128, 127).astype(np.int8).view(np.uint8)
    raw[:, :, 208:210] = np.array([2.0**-10], dtype=np.float16).view(np.uint8)
    raw[:5, :, 0:192], raw[:5, :, 192:208] = 0xFF, 0x80  # the largest sums: every value 63, every scale -128
    raw = raw.reshape(n, -1)
    layer = QuantizedLinear.from_gguf(torch.from_numpy(raw), "Q6_K", (n, k))
    x = torch.where(torch.rand(40, k, generator=torch.Generator().manual_seed(3)) < 0.5, 127.0, -127.0)
    x[0] = 127.0
    ref = (x.double() @ ref_dequant(raw, "Q6_K").double().T)
    want = layer(x)
    assert float(((want.double() - ref).abs() / ref.abs().clamp_min(1.0)).max()) < 1e-6
    assert torch.equal(rows_alone(layer, x), want)
    was = ext.use_vnni(False)
    try:
        assert torch.equal(layer(x), want)
    finally:
        ext.use_vnni(was)
