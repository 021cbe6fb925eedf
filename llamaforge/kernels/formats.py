"""GGUF block formats: the type table, exact pure-PyTorch dequantization, and quantization.

A quantized 2-D weight of shape (out_features, in_features) is stored as GGUF stores it: a uint8
tensor (out_features, bytes_per_row), each row a run of blocks (32 weights per block for
Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, 256 per super-block for Q4_K/Q5_K/Q6_K; F16 and BF16 weights are held the
same way, as their bytes, "blocks" of one weight). The byte layouts are
llama.cpp's (ggml-common.h); `dequantize_torch` decodes them with the one table of block decoders
(`llamaforge.checkpoints.dequant`, bit-identical to `gguf.quants.dequantize`, any device: the fallback
path on CUDA/MPS and on CPUs without the C++ kernels). `quantize_numpy` uses gguf-py's
numpy quantizers (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), which match llama.cpp's reference quantizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from llamaforge.checkpoints.dequant import decode_blocks
from llamaforge.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class QType:
    """One GGUF block format: its name, GGML type id, weights per block and bytes per block."""

    name: str
    type_id: int
    block: int
    bytes: int

    def bytes_per_row(self, in_features: int) -> int:
        """Bytes that one row of `in_features` weights takes (in_features must be a block multiple)."""
        return in_features // self.block * self.bytes


QTYPES: dict[str, QType] = {
    q.name: q
    for q in (
        QType("Q4_0", 2, 32, 18),
        QType("Q4_1", 3, 32, 20),
        QType("Q5_0", 6, 32, 22),
        QType("Q5_1", 7, 32, 24),
        QType("Q8_0", 8, 32, 34),
        QType("Q4_K", 12, 256, 144),
        QType("Q5_K", 13, 256, 176),
        QType("Q6_K", 14, 256, 210),
        # 16-bit floats, kept as stored (weight-only: the matmul converts them to float32 on the fly).
        QType("F16", 1, 1, 2),
        QType("BF16", 30, 1, 2),
    )
}

# Formats gguf-py can quantize to (the others can only be loaded).
QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")

# Formats the C++ kernels repack into the "x8" layout (8 interleaved rows per block; see qx8.h):
# name -> (columns per super-block, bytes per super-block of 8 rows).
X8_FORMATS = {
    "Q4_0": (32, 144), "Q4_1": (32, 160), "Q8_0": (32, 272), "Q4_K": (256, 1184), "Q5_K": (256, 1440),
    "Q6_K": (256, 1680),
}
LAYOUTS = ("gguf", "x8")


def qtype_info(qtype: str) -> QType:
    """The QType named `qtype` (case-insensitive, e.g. "Q4_1" or "q8_0"); ConfigError if unsupported."""
    info = QTYPES.get(str(qtype).upper())
    if info is None:
        raise ConfigError(
            f"quantized weight type {qtype!r} is not supported; supported GGUF types are "
            f"{sorted(QTYPES)} (load other types with dtype='float32' to dequantize them at load time)"
        )
    return info


def check_raw(raw: torch.Tensor, info: QType, shape: Sequence[int]) -> tuple[int, int]:
    """Validate that `raw` holds `shape` = (out_features, in_features) in format `info`.

    Returns (out_features, in_features). Raises ConfigError for a shape the format cannot hold and
    CheckpointError when the bytes do not match the shape.
    """
    if len(shape) != 2:
        raise ConfigError(f"a quantized linear weight must be 2-D (out_features, in_features), got shape {tuple(shape)}")
    out_features, in_features = int(shape[0]), int(shape[1])
    if in_features <= 0 or in_features % info.block != 0:
        raise ConfigError(
            f"{info.name} stores rows in blocks of {info.block} weights, but in_features is {in_features} "
            f"(not a multiple of {info.block}); use a format whose block size divides it, or keep this layer in float"
        )
    expected = (out_features, info.bytes_per_row(in_features))
    if raw.dtype != torch.uint8 or tuple(raw.shape) != expected:
        raise CheckpointError(
            f"{info.name} weight of shape {(out_features, in_features)} needs uint8 bytes of shape {expected}, "
            f"got {raw.dtype} {tuple(raw.shape)}; the file may be truncated or its shape metadata wrong"
        )
    return out_features, in_features


def dequantize_torch(raw: torch.Tensor, qtype: str, in_features: int) -> torch.Tensor:
    """Rows of GGUF blocks (rows, bytes_per_row) uint8 -> (rows, in_features) float32, on raw's device.

    Bit-identical to gguf.quants.dequantize (the block decoders of `llamaforge.checkpoints.dequant`, the one
    table). Works for any leading shape: raw (..., bytes) gives (..., in_features).
    """
    info = qtype_info(qtype)
    lead = raw.shape[:-1]
    blocks = raw.reshape(-1, info.bytes)  # (rows * blocks_per_row, bytes)
    return decode_blocks(blocks, info.name).reshape(*lead, in_features)


def x8_shape(qtype: str, out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of the x8 tensor holding a (out_features, in_features) weight of `qtype`."""
    cols, sb_bytes = X8_FORMATS[qtype]
    return (out_features + 7) // 8, in_features // cols * sb_bytes


def _x8_values(planes: torch.Tensor, fifth: torch.Tensor | None = None) -> torch.Tensor:
    """Nibble planes (..., 4 j, 8 rows, 4 t) [+ fifth-bit planes (..., 8 rows, 4 t)] -> (..., 8 k, 8 rows, 4 t)."""
    v = torch.cat([planes & 0x0F, planes >> 4], dim=-3)  # low nibble: k = j, high nibble: k = j + 4
    if fifth is not None:
        shifts = torch.arange(8, device=planes.device, dtype=torch.uint8).reshape(8, 1, 1)
        v = v | (((fifth.unsqueeze(-3) >> shifts) & 1) << 4)
    return v


def _pack_scale_min_k4(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Inverse of the Q4_K/Q5_K scale unpacking: (..., 8) six-bit scales and mins -> (..., 12) bytes."""
    lo = (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6)
    mid = (mn[..., :4] & 0x3F) | ((mn[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)
    return torch.cat([lo, mid, hi], dim=-1)


def x8_to_gguf(raw: torch.Tensor, qtype: str, out_features: int, in_features: int) -> torch.Tensor:
    """Undo the x8 repacking: x8 bytes -> GGUF bytes (out_features, bytes_per_row), on raw's device."""
    cols, sb_bytes = X8_FORMATS[qtype]
    groups, nsb = raw.shape[0], in_features // cols
    sb = raw.reshape(groups, nsb, sb_bytes)
    d = sb[:, :, :16].reshape(groups, nsb, 8, 2).permute(0, 2, 1, 3)  # (G, row, nsb, 2 bytes)
    if qtype == "Q6_K":
        scales = sb[:, :, 16:144].reshape(groups, nsb, 16, 8).permute(0, 3, 1, 2)  # (G, row, nsb, half)
        subs = sb[:, :, 144:].reshape(groups, nsb, 8, 192)  # per sub-block: nibble plane | two-bit plane
        v = _x8_values(subs[..., :128].reshape(groups, nsb, 8, 4, 8, 4))  # low 4 bits (G, nsb, sub, k, row, t)
        hi = subs[..., 128:].reshape(groups, nsb, 8, 2, 1, 8, 4)  # (G, nsb, sub, k // 4, 1, row, t)
        at = torch.tensor([4, 6, 0, 2], device=raw.device, dtype=torch.uint8).reshape(4, 1, 1)  # bits of k % 4
        v = v | (((hi >> at) & 3).reshape(groups, nsb, 8, 8, 8, 4) << 4)  # bits 4-5 of value k
        v = v.permute(0, 4, 1, 2, 3, 5).reshape(groups, 8, nsb, 2, 2, 2, 32)  # (G, row, nsb, h, s, c, col)
        # GGUF: ql[64h + 32c + e] = v[4h+c] low | v[4h+2+c] low << 4; qh[32h + e] = sum_s4 v[4h+s4] >> 4 << 2 s4
        ql = ((v[:, :, :, :, 0] & 0x0F) | ((v[:, :, :, :, 1] & 0x0F) << 4)).reshape(groups, 8, nsb, 128)
        v4 = v.reshape(groups, 8, nsb, 2, 4, 32)
        shifts = torch.arange(0, 8, 2, device=raw.device, dtype=torch.uint8).reshape(4, 1)
        qh = (((v4 >> 4) & 3) << shifts).sum(dim=-2, dtype=torch.uint8).reshape(groups, 8, nsb, 64)
        blocks = torch.cat([ql, qh, scales, d], dim=-1)
    elif qtype in ("Q4_K", "Q5_K"):
        dmin = sb[:, :, 16:32].reshape(groups, nsb, 8, 2).permute(0, 2, 1, 3)
        sc = sb[:, :, 32:96].reshape(groups, nsb, 8, 8).permute(0, 3, 1, 2)  # (G, row, nsb, sub)
        mn = sb[:, :, 96:160].reshape(groups, nsb, 8, 8).permute(0, 3, 1, 2)
        subs = sb[:, :, 160:].reshape(groups, nsb, 8, -1)  # per sub-block: nibble plane (| fifth-bit plane)
        planes = subs[..., :128].reshape(groups, nsb, 8, 4, 8, 4)  # (G, nsb, sub, j, row, t)
        fifth = subs[..., 128:].reshape(groups, nsb, 8, 8, 4) if qtype == "Q5_K" else None
        v = _x8_values(planes, fifth)  # (G, nsb, sub, k, row, t)
        v = v.permute(0, 4, 1, 2, 3, 5).reshape(groups, 8, nsb, 8, 32)  # (G, row, nsb, sub, column)
        pairs = v.reshape(groups, 8, nsb, 4, 2, 32)  # sub-blocks 2i and 2i+1 share bytes
        qs = ((pairs[..., 0, :] & 0x0F) | ((pairs[..., 1, :] & 0x0F) << 4)).reshape(groups, 8, nsb, 128)
        parts = [d, dmin, _pack_scale_min_k4(sc, mn)]
        if qtype == "Q5_K":
            shifts = torch.arange(8, device=raw.device, dtype=torch.uint8).reshape(8, 1)
            parts.append((((v >> 4) & 1) << shifts).sum(dim=-2, dtype=torch.uint8))  # (G, row, nsb, 32)
        blocks = torch.cat([*parts, qs], dim=-1)
    else:
        scales = [d]
        if qtype == "Q4_1":
            scales.append(sb[:, :, 16:32].reshape(groups, nsb, 8, 2).permute(0, 2, 1, 3))  # m
        qoff = 32 if qtype == "Q4_1" else 16
        if qtype == "Q8_0":
            v = sb[:, :, qoff:].reshape(groups, nsb, 8, 8, 4)  # (G, nsb, k, row, t): column 4k+t
        else:
            v = _x8_values(sb[:, :, qoff:].reshape(groups, nsb, 4, 8, 4))
        v = v.permute(0, 3, 1, 2, 4).reshape(groups, 8, nsb, 32)  # (G, row, nsb, column in block)
        if qtype != "Q8_0":
            v = v[..., :16] | (v[..., 16:] << 4)  # GGUF packing: columns e and e+16 share byte e
        blocks = torch.cat([*scales, v], dim=-1)  # (G, row, nsb, bytes per block)
    return blocks.reshape(groups * 8, -1)[:out_features]


def quantize_numpy(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """Quantize a float 2-D weight (out, in) to GGUF blocks with gguf-py: (out, bytes_per_row) uint8 on CPU."""
    import gguf

    info = qtype_info(qtype)
    if info.name not in QUANTIZABLE:
        raise ConfigError(f"cannot quantize to {info.name}: llamaforge quantizes float weights to {list(QUANTIZABLE)} only")
    if weight.dim() != 2:
        raise ConfigError(f"{info.name} quantizes 2-D weights (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.shape[1] % info.block != 0:
        raise ConfigError(
            f"{info.name} stores rows in blocks of {info.block} weights, but in_features is {weight.shape[1]} "
            f"(not a multiple of {info.block}); keep this layer in float"
        )
    data = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    raw = gguf.quants.quantize(np.ascontiguousarray(data), gguf.GGMLQuantizationType[info.name])
    return torch.from_numpy(np.ascontiguousarray(raw))
