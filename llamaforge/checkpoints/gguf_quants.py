"""Quantizing float32 weights into ggml blocks, bit for bit as llama.cpp's reference quantizers do.

llama-quantize without an importance matrix calls ggml's `quantize_row_*_ref` functions
(ggml/src/ggml-quants.c). Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and BF16 are taken from gguf-py's
`gguf.quants`, which reproduces them; Q4_K, Q5_K and Q6_K, which gguf-py can only decode, are written
here: `quantize_row_q4_K_ref` / `q5_K_ref` (with `make_qkx2_quants`) and `quantize_row_q6_K_ref` (with
`make_qx_quants`),
with the same float32 operations in the same order, vectorised over blocks (each C loop that sums
becomes a float32 accumulate along the block, so sums are taken left to right exactly as in C; ggml's
base library is built without -march flags, so without FMA contraction). The tests compare the bytes
with ggml's `quantize_row_*_ref` and with llama.cpp's `llama_model_quantize` (through llama-cpp-python)
where it is installed (identical on every case tried), and always check that gguf-py decodes them to
within the format's error.
"""

from __future__ import annotations

import numpy as np

from llamaforge.errors import CheckpointError

QK_K = 256
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
# Block sizes in bytes: Q4_K = f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles;
# Q5_K = the same with 32 bytes of fifth bits before the nibbles;
# Q6_K = 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, f16 d.
Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES = 144, 176, 210
_CHUNK = 4096  # blocks per vectorised step: bounded memory on large tensors


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5 * 2^23 in float32 and read the low mantissa bits (round half to even for
    |v| < 2^22; the same bits as C for anything else, inf and nan included)."""
    with np.errstate(invalid="ignore", over="ignore"):
        bits = (np.asarray(v, F32) + F32(12582912.0)).view(np.int32)
    bits &= 0x007FFFFF
    bits -= 0x00400000
    return bits


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Float32 sum over the last axis, left to right, as a C `for` loop accumulates it (an accumulate is
    sequential by definition, unlike np.sum's pairwise summation)."""
    return np.cumsum(a, axis=-1, dtype=F32)[..., -1]


def _col_sum(a: np.ndarray) -> np.ndarray:
    """The same on (n, S): sum over axis 0 in order, each step a contiguous add (much faster than _seq_sum)."""
    out = a[0].copy()
    for row in a[1:]:
        out += row
    return out


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants (use_mad false) on rows x, weights w (S, n): (scale (S,), -min (S,), L (S, n)).

    Computed on the transposes (n, S): the element loop of C is then the outer axis.
    """
    x, w = np.ascontiguousarray(x.T), np.ascontiguousarray(w.T)
    lo = np.minimum(x.min(axis=0), F32(0))
    hi = x.max(axis=0)
    sum_w = _col_sum(w)
    sum_x = _col_sum(w * x)
    flat = hi == lo
    iscale = F32(nmax) / np.where(flat, F32(1), hi - lo)  # flat rows are overwritten below
    scale = F32(1) / iscale
    L = np.clip(_nearest_int(iscale * (x - lo)), 0, nmax)
    diff = scale * L.astype(F32) + lo - x
    best = _col_sum(w * (diff * diff))
    mn = lo.copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(nstep + 1):
            # As in C, `min` is the best fit so far: each step scales from the current one.
            num = F32(rmin) + F32(rdelta) * F32(step)
            num = num + F32(nmax)
            iscale = num / np.where(flat, F32(1), hi - mn)
            laux = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
            la = laux.astype(F32)
            wl = w * la
            sum_l, sum_l2, sum_xl = _col_sum(wl), _col_sum(wl * la), _col_sum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            d = this_scale * la + this_min - x
            err = _col_sum(w * (d * d))
            better = (D > 0) & (err < best)
            L = np.where(better, laux, L)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L = np.where(flat, 0, L)
    scale = np.where(flat, F32(0), scale)
    return scale.astype(F32), (-np.where(flat, lo, mn)).astype(F32), L.T


def _k_blocks(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """The shared part of quantize_row_q4_K_ref / q5_K_ref on (nb, 256) float32: 8 sub-blocks of 32 with
    6-bit scales and mins. Returns (the 16-byte header d, dmin, packed scales: (nb, 16) uint8, L (nb, 8, 32))."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    av_x = np.sqrt(_seq_sum(sub * sub) / F32(32))
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, L = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    head = np.zeros((nb, 16), np.uint8)
    d = (max_scale / F32(63)).astype(np.float16)
    dmin = (max_min / F32(63)).astype(np.float16)
    head[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
    head[:, 2:4] = dmin.view(np.uint8).reshape(nb, 2)
    head[:, 4:8] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)  # get_scale_min_k4's layout
    head[:, 8:12] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    head[:, 12:16] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    dj = d.astype(F32)[:, None] * ls.astype(F32)  # (nb, 8): the scales as decoded
    dm = dmin.astype(F32)[:, None] * lm.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int((x.reshape(nb, 8, 32) + dm[..., None]) / dj[..., None]), 0, nmax)
    return head, np.where((dj != 0)[..., None], requant, L).astype(np.uint8)


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref on (nb, 256) float32 -> (nb, 144) uint8."""
    nb = x.shape[0]
    head, L = _k_blocks(x, 15, -1.0, 20)
    L = L.reshape(nb, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128)  # 64 values -> 32 bytes: low nibble first half
    return np.concatenate([head, qs], axis=1)


def _q5_k_blocks(x: np.ndarray) -> np.ndarray:
    """quantize_row_q5_K_ref on (nb, 256) float32 -> (nb, 176) uint8: header, 32 bytes of 5th bits, nibbles."""
    nb = x.shape[0]
    head, L = _k_blocks(x, 31, -0.5, 15)
    L = L.reshape(nb, 4, 2, 32)  # (64-value group g, half, j)
    low = L & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    high = (L >> 4).astype(np.uint8)  # bit 2g for the first half of group g, 2g + 1 for the second
    qh = np.zeros((nb, 32), np.uint8)
    for g in range(4):
        qh |= (high[:, g, 0] << (2 * g)) | (high[:, g, 1] << (2 * g + 1))
    return np.concatenate([head, qh, qs], axis=1)


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants with rmse_type 1 and no weights on rows x (S, n): (scale (S,), L (S, n) in [0, 2 nmax)).

    Computed on the transpose (n, S), as make_qkx2_quants.
    """
    S = x.shape[0]
    first = np.abs(x).argmax(axis=1)  # the first element of largest magnitude, as C's strict `>`
    mx = x[np.arange(S), first]
    tiny = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(tiny, F32(1), mx)
    x = np.ascontiguousarray(x.T)
    w = x * x
    wx = w * x

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        l = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
        lf = l.astype(F32)
        return l, _col_sum(wx * lf), _col_sum((w * lf) * lf)

    l, sumlx, suml2 = fit(F32(-nmax) / mx)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
            laux, slx, sl2 = fit(iscale)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            l = np.where(better, laux, l)
            scale = np.where(better, slx / sl2, scale)
            best = np.where(better, scale * slx, best)
    L = np.where(tiny, 0, l + nmax)
    return np.where(tiny, F32(0), scale).astype(F32), L.T


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref on (nb, 256) float32 -> (nb, 210) uint8."""
    nb = x.shape[0]
    scales, L = make_qx_quants(x.reshape(nb * 16, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    first = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), first]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    max_scale = np.where(zero, F32(1), max_scale)
    iscale = F32(-128) / max_scale
    d = (F32(1) / iscale).astype(np.float16)
    sq = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    dj = d.astype(F32)[:, None] * sq.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int(x.reshape(nb, 16, 16) / dj[..., None]), -32, 31) + 32
    L = np.where((dj != 0)[..., None], requant, L).astype(np.uint8).reshape(nb, 2, 4, 32)  # (half, quarter, l)
    ql = np.concatenate([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4),
                         L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], axis=2)  # (nb, 2, 64)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = np.empty((nb, Q6_K_BYTES), np.uint8)
    out[:, 0:128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = sq.view(np.uint8)
    out[:, 208:210] = d.view(np.uint8).reshape(nb, 2)
    out[zero] = 0  # an all-zero block: memset, d = 0
    return out


_K_QUANTS = {"Q4_K": (_q4_k_blocks, Q4_K_BYTES), "Q5_K": (_q5_k_blocks, Q5_K_BYTES), "Q6_K": (_q6_k_blocks, Q6_K_BYTES)}


def quantize(array: np.ndarray, qtype: str) -> np.ndarray:
    """A float32 (rows, cols) array as ggml `qtype` blocks: uint8 (rows, bytes per row), as llama.cpp writes them.

    Raises:
        CheckpointError: a type llamaforge cannot write, or rows that are not whole blocks.
    """
    import gguf.quants
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    array = np.ascontiguousarray(array, dtype=F32)
    try:
        ggml_type = GGMLQuantizationType[qtype]
    except KeyError:
        raise CheckpointError(f"unknown ggml type {qtype!r}") from None
    block = GGML_QUANT_SIZES[ggml_type][0]
    if array.shape[-1] % block:
        raise CheckpointError(f"rows of {array.shape[-1]} values are not whole {qtype} blocks of {block}")
    if qtype not in _K_QUANTS:
        try:
            return gguf.quants.quantize(array, ggml_type)
        except NotImplementedError:
            raise CheckpointError(f"llamaforge cannot write {qtype} tensors; choose Q8_0, Q4_0, Q4_K, Q5_K or Q6_K") from None
    fn, nbytes = _K_QUANTS[qtype]
    rows = array.reshape(-1, QK_K)
    out = np.empty((rows.shape[0], nbytes), np.uint8)
    for start in range(0, rows.shape[0], _CHUNK):
        out[start: start + _CHUNK] = fn(rows[start: start + _CHUNK])
    return out.reshape(*array.shape[:-1], array.shape[-1] // QK_K * nbytes)
