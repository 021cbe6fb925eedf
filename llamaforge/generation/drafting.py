"""What speculative decoding drafts, and how much of it is worth verifying (generation/speculative.py runs the loop).

- `NgramDrafter` (prompt lookup, as Apoorv Saxena's "prompt lookup decoding", transformers'
  `prompt_lookup_num_tokens`, vLLM's n-gram speculator and llama.cpp's lookup decoding): the tokens that
  followed an earlier occurrence of the context's last tokens: the longest match (extended backwards past
  the n-gram), or, when an edit broke the copy for a token or two, the match nearest to where the copy's
  source now is. An index of every n-gram's occurrences is kept up to date as the context grows, so a
  proposal costs a few dictionary look-ups, not a scan of the context. Its proposal carries the match
  length (in powers of two) as its `last_key`: a 20-token match is continued far more often than a 1-token one.
- `ModelDrafter`: a smaller model with the same vocabulary, run greedily over its own KV cache.
- `DraftPlanner` decides each round's draft length d (0: a plain one-token step), maximising the expected
  tokens per second: E(d) / c(d), with E(d) = 1 + sum_{j <= d} prod_{i <= j} p_i. The costs c(d) are the
  measured seconds of rounds that drafted d tokens (drafting included), medians of the last few, interpolated
  where a length was not tried yet; p_i is the measured chance that the i-th drafted token is accepted
  once the ones before it were, per kind of proposal (`last_key`), from decayed counts shrunk towards those
  of all kinds (which start from a Beta prior).
  A cheap drafter (prompt lookup) proposes every round and its proposals are scored against the output
  as it appears, whether verified or not, so acceptance is known even while drafting is off and it turns
  itself back on when the text starts copying again. A costly drafter (a model) only learns from the
  drafts it verifies, so after its drafts stopped paying it is off for a while (doubling, up to
  `max_backoff` steps), then tried afresh. This is what keeps open-ended text at plain speed: drafting
  that does not pay is not done. Timing only steers speed: the output never depends on it.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Protocol, Sequence

from llamaforge.errors import GenerationError

__all__ = ["Drafter", "NgramDrafter", "ModelDrafter", "DraftPlanner", "check_same_vocabulary"]


class Drafter(Protocol):
    """Proposes up to `k` tokens to follow `context` (the prompt and every token accepted so far).

    Optional attributes: `cheap` (True: proposing costs next to nothing, so the loop asks for the most it
    may verify and the planner trims it), `last_key` (a hashable kind of the last proposal, whose
    acceptance the planner learns apart) and `warm(prompt)` (called once, with the prefill).
    """

    def propose(self, context: Sequence[int], k: int) -> list[int]: ...


class NgramDrafter:
    """Prompt lookup: the tokens that followed an earlier occurrence of the context's last tokens.

    Two candidates, the better one proposed:
    - the longest match: among the latest `candidates` occurrences of the context's last n tokens (the
      longest n from `max_ngram` down to `min_ngram` that occurs), the one whose match, extended backwards,
      is longest (up to `max_match` tokens; ties: the latest);
    - the match near the source: the text being copied continues where the last proposal's source would
      be now (its start advanced by the tokens added since), so the positions within `window` of it whose
      preceding tokens match the context's last ones are candidates too (the longest match, then the
      nearest). An edit (a corrected word, a renamed name) breaks the match for a token or two; a copy
      resumes just after it, where a short match elsewhere in the text would send the proposal astray.
    The near candidate wins unless the longest match is more than `near_bonus` tokens longer. `last_key` is
    the bit length of the chosen match's length (0: no match, 1: one token, 2: 2-3, 3: 4-7, ... 6: 32): a
    long match is continued far more often than a short one, and in a copy run the match grows every
    round, so exact lengths would each be a new kind of proposal with nothing learned about it yet.
    """

    cheap = True

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, *, max_match: int = 32, window: int = 8,
                 near_bonus: int = 2, candidates: int = 16) -> None:
        if not 1 <= min_ngram <= max_ngram <= max_match:
            raise GenerationError(f"need 1 <= min_ngram <= max_ngram <= max_match, got {min_ngram}, {max_ngram}, "
                                  f"{max_match}")
        if window < 0 or near_bonus < 0 or candidates < 1:
            raise GenerationError(f"need window >= 0, near_bonus >= 0 and candidates >= 1, got {window}, "
                                  f"{near_bonus}, {candidates}")
        self.max_ngram, self.min_ngram, self.max_match = max_ngram, min_ngram, max_match
        self.window, self.near_bonus, self.candidates = window, near_bonus, candidates
        self.last_key: Hashable = 0
        self._ctx: list[int] = []
        # _starts[n][gram] = starts of gram's occurrences that have a token after them, oldest first
        self._starts: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(max_ngram + 1)]
        self._source: Optional[int] = None  # where the last proposal copied from, as of `_source_len` tokens
        self._source_len = 0

    def _index(self, context: Sequence[int]) -> list[int]:
        """The context as a list, with the index extended over its new tokens (rebuilt if it is not an extension)."""
        ctx = list(context)
        old = len(self._ctx)
        if len(ctx) < old or ctx[:old] != self._ctx:
            self._starts = [{} for _ in range(self.max_ngram + 1)]
            self._source, old = None, 0
        for i in range(max(old, 1), len(ctx)):  # token i now follows the n-grams that end at i - 1
            for n in range(self.min_ngram, min(self.max_ngram, i) + 1):
                self._starts[n].setdefault(tuple(ctx[i - n : i]), []).append(i - n)
        self._ctx = ctx
        return ctx

    def _match(self, ctx: list[int], end: int) -> int:
        """How many tokens before position `end` equal the context's last ones (at most max_match)."""
        last, m = len(ctx) - 1, 0
        while m < self.max_match and m < end and ctx[end - 1 - m] == ctx[last - m]:
            m += 1
        return m

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        ctx = self._index(context)
        self.last_key = 0
        n_ctx = len(ctx)
        if self._source is not None:  # the tokens added since the last proposal, as if copied from there
            self._source += n_ctx - self._source_len
        self._source_len = n_ctx
        if k <= 0:
            return []
        best: Optional[tuple[int, int]] = None  # (match length, continuation start)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            starts = self._starts[n].get(tuple(ctx[-n:]))
            if starts:
                for s in reversed(starts[-self.candidates :]):  # latest first: a tie keeps the latest
                    m = self._match(ctx, s + n) if n == self.max_ngram else n
                    if best is None or m > best[0]:
                        best = (m, s + n)
                break
        if self._source is not None:
            near: Optional[tuple[int, int, int]] = None  # (match length, -distance, continuation start)
            for end in range(max(1, self._source - self.window), min(n_ctx - 1, self._source + self.window) + 1):
                m = self._match(ctx, end)
                if m >= self.min_ngram and (near is None or (m, -abs(end - self._source)) > near[:2]):
                    near = (m, -abs(end - self._source), end)
            if near is not None and (best is None or near[0] + self.near_bonus >= best[0]):
                best = (near[0], near[2])
        if best is None:
            return []
        self._source = best[1]
        self.last_key = best[0].bit_length()
        return ctx[best[1] : best[1] + k]


class ModelDrafter:
    """A draft model run greedily over its own KV cache (the `Steps` of a smaller model, same vocabulary).

    It remembers which tokens its cache holds; after a rejection it re-feeds only the tokens past the
    common prefix, in one verify call. `warm(prompt)` prefills its cache before the first round, so that
    the prefill is not counted as the cost of a round.
    """

    cheap = False
    last_key: Hashable = None

    def __init__(self, steps) -> None:  # steps: generation.speculative.Steps
        self.steps = steps
        self.known: list[int] = []  # tokens whose keys/values are in the draft cache, positions 0..

    def warm(self, prompt: Sequence[int]) -> None:
        if len(prompt) <= self.steps.max_seq_len:
            self.steps.prefill(prompt)
            self.known = list(prompt)

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        ctx = list(context)
        k = min(k, self.steps.max_seq_len - len(ctx))
        if k <= 0:
            return []
        common = 0
        for a, b in zip(self.known, ctx):
            if a != b:
                break
            common += 1
        common = min(common, len(ctx) - 1)  # re-run at least the last token: its logits are needed
        if common == 0:
            logits = self.steps.prefill(ctx)
        else:
            logits = self.steps.verify(ctx[common:], common)[-1]
        self.known = ctx
        out: list[int] = []
        for _ in range(k):
            tok = int(logits.argmax())
            out.append(tok)
            if len(out) == k:
                break
            logits = self.steps.verify([tok], len(self.known))[-1]
            self.known.append(tok)
        return out


def check_same_vocabulary(target, draft) -> None:
    """Raise GenerationError unless two tokenizers (`llamaforge.Tokenizer`) have the same tokens, id for id:
    a draft model's token ids must mean what the target's mean."""
    if target.n_words != draft.n_words:
        raise GenerationError(f"the draft model's vocabulary ({draft.n_words} tokens) is not the target's "
                              f"({target.n_words}): a draft model must share the tokenizer")
    if target.token_bytes_table() != draft.token_bytes_table():
        first = next(i for i, (a, b) in enumerate(zip(target.token_bytes_table(), draft.token_bytes_table())) if a != b)
        raise GenerationError(f"the draft model's tokenizer differs from the target's (token {first} is "
                              f"{draft.token_bytes(first)!r} there, {target.token_bytes(first)!r} here): a draft "
                              f"model must share the tokenizer")


_ALL = ("every kind of proposal",)  # the key of the pooled counts


@dataclass
class DraftPlanner:
    """Chooses each round's draft length from measured round costs and acceptance (see the module docstring).

    k: most tokens drafted per round. window: a length's cost is the median of its last `window` rounds
    (one slow round, a page fault or another job on the core, does not stop a length for good). prior: Beta prior
    (accepted, rejected) of each draft position's acceptance. decay: weight kept by old acceptance counts
    at each update (recent text counts more). reprobe: a plain step every this many rounds refreshes
    c(0), which grows with the context. backoff, max_backoff: plain steps a costly drafter waits after
    its drafts stopped paying (doubled on each failed try). slope: assumed cost of one more drafted token,
    as a share of c(0), before any drafting was measured. margin: drafting must promise this much more
    than plain steps (estimates from noisy timings should not make open-ended text slower).
    """

    k: int = 7
    window: int = 5
    prior: tuple[float, float] = (2.0, 1.0)
    decay: float = 0.97
    reprobe: int = 64
    backoff: int = 16
    max_backoff: int = 512
    slope: float = 0.1
    margin: float = 0.03
    clock: Callable[[], float] = time.perf_counter
    samples: dict[int, deque] = field(default_factory=dict)  # draft length -> seconds of its last rounds
    cost: dict[int, float] = field(default_factory=dict)  # draft length -> median of its samples
    counts: dict[tuple[Hashable, int], list[float]] = field(default_factory=dict)  # (key, j) -> [accepted, tried]
    since_plain: int = 0
    off_for: int = 0  # plain steps left before a costly drafter is tried again
    wait: int = 0  # the next wait (0: `backoff`)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise GenerationError(f"need k >= 1 drafted tokens per round, got k={self.k}")

    def acceptance(self, key: Hashable, j: int) -> float:
        """Estimated chance that draft token j (1-based) of a `key` proposal is accepted, given j - 1 were: the
        key's counts shrunk towards those of every key at j (themselves under `prior`), so a kind of proposal
        seen for the first time starts from what drafting has been achieving, not from the prior."""
        acc, tried = self.counts.get((_ALL, j), (0.0, 0.0))
        pooled = (acc + self.prior[0]) / (tried + self.prior[0] + self.prior[1])
        if key is _ALL:
            return pooled
        acc, tried = self.counts.get((key, j), (0.0, 0.0))
        weight = self.prior[0] + self.prior[1]
        return (acc + weight * pooled) / (tried + weight)

    def round_cost(self, d: int) -> float:
        """Seconds of a round drafting d tokens: measured, else interpolated between measured lengths (and
        extended at the last measured slope, or `slope` * c(0) per token before any)."""
        if d in self.cost:
            return self.cost[d]
        base = self.cost.get(0, 1.0)
        lower = max((e for e in self.cost if e < d), default=0)
        upper = min((e for e in self.cost if e > d), default=None)
        c_lo = self.cost.get(lower, base)
        if upper is not None:
            return c_lo + (self.cost[upper] - c_lo) * (d - lower) / (upper - lower)
        per = (c_lo - base) / lower if lower > 0 else self.slope * base
        return c_lo + max(per, 0.0) * (d - lower)

    def best_length(self, key: Hashable, available: int) -> int:
        """The draft length in [0, min(k, available)] with the most expected tokens per second."""
        best_rate, best_d = (1.0 + self.margin) / max(self.round_cost(0), 1e-12), 0
        expected, p = 1.0, 1.0
        for d in range(1, min(self.k, available) + 1):
            p *= self.acceptance(key, d)
            expected += p
            rate = expected / max(self.round_cost(d), 1e-12)
            if rate > best_rate:
                best_rate, best_d = rate, d
        return best_d

    def length(self, key: Hashable, available: int, *, learns_unverified: bool) -> int:
        """This round's draft length (0: a plain step). `learns_unverified`: the drafter's proposals are scored
        even when not verified (cheap drafters), so no back-off is needed to find out that drafting pays again."""
        if 0 not in self.cost or self.since_plain >= self.reprobe:
            return 0  # measure (or refresh) what a plain step costs
        if self.off_for > 0:
            self.off_for -= 1
            if self.off_for == 0:  # try afresh: forget what made it stop
                self.counts = {kj: c for kj, c in self.counts.items() if kj[0] != key and kj[0] is not _ALL}
                self.cost = {0: self.cost[0]}
                self.samples = {0: self.samples[0]} if 0 in self.samples else {}
            return 0
        d = self.best_length(key, available)
        if d == 0 and not learns_unverified and available > 0:
            self.off_for = self.wait or self.backoff
            self.wait = min(self.max_backoff, 2 * self.off_for)
        elif d > 0 and not learns_unverified and self._counted(key):
            self.wait = 0  # drafting pays on what it measured: the next stop waits `backoff` again
        return d

    def _counted(self, key: Hashable) -> bool:
        return (key, 1) in self.counts

    def record_round(self, drafted: int, seconds: float) -> None:
        """A round that verified `drafted` tokens (0: a plain step) took `seconds`, drafting included."""
        window = self.samples.setdefault(drafted, deque(maxlen=self.window))
        window.append(seconds)
        self.cost[drafted] = statistics.median(window)
        self.since_plain = 0 if drafted == 0 else self.since_plain + 1

    def record_acceptance(self, key: Hashable, drafted: int, accepted: int) -> None:
        """Of a `key` proposal of `drafted` tokens, the first `accepted` agreed with the target."""
        for j in range(1, drafted + 1):
            for kind in (key, _ALL) if key is not _ALL else (_ALL,):
                c = self.counts.setdefault((kind, j), [0.0, 0.0])
                c[0], c[1] = c[0] * self.decay, c[1] * self.decay + 1.0
                if j <= accepted:
                    c[0] += 1.0
            if j > accepted:
                break

