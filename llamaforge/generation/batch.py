"""The running batch of the engine: engine steps (decodes first, then prompt chunks), sampling, endings.

`generation/engine.py` owns the thread, the queue and admission; `generation/scheduler.py` decides who
holds which KV blocks; `generation/prefill_plan.py` which prompt chunks a step computes and in which
forwards; this file executes the steps over them. Each engine loop iteration calls `step`: one decode step
(one token for every decoding sequence, each row with its own block table and position), so a running
answer never waits behind a long prompt for more than one step's budget, then the step's prompt chunks in
what is left of the budget, each prompt's first token sent as soon as the forward with its last chunk is
done. Results go back through each request's `sink` callback; nothing a request does can stop the loop: a
failure ends that request only (`fail`).
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import torch

from llamaforge.generation.jobs import Delta, Event, Failure, Finish, PromptDone, Sink
from llamaforge.generation.prefill_plan import allot, fixed_rows, plan
from llamaforge.generation.runner import PrefillChunk, Runner
from llamaforge.generation.sampler import TokenInfo, choose, logprob_info, prompt_logprob_info
from llamaforge.generation.scheduler import Active, Scheduler, Seq
from llamaforge.model.kv_cache import KVCache

log = logging.getLogger("llamaforge.engine")


class Batch:
    """The steps of the requests admitted to the engine (the engine thread's alone)."""

    def __init__(self, runner: Runner, cache: KVCache, sched: Scheduler, *, chunk: int, max_num_batched_tokens: int,
                 max_seq_len: int):
        self.runner = runner
        self.cache = cache
        self.sched = sched
        self.chunk = chunk
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_seq_len = max_seq_len
        self.fixed_rows = fixed_rows(cache.k.device.type)  # a prefill forward's cost beyond its rows (prefill_plan.py)
        self.generated_tokens = 0
        self.steps = 0

    def step(self) -> tuple[int, float]:
        """One engine step: the decode step of every decoding sequence, then prompt chunks in what is left of
        `max_num_batched_tokens` (at least one chunk). Returns (tokens of the budget left, seconds the decode
        step's forward took)."""
        rows, seconds = self.decode_step()
        return self.prefill_step(self.max_num_batched_tokens - rows), seconds

    def prefill_step(self, budget: int) -> int:
        """Compute the prompt chunks `prefill_plan.allot` gives this step's budget, in the forwards
        `prefill_plan.plan` groups them into; returns the budget left."""
        units = allot(self.sched.prefilling, budget, self.chunk)
        if not units:
            return budget
        finishing = {id(u.act) for u in units if u.final}
        others = len(self.sched.decoding) + sum(1 for a in self.sched.prefilling if id(a) not in finishing)
        for forward in plan(units, self.fixed_rows, others):
            # a request may have ended (failed, cancelled by its sink) since the plan was made
            acts = [u.act for u in forward if u.act in self.sched.prefilling and u.act.next_pos == u.start]
            if acts:
                self._prefill_chunks(acts)
        return budget - sum(u.rows for u in units)

    def _prefill_chunks(self, acts: Sequence[Active]) -> None:
        """One canonical chunk [start, start + C) of each job (start is a multiple of C), in one forward."""
        chunks = []
        for act in acts:
            end = min(len(act.job.prompt), act.next_pos + self.chunk)
            all_logits = act.job.prompt_logprobs is not None and not act.prompt_sent
            chunks.append(PrefillChunk(act.job.prompt[act.next_pos:end], act.next_pos,
                                       self.sched.primary(act).blocks, all_logits=all_logits, adapter=act.adapter))
        try:
            results = self.runner.prefill(self.cache, chunks)  # per job (T or 1, V)
        except Exception as exc:
            log.exception("prefill failed")
            for act in acts:
                self.fail(act, 500, f"prefill failed: {exc}")
            return
        for act, chunk, logits in zip(acts, chunks, results):
            try:
                self._chunk_done(act, chunk, logits)
            except Exception as exc:
                log.exception("prefill failed")
                self.fail(act, 500, f"prefill failed: {exc}")

    def _chunk_done(self, act: Active, chunk: PrefillChunk, logits: torch.Tensor) -> None:
        job = act.job
        start, end = chunk.start, chunk.start + len(chunk.tokens)
        self.sched.chunk_written(act, end)  # full blocks of whole chunks join the prefix cache
        act.next_pos = end
        if chunk.all_logits:
            # logits[j] predicts prompt[start + j + 1]; the first prompt token has no logprob.
            infos = prompt_logprob_info(logits, job.prompt[start:end + 1], job.prompt_logprobs)
            act.prompt_infos.extend(infos if start == 0 else infos[1:])
        if end == len(job.prompt):
            self._prompt_done(act, logits[-1:])

    def _prompt_done(self, act: Active, last_logits: torch.Tensor) -> None:
        """The prompt is in the cache: the choices fork from it and sample their first tokens (a resumed job's
        choices instead replay the tokens they had generated)."""
        job = act.job
        self.sched.fork(act)
        if act.prompt_sent:
            self.sched.decoding.extend(self.sched.resume(act))
            return
        act.prompt_sent = True
        self.send(act, PromptDone(act.cached, act.prompt_infos if job.prompt_logprobs is not None else None))
        if job.max_tokens == 0:
            for seq in act.seqs:
                self._finish(seq, "length")
            return
        self.take_tokens(act.seqs, last_logits.expand(len(act.seqs), -1))  # (n, V): every choice starts here

    def decode_step(self) -> tuple[int, float]:
        """One decode step of every decoding sequence; returns (its rows, the seconds its forward took)."""
        self.sched.grow()  # each sequence gets the block of its next position, or the youngest job waits
        seqs = [s for s in self.sched.decoding if not s.done]
        if not seqs:
            return 0, 0.0
        start = time.perf_counter()
        try:
            logits = self.runner.decode(self.cache, [s.last for s in seqs], [s.pos for s in seqs],
                                        [s.blocks for s in seqs], [s.job.adapter for s in seqs])  # (B, V)
        except Exception as exc:
            log.exception("decode step failed")
            for act in {id(s.job): s.job for s in seqs}.values():
                self.fail(act, 500, f"decode step failed: {exc}")
            return len(seqs), 0.0
        seconds = time.perf_counter() - start
        self.steps += 1
        sampled = []
        for i, s in enumerate(seqs):
            s.pos += 1
            if s.replay:  # resuming after a preemption: feed the next token it had generated, drop the logits
                s.last = s.replay.popleft()
            else:
                sampled.append(i)
        n_rows = len(seqs)
        if len(sampled) < len(seqs):
            seqs, logits = [seqs[i] for i in sampled], logits[sampled]
        self.take_tokens(seqs, logits)
        return n_rows, seconds

    def take_tokens(self, seqs: Sequence[Seq], logits: torch.Tensor) -> None:
        """Sample one token per sequence from logits (B, V) and send it on."""
        if not seqs:
            return
        rows = [s.row for s in seqs]
        chosen = choose(logits, rows)
        ok = [i for i, c in enumerate(chosen) if not isinstance(c, Exception)]
        infos = logprob_info(logits, [chosen[i] if i in ok else 0 for i in range(len(seqs))],
                             [seqs[i].job.job.logprobs if i in ok else None for i in range(len(seqs))])
        for i, seq in enumerate(seqs):
            if seq.done:  # its request failed on an earlier row of this batch
                continue
            if isinstance(chosen[i], Exception):
                self.fail(seq.job, 500, f"sampling failed: {chosen[i]}")
                continue
            try:
                self._advance(seq, chosen[i], infos[i])
            except Exception as exc:
                log.exception("advancing a sequence failed")
                self.fail(seq.job, 500, f"internal error: {exc}")

    def _advance(self, seq: Seq, token: int, info: Optional[TokenInfo]) -> None:
        job = seq.job.job
        seq.n_gen += 1
        self.generated_tokens += 1
        if token in job.stop_ids:
            tail = seq.text.flush() if seq.text is not None else ""
            if tail:
                self.send(seq.job, Delta(seq.index, tail, []))
            self._finish(seq, "stop", token)
            return
        seq.row.record(token)
        if seq.row.constraint is not None:
            seq.row.constraint.advance(token)
        text, hit = seq.text.push(token) if seq.text is not None else ("", False)
        reason = None
        if hit or (seq.row.constraint is not None and seq.row.constraint.is_finished()):
            reason = "stop"
        elif seq.n_gen >= job.max_tokens or seq.pos + 1 >= self.max_seq_len:
            reason = "length"
        if reason is not None and not hit and seq.text is not None:
            text += seq.text.flush()
        self.send(seq.job, Delta(seq.index, text, [info] if info is not None else [TokenInfo(token)]))
        if seq.done:  # the client is gone
            return
        if reason is not None:
            self._finish(seq, reason)
            return
        seq.last = token
        seq.tokens.append(token)
        if seq not in self.sched.decoding:
            self.sched.decoding.append(seq)

    # -- endings --------------------------------------------------------------------------------

    def _finish(self, seq: Seq, reason: str, stop_id: Optional[int] = None) -> None:
        if seq.done:
            return
        seq.done = True
        self.sched.release(seq)
        seq.job.open_seqs -= 1
        self.send(seq.job, Finish(seq.index, reason, seq.n_gen, stop_id))

    def drop(self, act: Active, *, keep_cache: bool) -> None:
        """End a request without telling it (cancelled, or its client is gone): its blocks go back."""
        self.sched.drop(act, keep=keep_cache)

    def fail(self, act: Active, status: int, message: str) -> None:
        """End a request with a Failure event (its cached blocks are not trusted)."""
        if act.open_seqs == 0:
            return
        self.drop(act, keep_cache=False)
        self.send(act, Failure(status, message))

    def cancel(self, ids: set[int]) -> None:
        """Drop the running, prefilling and preempted requests with these job ids."""
        if not ids:
            return
        for act in self.sched.running() + self.sched.preempted:
            if act.job.id in ids:
                self.drop(act, keep_cache=True)

    def fail_all(self, status: int, message: str) -> None:
        """Fail every request the batch holds, then free every block."""
        for act in self.sched.running() + self.sched.preempted:
            self.fail(act, status, message)
        # whatever the bookkeeping says, every block is free again (their contents are not trusted)
        self.sched.reset()

    def send(self, act: Active, event: Event) -> None:
        if not safe_call(act.sink, event):
            self.drop(act, keep_cache=True)  # nobody is listening any more



def safe_call(sink: Sink, event: Event) -> bool:
    try:
        sink(event)
        return True
    except Exception:  # the receiving side is gone (closed event loop, ...)
        log.debug("dropping an event for a closed request", exc_info=True)
        return False
