"""Validation of generation arguments, in one place for the Python API, Meta's loop and the server.

Each check raises `GenerationError` naming the argument, the value it got and what it takes, so a
wrong type (a float seed, a string of stop ids, a None prompt) never reaches torch as a raw
`TypeError`. Sampling values are checked by `SamplingParams` itself (`generation/sampler.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

from llamaforge.errors import GenerationError

if TYPE_CHECKING:
    from llamaforge.generation.jobs import Job


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_prompts(prompt_tokens: Any, vocab_size: int, max_seq_len: int) -> list[list[int]]:
    """The prompts as lists of ints; GenerationError for no/empty prompts, bad ids or prompts that do not fit."""
    if prompt_tokens is None or isinstance(prompt_tokens, (str, bytes)) or not isinstance(prompt_tokens, Sequence):
        raise GenerationError(f"prompt_tokens must be a list of token-id lists, got {type(prompt_tokens).__name__}")
    if len(prompt_tokens) == 0:
        raise GenerationError("no prompts given: pass a list with at least one prompt")
    out = []
    for i, prompt in enumerate(prompt_tokens):
        if prompt is None or isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise GenerationError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} is empty: give at least one token (text prompts get a BOS token)")
        bad = [t for t in prompt if not is_int(t) or not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
        if len(prompt) > max_seq_len:
            raise GenerationError(
                f"prompt {i} has {len(prompt)} tokens but max_seq_len is {max_seq_len}; shorten the prompt "
                f"or build with a larger max_seq_len (prompts are never silently truncated)"
            )
        out.append(list(prompt))
    return out


def check_texts(prompts: Any, name: str = "prompts") -> list[str]:
    """A list of strings (not a bare string, not None)."""
    if isinstance(prompts, str):
        raise GenerationError(f"{name} must be a list of strings; wrap a single prompt as [prompt]")
    if prompts is None or not isinstance(prompts, Sequence):
        raise GenerationError(f"{name} must be a list of strings, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise GenerationError(f"{name}[{i}] must be a string, got {type(p).__name__}")
    return list(prompts)


def check_max_gen_len(max_gen_len: Any) -> int:
    if not is_int(max_gen_len) or max_gen_len < 0:
        raise GenerationError(f"max_gen_len must be an integer >= 0, got {max_gen_len!r}")
    return max_gen_len


def check_seed(seed: Any) -> Optional[int]:
    if seed is not None and not is_int(seed):
        raise GenerationError(f"seed must be an integer or None, got {seed!r}")
    return seed


def check_stop_ids(stop_ids: Any, vocab_size: int) -> Optional[frozenset[int]]:
    """None, or a frozenset of token ids in [0, vocab_size)."""
    if stop_ids is None:
        return None
    if isinstance(stop_ids, (str, bytes)) or not hasattr(stop_ids, "__iter__"):
        raise GenerationError(f"stop_ids must be a list of token ids, got {stop_ids!r}")
    ids = list(stop_ids)
    bad = [t for t in ids if not is_int(t) or not 0 <= t < vocab_size]
    if bad:
        raise GenerationError(f"stop_ids must be token ids in [0, {vocab_size}), got {bad[:5]}")
    return frozenset(ids)


def check_stop(stop: Any, max_strings: int = 16) -> tuple[str, ...]:
    """Stop strings: None, a string or a list of strings (empty ones are dropped)."""
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return ()
    if not isinstance(stops, Sequence) or not all(isinstance(s, str) for s in stops):
        raise GenerationError(f"stop must be a string or a list of strings, got {stop!r}")
    if len(stops) > max_strings:
        raise GenerationError(f"at most {max_strings} stop strings, got {len(stops)}")
    return tuple(s for s in stops if s)


def check_n(n: Any) -> int:
    if not is_int(n) or n < 1:
        raise GenerationError(f"n must be a positive integer (choices per prompt), got {n!r}")
    return n


def check_job(job: "Job", vocab_size: int, n_slots: int, max_seq_len: int) -> None:
    """Raise GenerationError if an engine job can never run (whatever else is running)."""
    if not job.prompt:
        raise GenerationError("the prompt is empty: give at least one token")
    bad = [t for t in job.prompt if not 0 <= t < vocab_size]
    if bad:
        raise GenerationError(f"the prompt has token ids outside [0, {vocab_size}): {bad[:5]}")
    if job.n > n_slots:
        raise GenerationError(f"n={job.n} choices but the engine has {n_slots} slots (max_batch_size)")
    if len(job.prompt) + job.max_tokens > max_seq_len:
        raise GenerationError(f"{len(job.prompt)} prompt tokens + max_tokens {job.max_tokens} do not fit the "
                              f"context of {max_seq_len} tokens")
    bad = [t for t, _ in job.params.logit_bias if t >= vocab_size]
    if bad:
        raise GenerationError(f"logit_bias names token ids outside [0, {vocab_size}): {bad[:5]}")
