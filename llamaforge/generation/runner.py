"""Every call into the model that generation makes, in one place: prefill, decode, Meta's lock-step, embed.

The engine (`generation/engine.py`) and Meta's loop (`generation/generate.py`) never call the
`Transformer` themselves; they call a `Runner`, so how a step is chosen and what it is given is
read (and changed) here only.

Batch invariance (the engine's promise that a row's numbers do not depend on the other rows):
- `prefill` runs prompt chunks of several sequences in one forward (one row each, right-padded to the
  widest), always this way, also for a single chunk: every query sees exactly its own sequence's keys
  up to its position (an explicit mask), attention reads `kv_len` rounded up to `KV_ALIGN` with the
  math kernel (per row, as in decode), and the padding tokens write keys only past their own row's
  end, in its own current block (a chunk starts at a block boundary and is at most a block long), where
  nothing reads before a later step overwrites them. The linear layers
  see more rows: the x8 integer kernels compute each row alone (exact); float GEMMs, and the "gguf"
  layout's GEMM path from `GEMM_MIN_ROWS` rows on, may differ in the last bits;
- `decode` attends over `kv_len` rounded up to a multiple of `KV_ALIGN` (64) with PyTorch's math
  attention: past that length more masked positions leave a row's attention bit for bit unchanged,
  and the math kernel computes each row alone (the fused CPU kernel splits work by batch size and
  threads), so a row's result depends neither on the longest row nor on how many rows run.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llamaforge.model import KVCache, StepInput, Transformer
from llamaforge.model.kv_cache import blocks_for
from llamaforge.runtime import DecodeStep
from llamaforge.runtime.adapters import AdapterTable, ServedAdapter

KV_ALIGN = 64  # decode steps attend over a multiple of this many positions
_MATH_ATTENTION = threading.Lock()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def block_tables(tables: Sequence[Sequence[int]], width: int, device: torch.device) -> torch.Tensor:
    """Rows' block tables as one (B, width) tensor; entries past a row's own are block 0, never read unmasked."""
    return torch.tensor([list(t[:width]) + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)


def decode_logits(decode_step: DecodeStep, cache: KVCache, tokens: torch.Tensor, pos: torch.Tensor,
                  slots: Optional[torch.Tensor] = None, max_pos: Optional[int] = None,
                  blocks: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """One decode step, batch-invariant: tokens, pos (B, 1) in slots (B,) of a slot cache, or with block
    tables `blocks` (one list per row) of a pooled one -> last logits (B, V).

    `max_pos` is `pos.max()` when the caller knows it (saves a tensor op per step)."""
    max_pos = int(pos.max()) if max_pos is None else max_pos
    kv_len = min(round_up(max_pos + 1, KV_ALIGN), cache.max_seq_len)
    tables = None if blocks is None else block_tables(blocks, blocks_for(kv_len, cache.block_size), tokens.device)
    step = StepInput.make(pos, *tokens.shape, device=tokens.device, cache_len=cache.max_seq_len, slots=slots,
                          kv_len=kv_len, blocks=tables)
    # sdpa_kernel sets process-wide flags and restores them on exit: one engine at a time, so that two
    # engines' enter/exit never interleave and leave the flags changed.
    with _MATH_ATTENTION, sdpa_kernel(SDPBackend.MATH):
        return decode_step(tokens, step, cache)[:, -1]


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens to write at positions [start, start + len(tokens)) of the sequence with block table `blocks`.

    all_logits: return the logits of every token (prompt logprobs), not only of the last.
    adapter: the LoRA adapter of this row (None: the base model).
    """

    tokens: Sequence[int]
    start: int
    blocks: Sequence[int]
    all_logits: bool = False
    adapter: Optional[ServedAdapter] = None


class Runner:
    """The model, its device and its decode step, with the few step functions generation uses.

    decode_step: runs the one-token steps (default: the model's modules; `Llama` passes the one
    `llamaforge.runtime.prepare` chose, e.g. the fused C++ step); prefill runs the model's forward.
    adapters: the LoRA adapters served over the model; rows name theirs. A decode step runs all rows,
    adapted or not, in one call of `decode_step`: the fused C++ step adds each adapted row's deltas itself,
    and where it steps aside the modules' `RowLoRA` do. Where the adapters have C++ tensors (a float32 CPU
    model) every delta is the C++ kernel's, computed token row by token row in a fixed order (kernels/qlora.h),
    so adapted prompt chunks join the batched prefill like any other. Elsewhere (`torch.bmm` deltas) a prompt
    chunk with an adapter is prefilled in a forward of its own: padded to a batch's
    width, its float LoRA matmuls would see more rows and could differ in the last bit, which the int8
    kernels can turn into another token (seen on the default model with 8 adapters in one batch).
    """

    def __init__(self, model: Transformer, device: torch.device, decode_step: Optional[DecodeStep] = None,
                 adapters: Optional[AdapterTable] = None):
        self.model = model
        self.device = device
        self.decode_step = decode_step if decode_step is not None else DecodeStep(model)
        self.adapters = adapters

    def _rows(self, adapters: Sequence[Optional[ServedAdapter]]):
        """The context of one forward whose row i uses adapters[i] (holds the table's lock)."""
        return self.adapters.rows(adapters) if self.adapters is not None else contextlib.nullcontext()

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    def new_cache(self, n_slots: int, max_seq_len: int) -> KVCache:
        """A zeroed slot cache of n_slots sequences of max_seq_len positions, in the decode step's KV element type."""
        return self.decode_step.new_cache(n_slots, max_seq_len)

    def new_pool(self, n_blocks: int, max_seq_len: int, block_size: int) -> KVCache:
        """A zeroed pool of n_blocks blocks of block_size positions for sequences of up to max_seq_len, in the
        decode step's KV element type."""
        return self.decode_step.new_pool(n_blocks, max_seq_len, block_size)

    def prefill(self, cache: KVCache, chunks: Sequence[PrefillChunk]) -> list[torch.Tensor]:
        """Write the chunks of several sequences in one forward; per chunk logits (T, V), or (1, V) of its last.

        Rows whose padding would pass the cache or the rotary tables (a prompt ending at the context's
        end) run in a forward of their own: the results are the same, batch invariance says so. So does
        each chunk with a LoRA adapter that has no C++ tensors (see the class docstring).
        """
        limit = min(cache.max_seq_len, self.model.rope.max_seq_len)
        batchable = [i for i, c in enumerate(chunks) if c.adapter is None or c.adapter.native is not None]
        width = max((len(chunks[i].tokens) for i in batchable), default=0)
        together = {i for i in batchable if chunks[i].start + width <= limit}
        groups = [sorted(together)] if together else []
        groups += [[i] for i in range(len(chunks)) if i not in together]
        out: list[Optional[torch.Tensor]] = [None] * len(chunks)
        for group in groups:
            for i, logits in zip(group, self._prefill_rows(cache, [chunks[i] for i in group])):
                out[i] = logits
        return out  # type: ignore[return-value]

    def _prefill_rows(self, cache: KVCache, chunks: Sequence[PrefillChunk]) -> list[torch.Tensor]:
        lens = [len(c.tokens) for c in chunks]
        width = max(lens)
        ids = torch.zeros(len(chunks), width, dtype=torch.long)  # (B, W), right-padded with token 0
        for i, c in enumerate(chunks):
            ids[i, : lens[i]] = torch.tensor(list(c.tokens), dtype=torch.long)
        starts = torch.tensor([c.start for c in chunks], dtype=torch.long)
        pos = starts[:, None] + torch.arange(width)[None, :]  # (B, W)
        kv_len = min(round_up(int(pos.max()) + 1, KV_ALIGN), cache.max_seq_len)
        ids, pos = ids.to(self.device), pos.to(self.device)
        tables = block_tables([c.blocks for c in chunks], blocks_for(kv_len, cache.block_size), self.device)
        step = StepInput.make(pos, *ids.shape, device=self.device, cache_len=cache.max_seq_len, kv_len=kv_len,
                              blocks=tables)
        # Only the rows' wanted positions go through the last feed-forward and the output layer: per row its
        # chunk's positions or its last one, the shorter lists padded with their last (computed, not used).
        wanted = [list(range(lens[i])) if c.all_logits else [lens[i] - 1] for i, c in enumerate(chunks)]
        n = max(len(w) for w in wanted)
        keep = torch.tensor([w + w[-1:] * (n - len(w)) for w in wanted], dtype=torch.long, device=self.device)
        with self._rows([c.adapter for c in chunks]):
            with _MATH_ATTENTION, sdpa_kernel(SDPBackend.MATH):
                hidden = self.model.hidden_states(ids, step, cache, keep=keep)  # (B, n, dim)
            rows = torch.cat([hidden[i, : len(w)] for i, w in enumerate(wanted)])  # (sum of wanted, dim)
            logits = self.model.output(rows).float()  # (sum of wanted, V)
        return list(torch.split(logits, [len(w) for w in wanted]))

    def decode(self, cache: KVCache, tokens: Sequence[int], pos: Sequence[int], blocks: Sequence[Sequence[int]],
               adapters: Optional[Sequence[Optional[ServedAdapter]]] = None) -> torch.Tensor:
        """One token for each of B sequences (token, position, block table, adapter per row) -> logits (B, V)."""
        t = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        p = torch.tensor(pos, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        with self._rows(adapters or ()):
            return decode_logits(self.decode_step, cache, t, p, max_pos=max(pos), blocks=blocks)

    def copy_block(self, cache: KVCache, src: int, dst: int, length: int) -> None:
        """Copy cached positions [0, length) of block src into block dst."""
        cache.copy_block(src, dst, length)

    def lockstep(self, cache: KVCache, tokens: torch.Tensor, start: int, *, last_only: bool) -> torch.Tensor:
        """Meta's step: every row at positions [start, start + T) of rows 0..B-1 -> logits (B, T or 1, V).

        The prefill (start 0) runs the model's forward; each later one-token step the decode step.
        """
        if start > 0 and tokens.shape[1] == 1:
            step = StepInput.make(start, *tokens.shape, device=tokens.device, cache_len=cache.max_seq_len)
            return self.decode_step(tokens, step, cache)
        return self.model(tokens, start, cache, last_only=last_only)

    def full_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of whole sequences (B, T), without a cache."""
        return self.model(tokens)

    def hidden_sum(self, cache: KVCache, tokens: Sequence[int], start: int) -> torch.Tensor:
        """Sum over positions of the final hidden states of tokens at [start, start + T) of a one-slot
        cache holding the positions before them -> (dim,) float32 (embeddings, a chunk at a time)."""
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)  # (1, T)
        return self.model.hidden_states(ids, start, cache)[0].float().sum(dim=0)
