"""Embedding work for the engine: bounded, cancellable, and interleaved with generation.

An embedding request is a list of token lists; its result (one vector per list) is a
`concurrent.futures.Future`. The engine takes work from here one input at a time, at most a token
budget per loop iteration (shared with prompt prefill), between its decode steps, so a request with
hundreds of inputs slows running generations a little instead of stalling them, and a request whose
caller has gone (`Future.cancel()`, which works until the last input is done) stops at the next input.
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence


@dataclass(eq=False)
class EmbedWork:
    inputs: list[list[int]]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    vectors: list[list[float]] = field(default_factory=list)


class EmbedQueue:
    """FIFO of embedding requests; not thread-safe (the engine holds its lock around `add`/`close`)."""

    def __init__(self, max_inputs: int):
        self.max_inputs = max_inputs
        self._work: deque[EmbedWork] = deque()

    def __bool__(self) -> bool:
        return bool(self._work)

    def __len__(self) -> int:
        return len(self._work)

    def add(self, inputs: Sequence[Sequence[int]]) -> concurrent.futures.Future:
        work = EmbedWork([list(x) for x in inputs])
        self._work.append(work)
        return work.future

    def run(self, budget: int, embed: Callable[[list[int]], list[float]]) -> int:
        """Embed inputs, oldest request first, until `budget` tokens are spent (at least one input).

        Returns the tokens used. A failure ends its request only (the future gets the exception).
        """
        used = 0
        while self._work and (used == 0 or used < budget):
            work = self._work[0]
            if work.future.cancelled():
                self._work.popleft()
                continue
            ids = work.inputs[len(work.vectors)]
            try:
                work.vectors.append(embed(ids))
            except Exception as exc:
                self._work.popleft()
                if work.future.set_running_or_notify_cancel():
                    work.future.set_exception(exc)
                continue
            used += len(ids)
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
