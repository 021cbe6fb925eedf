"""Speculative greedy decoding: draft a few tokens cheaply, verify them in one batched target step.

Greedy output is identical to plain one-token decoding, by construction:

- A drafter proposes up to k tokens after the current context: `NgramDrafter` (prompt lookup: the
  tokens that followed the latest earlier occurrence of the context's last n tokens, as in
  transformers' `prompt_lookup_num_tokens` and vLLM's n-gram speculator) or `ModelDrafter` (a smaller
  model with the same vocabulary, run greedily).
- The target verifies [next, d_1 .. d_k] in one call: row i is the token at position p + i. With a
  row- and position-exact step (each row's logits bit for bit those of a one-token step at that
  position, as the fused C++ decode step computes them: every row's keys and values are written
  before any row attends, and each row attends over its own positions [0, pos + 1)), the argmax of
  row i is the token plain decoding would choose after d_1 .. d_i. The longest agreeing prefix of
  the draft is kept, plus the target's own token after it, so every round adds at least one token.
- Rejected drafts leave stale keys/values past the accepted position; they are never read (a row
  attends up to its own position) and the next round overwrites them. No rollback is needed.
- `Speedometer` turns drafting off while it does not pay: it compares the measured time per token of
  speculative rounds with that of plain steps, and probes again after a while, so a run with a poor
  drafter costs at most a few rounds more than plain decoding.

The interface is narrow on purpose: a model enters as two functions (`Steps`), so any engine (the
single-sequence loop, a server slot) can use it. `model_steps` makes them for a llamaforge
`Transformer` with a KV cache of one slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch

from llamaforge.errors import GenerationError
from llamaforge.model import StepInput
from llamaforge.runtime import DecodeStep

__all__ = [
    "Steps",
    "Drafter",
    "NgramDrafter",
    "ModelDrafter",
    "Speedometer",
    "SpecStats",
    "model_steps",
    "speculative_greedy",
]


@dataclass
class Steps:
    """A model with one sequence's KV cache, as two functions.

    prefill(tokens): run tokens at positions 0..len-1 (cache filled there); return the last logits (V,).
    verify(tokens, start): run tokens[i] as a one-token step at position start + i, all rows in one call,
        every row's keys/values written before any row attends; return logits (len, V). Must be row- and
        position-exact: row i equals what a one-token call verify([tokens[i]], start + i) would return
        after the rows before it. Positions past start + len keep whatever they held.
    """

    prefill: Callable[[Sequence[int]], torch.Tensor]
    verify: Callable[[Sequence[int], int], torch.Tensor]
    max_seq_len: int


def model_steps(model: torch.nn.Module, max_seq_len: int, decode_step: Optional[DecodeStep] = None) -> Steps:
    """`Steps` of a llamaforge Transformer over a fresh one-slot KV cache of `max_seq_len` (the decode step's kv_type).

    verify passes the rows as a batch of one-token rows, all in slot 0 at their own positions, to the
    decode step (`decode_step`, default the fused C++ step on the CPU, as `Llama.decode_step` is): it
    writes every row's keys and values before attention and lets each row attend over [0, its
    position], which makes rows exact. Plain greedy decoding that the result must equal runs the same
    decode step.
    """
    if max_seq_len > model.args.max_seq_len:
        raise GenerationError(f"max_seq_len {max_seq_len} exceeds the model's {model.args.max_seq_len}")
    device = model.norm.weight.device
    decode = decode_step if decode_step is not None else DecodeStep(model, fused=device.type == "cpu")
    cache = decode.new_cache(1, max_seq_len)  # in the decode step's KV element type

    def prefill(tokens: Sequence[int]) -> torch.Tensor:
        x = torch.tensor([list(tokens)], dtype=torch.long, device=device)  # (1, T)
        with torch.inference_mode():
            return model(x, 0, cache, last_only=True)[0, -1]

    def verify(tokens: Sequence[int], start: int) -> torch.Tensor:
        n = len(tokens)
        if start + n > max_seq_len:
            raise GenerationError(f"positions up to {start + n - 1} do not fit max_seq_len {max_seq_len}")
        x = torch.tensor(list(tokens), dtype=torch.long, device=device).view(n, 1)  # (rows, 1)
        pos = torch.arange(start, start + n, device=device).view(n, 1)  # (rows, 1): one position per row
        slots = torch.zeros(n, dtype=torch.long, device=device)  # every row in the sequence's slot
        step = StepInput.make(pos, n, 1, device=device, cache_len=max_seq_len, slots=slots, kv_len=start + n)
        with torch.inference_mode():
            return decode(x, step, cache)[:, -1]  # (rows, V)

    return Steps(prefill, verify, max_seq_len)


class Drafter(Protocol):
    """Proposes up to `k` tokens to follow `context` (the prompt and every token accepted so far)."""

    def propose(self, context: Sequence[int], k: int) -> list[int]: ...


@dataclass
class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens (n from
    `max_ngram` down to `min_ngram`) and propose the tokens that followed it."""

    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise GenerationError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        ctx = list(context)
        for n in range(min(self.max_ngram, len(ctx) - 1), self.min_ngram - 1, -1):
            tail = ctx[-n:]
            for start in range(len(ctx) - n - 1, -1, -1):  # latest match first, never the tail itself
                if ctx[start : start + n] == tail:
                    return ctx[start + n : start + n + k]
        return []


class ModelDrafter:
    """A draft model run greedily over its own KV cache (the `Steps` of a smaller model, same vocabulary).

    It remembers which tokens its cache holds; after a rejection it re-feeds only the tokens past the
    common prefix, in one verify call.
    """

    def __init__(self, steps: Steps):
        self.steps = steps
        self.known: list[int] = []  # tokens whose keys/values are in the draft cache, positions 0..

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


@dataclass
class Speedometer:
    """Decides whether to draft, from measured seconds per token of speculative rounds and plain steps.

    Both rates are exponential moving averages. Drafting stays on while its time per token is no worse
    than plain decoding's; otherwise it is off for `backoff` plain steps (which refresh the plain rate),
    then tried again; each failed try doubles the wait (up to `max_backoff`) and a round that pays resets
    it, so text a drafter cannot predict costs a vanishing share of rounds. With no plain rate yet (the
    start, or every `reprobe` rounds, since the rates drift as the context grows) one plain step measures
    it. Timing only steers speed: the output does not depend on it.
    """

    alpha: float = 0.3
    backoff: int = 16
    max_backoff: int = 512
    reprobe: int = 64
    clock: Callable[[], float] = time.perf_counter
    spec_s: Optional[float] = None  # seconds per token, speculative rounds
    plain_s: Optional[float] = None  # seconds per token, plain steps
    off_for: int = 0
    since_plain: int = 0
    wait: int = 0  # the next backoff (0: `backoff`)

    def should_draft(self) -> bool:
        if self.off_for > 0:
            self.off_for -= 1
            return False
        if self.plain_s is None or self.since_plain >= self.reprobe:
            return False
        return True

    def record(self, speculative: bool, seconds: float, tokens: int) -> None:
        per = seconds / max(1, tokens)
        if speculative:
            self.spec_s = per if self.spec_s is None else (1 - self.alpha) * self.spec_s + self.alpha * per
            if self.plain_s is not None and self.spec_s > self.plain_s:
                self.off_for = self.wait or self.backoff
                self.wait = min(self.max_backoff, 2 * self.off_for)
                self.spec_s = None  # forget: the next try measures afresh
            elif self.plain_s is not None:
                self.wait = 0
            self.since_plain += 1
        else:
            self.plain_s = per if self.plain_s is None else (1 - self.alpha) * self.plain_s + self.alpha * per
            self.since_plain = 0


@dataclass
class SpecStats:
    """What a speculative run did: verify rounds with a draft, plain steps, tokens drafted and accepted."""

    rounds: int = 0
    plain_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    tokens: int = 0
    per_round: list[int] = field(default_factory=list)  # accepted draft tokens of each round

    @property
    def acceptance(self) -> float:
        """Share of drafted tokens the target agreed with."""
        return self.accepted / self.drafted if self.drafted else 0.0


def speculative_greedy(
    target: Steps,
    prompt: Sequence[int],
    max_new_tokens: int,
    drafter: Drafter,
    *,
    k: int = 4,
    stop_ids: Sequence[int] = (),
    speedometer: Optional[Speedometer] = None,
    stats: Optional[SpecStats] = None,
) -> list[int]:
    """The greedy continuation of `prompt` (up to `max_new_tokens`, cut after the first stop id, which is
    included), equal token for token to plain one-token greedy decoding with `target`.

    Args:
        target: the model's `Steps` (its cache is overwritten from position 0).
        prompt: token ids, at least one; prompt + output must fit target.max_seq_len.
        drafter: proposes tokens (NgramDrafter, ModelDrafter, or anything with `propose`).
        k: most tokens drafted per round (the draft length adapts below it: doubled after a round whose
            draft was all accepted, halved after one that kept less than half).
        stop_ids: ids that end the output (kept as its last token).
        speedometer: turns drafting off while it does not pay (default: a fresh `Speedometer`).
        stats: filled with rounds, acceptance and time when given.
    """
    if len(prompt) == 0:
        raise GenerationError("the prompt is empty: give at least one token")
    if k < 1 or max_new_tokens < 0:
        raise GenerationError(f"need k >= 1 and max_new_tokens >= 0, got k={k}, max_new_tokens={max_new_tokens}")
    if len(prompt) + max_new_tokens > target.max_seq_len:
        raise GenerationError(
            f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceed max_seq_len {target.max_seq_len}"
        )
    meter = speedometer if speedometer is not None else Speedometer()
    k_now = k  # draft length: doubled after a fully accepted round, halved after one that kept under half
    st = stats if stats is not None else SpecStats()
    stops = set(stop_ids)
    t_start = time.perf_counter()
    if max_new_tokens == 0:
        return []
    context = list(prompt)
    out = [int(target.prefill(context).argmax())]
    while len(out) < max_new_tokens and out[-1] not in stops:
        pos = len(context) + len(out) - 1  # position of out[-1], not yet in the cache
        room = max_new_tokens - len(out)  # a round adds accepted + 1 tokens: draft at most room - 1
        t0 = meter.clock()  # the drafting counts: a draft model's steps are part of a round's cost
        draft = drafter.propose(context + out, min(k_now, room - 1)) if room > 1 and meter.should_draft() else []
        pred = target.verify([out[-1], *draft], pos).argmax(-1).tolist()  # (rows,)
        accepted = 0
        while accepted < len(draft) and draft[accepted] == pred[accepted]:
            accepted += 1
        new = draft[:accepted] + [pred[accepted]]
        meter.record(bool(draft), meter.clock() - t0, len(new))
        if draft:
            if accepted == len(draft):
                k_now = min(k, 2 * k_now)
            elif 2 * accepted < len(draft):
                k_now = max(1, k_now // 2)
            st.rounds += 1
            st.drafted += len(draft)
            st.accepted += accepted
            st.per_round.append(accepted)
        else:
            st.plain_steps += 1
        for tok in new:
            out.append(tok)
            if tok in stops or len(out) == max_new_tokens:
                break
    st.tokens = len(out)
    st.seconds = time.perf_counter() - t_start
    return out
