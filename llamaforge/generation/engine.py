"""THE engine: one thread owns the model and runs a continuous batch over the KV cache's slots.

Every front end generates through it: `Llama` (llamaforge/api/) for its Python calls and streams, and through
`Llama` the HTTP server, the CLI and spaCy. It imports nothing of HTTP.

Requests (`Job`s) wait in a bounded queue and join the running batch at step boundaries when enough
slots are free (admission control: a slot holds a whole sequence of up to `max_seq_len` positions, and
`submit` refuses a job whose `prompt + max_tokens` does not fit, so an admitted request never runs out
of cache mid-way). Each loop iteration
1. applies cancellations (a caller went away: its slots are free at once);
2. admits waiting jobs, reusing cached prefixes (`generation/slots.py`);
3. computes up to `prefill_budget` prompt tokens of the jobs being prefilled, a chunk of several jobs in one
   forward (as vLLM's chunked prefill), so a long prompt never
   stalls the others for long; a job whose prompt is done samples its first tokens; embedding work
   (`generation/embed.py`) takes what is left of that budget (at least one input);
4. runs one decode step for every running sequence together: each row names its slot and its own
   position, so sequences of different lengths, sampling settings and ages share one forward.
Results go back through each job's `sink` callback (called on the engine thread); nothing a request
does can stop the loop: failures end that request only.

Batching changes speed, never results. A row's numbers must not depend on the other rows, which
matters doubly with llama.cpp-style kernels that quantize activations to int8 (a rounding flip turns a
1e-7 difference into a different token). So:
- prefill runs in canonical chunks: positions [0, C), [C, 2C), ... with C = `chunk`; one forward
  takes a chunk of each of several requests (one row each), and each row is computed as if alone
  (`generation/runner.py` says how), so a chunk's keys are the same whatever else runs;
- a decode step is batch-invariant (`generation/runner.py` says how);
- prefix reuse only takes whole canonical chunks of earlier prompts (not generated tokens, whose keys
  were computed by decode steps), so a reused prefix holds exactly the values a fresh prefill computes.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from llamaforge.errors import GenerationError, LlamaforgeError
from llamaforge.generation.checks import check_job
from llamaforge.generation.embed import EmbedQueue, check_inputs
from llamaforge.generation.jobs import Delta, EngineClosed, Event, Failure, Finish, Job, PromptDone, QueueFull, Sink
from llamaforge.generation.runner import KV_ALIGN, PrefillChunk, Runner, round_up
from llamaforge.generation.sampler import RowState, TokenInfo, choose, logprob_info, make_generator, prompt_logprob_info
from llamaforge.generation.slots import SlotPool
from llamaforge.generation.text import TextStream
from llamaforge.model.transformer import Transformer
from llamaforge.runtime import DecodeStep
from llamaforge.runtime.adapters import AdapterTable, ServedAdapter

log = logging.getLogger("llamaforge.engine")

# While sequences decode, embedding work gets this fraction of the decode steps' time: generation is what a
# user watches token by token, so it keeps at least two thirds of the engine (short answers stay within ~1.5x
# of their solo latency beside a large embedding request; measured by benchmarks/embed_fairness.py).
EMBED_SHARE = 0.5

__all__ = ["Engine", "Job", "Delta", "Finish", "PromptDone", "Failure", "Event", "QueueFull", "EngineClosed",
           "wait_idle"]

# -- the engine's own bookkeeping ---------------------------------------------------------------


@dataclass(eq=False)
class _Seq:
    job: "_Active"
    index: int
    slot: int
    row: RowState
    text: Optional[TextStream]  # None: a token-level caller without stop strings (no text is made)
    pos: int = 0  # positions whose keys/values are in the slot
    last: int = -1  # the token to feed next
    n_gen: int = 0
    done: bool = False


@dataclass(eq=False)
class _Active:
    job: Job
    sink: Sink
    slots: list[int]
    cached: int
    next_pos: int  # next prompt position to compute
    adapter: Optional[ServedAdapter] = None
    seqs: list[_Seq] = field(default_factory=list)
    prompt_infos: list[TokenInfo] = field(default_factory=list)
    open_seqs: int = 0


class Engine:
    """Continuous batching over one model; thread-safe `submit`, `submit_all`, `cancel`, `embed`, `drain`."""

    def __init__(
        self,
        model: Transformer,
        tokenizer,
        *,
        n_slots: int,
        max_seq_len: int,
        device: torch.device,
        max_queue: int = 64,
        prefill_budget: int = 256,
        chunk: int = 64,
        prefix_reuse: bool = True,
        max_embed_inputs: int = 2048,
        decode_step: Optional[DecodeStep] = None,
        adapters: Optional[AdapterTable] = None,
        runner: Optional[Runner] = None,
    ):
        """`decode_step` runs the decode steps (default: the model's modules; `Llama` passes its own);
        `adapters`: the LoRA adapters a job may name (`Job.adapter`), served in the same batches;
        `runner`: the model calls (default: a `Runner` of those; a tensor-parallel `Llama` passes a
        `generation.mirror.Leader`, which repeats them on every rank)."""
        self.runner = runner if runner is not None else Runner(model, device, decode_step, adapters)
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.device = device
        self.max_seq_len = max_seq_len
        self.max_queue = max_queue
        self.chunk = chunk
        self.prefill_budget = max(prefill_budget, chunk)
        self.prefix_reuse = prefix_reuse
        self.vocab_size = self.runner.vocab_size
        # Positions past max_seq_len are never written; they let kv_len round up to KV_ALIGN.
        self.cache = self.runner.new_cache(n_slots, round_up(max_seq_len, KV_ALIGN))
        self.pool = SlotPool(self.cache, granule=chunk,
                             copy=lambda src, dst, n: self.runner.copy_prefix(self.cache, src, dst, n))
        self._lock = threading.Condition()
        self._waiting: deque[tuple[Job, Sink]] = deque()
        self._cancelled: set[int] = set()
        self._embeds = EmbedQueue(max_embed_inputs)
        self._drain: Optional[str] = None  # set by `drain`: fail everything running with this message
        self._embed_credit = 0.0  # seconds embeddings may use while generation runs (= decode time since)
        self._prefilling: list[_Active] = []
        self._decoding: list[_Seq] = []
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []  # `call`, run between steps
        self._next_id = 0
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        self.generated_tokens = 0
        self.steps = 0

    @property
    def n_slots(self) -> int:
        return self.cache.n_slots

    @property
    def closed(self) -> bool:
        return self._closing

    # -- the thread-safe surface ----------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (once; later calls do nothing)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="llamaforge-engine", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop: running and waiting requests end with a 503 Failure; then join the thread."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def check(self, job: Job) -> None:
        """Raise GenerationError if the job can never run here, whatever else is running (`check_job`, and
        an adapter this engine does not serve)."""
        check_job(job, self.vocab_size, self.n_slots, self.max_seq_len)
        self._adapter(job)

    def _adapter(self, job: Job) -> Optional[ServedAdapter]:
        """The served adapter a job names (None for the base model); GenerationError if it is not served."""
        if job.adapter is None:
            return None
        if self.adapters is None:
            raise GenerationError(f"adapter {job.adapter!r} asked for, but this engine serves no LoRA adapters")
        try:
            return self.adapters.get(job.adapter)
        except LlamaforgeError as exc:
            raise GenerationError(str(exc)) from None

    def submit(self, job: Job, sink: Sink) -> int:
        """Queue a job; events go to `sink` on the engine thread. Returns the job id for `cancel`."""
        return self.submit_all([job], [sink])[0]

    def submit_all(self, jobs: Sequence[Job], sinks: Sequence[Sink]) -> list[int]:
        """Queue the jobs of one request together, all or none; returns their ids.

        Raises:
            GenerationError: a job can never run here (`check`), or there are more jobs than the queue
                holds (`max_queue`): neither is helped by retrying.
            QueueFull: the queue has no room for them now; retry later.
            EngineClosed: the engine is shutting down.
        """
        for job in jobs:
            self.check(job)
        if len(jobs) > self.max_queue:
            raise GenerationError(f"{len(jobs)} prompts in one request, but at most {self.max_queue} can wait "
                                  f"for a slot (max_queue); send fewer prompts per request")
        with self._lock:
            if self._closing or self._drain is not None:
                raise EngineClosed("the engine is shutting down")
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for a slot "
                                f"(max_queue {self.max_queue}); retry later")
            ids = []
            for job, sink in zip(jobs, sinks):
                job.id = self._next_id
                self._next_id += 1
                self._waiting.append((job, sink))
                ids.append(job.id)
            self._lock.notify_all()
        return ids

    def cancel(self, job_id: int) -> None:
        """Stop a job (e.g. its client disconnected): its slots are freed at the next step boundary."""
        with self._lock:
            self._cancelled.add(job_id)
            self._lock.notify_all()

    def embed(self, inputs: list[list[int]]) -> concurrent.futures.Future:
        """Mean-pooled, L2-normalised final hidden states, one vector per token list (a Future).

        The work shares the loop's steps with generation; `Future.cancel()` stops it at the next input.

        Raises:
            GenerationError: the inputs can never run here (too many, empty, longer than the context).
            EngineClosed: the engine is shutting down.
        """
        problem = check_inputs(inputs, self._embeds.max_inputs, self.max_seq_len)
        if problem is not None:
            raise GenerationError(problem)
        bad = [t for ids in inputs for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise GenerationError(f"the inputs have token ids outside [0, {self.vocab_size}): {bad[:5]}")
        with self._lock:
            if self._closing or self._drain is not None:
                raise EngineClosed("the engine is shutting down")
            fut = self._embeds.add(inputs)
            self._lock.notify_all()
        return fut

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread between two steps (no step runs meanwhile); a Future of its result.

        For model calls made beside the jobs (Meta's lock-step mode, speculative decoding): on a caller's
        thread their OpenMP work would leave that thread a libgomp pool beside the engine thread's, which
        slows every later step of the engine (benchmarks/RESULTS.md); here they share the engine's.
        From the engine thread itself (a sink) `fn` runs at once. Raises EngineClosed when shutting down.
        """
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if threading.current_thread() is self._thread:
            _run_call(fn, fut)
            return fut
        with self._lock:
            if self._closing or self._drain is not None:
                raise EngineClosed("the engine is shutting down")
            self._calls.append((fn, fut))
            self._lock.notify_all()
        return fut

    def drain(self, message: str = "the server is shutting down") -> None:
        """End every running and waiting request now with a 503 `Failure(message)`; refuse new ones.

        The loop keeps running (so each caller hears of it in order); `close` stops it.
        """
        with self._lock:
            self._drain = message
            self._lock.notify_all()

    def stats(self) -> dict:
        """Occupancy and counters, for /health."""
        with self._lock:
            waiting = len(self._waiting)
        s = self.pool.stats
        return {
            "slots": self.n_slots, "slots_free": self.pool.n_free, "running": len(self._decoding),
            "prefilling": len(self._prefilling), "waiting": waiting, "max_queue": self.max_queue,
            "generated_tokens": self.generated_tokens, "decode_steps": self.steps,
            "prompt_tokens": s.prompt_tokens, "prompt_tokens_cached": s.reused_tokens,
        }

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._closing or self._waiting or self._cancelled or self._embeds or self._calls
                               or self._prefilling or self._decoding or self._drain_pending()):
                        self._lock.wait()
                    if self._closing:
                        break
                    calls, self._calls = self._calls, []
                    cancelled, self._cancelled = self._cancelled, set()
                    draining = self._drain
                    if cancelled:
                        self._waiting = deque((j, s) for j, s in self._waiting if j.id not in cancelled)
                    admitted = self._take_admissible() if draining is None else []
                for fn, fut in calls:
                    _run_call(fn, fut)
                if draining is not None:
                    self._fail_running(503, draining)
                    self._fail_waiting(503, draining)
                    continue
                try:
                    self._cancel_running(cancelled)
                    for job, sink in admitted:
                        try:
                            self._admit(job, sink)
                        except Exception as exc:  # e.g. a constraint that cannot start: this job only
                            log.exception("admitting a request failed")
                            _safe_call(sink, Failure(500, f"could not start the request: {exc}"))
                    self._embeds_step(self._prefill_step())
                    self._decode_step()
                except Exception as exc:  # a bug must not kill the loop: fail what is running, go on
                    log.exception("engine step failed")
                    self._fail_running(500, f"internal error in the engine: {exc}")
        self._fail_running(503, self._drain or "the engine is shutting down")
        self._fail_waiting(503, self._drain or "the engine is shutting down")
        with self._lock:
            calls, self._calls = self._calls, []
        for _fn, fut in calls:
            fut.set_exception(EngineClosed("the engine is shutting down"))

    def _drain_pending(self) -> bool:
        return self._drain is not None and bool(self._waiting or self._prefilling or self._decoding or self._embeds)

    def _take_admissible(self) -> list[tuple[Job, Sink]]:
        out, free = [], self.pool.n_free
        while self._waiting and self._waiting[0][0].n <= free:
            job, sink = self._waiting.popleft()
            free -= job.n
            out.append((job, sink))
        return out

    def _admit(self, job: Job, sink: Sink) -> None:
        rows = []  # made before any slot is taken, so a failure here leaks nothing
        for i in range(job.n):
            seed = None if job.seed is None else job.seed + i
            rows.append(RowState(job.params, make_generator(seed, self.device, global_rng=job.global_rng),
                                 self.vocab_size, job.prompt, job.constraint() if job.constraint else None))
        adapter = self._adapter(job)  # it may have been removed since `submit`
        reuse = self.prefix_reuse and job.prompt_logprobs is None
        slots, cached = self.pool.acquire(job.prompt, job.n, reuse=reuse, owner=adapter.key if adapter else 0)
        act = _Active(job, sink, slots, cached, next_pos=cached, adapter=adapter)
        for i, (slot, row) in enumerate(zip(slots, rows)):
            text = TextStream(self.tokenizer.stream_decoder(), job.stop) if job.detokenize or job.stop else None
            act.seqs.append(_Seq(act, i, slot, row, text))
        act.open_seqs = job.n
        self._prefilling.append(act)

    def _prefill_step(self) -> int:
        """Compute prompt chunks until the step's budget is spent; returns the rest.

        Each forward takes the next canonical chunk of every job being prefilled, first come first
        served, as far as the budget goes (a job's next chunk needs its previous one, so a long prompt
        gives one chunk per forward); what is left of the budget goes to further forwards.
        """
        budget = self.prefill_budget
        while budget > 0 and self._prefilling:
            batch = []
            for act in self._prefilling:
                if budget <= 0:
                    break
                batch.append(act)
                budget -= min(len(act.job.prompt), act.next_pos + self.chunk) - act.next_pos
            self._prefill_chunks(batch)
        return budget

    def _prefill_chunks(self, acts: Sequence[_Active]) -> None:
        """One canonical chunk [start, start + C) of each job (start is a multiple of C), in one forward."""
        chunks = []
        for act in acts:
            end = min(len(act.job.prompt), act.next_pos + self.chunk)
            chunks.append(PrefillChunk(act.job.prompt[act.next_pos:end], act.next_pos, act.slots[0],
                                       all_logits=act.job.prompt_logprobs is not None, adapter=act.adapter))
        try:
            results = self.runner.prefill(self.cache, chunks)  # per job (T or 1, V)
        except Exception as exc:
            log.exception("prefill failed")
            for act in acts:
                self._fail(act, 500, f"prefill failed: {exc}")
            return
        for act, chunk, logits in zip(acts, chunks, results):
            try:
                self._chunk_done(act, chunk, logits)
            except Exception as exc:
                log.exception("prefill failed")
                self._fail(act, 500, f"prefill failed: {exc}")

    def _chunk_done(self, act: _Active, chunk: PrefillChunk, logits: torch.Tensor) -> None:
        job = act.job
        start, end = chunk.start, chunk.start + len(chunk.tokens)
        if end - start == self.chunk:  # only whole chunks are reusable bit for bit
            self.pool.extend(chunk.slot, chunk.tokens)
        act.next_pos = end
        if chunk.all_logits:
            # logits[j] predicts prompt[start + j + 1]; the first prompt token has no logprob.
            infos = prompt_logprob_info(logits, job.prompt[start:end + 1], job.prompt_logprobs)
            act.prompt_infos.extend(infos if start == 0 else infos[1:])
        if end == len(job.prompt):
            self._prompt_done(act, logits[-1:])

    def _prompt_done(self, act: _Active, last_logits: torch.Tensor) -> None:
        """The prompt is in the cache: copy it to the sibling slots and sample every choice's first token."""
        job = act.job
        self._prefilling.remove(act)
        self._send(act, PromptDone(act.cached, act.prompt_infos if job.prompt_logprobs is not None else None))
        for seq in act.seqs:
            if seq.slot != act.slots[0]:
                self.pool.copy_prefix(act.slots[0], seq.slot, len(job.prompt))
            seq.pos = len(job.prompt)
        if job.max_tokens == 0:
            for seq in act.seqs:
                self._finish(seq, "length")
            return
        self._take_tokens(act.seqs, last_logits.expand(len(act.seqs), -1))  # (n, V): every choice starts here

    def _decode_step(self) -> None:
        seqs = [s for s in self._decoding if not s.done]
        if not seqs:
            return
        start = time.perf_counter()
        try:
            logits = self.runner.decode(self.cache, [s.last for s in seqs], [s.pos for s in seqs],
                                        [s.slot for s in seqs], [s.job.adapter for s in seqs])  # (B, V)
            self._embed_credit += EMBED_SHARE * (time.perf_counter() - start)
        except Exception as exc:
            log.exception("decode step failed")
            for act in {id(s.job): s.job for s in seqs}.values():
                self._fail(act, 500, f"decode step failed: {exc}")
            return
        self.steps += 1
        for s in seqs:
            s.pos += 1
        self._take_tokens(seqs, logits)

    def _take_tokens(self, seqs: Sequence[_Seq], logits: torch.Tensor) -> None:
        """Sample one token per sequence from logits (B, V) and send it on."""
        rows = [s.row for s in seqs]
        chosen = choose(logits, rows)
        ok = [i for i, c in enumerate(chosen) if not isinstance(c, Exception)]
        infos = logprob_info(logits, [chosen[i] if i in ok else 0 for i in range(len(seqs))],
                             [seqs[i].job.job.logprobs if i in ok else None for i in range(len(seqs))])
        for i, seq in enumerate(seqs):
            if seq.done:  # its request failed on an earlier row of this batch
                continue
            if isinstance(chosen[i], Exception):
                self._fail(seq.job, 500, f"sampling failed: {chosen[i]}")
                continue
            try:
                self._advance(seq, chosen[i], infos[i])
            except Exception as exc:
                log.exception("advancing a sequence failed")
                self._fail(seq.job, 500, f"internal error: {exc}")

    def _advance(self, seq: _Seq, token: int, info: Optional[TokenInfo]) -> None:
        job = seq.job.job
        seq.n_gen += 1
        self.generated_tokens += 1
        if token in job.stop_ids:
            tail = seq.text.flush() if seq.text is not None else ""
            if tail:
                self._send(seq.job, Delta(seq.index, tail, []))
            self._finish(seq, "stop")
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
        self._send(seq.job, Delta(seq.index, text, [info] if info is not None else [TokenInfo(token)]))
        if seq.done:  # the client is gone
            return
        if reason is not None:
            self._finish(seq, reason)
            return
        seq.last = token
        if seq not in self._decoding:
            self._decoding.append(seq)

    # -- endings --------------------------------------------------------------------------------

    def _finish(self, seq: _Seq, reason: str) -> None:
        if seq.done:
            return
        seq.done = True
        self.pool.release(seq.slot)
        if seq in self._decoding:
            self._decoding.remove(seq)
        seq.job.open_seqs -= 1
        self._send(seq.job, Finish(seq.index, reason, seq.n_gen))

    def _drop(self, act: _Active, *, keep_cache: bool) -> None:
        if act in self._prefilling:
            self._prefilling.remove(act)
            keep_cache = False  # a partly computed prompt is not worth keeping
        for seq in act.seqs:
            if not seq.done:
                seq.done = True
                self.pool.release(seq.slot, keep=keep_cache)
                if seq in self._decoding:
                    self._decoding.remove(seq)
        act.open_seqs = 0

    def _fail(self, act: _Active, status: int, message: str) -> None:
        if act.open_seqs == 0:
            return
        self._drop(act, keep_cache=False)
        self._send(act, Failure(status, message))

    def _cancel_running(self, ids: set[int]) -> None:
        if not ids:
            return
        acts = {id(a): a for a in self._prefilling if a.job.id in ids}
        acts.update({id(s.job): s.job for s in self._decoding if s.job.job.id in ids})
        for act in acts.values():
            self._drop(act, keep_cache=True)

    def _fail_running(self, status: int, message: str) -> None:
        acts = {id(a): a for a in self._prefilling}
        acts.update({id(s.job): s.job for s in self._decoding})
        for act in acts.values():
            self._fail(act, status, message)
        # whatever the bookkeeping says, every slot is free again (their caches are not trusted)
        self._prefilling.clear()
        self._decoding.clear()
        for slot in range(self.n_slots):
            if self.pool.busy[slot]:
                self.pool.release(slot, keep=False)

    def _fail_waiting(self, status: int, message: str) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
            self._embeds.fail_all(lambda: EngineClosed(message))
        for job, sink in waiting:
            _safe_call(sink, Failure(status, message))

    def _send(self, act: _Active, event: Event) -> None:
        if not _safe_call(act.sink, event):
            self._drop(act, keep_cache=True)  # nobody is listening any more

    # -- embeddings -----------------------------------------------------------------------------

    def _embeds_step(self, budget: int) -> None:
        """Embedding chunks: one per loop iteration when nothing else runs; while sequences decode, in what
        is left of this step's prefill budget but no more than EMBED_SHARE of the time the decode steps took
        (a generation then takes at most about 1 + EMBED_SHARE times as long as alone); a chunk that overran
        waits for credit."""
        if not self._embeds:
            return
        generating = bool(self._decoding or self._prefilling)
        if not generating:
            self._embed_credit = 0.0
        elif self._embed_credit <= 0:
            return
        start = time.perf_counter()
        try:  # idle, one chunk per loop iteration: a request that arrives waits for one chunk at most
            self._embeds.run(self.runner, max(budget, 1) if generating else 1, self._embed_credit)
        except Exception:  # a bug in the queue itself: never the loop
            log.exception("embedding step failed")
        if generating:
            self._embed_credit -= time.perf_counter() - start


def _run_call(fn: Callable[[], Any], fut: concurrent.futures.Future) -> None:
    """fn()'s result or exception into `fut` (unless its caller cancelled it)."""
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn())
    except BaseException as exc:  # the caller's to handle, on its own thread
        fut.set_exception(exc)


def _safe_call(sink: Sink, event: Event) -> bool:
    try:
        sink(event)
        return True
    except Exception:  # the receiving side is gone (closed event loop, ...)
        log.debug("dropping an event for a closed request", exc_info=True)
        return False


def wait_idle(engine: Engine, timeout: float = 5.0) -> bool:
    """Wait until no request is running or waiting (for tests and shutdown); True if it got idle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = engine.stats()
        if st["running"] == 0 and st["prefilling"] == 0 and st["waiting"] == 0:
            return True
        time.sleep(0.02)
    return False
