"""A static-shape key/value cache organised as a pool of blocks of positions.

Keys and values live in blocks of `block_size` positions, (n_layers, n_blocks, n_kv_heads, block_size,
head_dim), as vLLM's paged attention keeps them; a sequence's *block table* lists the blocks holding its
positions [0, block_size), [block_size, 2 block_size), ... So one decode step serves a single prompt, Meta's
ragged batch and a server's continuous batch alike, sequences of any length share one pool, and a block
full of a prompt prefix can sit in the tables of several sequences at once (generation/blocks.py keeps the
pool's books: who holds which block, the prefix cache).

Two ways to make one:
- `KVCache(n_layers, n_slots, max_seq_len, ...)` / `for_model`: a *slot* cache, each of n_slots sequences
  owning the contiguous blocks of max_seq_len positions (`slot_tables`); a step names rows by slot
  (`StepInput.slots`, rows 0..B-1 when None). Meta's lock-step loop, speculative decoding and embeddings use it.
- `KVCache.pool(...)`: n_blocks blocks and no slots; every step passes its rows' block tables
  (`StepInput.blocks`). The engine's.

Where a position's row lives is decided in one place, `locate` (the C++ step mirrors it in qdecode.cpp's
`kv_row`). Generation creates the cache and passes it to `Transformer.forward`; the model never allocates one. Rows are stored in the cache's element
type (`model/kv_types.py`: float32, float16, bfloat16 or q8_0 blocks); `update` converts on store and
returns values in the dtype of the keys it was given.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from llamaforge.errors import ConfigError
from llamaforge.model import kv_types
from llamaforge.model.step import StepInput

BLOCK_SIZE = 64  # positions per block by default: the engine's prefill chunk and the C++ attention tile


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeros; on the CPU from calloc, whose pages the OS maps on first touch, so a cache sized for a whole
    budget takes memory only for the blocks sequences use."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(nbytes + 64, dtype=np.uint8)  # np.zeros is calloc: no pages are written here
    offset = -raw.ctypes.data % 64  # 64-byte aligned, as torch's own allocator
    return torch.from_numpy(raw[offset : offset + nbytes]).view(dtype).view(shape)


def blocks_for(n_positions: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks that hold n_positions positions."""
    return -(-n_positions // block_size)


class KVCache(nn.Module):
    """Keys and values of shape (n_layers, n_blocks, n_kv_heads, block_size, row), one row per position of a
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
        block_size: int = BLOCK_SIZE,
        n_blocks: Optional[int] = None,
        kv_type: Optional[str] = None,
    ):
        """A slot cache of n_slots sequences of max_seq_len positions; with `n_blocks` (and n_slots 0) a pool
        of that many blocks whose sequences are at most max_seq_len long (`KVCache.pool`)."""
        super().__init__()
        if block_size < 1 or max_seq_len < 1:
            raise ConfigError(f"a KV cache needs block_size >= 1 and max_seq_len >= 1, got {block_size}, {max_seq_len}")
        width = blocks_for(max_seq_len, block_size)  # blocks of one sequence's table at most
        if n_blocks is None:
            n_blocks = n_slots * width
            tables = torch.arange(n_blocks, dtype=torch.long, device=device).view(n_slots, width)
        else:
            tables = None
        self.block_size = block_size
        self._max_seq_len = max_seq_len
        self.slot_tables: Optional[torch.Tensor] = tables  # (n_slots, width): slot s owns these blocks
        self.kv_type = kv_types.check_kv_type(kv_type) or kv_types.check_kv_type(dtype, name="dtype")
        self.head_dim = head_dim
        shape = (n_layers, n_blocks, n_kv_heads, block_size, kv_types.row_size(self.kv_type, head_dim))
        storage = kv_types.storage_dtype(self.kv_type)
        # Zeros, not empty: positions past a sequence's end are masked, but 0 * NaN would still be NaN.
        self.register_buffer("k", _lazy_zeros(shape, storage, device), persistent=False)
        self.register_buffer("v", _lazy_zeros(shape, storage, device), persistent=False)
        # A kernel that attends over one layer's blocks in place (`attend`), set by whoever has one (the runtime
        # sets the C++ one on the CPU caches it makes): fn(q (B, T, H, hd) float32, k_layer, v_layer (n_blocks,
        # Hkv, block_size, row), tables (B, W), n (B, T)) -> (B, T, H, hd), position t of row b over its keys
        # [0, n[b, t]). The model itself imports no kernels.
        self.block_attention: Optional[Callable[..., torch.Tensor]] = None

    @classmethod
    def for_model(cls, args, n_slots: int, max_seq_len: int, *, dtype=torch.float32, device,
                  block_size: int = BLOCK_SIZE, kv_type: Optional[str] = None) -> "KVCache":
        """A slot cache for the model `args` describes."""
        return cls(args.n_layers, n_slots, max_seq_len, args.n_kv_heads, args.head_dim, dtype=dtype, device=device,
                   block_size=block_size, kv_type=kv_type)

    @classmethod
    def pool(cls, args, n_blocks: int, max_seq_len: int, *, dtype=torch.float32, device,
             block_size: int = BLOCK_SIZE, kv_type: Optional[str] = None) -> "KVCache":
        """A pool of n_blocks blocks for the model `args` describes; steps pass block tables."""
        if n_blocks < 1:
            raise ConfigError(f"a KV block pool needs at least one block, got {n_blocks}")
        return cls(args.n_layers, 0, max_seq_len, args.n_kv_heads, args.head_dim, dtype=dtype, device=device,
                   block_size=block_size, n_blocks=n_blocks, kv_type=kv_type)

    @staticmethod
    def bytes_per_block(args, kv_type: str, block_size: int = BLOCK_SIZE) -> int:
        """Bytes of keys and values one block takes over all layers, rows in `kv_type` (model/kv_types.py)."""
        return 2 * args.n_layers * args.n_kv_heads * block_size * kv_types.row_bytes(kv_type, args.head_dim)

    @property
    def n_slots(self) -> int:
        return 0 if self.slot_tables is None else self.slot_tables.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        """Positions one sequence may hold."""
        return self._max_seq_len

    def block_tables(self, step: StepInput, bsz: int) -> torch.Tensor:
        """The block table (B, W) of each row of a step: its own, or its slot's."""
        if step.blocks is not None:
            return step.blocks
        if self.slot_tables is None:
            raise ConfigError("a pooled KV cache needs each row's block table (StepInput.blocks)")
        return self.slot_tables[step.slots] if step.slots is not None else self.slot_tables[:bsz]

    def locate(self, tables: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of each position (B, T) of rows with block tables (B, W): where its row lives."""
        return tables.gather(1, positions // self.block_size), positions % self.block_size

    def update(
        self, layer: int, step: StepInput, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, hd) at the step's positions (B, T); return this batch's keys and values.

        Rows write and read through their block tables (`block_tables`). The returned tensors cover
        positions [0, step.kv_len) (max_seq_len when None), gathered from the blocks: (B, Hkv, kv_len, hd), in
        k's dtype (decoded from the cache's element type: what was stored, not what was given).
        """
        bsz, n_kv = k.shape[0], k.shape[1]
        kv_len = step.kv_len or self.max_seq_len
        tables = self._write(layer, step, k, v)
        k_layer, v_layer = self.k[layer], self.v[layer]  # (n_blocks, Hkv, block_size, row)
        n = blocks_for(kv_len, self.block_size)
        if n > tables.shape[1]:
            raise ConfigError(f"kv_len {kv_len} needs {n} blocks per row, but the block tables have {tables.shape[1]}")
        # One gather: index (B, Hkv, n) of (block, head) pairs -> (B, Hkv, n, block_size, row), contiguous.
        rows = tables[:, None, :n]
        heads = torch.arange(n_kv, device=tables.device)[None, :, None]
        keys = k_layer[rows, heads].view(bsz, n_kv, n * self.block_size, -1)[:, :, :kv_len]  # (B, Hkv, kv_len, row)
        values = v_layer[rows, heads].view(bsz, n_kv, n * self.block_size, -1)[:, :, :kv_len]
        return kv_types.decode(keys, self.kv_type, k.dtype), kv_types.decode(values, self.kv_type, v.dtype)

    def _write(self, layer: int, step: StepInput, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (B, Hkv, T, hd) at the step's positions (B, T) of layer `layer`; return the rows' tables."""
        tables = self.block_tables(step, k.shape[0])
        k_layer, v_layer = self.k[layer], self.v[layer]  # (n_blocks, Hkv, block_size, row)
        block, offset = self.locate(tables, step.positions)  # (B, T) each
        # Advanced indices on dims 0 and 2 put (B, T) first: the target is (B, T, Hkv, row).
        k_layer[block, :, offset] = kv_types.encode(k.transpose(1, 2), self.kv_type)
        v_layer[block, :, offset] = kv_types.encode(v.transpose(1, 2), self.kv_type)
        return tables

    def attend(
        self, layer: int, step: StepInput, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """Write k, v (B, Hkv, T, hd) as `update` does and return the attention (B, H, T, hd) of q (B, H, T, hd),
        each query at position p over its row's cached positions [0, min(p + 1, kv_len)), by `block_attention`
        reading the blocks in place (no gathered copy of the keys and values, no mask).

        None, with nothing written, where there is no such kernel or it does not apply: one query (the decode
        step's own attention), no mask (causal from position 0: SDPA's), autograd, or queries that are not
        float32 on the CPU.
        """
        if (self.block_attention is None or q.shape[2] == 1 or step.mask is None or torch.is_grad_enabled()
                or q.dtype != torch.float32 or q.device.type != "cpu"):
            return None
        tables = self._write(layer, step, k, v)
        n = (step.positions + 1).clamp_(max=step.kv_len or self.max_seq_len)  # (B, T) keys each query sees
        out = self.block_attention(q.transpose(1, 2), self.k[layer], self.v[layer], tables, n)  # (B, T, H, hd)
        return out.transpose(1, 2)

    def round_query(self, q: torch.Tensor) -> torch.Tensor:
        """q (..., hd) as attention over this cache's keys uses it (through q8_0 for a q8_0 cache, see kv_types)."""
        return kv_types.round_query(q, self.kv_type)

    def copy_block(self, src: int, dst: int, length: Optional[int] = None) -> None:
        """Copy positions [0, length) (the whole block when None) of block src into block dst."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
