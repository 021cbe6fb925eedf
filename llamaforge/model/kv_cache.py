"""A static-shape key/value cache organised as a pool of slots.

Each slot holds one sequence; each batch row names its slot and its own positions, so one decode step
serves a single prompt, Meta's ragged batch and a server's continuous batch alike, and a finished
sequence frees its slot without disturbing the others. Generation creates the cache and passes it to
`Transformer.forward`; the model never allocates one. Rows are stored in the cache's element type
(`model/kv_types.py`: float32, float16, bfloat16 or q8_0 blocks); `update` converts on store and returns
values in the dtype of the keys it was given.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import nn

from llamaforge.model import kv_types
from llamaforge.model.step import StepInput


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeros; on the CPU from calloc, whose pages the OS maps on first touch, so a cache sized for every
    slot at full context (the engine's) takes memory only for the positions sequences use."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(nbytes + 64, dtype=np.uint8)  # np.zeros is calloc: no pages are written here
    offset = -raw.ctypes.data % 64  # 64-byte aligned, as torch's own allocator
    return torch.from_numpy(raw[offset : offset + nbytes]).view(dtype).view(shape)


class KVCache(nn.Module):
    """Keys and values of shape (n_layers, n_slots, n_kv_heads, max_seq_len, row), one row per position of a
    KV head in `kv_type` (`kv_types.row_size`: head_dim values, or head_dim / 32 q8_0 blocks of 34 bytes).

    `dtype` is the float dtype of a cache made without a `kv_type` (the model's); `kv_type` wins when given.
    """

    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device,
        kv_type: Optional[str] = None,
    ):
        super().__init__()
        self.kv_type = kv_types.check_kv_type(kv_type) or kv_types.check_kv_type(dtype, name="dtype")
        self.head_dim = head_dim
        shape = (n_layers, n_slots, n_kv_heads, max_seq_len, kv_types.row_size(self.kv_type, head_dim))
        storage = kv_types.storage_dtype(self.kv_type)
        # Zeros, not empty: positions past a sequence's end are masked, but 0 * NaN would still be NaN.
        self.register_buffer("k", _lazy_zeros(shape, storage, device), persistent=False)
        self.register_buffer("v", _lazy_zeros(shape, storage, device), persistent=False)

    @classmethod
    def for_model(cls, args, n_slots: int, max_seq_len: int, *, dtype=torch.float32, device,
                  kv_type: Optional[str] = None) -> "KVCache":
        return cls(args.n_layers, n_slots, max_seq_len, args.n_kv_heads, args.head_dim, dtype=dtype, device=device,
                   kv_type=kv_type)

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    def update(
        self, layer: int, step: StepInput, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, hd) at the step's positions (B, T); return this batch's keys and values.

        `step.slots` (B,) maps batch rows to cache slots (rows 0..B-1 when None). The returned tensors cover
        positions [0, step.kv_len) (the whole cache when None), shape (B, Hkv, kv_len, hd), in k's dtype
        (decoded from the cache's element type: what was stored, not what was given).
        """
        bsz = k.shape[0]
        kv_len = step.kv_len or self.max_seq_len
        k_layer, v_layer = self.k[layer], self.v[layer]  # (S, Hkv, L, row)
        slots = step.slots
        rows = slots if slots is not None else torch.arange(bsz, device=k.device)
        # Advanced indices on dims 0 and 2 put (B, T) first: the target is (B, T, Hkv, row).
        k_layer[rows[:, None], :, step.positions] = kv_types.encode(k.transpose(1, 2), self.kv_type)
        v_layer[rows[:, None], :, step.positions] = kv_types.encode(v.transpose(1, 2), self.kv_type)
        if slots is None:
            k_out, v_out = k_layer[:bsz, :, :kv_len], v_layer[:bsz, :, :kv_len]
        else:
            k_out, v_out = k_layer[slots, :, :kv_len], v_layer[slots, :, :kv_len]
        return kv_types.decode(k_out, self.kv_type, k.dtype), kv_types.decode(v_out, self.kv_type, v.dtype)

    def round_query(self, q: torch.Tensor) -> torch.Tensor:
        """q (..., hd) as attention over this cache's keys uses it (through q8_0 for a q8_0 cache, see kv_types)."""
        return kv_types.round_query(q, self.kv_type)

    def clear(self, slots: Optional[torch.Tensor] = None) -> None:
        """Zero the given slots (all when None)."""
        if slots is None:
            self.k.zero_()
            self.v.zero_()
        else:
            self.k[:, slots] = 0
            self.v[:, slots] = 0
