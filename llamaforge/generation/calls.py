"""Blocking calls on the engine for threads: run jobs to the end, or stream one job's output.

The engine calls a job's sink on its own thread; these helpers hand the events to the calling thread
(the Python API's; the server has its asyncio twin in `server/respond.py`). Leaving early - an
exception, a stream closed before its end - cancels the jobs, which frees their slots at the
engine's next step. A failure becomes a `GenerationError` with the engine's message.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

from llamaforge.errors import GenerationError
from llamaforge.generation.engine import Engine
from llamaforge.generation.jobs import Delta, Failure, Finish, Job, PromptDone, QueueFull
from llamaforge.generation.sampler import TokenInfo


@dataclass
class Choice:
    """One finished choice of a job."""

    tokens: list[TokenInfo] = field(default_factory=list)  # generated (the stop id that ended it excluded)
    text: list[str] = field(default_factory=list)
    finish: Optional[str] = None  # "stop" | "length"


@dataclass
class JobResult:
    choices: list[Choice]
    prompt_logprobs: Optional[list[TokenInfo]] = None
    cached_tokens: int = 0


class _Collector:
    """Gathers the events of several jobs; `done` is set when every choice finished or one job failed."""

    def __init__(self, jobs: Sequence[Job]):
        self.results = [JobResult([Choice() for _ in range(j.n)]) for j in jobs]
        self.open = sum(j.n for j in jobs)
        self.failure: Optional[Failure] = None
        self.done = threading.Event()

    def sink(self, k: int):
        def put(event) -> None:
            res = self.results[k]
            if isinstance(event, Delta):
                res.choices[event.index].tokens.extend(event.tokens)
                res.choices[event.index].text.append(event.text)
            elif isinstance(event, PromptDone):
                res.prompt_logprobs, res.cached_tokens = event.logprobs, event.cached_tokens
            elif isinstance(event, Finish):
                res.choices[event.index].finish = event.reason
                self.open -= 1
                if self.open == 0:
                    self.done.set()
            elif isinstance(event, Failure):
                self.failure = event
                self.done.set()
        return put


def _submit(engine: Engine, jobs: Sequence[Job], sinks) -> list[int]:
    """Submit all jobs, waiting while the queue is full (a Python caller blocks rather than fails)."""
    delay = 0.001
    while True:
        try:
            return engine.submit_all(jobs, sinks)
        except QueueFull:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def run_jobs(engine: Engine, jobs: Sequence[Job]) -> list[JobResult]:
    """Run jobs together on the engine (they share its continuous batch); one JobResult per job."""
    col = _Collector(jobs)
    ids = _submit(engine, jobs, [col.sink(k) for k in range(len(jobs))])
    try:
        col.done.wait()
    finally:
        if col.open > 0:
            for job_id in ids:
                engine.cancel(job_id)
    if col.failure is not None:
        raise GenerationError(col.failure.message)
    return col.results


def stream_job(engine: Engine, job: Job) -> Iterator[Delta]:
    """The Deltas of a one-choice job as they come; closing the iterator early cancels the job."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    job_id = _submit(engine, [job], [events.put])[0]
    finished = False
    try:
        while True:
            event = events.get()
            if isinstance(event, Delta):
                yield event
            elif isinstance(event, Finish):
                finished = True
                return
            elif isinstance(event, Failure):
                finished = True
                raise GenerationError(event.message)
    finally:
        if not finished:
            engine.cancel(job_id)
