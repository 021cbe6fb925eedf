"""THE engine: one thread owns the model and runs a continuous batch over the KV cache's block pool.

Every front end generates through it: `Llama` (llamaforge/api/) for its Python calls and streams, and through
`Llama` the HTTP server, the CLI and spaCy. It imports nothing of HTTP.

Requests (`Job`s) wait in a bounded queue and join the running batch at step boundaries when a slot
(a place in the batch, at most `n_slots` sequences) and KV blocks are free: the cache is a pool of
`kv_blocks` blocks of `chunk` positions, drawn as sequences grow (`generation/scheduler.py` has the policy:
admission with a watermark, preemption of the youngest request when blocks run out, resumed bit for bit;
`generation/blocks.py` the books and the prefix cache). `submit` refuses a job whose `prompt + max_tokens`
does not fit the context or, alone, the pool. Each loop iteration (steps 3 and 4 run in
`generation/batch.py`)
1. applies cancellations (a caller went away: its blocks are free at once);
2. resumes preempted jobs, then admits waiting ones, sharing cached prefix blocks;
3. gives each decoding sequence the block its next position needs (preempting if the pool is short) and
   runs one decode step for all of them together, first: each row names its block table and its own
   position, so sequences of different lengths, sampling settings and ages share one forward, and a running
   answer gets its token every step however long the prompts that arrive;
4. computes prompt chunks in what is left of the step's token budget (`max_num_batched_tokens`, counting the
   decode rows, as vLLM's chunked prefill; at least one chunk), first come first served: the oldest prompt
   is finished before the next one starts, the chunks grouped into forwards so that each prompt's first
   token is sent as soon as its own last chunk is computed, unless sharing a forward costs less waiting
   (`generation/prefill_plan.py`); a job whose prompt is done samples its first tokens; embedding work
   (`generation/embed.py`) takes what is left of the budget (at least one input).
Results go back through each job's `sink` callback (called on the engine thread); nothing a request
does can stop the loop: failures end that request only.

Batching changes speed, never results. A row's numbers must not depend on the other rows, which
matters doubly with llama.cpp-style kernels that quantize activations to int8 (a rounding flip turns a
1e-7 difference into a different token). So:
- prefill runs in canonical chunks: positions [0, C), [C, 2C), ... with C = `chunk`; one forward
  takes a chunk of each of several requests (one row each), and each row is computed as if alone
  (`generation/runner.py` says how), so a chunk's keys are the same whatever else runs;
- a decode step is batch-invariant (`generation/runner.py` says how);
- the prefix cache only holds blocks of whole canonical chunks of earlier prompts (not generated tokens,
  whose keys were computed by decode steps), so a reused prefix holds exactly the values a fresh prefill
  computes; a preempted sequence recomputes its prompt by prefill and its generated tokens by decode steps.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Optional, Sequence

import torch

from llamaforge.errors import ConfigError, GenerationError, LlamaforgeError
from llamaforge.generation.batch import Batch, safe_call
from llamaforge.generation.blocks import BlockPool
from llamaforge.generation.checks import check_job
from llamaforge.generation.embed import EmbedQueue, check_inputs
from llamaforge.generation.jobs import Delta, EngineClosed, Event, Failure, Finish, Job, PromptDone, QueueFull, Sink
from llamaforge.generation.runner import KV_ALIGN, Runner, round_up
from llamaforge.generation.sampler import RowState, make_generator
from llamaforge.generation.scheduler import Active, Scheduler, Seq
from llamaforge.generation.text import TextStream
from llamaforge.model.kv_cache import blocks_for
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
        max_num_batched_tokens: int = 256,
        chunk: int = 64,
        prefix_reuse: bool = True,
        max_embed_inputs: int = 2048,
        decode_step: Optional[DecodeStep] = None,
        adapters: Optional[AdapterTable] = None,
        runner: Optional[Runner] = None,
        kv_blocks: Optional[int] = None,
    ):
        """`n_slots`: sequences decoded together at most; `max_num_batched_tokens`: the tokens of one engine
        step (its decode rows, then prompt tokens; at least one prompt chunk is computed per step);
        `kv_blocks`: the KV pool's blocks of `chunk` positions (default, and at most: enough for every slot at `max_seq_len`, so nothing is preempted);
        `decode_step` runs the decode steps (default: the model's modules; `Llama` passes its own);
        `adapters`: the LoRA adapters a job may name (`Job.adapter`), served in the same batches;
        `runner`: the model calls (default: a `Runner` of those; a tensor-parallel `Llama` passes a
        `generation.mirror.Leader`, which repeats them on every rank)."""
        if chunk < 1 or n_slots < 1:
            raise ConfigError(f"an engine needs chunk >= 1 and n_slots >= 1, got {chunk}, {n_slots}")
        self.runner = runner if runner is not None else Runner(model, device, decode_step, adapters)
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.device = device
        self.max_seq_len = max_seq_len
        self.max_queue = max_queue
        self.chunk = chunk
        self.max_num_batched_tokens = max(max_num_batched_tokens, chunk)
        self.prefix_reuse = prefix_reuse
        self.vocab_size = self.runner.vocab_size
        self.n_slots = n_slots
        most = n_slots * blocks_for(max_seq_len, chunk)  # every slot at full context: more is never used
        kv_blocks = most if kv_blocks is None else min(kv_blocks, most)
        if kv_blocks < blocks_for(max_seq_len, chunk):
            raise ConfigError(f"{kv_blocks} KV blocks of {chunk} positions cannot hold one sequence of max_seq_len "
                              f"{max_seq_len}; give more KV memory or a shorter max_seq_len")
        # A block is a canonical prefill chunk. Positions past max_seq_len are never written; the rounding lets
        # kv_len round up to KV_ALIGN.
        self.cache = self.runner.new_pool(kv_blocks, round_up(max_seq_len, KV_ALIGN), chunk)
        self.pool = BlockPool(kv_blocks, chunk, caching=prefix_reuse)
        self.sched = Scheduler(self.pool, n_slots,
                               lambda src, dst, n: self.runner.copy_block(self.cache, src, dst, n),
                               seq_blocks=blocks_for(max_seq_len, chunk))
        self.batch = Batch(self.runner, self.cache, self.sched, chunk=chunk,
                           max_num_batched_tokens=self.max_num_batched_tokens, max_seq_len=max_seq_len)
        self._lock = threading.Condition()
        self._waiting: deque[tuple[Job, Sink]] = deque()
        self._cancelled: set[int] = set()
        self._embeds = EmbedQueue(max_embed_inputs)
        self._drain: Optional[str] = None  # set by `drain`: fail everything running with this message
        self._embed_credit = 0.0  # seconds embeddings may use while generation runs (= decode time since)
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []  # `call`, run between steps
        self._next_id = 0
        self._closing = False
        self._thread: Optional[threading.Thread] = None

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def steps(self) -> int:
        """Decode steps run so far."""
        return self.batch.steps

    @property
    def generated_tokens(self) -> int:
        return self.batch.generated_tokens

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
        """Raise GenerationError if the job can never run here, whatever else is running (`check_job`, a
        job larger than the whole KV pool, and an adapter this engine does not serve)."""
        check_job(job, self.vocab_size, self.n_slots, self.max_seq_len)
        need = job.n * blocks_for(len(job.prompt) + job.max_tokens, self.chunk)
        if need > self.pool.n_blocks:
            raise GenerationError(f"{len(job.prompt)} prompt tokens + max_tokens {job.max_tokens} for {job.n} "
                                  f"choice(s) need {need} KV blocks of {self.chunk} positions, but the pool holds "
                                  f"{self.pool.n_blocks}; lower max_tokens or n, or give the server more KV memory")
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
        """Occupancy and counters, for /health and /metrics (read from any thread: a snapshot, not a lock)."""
        with self._lock:
            waiting = len(self._waiting)
        sched, pool, s = self.sched, self.pool, self.pool.stats
        return {
            "slots": self.n_slots, "slots_free": self.n_slots - sched.seqs_in_use, "running": len(sched.decoding),
            "prefilling": len(sched.prefilling), "waiting": waiting + len(sched.preempted),
            "max_queue": self.max_queue, "max_num_batched_tokens": self.max_num_batched_tokens,
            "generated_tokens": self.generated_tokens, "decode_steps": self.steps,
            "prompt_tokens": s.prompt_tokens, "prompt_tokens_cached": s.reused_tokens,
            "kv_blocks": pool.n_blocks, "kv_block_size": pool.block_size, "kv_blocks_in_use": pool.n_in_use,
            "kv_blocks_cached": pool.n_cached, "kv_blocks_free": pool.n_free, "kv_block_evictions": s.evictions,
            "preemptions": s.preemptions,
        }

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._closing or self._waiting or self._cancelled or self._embeds or self._calls
                               or self.sched.busy or self.sched.preempted or self._drain_pending()):
                        self._lock.wait()
                    if self._closing:
                        break
                    calls, self._calls = self._calls, []
                    cancelled, self._cancelled = self._cancelled, set()
                    draining = self._drain
                    if cancelled:
                        self._waiting = deque((j, s) for j, s in self._waiting if j.id not in cancelled)
                    resumed, admitted = self._take_admissible() if draining is None else ([], [])
                for fn, fut in calls:
                    _run_call(fn, fut)
                if draining is not None:
                    self.batch.fail_all(503, draining)
                    self._fail_waiting(503, draining)
                    continue
                try:
                    self.batch.cancel(cancelled)
                    for act in resumed:  # prompt logprobs not yet sent need every prompt position again
                        self.sched.start(act, reuse=self.prefix_reuse and (act.prompt_sent or self._reuse(act.job)))
                    for job, sink in admitted:
                        try:
                            self._admit(job, sink)
                        except Exception as exc:  # e.g. a constraint that cannot start: this job only
                            log.exception("admitting a request failed")
                            safe_call(sink, Failure(500, f"could not start the request: {exc}"))
                    left, decode_seconds = self.batch.step()
                    self._embed_credit += EMBED_SHARE * decode_seconds
                    self._embeds_step(left)
                except Exception as exc:  # a bug must not kill the loop: fail what is running, go on
                    log.exception("engine step failed")
                    self.batch.fail_all(500, f"internal error in the engine: {exc}")
        self.batch.fail_all(503, self._drain or "the engine is shutting down")
        self._fail_waiting(503, self._drain or "the engine is shutting down")
        with self._lock:
            calls, self._calls = self._calls, []
        for _fn, fut in calls:
            fut.set_exception(EngineClosed("the engine is shutting down"))

    def _drain_pending(self) -> bool:
        return self._drain is not None and bool(self._waiting or self.sched.busy or self.sched.preempted
                                                or self._embeds)

    def _take_admissible(self) -> tuple[list[Active], list[tuple[Job, Sink]]]:
        """Preempted jobs to resume, then waiting jobs to admit, first come first served, as far as slots and
        blocks go (`Scheduler.fits`; the blocks are taken by `Scheduler.start` right after)."""
        claimed = seqs = 0
        resumed: list[Active] = []
        for act in list(self.sched.preempted):
            n_open = sum(1 for q in act.seqs if not q.done)
            cost = self.sched.fits(act.job, n_open, claimed, seqs)
            if cost is None:
                return resumed, []
            self.sched.preempted.remove(act)
            resumed.append(act)
            claimed, seqs = claimed + cost, seqs + n_open
        out = []
        while self._waiting:
            job, sink = self._waiting[0]
            cost = self.sched.fits(job, job.n, claimed, seqs)
            if cost is None:
                break
            self._waiting.popleft()
            out.append((job, sink))
            claimed, seqs = claimed + cost, seqs + job.n
        return resumed, out

    def _reuse(self, job: Job) -> bool:
        return self.prefix_reuse and job.prompt_logprobs is None  # prompt logprobs need every prompt position

    def _admit(self, job: Job, sink: Sink) -> None:
        rows = []  # made before any block is taken, so a failure here leaks nothing
        for i in range(job.n):
            seed = None if job.seed is None else job.seed + i
            rows.append(RowState(job.params, make_generator(seed, self.device, global_rng=job.global_rng),
                                 self.vocab_size, job.prompt, job.constraint() if job.constraint else None))
        adapter = self._adapter(job)  # it may have been removed since `submit`
        act = Active(job, sink, adapter=adapter)
        for i, row in enumerate(rows):
            text = TextStream(self.tokenizer.stream_decoder(), job.stop) if job.detokenize or job.stop else None
            act.seqs.append(Seq(act, i, row, text))
        act.open_seqs = job.n
        self.sched.start(act, reuse=self._reuse(job))
        self.pool.stats.prompt_tokens += len(job.prompt)
        self.pool.stats.reused_tokens += act.cached

    def _fail_waiting(self, status: int, message: str) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
            self._embeds.fail_all(lambda: EngineClosed(message))
        for job, sink in waiting:
            safe_call(sink, Failure(status, message))

    # -- embeddings -----------------------------------------------------------------------------

    def _embeds_step(self, budget: int) -> None:
        """Embedding chunks: one per loop iteration when nothing else runs; while sequences decode, in what
        is left of this step's prefill budget but no more than EMBED_SHARE of the time the decode steps took
        (a generation then takes at most about 1 + EMBED_SHARE times as long as alone); a chunk that overran
        waits for credit."""
        if not self._embeds:
            return
        generating = self.sched.busy
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


def wait_idle(engine: Engine, timeout: float = 5.0) -> bool:
    """Wait until no request is running or waiting (for tests and shutdown); True if it got idle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = engine.stats()
        if st["running"] == 0 and st["prefilling"] == 0 and st["waiting"] == 0:
            return True
        time.sleep(0.02)
    return False
