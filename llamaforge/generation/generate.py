"""Token generation with the reference semantics of Meta's `Llama.generate`.

Prompts of different lengths are right-padded into one (bsz, total_len) buffer with
total_len = min(max_seq_len, max_gen_len + max_prompt_len). The first forward covers positions
[0, min_prompt_len) of every row; then one position at a time for all rows, and a row whose prompt
still has a token at that position keeps it (teacher forcing), so every row's result equals its prompt
generated alone. A row is finished when it *generates* a stop id; the loop ends when all rows are
finished or total_len is reached. Each row's output is tokens [start : len(prompt) + max_gen_len]
(start = 0 with echo, else len(prompt)), cut before the first stop id; logprobs are cut alike.

One deliberate difference from Meta: when no token can be generated (min_prompt_len == total_len),
Meta's logprobs are shifted by one position; here logprobs[j] is always log p(token_j | tokens_<j)
(the first token of a row gets 0.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from llamaforge.errors import GenerationError
from llamaforge.generation.sampling import SamplingParams, sample
from llamaforge.model import KVCache, StepInput, Transformer
from llamaforge.runtime import DecodeStep


@dataclass
class Step:
    """One decode position: the token chosen for every row and which rows are now finished."""

    pos: int
    tokens: torch.Tensor  # (B,) token at `pos` (prompt token where the prompt reaches `pos`)
    generated: torch.Tensor  # (B,) bool: the token was generated, not taken from the prompt
    finished: torch.Tensor  # (B,) bool: the row has generated a stop id at or before `pos`


def check_prompts(prompt_tokens: Sequence[Sequence[int]], vocab_size: int, max_seq_len: int) -> None:
    """Raise GenerationError for an empty batch, empty prompts, bad ids or prompts that do not fit."""
    if len(prompt_tokens) == 0:
        raise GenerationError("no prompts given: pass a list with at least one prompt")
    for i, prompt in enumerate(prompt_tokens):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} is empty: give at least one token (text prompts get a BOS token)")
        bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
        if len(prompt) > max_seq_len:
            raise GenerationError(
                f"prompt {i} has {len(prompt)} tokens but max_seq_len is {max_seq_len}; shorten the prompt "
                f"or build with a larger max_seq_len (prompts are never silently truncated)"
            )


def iterate(
    model: Transformer,
    prompt_tokens: Sequence[Sequence[int]],
    *,
    total_len: int,
    params: SamplingParams,
    stop_ids: torch.Tensor,
    device: torch.device,
    generator: Optional[torch.Generator] = None,
    logprobs: Optional[torch.Tensor] = None,
    decode_step: Optional[DecodeStep] = None,
) -> Iterator[Step]:
    """Run Meta's lock-step loop, yielding one Step per position from min_prompt_len on.

    The prompt positions [0, min_prompt_len) go through `model` (prefill); every later position is one
    token per row through `decode_step` (default: the model's modules; `Llama` passes the one
    `llamaforge.runtime.prepare` chose, e.g. the fused C++ step). `logprobs`, when given, is a
    (B, total_len) float32 tensor filled in place with log p(token_j | tokens_<j). The caller owns early
    exit: stop iterating to stop the work.
    """
    decode = decode_step if decode_step is not None else DecodeStep(model)
    bsz = len(prompt_tokens)
    min_prompt_len = min(len(p) for p in prompt_tokens)
    tokens = torch.zeros((bsz, total_len), dtype=torch.long, device=device)
    prompt_mask = torch.zeros((bsz, total_len), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompt_tokens):
        tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
        prompt_mask[row, : len(prompt)] = True
    cache = KVCache.for_model(model.args, bsz, total_len, dtype=model.norm.weight.dtype, device=device)
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    want_logprobs = logprobs is not None

    if min_prompt_len == total_len:
        if want_logprobs:
            logits = model(tokens, 0, cache)
            logprobs[:, 1:] = _token_logprobs(logits[:, :-1], tokens[:, 1:])
        return

    prev_pos = 0
    for cur_pos in range(min_prompt_len, total_len):
        if prev_pos == 0:  # prefill: (B, min_prompt_len) -> logits (B, T or 1, V)
            logits = model(tokens[:, :cur_pos], 0, cache, last_only=not want_logprobs)
        else:  # one token per row: (B, 1) -> (B, 1, V)
            step = StepInput.make(prev_pos, bsz, 1, device=device, cache_len=total_len)
            logits = decode(tokens[:, prev_pos:cur_pos], step, cache)
        next_token = sample(logits[:, -1], params, generator)
        from_prompt = prompt_mask[:, cur_pos]
        next_token = torch.where(from_prompt, tokens[:, cur_pos], next_token)
        tokens[:, cur_pos] = next_token
        if want_logprobs:
            logprobs[:, prev_pos + 1 : cur_pos + 1] = _token_logprobs(logits, tokens[:, prev_pos + 1 : cur_pos + 1])
        finished |= ~from_prompt & torch.isin(next_token, stop_ids)
        yield Step(cur_pos, next_token, ~from_prompt, finished)
        prev_pos = cur_pos


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position: logits (B, T, V), targets (B, T) -> (B, T) float32."""
    return -F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")


def generate(
    model: Transformer,
    prompt_tokens: Sequence[Sequence[int]],
    *,
    max_gen_len: int,
    max_seq_len: int,
    params: SamplingParams,
    stop_ids: Sequence[int],
    device: torch.device,
    logprobs: bool = False,
    echo: bool = False,
    generator: Optional[torch.Generator] = None,
    decode_step: Optional[DecodeStep] = None,
) -> tuple[list[list[int]], Optional[list[list[float]]]]:
    """Generate continuations of token-id prompts; returns (tokens, logprobs or None) per row.

    `decode_step` runs the one-token steps (see `iterate`).
    """
    check_prompts(prompt_tokens, model.args.vocab_size, max_seq_len)
    if not isinstance(max_gen_len, int) or max_gen_len < 0:
        raise GenerationError(f"max_gen_len must be an integer >= 0, got {max_gen_len!r}")
    bsz = len(prompt_tokens)
    max_prompt_len = max(len(p) for p in prompt_tokens)
    total_len = min(max_seq_len, max_gen_len + max_prompt_len)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float32, device=device) if logprobs else None

    # The buffer of chosen tokens, rebuilt on the host from the steps (one transfer per step).
    rows = [list(p) + [0] * (total_len - len(p)) for p in prompt_tokens]
    with torch.inference_mode():
        for step in iterate(
            model, prompt_tokens, total_len=total_len, params=params, stop_ids=stops,
            device=device, generator=generator, logprobs=token_logprobs, decode_step=decode_step,
        ):
            for row, token in enumerate(step.tokens.tolist()):
                rows[row][step.pos] = token
            if bool(step.finished.all()):
                break
    stop_set = set(stop_ids)
    all_logprobs = token_logprobs.tolist() if logprobs else None
    out_tokens, out_logprobs = [], []
    for i, toks in enumerate(rows):
        start = 0 if echo else len(prompt_tokens[i])
        end = len(prompt_tokens[i]) + max_gen_len
        toks = toks[start:end]
        cut = next((j for j, t in enumerate(toks) if t in stop_set), len(toks))
        out_tokens.append(toks[:cut])
        if all_logprobs is not None:
            out_logprobs.append(all_logprobs[i][start:end][:cut])
    return out_tokens, (out_logprobs if logprobs else None)
