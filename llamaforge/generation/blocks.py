"""The books of the KV cache's block pool: which block is free, in use (by how many sequences) or cached.

The engine's KV cache is a pool of blocks of `block_size` positions (model/kv_cache.py); a sequence's
block table lists its blocks. `BlockPool` hands blocks out and takes them back, and keeps a prefix cache
on them, as vLLM's automatic prefix caching does:
- a block full of prompt tokens computed by canonical prefill chunks (see `generation/engine.py` for why
  only those) is registered under the key (its parent block's key, its tokens, its owner), so a key names
  the whole prefix up to the block's end; `owner` is 0 for the base model and a served LoRA adapter's key
  otherwise (a prefix is only valid for the model that computed it);
- `match` walks a new prompt's full blocks from the start and returns the cached blocks of its longest
  cached prefix; the sequence shares them (`share`: one more reference each);
- every block has a reference count; a block no sequence references is *free* (no content worth keeping)
  or *cached* (it holds a registered prefix): cached blocks stay reusable until the pool needs them, then
  the least recently released one is evicted (its key forgotten) and handed out.
So at every moment free + in use + cached == n_blocks (`check` asserts it, the tests call it under churn).
Free blocks are handed out lowest index first, so on the CPU (whose cache pages are mapped on first
touch) the memory taken follows the most blocks ever in use, not the budget.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

ROOT = 0  # the key id of the empty prefix


@dataclass
class PoolStats:
    prompt_tokens: int = 0  # prompt tokens admitted
    reused_tokens: int = 0  # of which came from the prefix cache
    evictions: int = 0  # cached blocks evicted to make room
    preemptions: int = 0  # sequences stopped for lack of blocks (the engine resumes them later)


class BlockPool:
    """Reference-counted blocks with a prefix cache; not thread-safe (the engine thread owns it)."""

    def __init__(self, n_blocks: int, block_size: int, *, caching: bool = True):
        """caching: register full prompt blocks for reuse (False: released blocks are simply free)."""
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs n_blocks >= 1 and block_size >= 1, got {n_blocks}, {block_size}")
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.caching = caching
        self.refs = [0] * n_blocks
        self._free = list(range(n_blocks))  # a heap: lowest index first
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks no one references, oldest first
        self._key: dict[int, tuple[int, tuple[int, ...], int]] = {}  # block -> its prefix key
        self._id: dict[int, int] = {}  # block -> id of the prefix ending at it (the parent of the next)
        self._by_key: dict[tuple[int, tuple[int, ...], int], int] = {}  # prefix key -> block
        self._next_id = ROOT + 1
        self.stats = PoolStats()

    # -- counts ---------------------------------------------------------------------------------

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_cached(self) -> int:
        """Blocks no sequence uses that hold a reusable prefix."""
        return len(self._lru)

    @property
    def n_in_use(self) -> int:
        return self.n_blocks - self.n_free - self.n_cached

    @property
    def available(self) -> int:
        """Blocks `take` can hand out now (free, or cached and evictable)."""
        return self.n_free + self.n_cached

    def check(self) -> None:
        """Raise AssertionError if the books do not balance (for tests)."""
        in_use = sum(1 for r in self.refs if r > 0)
        if min(self.refs) < 0 or in_use + self.n_free + self.n_cached != self.n_blocks:
            raise AssertionError(f"block pool out of balance: {in_use} in use + {self.n_free} free + "
                                 f"{self.n_cached} cached != {self.n_blocks}, min refcount {min(self.refs)}")
        if any(self.refs[b] for b in self._free) or any(self.refs[b] for b in self._lru):
            raise AssertionError("a referenced block is listed as free or cached")
        if set(self._lru) - set(self._key) or set(self._free) & set(self._key):
            raise AssertionError("a cached block has no key, or a free block has one")

    # -- handing out and taking back ------------------------------------------------------------

    def take(self) -> int:
        """A block for one sequence (reference count 1): a free one, else the least recently used cached one.

        Raises RuntimeError when none is available (the engine checks `available` first)."""
        if self._free:
            block = heapq.heappop(self._free)
        elif self._lru:
            block, _ = self._lru.popitem(last=False)
            self._forget(block)
            self.stats.evictions += 1
        else:
            raise RuntimeError("no KV block available")
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more sequence uses a block that holds content (a cached prefix)."""
        if self.refs[block] == 0:
            self._lru.pop(block, None)
        self.refs[block] += 1

    def release(self, blocks: Sequence[int], *, keep: bool = True) -> None:
        """A sequence is done with its blocks: each loses a reference; an unreferenced one becomes cached
        (it holds a registered prefix and `keep`) or free. keep=False forgets their prefixes (after an error)."""
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] < 0:
                raise RuntimeError(f"KV block {block} released more often than taken")
            if self.refs[block] > 0:
                continue
            if not keep:
                self._forget(block)
            if block in self._key:
                self._lru[block] = None  # most recently used last
            else:
                heapq.heappush(self._free, block)

    def reset(self) -> None:
        """Everything free, nothing cached (after an engine failure whose bookkeeping is not trusted)."""
        self.__init__(self.n_blocks, self.block_size, caching=self.caching)

    # -- the prefix cache -----------------------------------------------------------------------

    def match(self, prompt: Sequence[int], owner: int, limit: int) -> list[int]:
        """Cached blocks of prompt's longest cached prefix of whole blocks, at most `limit` positions."""
        if not self.caching:
            return []
        out, parent, bs = [], ROOT, self.block_size
        for end in range(bs, min(limit, len(prompt)) + 1, bs):
            block = self._by_key.get((parent, tuple(prompt[end - bs : end]), owner))
            if block is None:
                break
            out.append(block)
            parent = self._id[block]
        return out

    def register(self, blocks: Sequence[int], prompt: Sequence[int], n_full: int, owner: int) -> None:
        """Record that blocks[:n_full] hold the keys and values of prompt[:n_full * block_size] (computed by
        `owner`), so later prompts can share them. A prefix already cached in another block keeps that one."""
        if not self.caching:
            return
        parent, bs = ROOT, self.block_size
        for j in range(n_full):
            block = blocks[j]
            if block in self._id:  # registered already (shared from the cache, or an earlier call)
                parent = self._id[block]
                continue
            key = (parent, tuple(prompt[j * bs : (j + 1) * bs]), owner)
            other = self._by_key.get(key)
            if other is not None:  # computed twice: the cached copy stays the one found
                parent = self._id[other]
                continue
            self._by_key[key] = block
            self._key[block] = key
            self._id[block] = parent = self._next_id
            self._next_id += 1

    def clear_cache(self) -> None:
        """Forget every cached prefix (referenced blocks keep their contents, unregistered)."""
        for block in list(self._key):
            self._forget(block)
        while self._lru:
            block, _ = self._lru.popitem(last=False)
            heapq.heappush(self._free, block)

    def _forget(self, block: int) -> None:
        key = self._key.pop(block, None)
        if key is not None:
            del self._by_key[key]
            del self._id[block]


def owner_of(adapter) -> int:
    """The prefix-cache owner of a served adapter (None: the base model)."""
    return 0 if adapter is None else adapter.key


__all__ = ["BlockPool", "PoolStats", "owner_of", "ROOT"]
