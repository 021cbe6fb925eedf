"""The one sampler: how the next token is chosen from logits, for Meta's loop and the engine alike.

`SamplingParams` is every setting a request can give, validated once on construction (the Python API
and the server both build one, so a bad value is the same clear `GenerationError` everywhere).

Choosing a token from last-position logits (B, V), in this order:
1. `logit_bias` is added (OpenAI: token id -> bias; -100 bans a token, +100 nearly forces it);
2. `repetition_penalty` (CTRL / Hugging Face): over tokens seen in the prompt or the output, a
   positive logit is divided by the penalty, a negative one multiplied;
3. `frequency_penalty` / `presence_penalty` (OpenAI): `logit -= count * frequency + (count > 0) * presence`,
   counting output tokens only;
4. a grammar constraint (structured output) sets disallowed tokens to -inf;
5. `sample`: `temperature == 0` is argmax; otherwise `top_k` on the logits, `softmax(logits / temperature)`,
   `min_p` drops tokens below `min_p * p(best)`, then Meta's `sample_top_p` (the token that crosses
   `top_p` stays; `top_p = 0` keeps only the most likely token) draws with `torch.multinomial`.

Steps 1-4 need per-sequence state (`RowState`); with none of them a row's draw is exactly `sample` on
that row with the same generator, so a seeded request gives the same tokens alone or in any batch.
Logprobs are those of the model's raw distribution (`log_softmax` of the unprocessed logits), as vLLM
reports by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Protocol, Sequence, Union

import torch

from llamaforge.errors import GenerationError


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; validated on construction (Meta's defaults: temperature 0.6, top_p 0.9)."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: Optional[int] = None  # None: all tokens
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # a mapping {token id: bias} is accepted too

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise GenerationError(
                f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 <= self.top_p <= 1:
            raise GenerationError(f"top_p must be a number in [0, 1] (0 keeps only the most likely token), "
                                  f"got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or self.top_k < 1):
            raise GenerationError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise GenerationError(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise GenerationError(f"repetition_penalty must be a number > 0 (1 is off), got {self.repetition_penalty!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise GenerationError(f"{name} must be a number in [-2, 2], got {value!r}")
        bias = self.logit_bias
        if isinstance(bias, Mapping):
            bias = tuple(bias.items())
        try:
            pairs = tuple((k, v) for k, v in bias)
        except (TypeError, ValueError):
            raise GenerationError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}") from None
        for token, value in pairs:
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise GenerationError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if not _is_number(value) or not -100 <= value <= 100:
                raise GenerationError(f"logit_bias values must be numbers in [-100, 100], got {value!r} "
                                      f"for token {token}")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(v)) for t, v in pairs))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def counts_output(self) -> bool:
        """The penalties need the counts of the tokens a sequence has seen."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Meta's nucleus sampling: probs (B, V) -> token ids (B, 1)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B,) from (processed) last-position logits (B, V); the global generator when None."""
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # A temperature past the logits' float range would be inf there, and a masked -inf logit over it NaN.
    temperature = min(params.temperature, torch.finfo(logits.dtype).max)
    scaled = logits / temperature
    if bool(torch.isposinf(scaled).any()):
        # logits / temperature overflowed (a temperature near 0): softmax's limit there, the most likely
        # token(s), computed without infinities. Elsewhere Meta's formula exactly.
        scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    probs = torch.softmax(scaled, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return sample_top_p(probs, params.top_p, generator).reshape(-1)


class Constraint(Protocol):
    """A grammar that limits which tokens may come next (see `generation/grammar.py`)."""

    def allowed(self) -> torch.Tensor:
        """Bool mask (V,) of the tokens allowed next."""

    # Optional: `allows(token) -> bool`, whether one token may come next (greedy rows check the best token first).

    def advance(self, token: int) -> None:
        """Accept the chosen token."""

    def is_finished(self) -> bool:
        """True once the grammar is complete and nothing more may follow."""


@dataclass
class RowState:
    """What the sampler needs to know about one running sequence (generator None: torch's global one)."""

    params: SamplingParams
    generator: Optional[torch.Generator]
    vocab_size: int
    prompt: Sequence[int] = ()
    constraint: Optional[Constraint] = None
    out_counts: Optional[torch.Tensor] = field(default=None, repr=False)  # (V,) float32
    seen: Optional[torch.Tensor] = field(default=None, repr=False)  # (V,) bool: in prompt or output

    def __post_init__(self) -> None:
        if self.params.counts_output:
            self.out_counts = torch.zeros(self.vocab_size, dtype=torch.float32)
            self.seen = torch.zeros(self.vocab_size, dtype=torch.bool)
            if len(self.prompt):
                self.seen[torch.tensor(list(self.prompt), dtype=torch.long)] = True

    @property
    def needs_processing(self) -> bool:
        return bool(self.params.logit_bias) or self.out_counts is not None or self.constraint is not None

    @property
    def greedy_constrained(self) -> bool:
        """Greedy with a constraint that can check one token, and nothing else to apply: the model's best token,
        if the constraint allows it, is the masked argmax (ties too: argmax takes the first best)."""
        return (self.params.greedy and self.constraint is not None and hasattr(self.constraint, "allows")
                and not self.params.logit_bias and self.out_counts is None)

    def record(self, token: int) -> None:
        """Note an output token (for the penalties)."""
        if self.out_counts is not None:
            self.out_counts[token] += 1
            self.seen[token] = True


@dataclass
class TokenInfo:
    """A chosen token with its log-probability and the most likely alternatives."""

    id: int
    logprob: Optional[float] = None
    top: list[tuple[int, float]] = field(default_factory=list)


def process_row(logits: torch.Tensor, row: RowState) -> torch.Tensor:
    """Apply bias, penalties and constraint to one row of logits (V,), returning a new tensor."""
    p = row.params
    out = logits.clone()
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=out.device)
        vals = torch.tensor([b for _, b in p.logit_bias], dtype=out.dtype, device=out.device)
        out.index_add_(0, ids, vals)
    if row.out_counts is not None:
        counts = row.out_counts.to(out.device)
        if p.repetition_penalty != 1:
            seen = row.seen.to(out.device)
            penalised = torch.where(out > 0, out / p.repetition_penalty, out * p.repetition_penalty)
            # a penalty near 0 overflows: the largest finite logit instead, so softmax stays defined
            big = torch.finfo(out.dtype).max
            out = torch.where(seen, penalised.clamp(-big, big), out)
        if p.frequency_penalty or p.presence_penalty:
            out = out - counts * p.frequency_penalty - (counts > 0).to(out.dtype) * p.presence_penalty
    if row.constraint is not None:
        allowed = row.constraint.allowed().to(out.device)
        out = out.masked_fill(~allowed, float("-inf"))
    return out


def choose(logits: torch.Tensor, rows: Sequence[RowState]) -> list[Union[int, Exception]]:
    """Next token per row from last-position logits (B, V), each row with its own settings and generator.

    A row that cannot be sampled (e.g. a constraint that allows nothing) gets its exception in place of
    a token, so one row's failure does not touch the others.
    """
    greedy_plain = [i for i, r in enumerate(rows) if r.params.greedy and not r.needs_processing]
    checked = [i for i, r in enumerate(rows) if r.greedy_constrained]
    out: list[Union[int, Exception]] = [0] * len(rows)
    done = set()
    if greedy_plain or checked:
        # One batched argmax for the common case (no host round trip per row). Over all rows when all are
        # greedy: indexing a (B, V) tensor costs more than the argmax itself.
        greedy = sorted(greedy_plain + checked)
        if len(greedy_plain) == len(rows):
            return torch.argmax(logits, dim=-1).tolist()
        best = torch.argmax(logits if len(greedy) == len(rows) else logits[greedy], dim=-1).tolist()
        best = dict(zip(range(len(rows)) if len(greedy) == len(rows) else greedy, best))
        for i in greedy_plain:
            out[i] = best[i]
        done.update(greedy_plain)
        for i in checked:
            try:
                if rows[i].constraint.allows(best[i]):
                    out[i] = best[i]
                    done.add(i)
            except Exception as exc:  # reported for this row only
                out[i] = exc
                done.add(i)
    for i, row in enumerate(rows):
        if i in done:
            continue
        try:
            row_logits = process_row(logits[i], row) if row.needs_processing else logits[i]
            if not torch.isfinite(row_logits).any():
                raise GenerationError("no token is allowed here (every logit is -inf or NaN)")
            out[i] = int(sample(row_logits.unsqueeze(0), row.params, row.generator)[0])  # (1, V) -> one id
        except Exception as exc:  # reported for this row only
            out[i] = exc
    return out


def logprob_info(logits: torch.Tensor, chosen: Sequence[int], top_n: Sequence[Optional[int]]) -> list[Optional[TokenInfo]]:
    """TokenInfo for the rows that asked for logprobs (top_n not None), from raw logits (B, V)."""
    want = [i for i, k in enumerate(top_n) if k is not None]
    infos: list[Optional[TokenInfo]] = [None] * len(chosen)
    if not want:
        return infos
    idx = torch.tensor(want, dtype=torch.long, device=logits.device)
    lp = torch.log_softmax(logits[idx].float(), dim=-1)  # (W, V)
    chosen_t = torch.tensor([chosen[i] for i in want], dtype=torch.long, device=logits.device)
    chosen_lp = lp.gather(1, chosen_t[:, None])[:, 0].tolist()
    kmax = max(top_n[i] for i in want)
    if kmax > 0:
        top_vals, top_ids = torch.topk(lp, kmax, dim=-1)
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    for j, i in enumerate(want):
        k = top_n[i]
        top = list(zip(top_ids[j][:k], top_vals[j][:k])) if k else []
        infos[i] = TokenInfo(chosen[i], chosen_lp[j], top)
    return infos


def prompt_logprob_info(logits: torch.Tensor, prompt: Sequence[int], top_n: int) -> list[TokenInfo]:
    """Logprobs of prompt tokens 1.. from full-prompt logits (T, V); token 0 gets logprob None."""
    infos = [TokenInfo(prompt[0], None, [])]
    if len(prompt) < 2:
        return infos
    lp = torch.log_softmax(logits[: len(prompt) - 1].float(), dim=-1)  # (T-1, V)
    targets = torch.tensor(list(prompt[1:]), dtype=torch.long, device=logits.device)
    chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
    if top_n > 0:
        top_vals, top_ids = torch.topk(lp, top_n, dim=-1)
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    for j, t in enumerate(prompt[1:]):
        top = list(zip(top_ids[j], top_vals[j])) if top_n > 0 else []
        infos.append(TokenInfo(int(t), chosen[j], top))
    return infos


def make_generator(seed: Optional[int], device: torch.device, *, global_rng: bool = False) -> Optional[torch.Generator]:
    """The generator of one sequence: seeded when a seed is given; otherwise torch's global one
    (`global_rng`, Meta's seeding by `Llama.build`) or a private one from fresh OS entropy."""
    if seed is None and global_rng:
        return None
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed) % 2**64)
    return gen
