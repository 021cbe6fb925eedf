"""The engine's view of the KV cache's slot pool: who holds which slot, and what each slot has cached.

Every slot remembers the prompt tokens whose keys and values it holds as whole canonical prefill
chunks (multiples of `granule`; see `generation/engine.py` for why only those), also after its sequence
has finished.
A new request takes the free slot that already holds the longest prefix of its prompt (a shared system
prompt, the earlier turns of a chat), and when another slot - free or still running - holds a longer
one, that prefix is copied into the chosen slot (one tensor copy within the cache), so only the rest of
the prompt is computed. Positions [0, L) of a running slot never change, so copying from it is safe.
Each slot's prefix belongs to the model it was computed with (`owner`: 0 for the base model, a served
LoRA adapter's key otherwise), and is reused only by requests of the same owner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from llamaforge.model.kv_cache import KVCache


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens a and b share."""
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: list slices compare in C.
    step = 64
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def copy_positions(cache: KVCache, src: int, dst: int, length: int) -> None:
    """Copy the keys and values of positions [0, length) from slot src to slot dst of `cache`."""
    # Cache tensors: (n_layers, n_slots, n_kv_heads, max_seq_len, head_dim).
    cache.k[:, dst, :, :length] = cache.k[:, src, :, :length]
    cache.v[:, dst, :, :length] = cache.v[:, src, :, :length]


@dataclass
class PoolStats:
    prompt_tokens: int = 0  # prompt tokens admitted
    reused_tokens: int = 0  # of which came from the cache
    copies: int = 0  # prefix copies between slots


class SlotPool:
    """Assignment of cache slots to sequences, with prefix reuse."""

    def __init__(self, cache: KVCache, granule: int = 1,
                 copy: Optional[Callable[[int, int, int], None]] = None):
        """`copy(src, dst, length)` copies cached positions between slots (default: `copy_positions` on
        `cache`; the engine passes its runner's, which a tensor-parallel leader repeats on every rank)."""
        self.cache = cache
        self._copy = copy if copy is not None else (lambda src, dst, n: copy_positions(cache, src, dst, n))
        self.granule = granule  # reused prefixes are whole multiples of this (canonical prefill chunks)
        self.n_slots = cache.n_slots
        self.cached: list[list[int]] = [[] for _ in range(self.n_slots)]
        self.busy = [False] * self.n_slots
        self.owner = [0] * self.n_slots
        self.last_used = [0] * self.n_slots
        self._clock = 0
        self.stats = PoolStats()

    @property
    def n_free(self) -> int:
        return self.busy.count(False)

    def acquire(self, prompt: Sequence[int], n: int = 1, *, reuse: bool = True, owner: int = 0) -> tuple[list[int], int]:
        """Take n free slots for one prompt, computed by `owner` (0: the base model; else an adapter's key).

        Returns (slots, cached_len): the first slot already holds the keys and values of
        prompt[:cached_len] (cached_len < len(prompt), so the last prompt token is always computed and
        gives the logits of the first new token); the others are for sibling choices (`n`) and get
        the prompt copied in by `copy_prefix` after the prefill.
        """
        free = [i for i in range(self.n_slots) if not self.busy[i]]
        if len(free) < n:
            raise RuntimeError(f"asked for {n} slots with {len(free)} free")  # the engine checks first
        limit = max(0, len(prompt) - 1)
        usable = [self._usable(common_prefix_len(self.cached[i], prompt), limit)
                  if reuse and self.owner[i] == owner else 0 for i in range(self.n_slots)]
        best_free = max(free, key=lambda i: (usable[i], -self.last_used[i]))
        source = max(range(self.n_slots), key=lambda i: usable[i])
        if usable[best_free] > 0 and usable[best_free] >= usable[source]:
            primary, cached_len = best_free, usable[best_free]
        else:
            # Keep the useful caches: take the least recently used free slot, copy the prefix in.
            primary = min(free, key=lambda i: (self.last_used[i], usable[i]))
            cached_len = usable[source]
            if cached_len > 0 and source != primary:
                self.copy_prefix(source, primary, cached_len)
                self.stats.copies += 1
        others = sorted((i for i in free if i != primary), key=lambda i: self.last_used[i])[: n - 1]
        slots = [primary, *others]
        for i in slots:
            self.busy[i] = True
            self.cached[i] = []
            self.owner[i] = owner
        self.cached[primary] = list(prompt[:cached_len])
        self.stats.prompt_tokens += len(prompt)
        self.stats.reused_tokens += cached_len
        return slots, cached_len

    def _usable(self, lcp: int, limit: int) -> int:
        return (min(lcp, limit) // self.granule) * self.granule

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy the keys and values of positions [0, length) from slot src to slot dst."""
        if length <= 0 or src == dst:
            return
        self._copy(src, dst, length)
        self.cached[dst] = list(self.cached[src][:length])
        self.owner[dst] = self.owner[src]

    def extend(self, slot: int, tokens: Sequence[int]) -> None:
        """Record that the keys and values of `tokens` were written after the slot's cached prefix."""
        self.cached[slot].extend(tokens)

    def release(self, slot: int, *, keep: bool = True) -> None:
        """Free a slot; its cached prefix stays reusable unless `keep` is False (e.g. after an error)."""
        self.busy[slot] = False
        self._clock += 1
        self.last_used[slot] = self._clock
        if not keep:
            self.cached[slot] = []
