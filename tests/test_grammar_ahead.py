"""Constrained decoding at throughput: masks computed ahead on a worker, greedy rows checking one bit first.

A tiny random model with the default model's tokenizer (as tests/test_server_engine.py). The reference is the
naive constraint: the whole mask computed on the engine thread when the sampler asks, always applied. Token
ids must be identical; every answer must be JSON of the schema.
"""

from __future__ import annotations

import json

import pytest
import torch

from llamaforge.generation.engine import Engine, Job
from llamaforge.generation.sampler import RowState, SamplingParams, choose
from tests.test_server_engine import CPU, MAX_SEQ, encode, model, run, tokenizer  # noqa: F401 (fixtures)

pytest.importorskip("llguidance")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "n", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "n": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}}}
STOPS = frozenset({0, 2})


class Naive:
    """The constraint without either shortcut: compute_bitmask when asked, no `allows`."""

    def __init__(self, matcher, vocab_size):
        self.matcher, self.vocab_size = matcher, vocab_size

    def allowed(self):
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        bits = ((words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten().bool()  # token 32i + j
        return torch.cat([bits, bits.new_zeros(max(0, self.vocab_size - bits.numel()))])[: self.vocab_size]

    def advance(self, token):
        assert self.matcher.consume_token(token), self.matcher.get_error()

    def is_finished(self):
        return self.matcher.is_stopped()


@pytest.fixture(scope="module")
def factories(tokenizer):
    from llamaforge.generation.grammar import GrammarCompiler

    ahead = GrammarCompiler(tokenizer, tokenizer.n_words, STOPS).json_schema(SCHEMA)

    def naive():
        c = ahead()
        c.allowed()  # the worker is done with this fresh matcher
        return Naive(c.matcher, c.vocab_size)

    return ahead, naive


def test_masks_ahead_and_the_one_bit_check_give_the_naive_tokens(model, tokenizer, factories, monkeypatch):
    from llamaforge.generation.grammar import LLGuidanceConstraint

    ahead, naive = factories
    prompts = encode(tokenizer, ["Give me JSON:", "A record:", "Name, number, flag:", "{"])
    jobs = lambda factory: [Job(p, 60, SamplingParams(temperature=0), stop_ids=STOPS, constraint=factory)
                            for p in prompts] + [
        Job(prompts[0], 60, SamplingParams(temperature=1.0, top_p=1.0), n=2, seed=5, stop_ids=STOPS, constraint=factory)]
    eng = Engine(model, tokenizer, n_slots=6, max_seq_len=MAX_SEQ, device=CPU, chunk=8)
    eng.start()
    checks = []
    real = LLGuidanceConstraint.allows
    try:
        want = run(eng, jobs(naive))
        monkeypatch.setattr(LLGuidanceConstraint, "allows", lambda self, t: checks.append(real(self, t)) or checks[-1])
        got = run(eng, jobs(ahead))
    finally:
        eng.close()
    for w, g in zip(want, got):
        for cw, cg in zip(w["choices"], g["choices"]):
            assert cg["tokens"] == cw["tokens"]
            assert cg["finish"] == "stop"
            obj = json.loads(cg["text"])
            assert set(obj) == {"name", "n", "ok"} and len(obj["name"]) <= 6 and isinstance(obj["ok"], bool)
    assert checks  # greedy rows checked their best token first (a random model's best is rarely allowed:
    # the allowed case is the unit test below)


def test_a_greedy_row_whose_best_token_is_banned_gets_the_masked_argmax():
    class OnlyOdd:
        def allowed(self):
            return torch.arange(6) % 2 == 1

        def allows(self, token):
            return token % 2 == 1

        def advance(self, token):
            pass

        def is_finished(self):
            return False

    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0, 9.0]])
    rows = [RowState(SamplingParams(temperature=0), None, 6, constraint=OnlyOdd()) for _ in range(2)]
    assert choose(logits, rows) == [3, 5]  # best 2 is banned -> 3; best 5 is allowed
