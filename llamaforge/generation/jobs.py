"""What goes into the engine (a `Job`) and what comes out (events), plus its refusals.

The engine calls a job's sink on its own thread with, in order: one `PromptDone` when the prompt is
computed, `Delta`s as each choice produces tokens, and one `Finish` per choice - or a single `Failure`
that ends the job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from llamaforge.errors import GenerationError
from llamaforge.generation.sampler import Constraint, SamplingParams, TokenInfo


class QueueFull(GenerationError):
    """The waiting queue is full for now: retry later (HTTP 429)."""


class EngineClosed(GenerationError):
    """The engine is shutting down or has stopped (HTTP 503)."""


# -- what goes in and what comes out ------------------------------------------------------------


@dataclass
class Job:
    """One request: a prompt and how to continue it, `n` times."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    seed: Optional[int] = None  # choice i uses seed + i
    global_rng: bool = False  # no seed: draw from torch's global generator (Meta's seeding), not fresh entropy
    detokenize: bool = True  # produce text (Delta.text); token-level callers without stop strings skip it
    stop_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()
    logprobs: Optional[int] = None  # None: no logprobs; k: the chosen token's and the top k
    prompt_logprobs: Optional[int] = None  # echo with logprobs: top k for prompt tokens
    constraint: Optional[Callable[[], Constraint]] = None  # a fresh constraint per choice
    adapter: Optional[str] = None  # the name of a LoRA adapter the engine serves (None: the base model)
    id: int = -1


@dataclass
class Delta:
    """New output of choice `index`: text safe to show and the tokens generated (with logprobs)."""

    index: int
    text: str
    tokens: list[TokenInfo]


@dataclass
class Finish:
    """Choice `index` is complete."""

    index: int
    reason: str  # "stop" | "length"
    completion_tokens: int
    stop_id: Optional[int] = None  # the stop id that ended it (generated, counted, never in a Delta)


@dataclass
class PromptDone:
    """The prompt is computed: how many of its tokens came from the cache, and their logprobs if asked."""

    cached_tokens: int
    logprobs: Optional[list[TokenInfo]] = None


@dataclass
class Failure:
    """The request failed; no more events follow."""

    status: int
    message: str


Event = Union[Delta, Finish, PromptDone, Failure]
Sink = Callable[[Event], None]
