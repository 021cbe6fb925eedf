"""`StepInput`: where the tokens of one forward pass sit, as one typed object.

A forward over tokens (B, T) needs each token's position, where each row's keys live in the cache (its
slot, or its block table), how many cached positions attention reads and which keys each query may see. `StepInput.make` derives all four once from
what a caller knows (an int start as Meta's `start_pos`, or per-row positions as a server's continuous
batch has them); the Transformer, its blocks, attention and the KV cache then receive this one object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class StepInput:
    """The positions of one forward pass of tokens (B, T).

    positions: (B, T) long, the position of each token.
    slots: (B,) long, the KV-cache slot of each row of a slot cache; None means rows 0..B-1.
    blocks: (B, W) long, each row's block table in a pooled cache (entry j: the block of its positions
        [j * block_size, (j + 1) * block_size)); when given, slots are not used.
    kv_len: with a cache, attention reads cached positions [0, kv_len) of each slot; None reads the whole cache.
    mask: (B or 1, 1, T, keys) bool, True where a query may see a key; None means plain causal attention from
        position 0 (T > 1), or one query that sees every key read (T == 1). No mask keeps CPU attention fast.
    """

    positions: torch.Tensor
    slots: Optional[torch.Tensor] = None
    kv_len: Optional[int] = None
    mask: Optional[torch.Tensor] = None
    blocks: Optional[torch.Tensor] = None

    @classmethod
    def make(
        cls,
        input_pos: Union[int, torch.Tensor, None],
        bsz: int,
        seqlen: int,
        *,
        device: torch.device,
        cache_len: Optional[int] = None,
        slots: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
        blocks: Optional[torch.Tensor] = None,
    ) -> "StepInput":
        """The StepInput of tokens (bsz, seqlen) at `input_pos`.

        input_pos: an int `start` (every row at positions start..start+T-1, as Meta's `start_pos`; with a
            cache, attention reads positions [0, start+T)), or a tensor of positions, (B, T) per row or (T,)
            shared, with `kv_len` cached positions read (default: the whole cache); None means 0.
        cache_len: the cache's length when the forward writes and reads a KV cache, None without one.
        """
        if input_pos is None:
            input_pos = 0
        if isinstance(input_pos, int):
            start = input_pos
            positions = torch.arange(start, start + seqlen, device=device).unsqueeze(0).expand(bsz, seqlen)  # (B, T)
            if cache_len is not None:
                kv_len = start + seqlen
            if seqlen == 1 or start == 0:
                return cls(positions, slots, kv_len, None, blocks)
            # keys: the cached positions [0, start+T), or without a cache these tokens' own positions
            key_pos = torch.arange(kv_len, device=device) if cache_len is not None else positions[0]
            mask = key_pos[None, None, None, :] <= positions[:1, None, :, None]  # (1, 1, T, keys)
            return cls(positions, slots, kv_len, mask, blocks)
        # (T,) shared or (1, T) broadcast to every row: (B, T)
        positions = (input_pos.unsqueeze(0) if input_pos.dim() == 1 else input_pos).expand(bsz, seqlen)
        if cache_len is None:  # training, scoring: causal attention within these tokens
            key_pos = positions
        else:  # the first kv_len cached positions of each row's slot
            key_pos = torch.arange(kv_len or cache_len, device=device).unsqueeze(0)  # (1, keys)
        mask = key_pos[:, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, keys)
        return cls(positions, slots, kv_len, mask, blocks)
