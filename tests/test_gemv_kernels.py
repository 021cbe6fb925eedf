"""Exact tests of the C++ decode kernels (M <= 8 activation rows) for every weight type, on the AVX2 and
AVX-512 VNNI tiles.

The inputs are chosen so that every product and partial sum is exactly representable in float32: the
activation rows are integers with |x| <= 127 and a 127 in every block of 32 (so the kernels' int8
quantization is exact: scale 1, q = x), the weights' block scales are powers of two and their sub-block
scales and mins small. Then the kernels' integer dot sums and float scalings lose nothing, and their output
must EQUAL the float64 product of gguf-py's dequantized weight with x (torch.equal, no tolerance): a wrong
bit, row, column or scale anywhere shows. Shapes: odd row counts (N not a multiple of 8), K not a
multiple of 256 where the format allows it, every row count 1..8 (each tile remainder), and the rows
split across threads at every group. The F16/BF16 weights hold small integers, so float32 products are
exact too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from llamaforge import kernels
from tests.conftest import cpu_vendor, fresh_kernel_defaults

EXT = kernels.get_extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="C++ kernels unavailable")

BLOCK_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
TILES = ["avx2", "vnni"]


def f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def pack_scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """(..., 8) six-bit scales and mins -> GGUF's 12 packed bytes (inverse of ggml's get_scale_min_k4)."""
    lo = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    mid = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return np.concatenate([lo, mid, hi], axis=-1).astype(np.uint8)


def exact_raw(qtype: str, n: int, k: int, seed: int) -> np.ndarray:
    """GGUF bytes (n, bytes_per_row): random quants, power-of-two block scales, small sub-block scales."""
    rng = np.random.default_rng(seed)
    info = kernels.qtype_info(qtype)
    nb = k // info.block
    raw = rng.integers(0, 256, (n, nb, info.bytes), dtype=np.uint8)
    pow2 = lambda: 2.0 ** rng.integers(-4, -2, (n, nb))  # noqa: E731  (1/16 or 1/8: UNIT divides every weight)
    if qtype == "Q6_K":
        raw[:, :, 192:208] = rng.integers(-4, 5, (n, nb, 16)).astype(np.int8).view(np.uint8)
        raw[:, :, 208:210] = f16_bytes(pow2())
    elif qtype in ("Q4_K", "Q5_K"):
        raw[:, :, 0:2], raw[:, :, 2:4] = f16_bytes(pow2()), f16_bytes(pow2())
        raw[:, :, 4:16] = pack_scale_min_k4(rng.integers(0, 8, (n, nb, 8)), rng.integers(0, 8, (n, nb, 8)))
    else:
        raw[:, :, 0:2] = f16_bytes(pow2())
        if qtype in ("Q4_1", "Q5_1"):
            raw[:, :, 2:4] = f16_bytes(rng.integers(-8, 9, (n, nb)) * 2.0**-4)  # the block's m
    return raw.reshape(n, nb * info.bytes)


def exact_x(m: int, k: int, seed: int) -> torch.Tensor:
    """(m, k) integers in [-15, 15] with a 127 in every block of 32: int8-quantized without loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-15, 16, (m, k), generator=g).float()
    x.view(m, k // 32, 32)[:, :, int(torch.randint(0, 32, (1,), generator=g))] = 127.0
    return x


UNIT = 2.0**-4  # every block weight (and min term) is a multiple of it


def reference(w: torch.Tensor, x: torch.Tensor, unit: float = UNIT) -> torch.Tensor:
    """x @ w.T in float64; checks that no partial sum of the kernels (each term below |w| + 2, a bound on the
    K-quants' separate min terms too) can leave the integers times `unit` that float32 holds exactly."""
    assert float(((w.abs() + 2.0).double() @ x.abs().double().T).max()) < 2**24 * unit
    return (x.double() @ w.double().T).float()


def run_tiles(tiles: str, fn):
    """fn() on the AVX2 or the AVX-512 VNNI x8 tiles (skipped where the CPU has no VNNI)."""
    was = EXT.use_vnni(tiles == "vnni")
    try:
        if EXT.use_vnni() != (tiles == "vnni"):
            pytest.skip("this CPU has no AVX-512 VNNI")
        return fn()
    finally:
        EXT.use_vnni(was)


def qlinear(x: torch.Tensor, w: torch.Tensor, qt: int, n: int, k: int, layout: int) -> torch.Tensor:
    return EXT.qlinear(x, w, qt, n, k, None, 0, layout)


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_block_gemv_is_exact(qtype: str, tiles: str) -> None:
    info = kernels.qtype_info(qtype)
    ks = (768,) if info.block == 256 else (96, 544)  # 3 super-blocks; 3 and 17 blocks of 32
    for n in (45, 8, 3):
        for k in ks:
            raw = exact_raw(qtype, n, k, seed=n + k)
            w = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).copy())
            packed, layout = kernels.repack(torch.from_numpy(raw), qtype, n, k)
            assert layout == ("x8" if qtype in kernels.X8_FORMATS else "gguf")
            lid = kernels.LAYOUT_IDS[layout]
            x = exact_x(8, k, seed=k)
            for m in range(1, 9):
                y = run_tiles(tiles, lambda: qlinear(x[:m], packed, info.type_id, n, k, lid))
                assert torch.equal(y, reference(w, x[:m])), (qtype, tiles, n, k, m)
            # the same numbers with the row groups split across threads at every group
            was = EXT.min_bytes_per_thread(1)
            try:
                y = run_tiles(tiles, lambda: qlinear(x[:5], packed, info.type_id, n, k, lid))
            finally:
                EXT.min_bytes_per_thread(was)
            assert torch.equal(y, reference(w, x[:5]))


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("qtype", sorted(kernels.X8_FORMATS))
def test_x8_prefetch_distance_changes_no_bit(qtype: str, tiles: str) -> None:
    # The decode tiles (M <= 4) prefetch `x8_prefetch` bytes ahead of the super-block they read; 45 rows: the
    # last group's prefetch runs past the weight's end (a prefetch never faults), 1 MiB: far past it.
    info = kernels.qtype_info(qtype)
    n, k = 45, 768 if info.block == 256 else 544
    raw = exact_raw(qtype, n, k, seed=11)
    w = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).copy())
    packed, layout = kernels.repack(torch.from_numpy(raw), qtype, n, k)
    x = exact_x(8, k, seed=12)
    was = EXT.x8_prefetch()
    try:
        for ahead in (0, 64, 8192, 1 << 20):
            EXT.x8_prefetch(ahead)
            assert EXT.x8_prefetch() == ahead
            for m in range(1, 9):
                y = run_tiles(tiles, lambda: qlinear(x[:m], packed, info.type_id, n, k, kernels.LAYOUT_IDS[layout]))
                assert torch.equal(y, reference(w, x[:m])), (qtype, tiles, ahead, m)
    finally:
        EXT.x8_prefetch(was)
    assert EXT.x8_prefetch() == was


def test_x8_prefetch_default_follows_the_cpu_vendor() -> None:
    # 1 KiB ahead on Intel (measured: 12-18% off a decode step there), off elsewhere (it cost up to 1.6x on a Zen 4).
    vendor, (ahead,) = cpu_vendor(), fresh_kernel_defaults("x8_prefetch")
    assert int(ahead) == (1024 if vendor == "GenuineIntel" else 0), (vendor, ahead)


@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_float_gemv_is_exact(qtype: str) -> None:
    g = torch.Generator().manual_seed(3)
    dtype = torch.float16 if qtype == "F16" else torch.bfloat16
    info = kernels.qtype_info(qtype)
    for n, k in ((45, 96), (17, 2056), (8, 8), (3, 13)):  # K off the 8-wide vectors too
        w = torch.randint(-8, 9, (n, k), generator=g).to(dtype)
        x = torch.randint(-64, 65, (8, k), generator=g).float()
        for m in range(1, 9):
            y = qlinear(x[:m], w, info.type_id, n, k, 0)
            assert torch.equal(y, reference(w.float(), x[:m], unit=1.0)), (qtype, n, k, m)


def test_avx2_tiles_forced_by_environment() -> None:
    code = "from llamaforge import kernels; print(kernels.get_extension().use_vnni())"
    env = dict(os.environ, LLAMAFORGE_X8_TILES="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("qtype", sorted(kernels.X8_FORMATS))
def test_x8_repack_moves_every_bit(qtype: str) -> None:
    # Any GGUF bytes (every bit pattern, scales included: Q4_K/Q5_K's 12 packed bytes use all 96 bits) repack
    # into x8 bytes that torch's independent inverse (kernels/formats.py) turns back into the same bytes; a last
    # partial group's missing rows are zero, as the repack of the same rows followed by rows of zero bytes.
    info = kernels.qtype_info(qtype)
    k = 768 if info.block == 256 else 544  # 3 super-blocks; 17 blocks of 32
    bpr = k // info.block * info.bytes
    raw = torch.randint(0, 256, (45, bpr), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    packed, layout = kernels.repack(raw, qtype, 45, k)
    assert layout == "x8" and packed.shape == (6, k // kernels.X8_FORMATS[qtype][0] * kernels.X8_FORMATS[qtype][1])
    assert torch.equal(kernels.to_gguf_layout(packed, qtype, 45, k, layout), raw)
    padded, _ = kernels.repack(torch.cat([raw, torch.zeros(3, bpr, dtype=torch.uint8)]), qtype, 48, k)
    assert torch.equal(packed, padded)


@pytest.mark.parametrize("qtype", ["Q4_0", "F16"])
def test_streamed_weights_are_2mib_aligned_copies(qtype: str) -> None:
    # repack puts x8 weights of 2 MiB and more in 2 MiB-aligned memory marked for huge pages (whether the OS
    # backs it with huge pages is its business); F16/BF16 are left where they are (no copy at load).
    n, k = 4096, 1024  # Q4_0: 2.4 MB, F16: 8.4 MB
    raw = torch.from_numpy(exact_raw(qtype, n, k, seed=5)) if qtype != "F16" else \
        torch.randint(0, 256, (n, 2 * k), dtype=torch.uint8)
    packed, layout = kernels.repack(raw, qtype, n, k)
    if qtype == "F16":
        assert layout == "gguf" and packed is raw
        return
    assert packed.data_ptr() % (2 << 20) == 0 and packed.data_ptr() != raw.data_ptr()
    assert layout == "x8" and torch.equal(kernels.to_gguf_layout(packed, qtype, n, k, layout), raw)
    small = raw[:8].clone()
    assert kernels.repack(small, qtype, 8, k)[0].data_ptr() % 64 == 0  # small ones: ordinary memory
