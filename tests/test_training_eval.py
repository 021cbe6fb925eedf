"""Sliding-window perplexity: every token scored once, equal to a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llamaforge.errors import ConfigError
from llamaforge.model import ModelArgs, Transformer
from llamaforge.training.eval import perplexity, windows


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=40, multiple_of=32, max_seq_len=32)).eval()


def _ids(n: int) -> list[int]:
    return torch.randint(0, 40, (n,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (101, 16, 5), (33, 8, 7), (7, 16, 3), (50, 10, 1)])
def test_windows_score_every_token_but_the_first_exactly_once(n, window, stride):
    scored = []
    for begin, end, first in windows(n, window, stride):
        assert end - begin <= window and begin < first <= end
        assert first - begin >= min(window - stride, begin) or begin == 0  # at least window - stride of context
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_perplexity_within_one_window_is_the_direct_mean_nll():
    model, ids = _model(), _ids(30)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    nll = float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])))
    result = perplexity(model, ids, window=32)
    assert result.n_tokens == 29 and result.nll == pytest.approx(nll, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)


def test_sliding_window_matches_a_token_by_token_reference():
    model, ids = _model(), _ids(90)
    window, stride = 20, 7
    expected = []
    for t in range(1, len(ids)):
        # the first window that reaches t starts at the largest multiple of stride with begin + window > t
        begin = next(b for b in range(0, len(ids), stride) if b + window > t)
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:t]]))[0, -1]
        expected.append(-float(torch.log_softmax(logits, -1)[ids[t]]))
    for batch_size in (1, 3):
        result = perplexity(model, ids, window=window, stride=stride, batch_size=batch_size)
        assert result.n_tokens == 89
        assert result.nll == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_perplexity_rejects_bad_windows():
    model = _model()
    for kw in (dict(window=64), dict(window=8, stride=8), dict(window=8, stride=0)):
        with pytest.raises(ConfigError):
            perplexity(model, _ids(20), **kw)
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        perplexity(model, [3])
