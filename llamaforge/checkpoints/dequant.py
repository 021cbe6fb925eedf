"""Dequantizing ggml blocks (the quantized tensor types of GGUF files) to float32 torch tensors.

Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 are decoded here with vectorized torch code that performs the same
operations in the same order as gguf-py's numpy reference (`gguf.quants.dequantize`), so the results are
bit-identical (tests check it) and several times faster; every other type gguf-py knows (K-quants, IQ*,
...) goes through `gguf.quants.dequantize`. Block layouts follow ggml-common.h: each block of 32 values
starts with an f16 scale `d` (and for *_1 types an f16 minimum `m`), then packed integers.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from llamaforge.errors import CheckpointError


def gguf_version() -> str:
    """The installed gguf package and version, for error messages."""
    try:
        from importlib.metadata import version

        return f"gguf {version('gguf')}"
    except Exception:  # pragma: no cover - metadata missing in odd installs
        return "gguf"


def _scale(blocks: torch.Tensor, index: int) -> torch.Tensor:
    """The f16 stored as the `index`-th half-word of each block, as float32 (n_blocks, 1)."""
    return blocks.view(torch.float16)[:, index: index + 1].to(torch.float32)


def _unpack_nibbles(qs: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 16) bytes -> (n, 32) values in `out`: low nibbles are elements 0..15, high ones 16..31."""
    half = qs.shape[1]
    out[:, :half] = qs & 0x0F
    out[:, half:] = qs >> 4


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) values 16 * bit j (the 5th bit of element j)."""
    bits = qh.unsqueeze(-1).bitwise_right_shift(torch.arange(8, dtype=torch.uint8)).bitwise_and(1)  # (n, 4, 8)
    return bits.reshape(qh.shape[0], 32) << 4


# Each fills a float32 (n_blocks, 32) `out` from (n_blocks, bytes per block) blocks, with the same
# operations in the same order as gguf-py's numpy reference, so results are bit-identical; working in
# place on cache-sized chunks keeps it several times faster than the reference.
def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:  # f16 scale d, 32 x int8 q; x = q * d
    out.copy_(b[:, 2:].view(torch.int8))
    out.mul_(_scale(b, 0))


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:  # f16 d, 16 bytes of nibbles q; x = d * (q - 8)
    _unpack_nibbles(b[:, 2:], out)
    out.sub_(8).mul_(_scale(b, 0))


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:  # f16 d, f16 m, nibbles q; x = d * q + m
    _unpack_nibbles(b[:, 4:], out)
    out.mul_(_scale(b, 0)).add_(_scale(b, 1))


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:  # f16 d, 32 fifth bits, nibbles; x = d * (q - 16)
    _unpack_nibbles(b[:, 6:], out)
    out.add_(_fifth_bits(b[:, 2:6])).sub_(16).mul_(_scale(b, 0))


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:  # f16 d, f16 m, fifth bits, nibbles; x = d * q + m
    _unpack_nibbles(b[:, 8:], out)
    out.add_(_fifth_bits(b[:, 4:8])).mul_(_scale(b, 0)).add_(_scale(b, 1))


_FAST: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
}
# 1024 blocks = 32768 values (128 KB of float32): stays in cache through the in-place steps, and is at
# torch's parallel grain size, so each step runs on one thread. Multi-threaded steps on bigger chunks
# were up to 10x slower whenever another process held a core (OpenMP threads waiting on each other).
_CHUNK_BLOCKS = 1 << 10

def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode ggml blocks of type `qtype` into a float32 tensor of `shape` (outermost first).

    Raises:
        CheckpointError: a type neither llamaforge nor the installed gguf package can decode.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    ggml_type = GGMLQuantizationType[qtype]
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    flat = raw.reshape(-1)
    if qtype in ("F32", "F16", "BF16"):
        return flat.view(getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[qtype])).to(
            torch.float32).reshape(shape)
    fast = _FAST.get(qtype)
    if fast is None:
        import gguf.quants

        try:
            out = gguf.quants.dequantize(flat.numpy(), ggml_type)
        except NotImplementedError:
            raise CheckpointError(
                f"ggml type {qtype} cannot be dequantized by llamaforge or by the installed {gguf_version()}; "
                "requantize the model to Q8_0, Q4_K, Q6_K or F16"
            ) from None
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)
    blocks = flat.view(-1, type_size)  # (n_blocks, bytes per block)
    out = torch.empty(blocks.shape[0], block, dtype=torch.float32)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        fast(blocks[start: start + _CHUNK_BLOCKS], out[start: start + _CHUNK_BLOCKS])
    return out.reshape(shape)


def can_dequantize(qtype: str) -> bool:
    """Whether llamaforge or gguf-py can decode this ggml type."""
    import gguf.quants
    from gguf.constants import GGMLQuantizationType

    if qtype in _FAST or qtype in ("F32", "F16", "BF16"):
        return True
    return GGMLQuantizationType[qtype] in gguf.quants._type_traits  # noqa: SLF001 - gguf has no public query

