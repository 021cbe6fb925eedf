"""A static-shape key/value cache organised as a pool of slots.

Each slot holds one sequence; each batch row names its slot and its own positions, so one decode step
serves a single prompt, Meta's ragged batch and a server's continuous batch alike, and a finished
sequence frees its slot without disturbing the others. Generation creates the cache and passes it to
`Transformer.forward`; the model never allocates one.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import nn

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
    """Keys and values of shape (n_layers, n_slots, n_kv_heads, max_seq_len, head_dim)."""

    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        shape = (n_layers, n_slots, n_kv_heads, max_seq_len, head_dim)
        # Zeros, not empty: positions past a sequence's end are masked, but 0 * NaN would still be NaN.
        self.register_buffer("k", _lazy_zeros(shape, dtype, device), persistent=False)
        self.register_buffer("v", _lazy_zeros(shape, dtype, device), persistent=False)

    @classmethod
    def for_model(cls, args, n_slots: int, max_seq_len: int, *, dtype, device) -> "KVCache":
        return cls(args.n_layers, n_slots, max_seq_len, args.n_kv_heads, args.head_dim, dtype=dtype, device=device)

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
        positions [0, step.kv_len) (the whole cache when None), shape (B, Hkv, kv_len, hd).
        """
        bsz = k.shape[0]
        kv_len = step.kv_len or self.max_seq_len
        k_layer, v_layer = self.k[layer], self.v[layer]  # (S, Hkv, L, hd)
        slots = step.slots
        rows = slots if slots is not None else torch.arange(bsz, device=k.device)
        # Advanced indices on dims 0 and 2 put (B, T) first: the target is (B, T, Hkv, hd).
        k_layer[rows[:, None], :, step.positions] = k.transpose(1, 2).to(k_layer.dtype)
        v_layer[rows[:, None], :, step.positions] = v.transpose(1, 2).to(v_layer.dtype)
        if slots is None:
            return k_layer[:bsz, :, :kv_len], v_layer[:bsz, :, :kv_len]
        return k_layer[slots, :, :kv_len], v_layer[slots, :, :kv_len]

    def clear(self, slots: Optional[torch.Tensor] = None) -> None:
        """Zero the given slots (all when None)."""
        if slots is None:
            self.k.zero_()
            self.v.zero_()
        else:
            self.k[:, slots] = 0
            self.v[:, slots] = 0
