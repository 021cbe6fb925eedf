"""Speculative greedy decoding: draft a few tokens cheaply, verify them in one batched target step.

Greedy output is identical to plain one-token decoding, by construction:

- A drafter (generation/drafting.py) proposes tokens after the current context: `NgramDrafter` (prompt
  lookup) or `ModelDrafter` (a smaller model with the same vocabulary, run greedily); a `DraftPlanner`
  decides how many of them are worth verifying this round (0: a plain one-token step), from the measured
  cost of rounds and the measured acceptance of proposals.
- The target verifies [next, d_1 .. d_d] in one call: row i is the token at position p + i. With a
  row- and position-exact step (each row's logits bit for bit those of a one-token step at that
  position, as the fused C++ decode step computes them: every row's keys and values are written
  before any row attends, and each row attends over its own positions [0, pos + 1)), the argmax of
  row i is the token plain decoding would choose after d_1 .. d_i. The longest agreeing prefix of
  the draft is kept, plus the target's own token after it, so every round adds at least one token.
- Rejected drafts leave stale keys/values past the accepted position; they are never read (a row
  attends up to its own position) and the next round overwrites them. No rollback is needed.

The interface is narrow on purpose: a model enters as two functions (`Steps`), so any engine (the
single-sequence loop, a server slot) can use it. `model_steps` makes them for a llamaforge
`Transformer` with a KV cache of one slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Sequence

import torch

from llamaforge.errors import GenerationError
from llamaforge.generation.drafting import DraftPlanner, Drafter, ModelDrafter, NgramDrafter, check_same_vocabulary
from llamaforge.generation.runner import PrefillChunk, Runner, decode_logits
from llamaforge.runtime import DecodeStep

__all__ = [
    "Steps",
    "Drafter",
    "NgramDrafter",
    "ModelDrafter",
    "DraftPlanner",
    "SpecStats",
    "check_same_vocabulary",
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


def model_steps(model: torch.nn.Module, max_seq_len: int, decode_step: Optional[DecodeStep] = None, *,
                chunk: int = 64) -> Steps:
    """`Steps` of a llamaforge Transformer over a fresh one-slot KV cache of `max_seq_len`, computed as the engine
    computes a sequence (generation/runner.py), so the output equals `Llama.generate`'s plain greedy output.

    prefill runs the prompt in the engine's canonical chunks of `chunk` positions (the Engine's default);
    verify passes the rows as a batch of one-token rows, all in slot 0 at their own positions, through the
    engine's decode function and decode step (`decode_step`, default the fused C++ step on the CPU, as
    `Llama.decode_step` is): it writes every row's keys and values before attention and lets each row
    attend over [0, its position], which makes rows exact.
    """
    if max_seq_len > model.args.max_seq_len:
        raise GenerationError(f"max_seq_len {max_seq_len} exceeds the model's {model.args.max_seq_len}")
    device = model.norm.weight.device
    decode = decode_step if decode_step is not None else DecodeStep(model, fused=device.type == "cpu")
    runner = Runner(model, device, decode)
    cache = runner.new_cache(1, max_seq_len)
    table = cache.slot_tables[0].tolist()  # the one sequence's blocks (slot 0)

    def prefill(tokens: Sequence[int]) -> torch.Tensor:
        tokens = list(tokens)
        with torch.inference_mode():
            for start in range(0, len(tokens), chunk):
                logits = runner.prefill(cache, [PrefillChunk(tokens[start : start + chunk], start, table)])[0]
        return logits[-1]

    def verify(tokens: Sequence[int], start: int) -> torch.Tensor:
        n = len(tokens)
        if start + n > max_seq_len:
            raise GenerationError(f"positions up to {start + n - 1} do not fit max_seq_len {max_seq_len}")
        x = torch.tensor(list(tokens), dtype=torch.long, device=device).view(n, 1)  # (rows, 1)
        pos = torch.arange(start, start + n, device=device).view(n, 1)  # (rows, 1): one position per row
        slots = torch.zeros(n, dtype=torch.long, device=device)  # every row in the sequence's slot
        with torch.inference_mode():
            return decode_logits(decode, cache, x, pos, slots, max_pos=start + n - 1)  # (rows, V)

    return Steps(prefill, verify, max_seq_len)


@dataclass
class SpecStats:
    """What a speculative run did: verify rounds with a draft, plain steps, tokens drafted and accepted, and
    the seconds of the whole call and of its prefill (the rest is decoding), by the planner's clock."""

    rounds: int = 0
    plain_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    tokens: int = 0
    per_round: list[int] = field(default_factory=list)  # accepted draft tokens of each round

    @property
    def acceptance(self) -> float:
        """Share of verified draft tokens the target agreed with."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_call(self) -> float:
        """Tokens added per target call after the prefill (1.0: plain decoding)."""
        calls = self.rounds + self.plain_steps
        return (self.tokens - 1) / calls if calls else 0.0


def _agreeing(proposal: Sequence[int], actual: Sequence[int]) -> int:
    """How many leading tokens of `proposal` equal those of `actual`."""
    n = 0
    for a, b in zip(proposal, actual):
        if a != b:
            break
        n += 1
    return n


def speculative_greedy(
    target: Steps,
    prompt: Sequence[int],
    max_new_tokens: int,
    drafter: Drafter,
    *,
    k: int = 7,
    stop_ids: Sequence[int] = (),
    planner: Optional[DraftPlanner] = None,
    stats: Optional[SpecStats] = None,
) -> list[int]:
    """The greedy continuation of `prompt` (up to `max_new_tokens`, cut after the first stop id, which is
    included), equal token for token to plain one-token greedy decoding with `target`.

    Args:
        target: the model's `Steps` (its cache is overwritten from position 0).
        prompt: token ids, at least one; prompt + output must fit target.max_seq_len.
        drafter: proposes tokens (NgramDrafter, ModelDrafter, or anything with `propose`).
        k: most tokens drafted per round (a fresh planner's `k`; a given planner keeps its own).
        stop_ids: ids that end the output (kept as its last token).
        planner: chooses each round's draft length, and turns drafting off while it does not pay
            (default: a fresh `DraftPlanner(k=k)`, timing rounds with time.perf_counter).
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
    plan = planner if planner is not None else DraftPlanner(k=k)
    cheap = bool(getattr(drafter, "cheap", False))
    st = stats if stats is not None else SpecStats()
    stops = set(stop_ids)
    t_start = plan.clock()
    if max_new_tokens == 0:
        return []
    context = list(prompt)
    out = [int(target.prefill(context).argmax())]
    if hasattr(drafter, "warm"):
        drafter.warm(context)
    st.prefill_seconds = plan.clock() - t_start
    # a cheap drafter's proposals, scored against the output as it appears: (index in out of the token
    # the proposal's first one stands for, proposal, key)
    pending: list[tuple[int, list[int], Hashable]] = []
    while len(out) < max_new_tokens and out[-1] not in stops:
        pos = len(context) + len(out) - 1  # position of out[-1], not yet in the cache
        limit = min(plan.k, max_new_tokens - len(out) - 1)  # a round adds accepted + 1 tokens
        t0 = plan.clock()  # drafting counts: a draft model's steps are part of a round's cost
        if cheap:
            proposal = drafter.propose(context + out, limit) if limit > 0 else []
            key = getattr(drafter, "last_key", None)
            if proposal:
                pending.append((len(out), proposal, key))
            draft = proposal[: plan.length(key, len(proposal), learns_unverified=True)]
        else:
            key = getattr(drafter, "last_key", None)
            d = plan.length(key, limit, learns_unverified=False) if limit > 0 else 0
            draft = drafter.propose(context + out, d) if d > 0 else []
        pred = target.verify([out[-1], *draft], pos).argmax(-1).tolist()  # (rows,)
        accepted = _agreeing(draft, pred)
        new = draft[:accepted] + [pred[accepted]]
        plan.record_round(len(draft), plan.clock() - t0)
        if draft:
            st.rounds += 1
            st.drafted += len(draft)
            st.accepted += accepted
            st.per_round.append(accepted)
            if not cheap:
                plan.record_acceptance(key, len(draft), accepted)
        else:
            st.plain_steps += 1
        for tok in new:
            out.append(tok)
            if tok in stops or len(out) == max_new_tokens:
                break
        still = []
        for at, proposal, pkey in pending:
            agree = _agreeing(proposal, out[at:])
            if agree == len(proposal) or at + agree < len(out):  # all agreed, or a disagreement is known
                plan.record_acceptance(pkey, len(proposal), agree)
            else:
                still.append((at, proposal, pkey))
        pending = still
    st.tokens = len(out)
    st.seconds = plan.clock() - t_start
    return out
