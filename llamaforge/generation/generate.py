"""Meta's lock-step mode of generation: the reference semantics of Meta's `Llama.generate`, exactly.

`Llama.generate` runs on the engine (`generation/engine.py`), whose rows equal this loop's greedy
tokens and logprobs; this mode stays for what only lock-step gives: a sampled batch drawn in Meta's
order from one generator ((B, V) per position, teacher-forced rows included), so a seeded batch gives
Meta's very tokens. It uses the engine's sampler (`sample`) and runner and the same output cut.

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

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from llamaforge.generation.checks import check_max_gen_len, check_prompts
from llamaforge.generation.runner import Runner
from llamaforge.generation.sampler import SamplingParams, sample
from llamaforge.model.transformer import Transformer
from llamaforge.runtime import DecodeStep


def meta_cut(tokens: Sequence[int], logprobs: Optional[Sequence[float]], prompt_len: int, max_gen_len: int,
             echo: bool, stop_ids: frozenset[int]) -> tuple[list[int], Optional[list[float]]]:
    """Meta's output of one row: tokens [start : prompt_len + max_gen_len] cut before the first stop id.

    `tokens` (and `logprobs`) hold the prompt then what was generated; start = 0 with echo, else
    prompt_len. With echo the cut looks inside the prompt too, as Meta's does.
    """
    start = 0 if echo else prompt_len
    end = prompt_len + max_gen_len
    toks = list(tokens[start:end])
    cut = next((j for j, t in enumerate(toks) if t in stop_ids), len(toks))
    return toks[:cut], (list(logprobs[start:end][:cut]) if logprobs is not None else None)


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
    """Generate continuations of token-id prompts in lock-step; returns (tokens, logprobs or None) per row.

    Only Meta's sampling settings apply here (temperature, top_p, top_k, min_p): per-sequence state
    (penalties, logit_bias, constraints) is the engine's. `decode_step` runs the one-token steps
    (default: the model's modules; `Llama` passes the one `llamaforge.runtime.prepare` chose).
    """
    prompt_tokens = check_prompts(prompt_tokens, model.args.vocab_size, max_seq_len)
    check_max_gen_len(max_gen_len)
    runner = Runner(model, device, decode_step)
    bsz = len(prompt_tokens)
    min_prompt_len = min(len(p) for p in prompt_tokens)
    max_prompt_len = max(len(p) for p in prompt_tokens)
    total_len = min(max_seq_len, max_gen_len + max_prompt_len)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)

    tokens = torch.zeros((bsz, total_len), dtype=torch.long, device=device)  # right-padded prompts
    prompt_mask = torch.zeros((bsz, total_len), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompt_tokens):
        tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
        prompt_mask[row, : len(prompt)] = True
    token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float32, device=device) if logprobs else None
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    # The buffer of chosen tokens, rebuilt on the host from the steps (one transfer per step).
    rows = [list(p) + [0] * (total_len - len(p)) for p in prompt_tokens]

    with torch.inference_mode():
        if min_prompt_len == total_len:
            # Nothing to generate; Meta's logprobs are shifted by one here, ours are log p(token_j | tokens_<j).
            if logprobs:
                token_logprobs[:, 1:] = _token_logprobs(runner.full_logits(tokens)[:, :-1], tokens[:, 1:])
        else:
            cache = runner.new_cache(bsz, total_len)
            prev_pos = 0
            for cur_pos in range(min_prompt_len, total_len):
                logits = runner.lockstep(cache, tokens[:, prev_pos:cur_pos], prev_pos, last_only=not logprobs)
                next_token = sample(logits[:, -1], params, generator)  # (B,)
                from_prompt = prompt_mask[:, cur_pos]
                next_token = torch.where(from_prompt, tokens[:, cur_pos], next_token)  # teacher forcing
                tokens[:, cur_pos] = next_token
                if logprobs:
                    token_logprobs[:, prev_pos + 1 : cur_pos + 1] = _token_logprobs(
                        logits, tokens[:, prev_pos + 1 : cur_pos + 1])
                finished |= ~from_prompt & torch.isin(next_token, stops)
                for row, token in enumerate(next_token.tolist()):
                    rows[row][cur_pos] = token
                prev_pos = cur_pos
                if bool(finished.all()):
                    break

    stop_set = frozenset(stop_ids)
    all_logprobs = token_logprobs.tolist() if logprobs else [None] * bsz
    out = [meta_cut(rows[i], all_logprobs[i], len(p), max_gen_len, echo, stop_set)
           for i, p in enumerate(prompt_tokens)]
    return [t for t, _ in out], ([lp for _, lp in out] if logprobs else None)
