"""Dequantizing ggml blocks (the quantized tensor types of GGUF files) to float32 torch tensors.

The one table of block decoders (`DECODERS`), used by the checkpoint loaders and by the quantized layers'
PyTorch path (`llamaforge.kernels`): F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K are decoded
with vectorized torch code that performs the same operations in the same order as gguf-py's numpy reference
(`gguf.quants.dequantize`), so the results are bit-identical (tests check it), several times faster, and on
any device; every other type gguf-py knows (IQ*, ...) goes through `gguf.quants.dequantize`. Block layouts
follow ggml-common.h (e.g. a Q4_0 block of 32 values: an f16 scale `d`, then 16 bytes of nibbles).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from llamaforge.checkpoints.gguf_reader import GGML_BLOCKS
from llamaforge.errors import CheckpointError


def gguf_version() -> str:
    """The installed gguf package and version, for error messages."""
    try:
        from importlib.metadata import version

        return f"gguf {version('gguf')}"
    except Exception:  # pragma: no cover - metadata missing in odd installs
        return "gguf"


# ------------------------------------------------------------------------------------------------
# The block decoders. Each takes blocks (n_blocks, bytes) uint8 and returns (n_blocks, block) float32,
# with the same float32 operations in the same order as gguf-py's numpy reference (bit-identical), on
# the blocks' device.


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 at byte `offset` of every block, as float32 (n_blocks, 1)."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) packed bytes -> (n, 32) values: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes holding a little-endian uint32 -> (n, 32) uint8 bits, bit j at position j."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)  # (n, 4, 8) -> (n, 32)


def _deq_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    x = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return x * d


def _deq_q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _deq_q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:]).to(torch.float32)
    return (d * q) + m


def _deq_q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)
    return d * (q.to(torch.int8) - 16).to(torch.float32)


def _deq_q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
    return (d * q.to(torch.float32)) + m


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 12) packed six-bit scales/mins of Q4_K/Q5_K -> two (n, 8) uint8 tensors."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _deq_qk(b: torch.Tensor, five: bool) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    qs = b[:, 48:] if five else b[:, 16:]
    q = torch.stack([qs.reshape(n, 4, 32) & 0x0F, qs.reshape(n, 4, 32) >> 4], dim=2).reshape(n, 8, 32)
    if five:
        shifts = torch.arange(8, device=b.device, dtype=torch.uint8).reshape(1, 8, 1)
        q = q | (((b[:, 16:48].reshape(n, 1, 32) >> shifts) & 1) << 4)  # (n, 8, 32)
    return (dl * q.to(torch.float32) - ml).reshape(n, 256)


def _deq_q4_k(b: torch.Tensor) -> torch.Tensor:
    return _deq_qk(b, five=False)


def _deq_q5_k(b: torch.Tensor) -> torch.Tensor:
    return _deq_qk(b, five=True)


def _deq_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    ql = ql.reshape(n, 2, 1, 64) >> torch.tensor([0, 4], device=b.device, dtype=torch.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(n, 8, 32)  # (n, 2 halves, 2 shifts, 64) -> (n, 8, 32)
    qh = qh.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
    return (d * q).reshape(n, 256)


def _deq_16bit(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda b: b.contiguous().view(dtype).to(torch.float32)


DECODERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F16": _deq_16bit(torch.float16),
    "BF16": _deq_16bit(torch.bfloat16),
    "Q4_0": _deq_q4_0,
    "Q4_1": _deq_q4_1,
    "Q5_0": _deq_q5_0,
    "Q5_1": _deq_q5_1,
    "Q8_0": _deq_q8_0,
    "Q4_K": _deq_q4_k,
    "Q5_K": _deq_q5_k,
    "Q6_K": _deq_q6_k,
}


# 1024 blocks (32768 values of 32-value blocks, 128 KB of float32): each chunk's intermediates stay in cache,
# and at torch's parallel grain size each step runs on one thread. Multi-threaded steps on bigger tensors were
# up to 10x slower whenever another process held a core (OpenMP threads waiting on each other).
_CHUNK_BLOCKS = 1 << 10


def decode_blocks(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """Blocks (n_blocks, bytes) uint8 of `qtype` (a key of DECODERS) -> (n_blocks, block) float32, exactly."""
    decode = DECODERS[qtype]
    if blocks.device.type != "cpu" or blocks.shape[0] <= _CHUNK_BLOCKS:
        return decode(blocks)
    first = decode(blocks[:_CHUNK_BLOCKS])
    out = torch.empty((blocks.shape[0], first.shape[1]), dtype=torch.float32)  # (n_blocks, block)
    out[:_CHUNK_BLOCKS] = first
    for start in range(_CHUNK_BLOCKS, blocks.shape[0], _CHUNK_BLOCKS):
        out[start: start + _CHUNK_BLOCKS] = decode(blocks[start: start + _CHUNK_BLOCKS])
    return out


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode ggml blocks of type `qtype` into a float32 tensor of `shape` (outermost first).

    Raises:
        CheckpointError: a type neither llamaforge nor the installed gguf package can decode.
    """
    flat = raw.reshape(-1)
    if qtype == "F32":
        return flat.view(torch.float32).reshape(shape)
    if qtype in DECODERS:
        type_size = GGML_BLOCKS[qtype][1]
        return decode_blocks(flat.view(-1, type_size), qtype).reshape(shape)  # (n_blocks, bytes) -> shape
    import gguf.quants
    from gguf.constants import GGMLQuantizationType

    ggml_type = GGMLQuantizationType[qtype]

    try:
        out = gguf.quants.dequantize(flat.numpy(), ggml_type)
    except NotImplementedError:
        raise CheckpointError(
            f"ggml type {qtype} cannot be dequantized by llamaforge or by the installed {gguf_version()}; "
            "requantize the model to Q8_0, Q4_K, Q6_K or F16"
        ) from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


def can_dequantize(qtype: str) -> bool:
    """Whether llamaforge or gguf-py can decode this ggml type."""
    if qtype in DECODERS or qtype == "F32":
        return True
    import gguf.quants
    from gguf.constants import GGMLQuantizationType

    return GGMLQuantizationType[qtype] in gguf.quants._type_traits  # noqa: SLF001 - gguf has no public query

