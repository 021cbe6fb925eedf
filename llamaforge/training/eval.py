"""Perplexity of a model on a token sequence, with a sliding window.

A text longer than the model's window cannot be scored in one forward pass. The window of `window`
tokens moves forward `stride` tokens at a time (the method of Hugging Face's "Perplexity of
fixed-length models"): every token except the first is scored exactly once, in the first window
that reaches it, so after the first window each scored token sees at least `window - stride`
tokens of context (stride = window - 1: chunks overlapping by the one token that conditions the
next chunk, fastest, least context; stride = 1: the most context, slowest). The default stride is
window // 2.

    perplexity = exp( (1/N) * sum_t -log p(x_t | x_<t within its window) )

over the N scored tokens, in float32. The first token (BOS when the model uses one) is context only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.errors import ConfigError
from llamaforge.model import KVCache, kv_types


@dataclass
class PerplexityResult:
    """Perplexity and what it was computed over.

    Attributes:
        perplexity: exp(nll).
        nll: mean negative log-likelihood per scored token, in nats.
        n_tokens: tokens scored (all but the first).
        window, stride: the sliding window used.
    """

    perplexity: float
    nll: float
    n_tokens: int
    window: int
    stride: int

    @property
    def bits_per_token(self) -> float:
        return self.nll / math.log(2)


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n tokens; every position >= 1 once."""
    out = []
    prev_end = 0
    begin = 0
    while True:
        end = min(begin + window, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            return out
        begin += stride


@torch.inference_mode()
def perplexity(
    model: nn.Module, token_ids: Sequence[int], *, window: Optional[int] = None, stride: Optional[int] = None,
    batch_size: int = 1, device: Optional[torch.device] = None, progress: bool = False,
    kv_type: Optional[str] = None,
) -> PerplexityResult:
    """Sliding-window perplexity of `model` (a Transformer) on `token_ids` (see the module docstring).

    Args:
        model: a llamaforge Transformer (e.g. `Llama.build(...).model`), any weight format.
        token_ids: the text's ids (with BOS first when the model expects it).
        window: tokens per forward pass (default: min(model context, 1024)).
        stride: tokens the window moves (default window // 2); 1 <= stride < window.
        batch_size: windows per forward pass.
        device: where the model is (default: its first parameter's device).
        progress: show a progress bar.
        kv_type: a KV cache element type ("float16", "q8_0", ...; `llamaforge.model.kv_types`): each window's
            keys and values are stored in a cache of that type and attention reads them back from it, as in
            generation, so the result includes what that type loses. None: the plain forward (a cache of the
            model's own dtype stores the values unchanged and gives the same result).

    Raises:
        ConfigError: fewer than 2 tokens, or a window/stride out of range.
    """
    limit = model.rope.max_seq_len  # positions the model was built for
    window = min(limit, 1024) if window is None else window
    stride = max(1, window // 2) if stride is None else stride
    if window > limit or window < 2:
        raise ConfigError(f"window={window} must be in [2, {limit}] (the positions the model was built for)")
    if not 1 <= stride < window:
        raise ConfigError(f"stride={stride} must be in [1, window - 1 = {window - 1}]: a window's first token "
                          "is context only, so windows must overlap by at least one token")
    if len(token_ids) < 2:
        raise ConfigError(f"perplexity needs at least 2 tokens, got {len(token_ids)}")
    device = device or next(model.parameters()).device
    kv_type = kv_types.check_kv_type(kv_type)
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    spans = windows(len(ids), window, stride)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(spans), unit="window", desc="perplexity")
    i = 0
    while i < len(spans):
        length = spans[i][1] - spans[i][0]
        group = [spans[i]]
        while len(group) < batch_size and i + len(group) < len(spans) and \
                spans[i + len(group)][1] - spans[i + len(group)][0] == length:
            group.append(spans[i + len(group)])
        batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)  # (B, L)
        if kv_type is None:
            logits = model(batch)  # (B, L, V) float32
        else:
            cache = KVCache.for_model(model.args, len(group), length, dtype=model.norm.weight.dtype, device=device,
                                      kv_type=kv_type)
            logits = model(batch, 0, cache)
        for row, (b, e, first) in enumerate(group):
            pred = logits[row, first - b - 1:e - b - 1]  # logits at t-1 predict token t, for t in [first, e)
            target = batch[row, first - b:e - b]
            total += float(F.cross_entropy(pred.float(), target, reduction="sum"))
            count += e - first
        i += len(group)
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    model.train(was_training)
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, window, stride)
