"""Choosing the next token from logits, with Meta's semantics.

`temperature == 0` is argmax. Otherwise `softmax(logits / temperature)`, then nucleus (top-p) sampling
exactly as Meta's `sample_top_p`: sort descending, drop every token whose cumulative probability
*before* it exceeds `top_p` (so the token that crosses `top_p` stays), renormalise, and draw with
`torch.multinomial` from the given generator (the global one, seeded by `Llama.build`, when None).
`top_k`, when given, keeps only the k most likely tokens before the softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from llamaforge.errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; validated on construction."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise GenerationError(f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise GenerationError(f"top_k must be a positive integer or None, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Meta's nucleus sampling: probs (B, V) -> token ids (B, 1)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    return sample_top_p(probs, params.top_p, generator).reshape(-1)
