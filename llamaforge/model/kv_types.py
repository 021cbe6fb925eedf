"""Element types of the KV cache: float32, float16, bfloat16 and q8_0, as llama.cpp's `--cache-type-k/-v`.

A cache row is one position of one KV head: `head_dim` values stored as
- "float32", "float16", "bfloat16": that dtype (conversion rounds to nearest even);
- "q8_0": ggml's block_q8_0, per block of 32 values 2 bytes of fp16 scale d then 32 int8 q, x ~= d * q, with
  d = amax / 127 and q = round_half_even(x * (127 / amax)) as ggml's AVX2 `quantize_row_q8_0` computes them
  (bit for bit: the C++ store in kernels/qkv.h is the same arithmetic), so a row is head_dim / 32 * 34 bytes.
With a q8_0 cache the attention scores are computed, as llama.cpp does (q8_0's vec_dot_type is q8_0), from the
query rounded through q8_0 too (`round_query`): the fused C++ step then takes int8 dot products, and the
PyTorch path computes the same numbers from dequantized tensors.

`encode` and `decode` are the PyTorch path's store and load (`KVCache.update`); `choose_kv_type` is the one
place that decides the default.
"""

from __future__ import annotations

from typing import Optional

import torch

from llamaforge.errors import ConfigError

KV_TYPES = ("float32", "float16", "bfloat16", "q8_0")
_ALIASES = {"f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16", "half": "float16",
            "bf16": "bfloat16", "q8": "q8_0"}
_FLOAT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NAMES = {v: k for k, v in _FLOAT.items()}
Q8_BLOCK, Q8_BYTES = 32, 34  # values and bytes of one block_q8_0
# The KV type GGUF models get on the CPU when none is asked for (see `choose_kv_type`): llama.cpp's.
GGUF_DEFAULT = "float16"


def check_kv_type(kv_type: object, *, name: str = "kv_type") -> Optional[str]:
    """The canonical name of `kv_type` ("f16" -> "float16"), None for None; ConfigError naming `name` otherwise."""
    if kv_type is None:
        return None
    if isinstance(kv_type, torch.dtype) and kv_type in _NAMES:
        return _NAMES[kv_type]
    if isinstance(kv_type, str):
        key = kv_type.strip().lower()
        key = _ALIASES.get(key, key)
        if key in KV_TYPES:
            return key
    raise ConfigError(f"{name} must be one of {', '.join(KV_TYPES)} (or f32, f16, bf16), got {kv_type!r}")


def choose_kv_type(requested: object, *, model_dtype: torch.dtype, gguf_weights: bool) -> str:
    """The KV type a build uses: the one asked for, else the model's float dtype, except that a model whose
    weights stay as a GGUF file holds them (CPU: quantized blocks, or F16 / BF16 kept 16-bit) gets
    `GGUF_DEFAULT`, as llama.cpp's f16 cache (benchmarks/RESULTS.md has the perplexity and speed that decided it:
    at 4096 tokens a float32 cache doubled what a decode step's attention reads, and 1B F16 decoded at 0.79x
    llama.cpp). Float checkpoints (Meta, Hugging Face, F32 GGUF) keep a cache of their own dtype, which is what
    the tests against Meta's reference and transformers compare exactly."""
    chosen = check_kv_type(requested)
    if chosen is not None:
        return chosen
    if gguf_weights:
        return GGUF_DEFAULT
    return _NAMES.get(model_dtype, "float32")


def storage_dtype(kv_type: str) -> torch.dtype:
    """The dtype of the cache tensors: the float dtype, or uint8 for q8_0's blocks."""
    return _FLOAT.get(kv_type, torch.uint8)


def row_size(kv_type: str, head_dim: int) -> int:
    """Elements of `storage_dtype` per cached row (one position of one KV head); ConfigError if it cannot hold one."""
    if kv_type != "q8_0":
        return head_dim
    if head_dim % Q8_BLOCK:
        raise ConfigError(f"kv_type='q8_0' stores blocks of {Q8_BLOCK} values and needs head_dim a multiple of "
                          f"{Q8_BLOCK}; this model's head_dim is {head_dim}: use kv_type='float16'")
    return head_dim // Q8_BLOCK * Q8_BYTES


def row_bytes(kv_type: str, head_dim: int) -> int:
    """Bytes of one cached row."""
    return row_size(kv_type, head_dim) * torch.empty((), dtype=storage_dtype(kv_type)).element_size()


def encode(x: torch.Tensor, kv_type: str) -> torch.Tensor:
    """Rows x (..., head_dim), any float dtype -> their stored form (..., row_size) of `storage_dtype`."""
    if kv_type != "q8_0":
        return x.to(_FLOAT[kv_type])
    *lead, hd = x.shape
    blocks = x.float().reshape(*lead, hd // Q8_BLOCK, Q8_BLOCK)  # (..., nb, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)  # (..., nb, 1)
    inv = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv).to(torch.int8)  # round half to even, as _mm256_round_ps
    d = (amax / 127.0).to(torch.float16)
    out = torch.cat([d.view(torch.uint8), q.view(torch.uint8)], dim=-1)  # (..., nb, 2 + 32)
    return out.reshape(*lead, hd // Q8_BLOCK * Q8_BYTES)


def decode(stored: torch.Tensor, kv_type: str, dtype: torch.dtype) -> torch.Tensor:
    """Stored rows (..., row_size) -> values (..., head_dim) in `dtype` (float32 products d * q for q8_0)."""
    if kv_type != "q8_0":
        return stored if stored.dtype == dtype else stored.to(dtype)
    *lead, nbytes = stored.shape
    blocks = stored.reshape(*lead, nbytes // Q8_BYTES, Q8_BYTES)  # (..., nb, 34)
    d = blocks[..., :2].contiguous().view(torch.float16).float()  # (..., nb, 1)
    q = blocks[..., 2:].contiguous().view(torch.int8).float()  # (..., nb, 32)
    return (d * q).reshape(*lead, nbytes // Q8_BYTES * Q8_BLOCK).to(dtype)


def round_query(q: torch.Tensor, kv_type: str) -> torch.Tensor:
    """The query as attention over keys of `kv_type` sees it: through q8_0 for a q8_0 cache (llama.cpp's
    vec_dot_type), unchanged otherwise. q (..., head_dim)."""
    if kv_type != "q8_0":
        return q
    return decode(encode(q, kv_type), kv_type, q.dtype)
