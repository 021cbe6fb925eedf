"""The engine's scheduling policy over the KV block pool: admission, block growth, preemption, resumption.

`generation/engine.py` runs the steps; this file decides who holds which KV blocks (`generation/blocks.py`
keeps the books). The cache is a pool of blocks of `block_size` positions (= the engine's canonical prefill
chunk), sized by a memory budget, so many short or a few long sequences fit in the same memory:
- **Admission.** A waiting request joins when a slot (a sequence of the batch, at most `n_slots`) is free
  for each of its choices and the pool can give the blocks of its prompt (less the prefix-cache hits) plus,
  for sibling choices, a block each for the prompt's partial last block, with a watermark of 1% of the pool
  left over while others run (as vLLM's), so a new request does not at once push a running one out; none
  when the pool holds every slot at full context (the engine's default), where growth cannot run out.
- **Growth.** A sequence draws a block when its next position starts one (decode steps), never earlier.
- **Preemption by recompute, replayed.** When a decode step needs more blocks than the pool has (free +
  cached), the youngest request (by submission) is preempted: its blocks go back (full prompt blocks stay in
  the prefix cache), and it waits ahead of new requests. When blocks are free again it resumes: its prompt is
  prefilled again in the same canonical chunks (or found in the prefix cache), then each choice's generated
  tokens are fed again through decode steps, one per step (`Seq.replay`), whose logits are dropped. Prefill
  and decode steps are batch-invariant, so the replayed keys and values are bit for bit the ones it had,
  and its greedy (and seeded) answer is the one it gets alone: the client sees only a pause. The oldest
  request is never preempted for a younger one and `Engine.check` refuses a request that could not fit the
  pool alone, so every admitted request completes.
- **Forks.** The choices of one request (`n`) share the prompt's full blocks (reference counts); each
  gets its own copy of the partial last block when the prompt is done.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from llamaforge.generation.blocks import BlockPool, owner_of
from llamaforge.generation.jobs import Job, Sink
from llamaforge.generation.sampler import RowState, TokenInfo
from llamaforge.generation.text import TextStream
from llamaforge.model.kv_cache import blocks_for
from llamaforge.runtime.adapters import ServedAdapter

WATERMARK = 0.01  # of the pool kept free at admission while other requests run


@dataclass(eq=False)
class Seq:
    """One choice of a request: its sampler state and its KV blocks."""

    job: "Active"
    index: int
    row: RowState
    text: Optional[TextStream]  # None: a token-level caller without stop strings (no text is made)
    blocks: list[int] = field(default_factory=list)  # block table: blocks[j] holds positions [j*bs, (j+1)*bs)
    pos: int = 0  # positions whose keys/values are in the blocks
    last: int = -1  # the token to feed next
    n_gen: int = 0
    done: bool = False
    tokens: list[int] = field(default_factory=list)  # generated tokens fed back (replayed after a preemption)
    replay: deque = field(default_factory=deque)  # tokens still to feed again before sampling resumes


@dataclass(eq=False)
class Active:
    """An admitted request (or a preempted one waiting to resume)."""

    job: Job
    sink: Sink
    cached: int = 0  # prompt positions found in the prefix cache at admission
    next_pos: int = 0  # next prompt position to compute
    adapter: Optional[ServedAdapter] = None
    seqs: list[Seq] = field(default_factory=list)
    prompt_infos: list[TokenInfo] = field(default_factory=list)
    open_seqs: int = 0
    prompt_sent: bool = False  # PromptDone went out (a resumed request sends it once only)
    reserved: list[int] = field(default_factory=list)  # siblings' blocks for the partial last prompt block

    @property
    def age(self) -> int:
        return self.job.id

    @property
    def owner(self) -> int:
        return owner_of(self.adapter)


class Scheduler:
    """Who holds which KV blocks; the engine thread's alone."""

    def __init__(self, pool: BlockPool, n_slots: int, copy_block: Callable[[int, int, int], None], seq_blocks: int):
        """copy_block(src, dst, length) copies cached positions [0, length) between blocks (the runner's);
        seq_blocks: the blocks of one sequence at full context. A pool that holds every slot at full context
        can never run out as sequences grow, so it keeps no watermark (it would only keep the last slot idle)."""
        self.pool = pool
        self.n_slots = n_slots
        self.block_size = pool.block_size
        self._copy_block = copy_block
        full = pool.n_blocks >= n_slots * seq_blocks
        self.watermark = 0 if full else max(1, int(pool.n_blocks * WATERMARK))
        self.prefilling: list[Active] = []
        self.decoding: list[Seq] = []
        self.preempted: list[Active] = []  # oldest first; they resume before new requests are admitted

    # -- occupancy ------------------------------------------------------------------------------

    def running(self) -> list[Active]:
        acts = {id(a): a for a in self.prefilling}
        acts.update({id(s.job): s.job for s in self.decoding})
        return list(acts.values())

    @property
    def seqs_in_use(self) -> int:
        return sum(a.open_seqs for a in self.running())

    @property
    def busy(self) -> bool:
        return bool(self.prefilling or self.decoding)

    # -- admission ------------------------------------------------------------------------------

    def cost(self, job: Job, n_open: int) -> int:
        """Blocks `start` takes at most for a request with n_open choices: its prompt's (prefix-cache hits
        take none, or one if they were evictable) and, with a partial last prompt block, one per sibling."""
        p, bs = len(job.prompt), self.block_size
        return blocks_for(p, bs) + (n_open - 1) * (1 if p % bs else 0)

    def fits(self, job: Job, n_open: int, claimed: int, seqs: int) -> Optional[int]:
        """Blocks a request would claim if admitted now, beside `claimed` blocks and `seqs` sequences already
        admitted this step; None if it has to wait."""
        if self.seqs_in_use + seqs + n_open > self.n_slots:
            return None
        cost = self.cost(job, n_open)
        margin = self.watermark if (self.busy or claimed) else 0
        return cost if self.pool.available - claimed - cost >= margin else None

    def start(self, act: Active, reuse: bool) -> None:
        """Give an admitted (or resuming) request its prompt's blocks and put it in the prefill queue."""
        open_seqs = [s for s in act.seqs if not s.done]
        p, bs = len(act.job.prompt), self.block_size
        hits = self.pool.match(act.job.prompt, act.owner, p - 1) if reuse else []  # the last token is computed
        for b in hits:
            self.pool.share(b)
        primary = open_seqs[0]
        primary.blocks = hits + [self.pool.take() for _ in range(blocks_for(p, bs) - len(hits))]
        act.reserved = [self.pool.take() for _ in open_seqs[1:]] if p % bs else []
        act.next_pos = len(hits) * bs
        if not act.prompt_sent:
            act.cached = act.next_pos
        self.prefilling.append(act)

    def chunk_written(self, act: Active, end: int) -> None:
        """Prompt positions [0, end) are in the primary's blocks: register the full ones in the prefix cache."""
        if end % self.block_size == 0:
            self.pool.register(self.primary(act).blocks, act.job.prompt, end // self.block_size, act.owner)

    def primary(self, act: Active) -> Seq:
        return next(s for s in act.seqs if not s.done)

    def fork(self, act: Active) -> None:
        """The prompt is in the primary's blocks: the other choices share its full blocks and copy its partial one."""
        self.prefilling.remove(act)
        p, bs = len(act.job.prompt), self.block_size
        primary = self.primary(act)
        full = primary.blocks[: p // bs]
        siblings = [s for s in act.seqs if not s.done and s is not primary]
        for seq, own in zip(siblings, act.reserved if p % bs else [None] * len(siblings)):
            for b in full:
                self.pool.share(b)
            seq.blocks = list(full)
            if own is not None:
                self._copy_block(primary.blocks[-1], own, p % bs)
                seq.blocks.append(own)
        act.reserved = []
        for seq in act.seqs:
            seq.pos = p

    def resume(self, act: Active) -> list[Seq]:
        """A resumed request's prompt is back: feed each choice's generated tokens again (decode steps)."""
        out = []
        for seq in act.seqs:
            if seq.done:
                continue
            seq.last = seq.tokens[0]
            seq.replay = deque(seq.tokens[1:])
            out.append(seq)
        return out

    # -- growth and preemption ------------------------------------------------------------------

    def grow(self) -> None:
        """Give every decoding sequence the block its next position needs, preempting the youngest requests
        while the pool cannot (never the oldest for a younger one; `Engine.check` makes the oldest fit alone)."""
        bs = self.block_size
        while True:
            needy = [s for s in self.decoding if not s.done and len(s.blocks) * bs <= s.pos]
            if len(needy) <= self.pool.available:
                break
            self.preempt(max(self.running(), key=lambda a: a.age))
        for s in needy:
            s.blocks.append(self.pool.take())

    def preempt(self, act: Active) -> None:
        """Stop a request for lack of blocks: its blocks go back, it waits to resume (`start`, then `resume`)."""
        self.pool.stats.preemptions += 1
        if act in self.prefilling:
            self.prefilling.remove(act)
        for seq in act.seqs:
            if seq in self.decoding:
                self.decoding.remove(seq)
            self.pool.release(seq.blocks)
            seq.blocks = []
            seq.replay.clear()
        self.pool.release(act.reserved)
        act.reserved = []
        if not act.prompt_sent:  # its prompt logprobs are computed again
            act.prompt_infos = []
        self.preempted.append(act)
        self.preempted.sort(key=lambda a: a.age)

    # -- endings --------------------------------------------------------------------------------

    def release(self, seq: Seq, *, keep: bool = True) -> None:
        """A choice is done: its blocks go back (full prompt blocks stay cached unless `keep` is False)."""
        self.pool.release(seq.blocks, keep=keep)
        seq.blocks = []
        if seq in self.decoding:
            self.decoding.remove(seq)

    def drop(self, act: Active, *, keep: bool) -> None:
        """A request ends (cancelled, failed, its client gone): every open choice is done, its blocks back."""
        if act in self.prefilling:
            self.prefilling.remove(act)
        if act in self.preempted:
            self.preempted.remove(act)
        for seq in act.seqs:
            if not seq.done:
                seq.done = True
                self.release(seq, keep=keep)
        self.pool.release(act.reserved, keep=keep)
        act.reserved = []
        act.open_seqs = 0

    def reset(self) -> None:
        """After an engine failure: nothing runs and every block is free (their contents are not trusted)."""
        self.prefilling.clear()
        self.decoding.clear()
        self.preempted.clear()
        self.pool.reset()
