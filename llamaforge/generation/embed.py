"""Embedding work for the engine: bounded, cancellable, and interleaved with generation.

An embedding request is a list of token lists; its result (one mean-pooled, L2-normalised vector of
final hidden states per list) is a `concurrent.futures.Future`. The engine computes it a chunk of
`CHUNK` tokens at a time (each input in a small cache of its own, so a long input is split too), as
the engine gives it time: while generation runs, no more than the decode steps took (so a request with
hundreds of inputs makes running generations about twice as slow at most instead of stalling them),
and one chunk per loop iteration otherwise. A request whose caller has gone (`Future.cancel()`,
which works until its last input is done) stops at the next chunk.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from llamaforge.generation.runner import Runner
from llamaforge.model.kv_cache import KVCache

CHUNK = 32  # tokens of one input computed in one piece


@dataclass(eq=False)
class EmbedWork:
    inputs: list[list[int]]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    vectors: list[list[float]] = field(default_factory=list)
    pos: int = 0  # tokens of the current input done
    cache: Optional[KVCache] = None  # the current input's keys and values so far
    total: Optional[torch.Tensor] = None  # (dim,) sum of its final hidden states so far

    def step(self, runner: Runner) -> int:
        """Compute the next chunk of the current input; returns its length."""
        ids = self.inputs[len(self.vectors)]
        if self.cache is None:
            self.cache = runner.new_cache(1, len(ids))
        piece = ids[self.pos : self.pos + CHUNK]
        part = runner.hidden_sum(self.cache, piece, self.pos)
        self.total = part if self.total is None else self.total + part
        self.pos += len(piece)
        if self.pos == len(ids):
            mean = self.total / len(ids)
            self.vectors.append(torch.nn.functional.normalize(mean, dim=0).tolist())
            self.pos, self.cache, self.total = 0, None, None
        return len(piece)


class EmbedQueue:
    """FIFO of embedding requests; not thread-safe (the engine holds its lock around `add`)."""

    def __init__(self, max_inputs: int):
        self.max_inputs = max_inputs
        self._work: deque[EmbedWork] = deque()

    def __bool__(self) -> bool:
        return bool(self._work)

    def add(self, inputs: Sequence[Sequence[int]]) -> concurrent.futures.Future:
        work = EmbedWork([list(x) for x in inputs])
        self._work.append(work)
        return work.future

    def run(self, runner: Runner, budget: int, seconds: float = float("inf")) -> int:
        """Compute chunks, oldest request first, until `budget` tokens or `seconds` are spent (at least
        one chunk). Returns the tokens done. A failure ends its request only."""
        used, deadline = 0, time.perf_counter() + seconds
        while self._work and (used == 0 or (used < budget and time.perf_counter() < deadline)):
            work = self._work[0]
            if work.future.cancelled():
                self._work.popleft()
                continue
            try:
                used += work.step(runner)
            except Exception as exc:
                self._work.popleft()
                if work.future.set_running_or_notify_cancel():
                    work.future.set_exception(exc)
                continue
            if len(work.vectors) == len(work.inputs):
                self._work.popleft()
                if work.future.set_running_or_notify_cancel():
                    work.future.set_result(work.vectors)
        return used

    def fail_all(self, exc_factory: Callable[[], Exception]) -> None:
        while self._work:
            work = self._work.popleft()
            if work.future.set_running_or_notify_cancel():
                work.future.set_exception(exc_factory())


def check_inputs(inputs: Sequence[Sequence[int]], max_inputs: int, max_seq_len: int) -> Optional[str]:
    """Why an embedding request can never run here, or None."""
    if not inputs:
        return "no inputs given"
    if len(inputs) > max_inputs:
        return f"{len(inputs)} inputs given; at most {max_inputs} per request"
    for i, ids in enumerate(inputs):
        if not ids:
            return f"input {i} is empty"
        if len(ids) > max_seq_len:
            return f"input {i} has {len(ids)} tokens but the context is {max_seq_len}; inputs are never truncated"
    return None
