"""Every call into the model that generation makes, in one place: prefill, decode, Meta's lock-step, embed.

The engine (`generation/engine.py`) and Meta's loop (`generation/generate.py`) never call the
`Transformer` themselves; they call a `Runner`, so how a step is chosen and what it is given is
read (and changed) here only.

Batch invariance (the engine's promise that a row's numbers do not depend on the other rows):
- `prefill` runs one sequence at a time (batch 1) over positions [start, end), attending over exactly
  the positions up to `end`;
- `decode` attends over `kv_len` rounded up to a multiple of `KV_ALIGN` (64) with PyTorch's math
  attention: past that length more masked positions leave a row's attention bit for bit unchanged,
  and the math kernel computes each row alone (the fused CPU kernel splits work by batch size and
  threads), so a row's result depends neither on the longest row nor on how many rows run.
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llamaforge.model import KVCache, StepInput, Transformer
from llamaforge.runtime import DecodeStep

KV_ALIGN = 64  # decode steps attend over a multiple of this many positions
_MATH_ATTENTION = threading.Lock()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def decode_logits(decode_step: DecodeStep, cache: KVCache, tokens: torch.Tensor, pos: torch.Tensor,
                  slots: torch.Tensor, max_pos: Optional[int] = None) -> torch.Tensor:
    """One decode step, batch-invariant: tokens, pos (B, 1) in slots (B,) -> last logits (B, V).

    `max_pos` is `pos.max()` when the caller knows it (saves a tensor op per step)."""
    max_pos = int(pos.max()) if max_pos is None else max_pos
    kv_len = min(round_up(max_pos + 1, KV_ALIGN), cache.max_seq_len)
    step = StepInput.make(pos, *tokens.shape, device=tokens.device, cache_len=cache.max_seq_len, slots=slots,
                          kv_len=kv_len)
    # sdpa_kernel sets process-wide flags and restores them on exit: one engine at a time, so that two
    # engines' enter/exit never interleave and leave the flags changed.
    with _MATH_ATTENTION, sdpa_kernel(SDPBackend.MATH):
        return decode_step(tokens, step, cache)[:, -1]


class Runner:
    """The model, its device and its decode step, with the few step functions generation uses.

    decode_step: runs the one-token steps (default: the model's modules; `Llama` passes the one
    `llamaforge.runtime.prepare` chose, e.g. the fused C++ step); prefill runs the model's forward.
    """

    def __init__(self, model: Transformer, device: torch.device, decode_step: Optional[DecodeStep] = None):
        self.model = model
        self.device = device
        self.decode_step = decode_step if decode_step is not None else DecodeStep(model)

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    def new_cache(self, n_slots: int, max_seq_len: int) -> KVCache:
        """A zeroed cache of n_slots sequences of max_seq_len positions, in the model's dtype."""
        return KVCache.for_model(self.model.args, n_slots, max_seq_len, dtype=self.model.norm.weight.dtype,
                                 device=self.device)

    def prefill(self, cache: KVCache, tokens: Sequence[int], start: int, slot: int, *,
                all_logits: bool) -> torch.Tensor:
        """Write tokens at positions [start, start + T) of `slot`; logits (T, V), or (1, V) of the last."""
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)  # (1, T)
        end = start + ids.shape[1]
        return self.model(
            ids, torch.arange(start, end, device=self.device), cache,
            slots=torch.tensor([slot], device=self.device), kv_len=end, last_only=not all_logits,
        )[0]

    def decode(self, cache: KVCache, tokens: Sequence[int], pos: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        """One token for each of B sequences (token, position, slot per row) -> last logits (B, V)."""
        t = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        p = torch.tensor(pos, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        s = torch.tensor(slots, dtype=torch.long, device=self.device)  # (B,)
        return decode_logits(self.decode_step, cache, t, p, s, max_pos=max(pos))

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
