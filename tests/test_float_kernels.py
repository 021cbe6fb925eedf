"""The C++ kernels' plain-float weight matmul (F32 / F16 weights with float32 activations, BF16 weights with
bf16-rounded activations summed as AVX512_BF16's vdpbf16ps sums them, kernels/qgemm.h).

Reference: float64 `x @ W.T` of the same (exactly converted) weights, x rounded to bf16 first for BF16
(torch's `.to(torch.bfloat16)`); float32 sums of K products agree to 1e-5 relative. BF16 also EQUALS (no
tolerance) a PyTorch emulation of vdpbf16ps's lanes (`bf16_dot`), on every path: decode tiles, the AVX2
GEMM and the AVX-512 one (vdpbf16ps itself where the CPU has AVX512_BF16), which must agree bit for bit
with each other on denormal inputs and flushed sums too. The decode tiles (float32: 1 weight row x 8/4/3/2/1 activation rows; 16-bit: 8 x 1 and 4 x 2)
keep one accumulator per (row, activation) pair summed in the same order as a lone row, so results must be bit for bit independent of the batch
and of which weight rows share a tile (exact equality); the prefill GEMM (M >= 9 rows of a 16-bit
weight, kernels/qgemm_tiles.h) keeps that order in both its builds (AVX-512 where the CPU has it, and
AVX2), so its rows must equal rows computed alone, for M = 1..300, and the two builds must agree bit for
bit. No test asserts on time.
"""

from __future__ import annotations

import pytest
import torch

from llamaforge import kernels
from tests.conftest import cpu_vendor, fresh_kernel_defaults

ext = kernels.get_extension()
pytestmark = pytest.mark.skipif(ext is None, reason="the C++ kernels are not available here")
TYPES = {"F32": (0, torch.float32), "F16": (1, torch.float16), "BF16": (30, torch.bfloat16)}
REL_TOL = 1e-5


def linear(x: torch.Tensor, w: torch.Tensor, qt: str) -> torch.Tensor:
    n, k = w.shape
    return ext.qlinear(x, w, TYPES[qt][0], n, k, None, 0, 0)


def reference(x: torch.Tensor, w: torch.Tensor, qt: str) -> torch.Tensor:
    """float64 x @ w.T, x rounded to bf16 for a BF16 weight (as the kernels and the model's bf16 arithmetic)."""
    xr = x.to(torch.bfloat16) if qt == "BF16" else x
    return (xr.double() @ w.double().T).float()


@pytest.mark.parametrize("qt", list(TYPES))
@pytest.mark.parametrize("n,k", [(1, 8), (3, 37), (4, 64), (13, 72), (21, 200)])
@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_float_weights_match_float64(qt, n, k, m):
    g = torch.Generator().manual_seed(n * 1000 + k * 10 + m)
    w = torch.randn(n, k, generator=g).to(TYPES[qt][1])
    x = torch.randn(m, k, generator=g)
    got = linear(x, w, qt)
    want = reference(x, w, qt)
    assert got.shape == (m, n)
    assert ((got - want).norm() / want.norm()).item() < REL_TOL


# Decode batches: float32 rows run 1 x 8, 1 x 4 then 1 x 3/2/1 tiles (M = 19 = 8 + 8 + 3), 16-bit rows 4 x 2
# tiles and 2 x 1 at M = 1 (up to M = 8: from 9 rows on the prefill GEMM takes over).
@pytest.mark.parametrize("qt", list(TYPES))
@pytest.mark.parametrize("n,k", [(11, 136), (21, 37), (9, 1000)])  # k past the last 8; n past the 8/4-row tiles
def test_a_result_does_not_depend_on_its_batch_or_tile(qt, n, k):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).to(TYPES[qt][1])
    rows = 19 if qt == "F32" else 8
    x = torch.randn(rows, k, generator=g)
    full = linear(x, w, qt)
    want = reference(x, w, qt)
    assert ((full - want).norm() / want.norm()).item() < REL_TOL
    for m in range(rows):
        assert torch.equal(linear(x[m : m + 1], w, qt), full[m : m + 1])
    for m in range(1, rows + 1):  # every batch size: each tile width and edge
        assert torch.equal(linear(x[:m], w, qt), full[:m]), m
    for j in range(n):  # row j alone (no tile) against its place inside a 4- or 8-row tile
        assert torch.equal(linear(x, w[j : j + 1].contiguous(), qt)[:, 0], full[:, j])


@pytest.mark.parametrize("qt", list(TYPES))
def test_prefetch_distance_does_not_change_results(qt):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(300, 520, generator=g).to(TYPES[qt][1])  # 300 rows: tiles cut where the prefetch runs past
    x = torch.randn(8, 520, generator=g)
    was = ext.float_prefetch()
    try:
        ys = []
        for ahead in (0, 64, 8192, 1 << 20):  # off, one line, the default, far past the weight's end
            assert ext.float_prefetch(ahead) in (was, 0, 64, 8192)
            ys.append([linear(x[:m], w, qt) for m in (1, 2, 4, 8)])
        for other in ys[1:]:
            assert all(torch.equal(a, b) for a, b in zip(ys[0], other))
    finally:
        ext.float_prefetch(was)
    assert ext.float_prefetch() == was




# Prefill (M >= 9 rows) of a 16-bit weight runs a GEMM over panels of 8 weight rows converted to float32
# (AVX2 F16: kept as halves, converted in the tile) once per pass of 128 rows, in tiles of 8 weight rows x
# 6 activation rows (AVX-512) or 4 x 3 (AVX2) over slices of 256 columns (AVX2); its pairs keep the decode
# tiles' summation order, so every row must equal the same row computed alone, bit for bit, on both builds,
# and with the AVX-512 build's BF16 emulation ("avx512-nobf16": vdpbf16ps off, as on AVX-512 CPUs without
# AVX512_BF16). At K = 520 and 2056 the AVX2 F16 tiles end in a slice of one 8-column step.
ISAS = ["avx512", "avx512-nobf16", "avx2"] if ext is not None and ext.use_avx512_gemm() else ["avx2"]


def set_isa(isa: str) -> tuple[bool, bool, bool]:
    """The 16-bit paths of `isa` on ("avx512": vdpbf16ps in the GEMM too, whatever this CPU's default); returns
    the switches (AVX-512 GEMM, vdpbf16ps, vdpbf16ps in the GEMM) as they were."""
    return (ext.use_avx512_gemm(isa != "avx2"), ext.use_bf16dot(isa == "avx512"),
            ext.use_bf16dot_gemm(isa == "avx512"))


def restore_isa(was: tuple[bool, bool, bool]) -> None:
    ext.use_avx512_gemm(was[0])
    ext.use_bf16dot(was[1])
    ext.use_bf16dot_gemm(was[2])


@pytest.fixture(params=ISAS)
def gemm_isa(request):
    was = set_isa(request.param)
    yield request.param
    restore_isa(was)


@pytest.mark.parametrize("qt", ["F16", "BF16"])
@pytest.mark.parametrize("n,k", [(37, 264), (16, 520), (5, 7), (50, 256), (9, 2056)])
def test_prefill_gemm_rows_equal_decode_rows(qt, n, k, gemm_isa):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).to(TYPES[qt][1])
    x = torch.randn(300, k, generator=g)
    alone = torch.cat([linear(x[m : m + 1], w, qt) for m in range(300)])
    want = reference(x, w, qt)
    assert ((alone - want).norm() / want.norm()).item() < REL_TOL
    sizes = range(1, 301) if (n, k) == (37, 264) else (9, 10, 11, 12, 13, 47, 64, 65, 127, 128, 129, 300)
    for m in sizes:  # every M around the tile edges (3, 6 rows) on one shape; edges of panels and passes on all
        assert torch.equal(linear(x[:m], w, qt), alone[:m]), m


@pytest.mark.parametrize("qt", ["F16", "BF16"])
def test_prefill_gemm_splits_across_threads_exactly(qt, gemm_isa):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(75, 136, generator=g).to(TYPES[qt][1])  # panels of 8 rows cut at every thread boundary
    x = torch.randn(40, 136, generator=g)
    one = linear(x, w, qt)
    was = ext.min_bytes_per_thread(1)
    try:
        assert torch.equal(linear(x, w, qt), one)
    finally:
        ext.min_bytes_per_thread(was)


def test_prefill_gemm_vdpbf16ps_default_follows_the_cpu_vendor():
    # The GEMM runs BF16 by vdpbf16ps where the CPU has it, except on Intel, where its exact FMA emulation measured
    # faster (qgemm.cpp); the decode tiles keep vdpbf16ps.
    vendor, out = cpu_vendor(), fresh_kernel_defaults("bf16dot_supported", "use_bf16dot_gemm")
    supported, gemm = (v == "True" for v in out)
    assert gemm == (supported and vendor != "GenuineIntel"), (vendor, out)


@pytest.mark.skipif(len(ISAS) < 2, reason="this CPU has no AVX-512: only the AVX2 GEMM runs here")
@pytest.mark.parametrize("qt", ["F16", "BF16"])
def test_prefill_gemm_builds_agree_bit_for_bit(qt):
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(203, 1030, generator=g) * 0.05).to(TYPES[qt][1])  # odd panels, a 6-column tail
    x = torch.randn(140, 1030, generator=g)  # a pass of 128 rows and one of 12
    was = set_isa("avx512")
    try:
        wide = linear(x, w, qt)
        set_isa("avx512-nobf16")
        emulated = linear(x, w, qt)
        set_isa("avx2")
        narrow = linear(x, w, qt)
    finally:
        restore_isa(was)
    assert torch.equal(wide, narrow) and torch.equal(wide, emulated)


@pytest.mark.parametrize("qt", list(TYPES))
def test_decode_tiles_split_across_threads_exactly(qt):
    g = torch.Generator().manual_seed(6)
    w = torch.randn(77, 104, generator=g).to(TYPES[qt][1])  # thread ranges cut 8-, 4- and 3-row tiles anywhere
    x = torch.randn(16, 104, generator=g)
    sizes = (1, 2, 3, 4, 5, 8, 16) if qt == "F32" else (1, 2, 3, 4, 5, 8)
    with torch.inference_mode():
        was_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one = [linear(x[:m], w, qt) for m in sizes]
        finally:
            torch.set_num_threads(was_threads)
        was = ext.min_bytes_per_thread(1)
        try:
            for m, y in zip(sizes, one):
                assert torch.equal(linear(x[:m], w, qt), y), m
        finally:
            ext.min_bytes_per_thread(was)


# BF16: activations rounded to bf16, products summed as vdpbf16ps sums them (kernels/qgemm.h).
def bf16_dot(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The kernels' BF16 result, emulated in float32: per (row, activation) pair 8 lanes, lane j adding in step
    s the product of column 16s + 2j + 1 then of 16s + 2j (bf16 x bf16 products are exact in float32, so a
    multiply then an add is the fused multiply-add), the lanes summed as hsum does, then the tail columns."""
    xr, wf = x.to(torch.bfloat16).float(), w.float()
    m, k = x.shape
    k16 = k // 16 * 16
    acc = torch.zeros(m, w.shape[0], 8)
    for c in range(0, k16, 16):
        acc = acc + xr[:, None, c + 1 : c + 16 : 2] * wf[None, :, c + 1 : c + 16 : 2]  # odd columns first
        acc = acc + xr[:, None, c : c + 16 : 2] * wf[None, :, c : c + 16 : 2]
    s4 = acc[..., :4] + acc[..., 4:]  # hsum: (v0 + v4) + (v2 + v6), (v1 + v5) + (v3 + v7), their sum
    s2 = s4[..., :2] + s4[..., 2:]
    out = s2[..., 0] + s2[..., 1]
    for c in range(k16, k):
        out = out + xr[:, c : c + 1] * wf[None, :, c]
    return out


@pytest.mark.parametrize("n,k", [(37, 264), (5, 7), (9, 2056), (16, 520), (3, 31), (8, 16)])  # tails of 8, 7, 8, 8, 15
def test_bf16_sums_exactly_as_vdpbf16ps(n, k, gemm_isa):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(40, k, generator=g) * 3
    want = bf16_dot(x, w)
    assert not torch.equal(want, (x.double() @ w.double().T).float())  # the rounding of x shows
    assert torch.equal(linear(x, w, "BF16"), want)  # the prefill GEMM (>= 9 rows)
    for m in range(1, 9):  # every decode tile
        assert torch.equal(linear(x[:m], w, "BF16"), want[:m]), m


def test_bf16_activations_round_to_nearest_even(gemm_isa):
    # An identity weight returns the activations as the kernels round them: ties (a low half of 0x8000)
    # go to the even bf16, anything above half up, below half down, signs alike.
    k = 48
    hi = torch.randint(0x3C00, 0x4400, (20, k), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    lo = torch.tensor([0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF, 0x4000], dtype=torch.int32)[torch.arange(20 * k) % 6].view(20, k)
    bits = (hi << 16) | lo
    bits[::2] |= torch.iinfo(torch.int32).min  # negative rows
    x = bits.view(torch.float32)
    eye = torch.eye(k).bfloat16()
    want = x.bfloat16().float()
    assert torch.equal(linear(x, eye, "BF16"), want)  # GEMM
    assert torch.equal(linear(x[:3], eye, "BF16"), want[:3])  # decode tiles


@pytest.mark.skipif(not ext.bf16dot_supported() or len(ISAS) < 2,
                    reason="this CPU has no AVX512_BF16: only the emulation of vdpbf16ps runs here")
def test_bf16_emulation_equals_vdpbf16ps_on_denormals():
    # vdpbf16ps reads denormal inputs as zero and flushes denormal sums (DAZ / FTZ, whatever MXCSR says); the
    # AVX2 tiles and the decode tiles emulate it under MXCSR's DAZ / FTZ. Products and sums around 2^-126,
    # denormal bf16 weights and activations: the GEMM and the decode tiles, each with vdpbf16ps (AVX-512) and
    # with its emulation (AVX2), must give the same bits, and these differ from IEEE arithmetic with denormals
    # (the data reaches them).
    g = torch.Generator().manual_seed(9)
    n, k = 45, 1032
    w = (torch.randn(n, k, generator=g) * 2.0**-60).bfloat16()
    w[:, ::7] = (torch.randn(n, k, generator=g)[:, ::7] * 2.0**-128).bfloat16()  # denormal bf16 weights
    x = torch.randn(30, k, generator=g) * 2.0**-66
    x[:, 3::5] = torch.randn(30, k, generator=g)[:, 3::5] * 2.0**-130  # denormal activations
    was = set_isa("avx512")
    try:
        wide = linear(x, w, "BF16")
        wide_decode = torch.cat([linear(x[m : m + 4], w, "BF16") for m in range(0, 30, 4)])
        set_isa("avx512-nobf16")  # the AVX-512 GEMM's own emulation (Skylake-X .. Ice Lake)
        emulated = linear(x, w, "BF16")
        emulated_decode = torch.cat([linear(x[m : m + 4], w, "BF16") for m in range(0, 30, 4)])
        set_isa("avx2")
        narrow = linear(x, w, "BF16")
        narrow_decode = torch.cat([linear(x[m : m + 4], w, "BF16") for m in range(0, 30, 4)])
    finally:
        restore_isa(was)
    for other in (narrow, wide_decode, narrow_decode, emulated, emulated_decode):
        assert torch.equal(wide, other)
    assert (wide != 0).any()
    assert not torch.equal(wide, bf16_dot(x, w))  # IEEE float32 (denormals kept) sums differently here
