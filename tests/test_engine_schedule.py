"""The order of an engine step: decodes first, then prompt chunks first come first served (prefill_plan.py).

The plan is checked alone (against a brute force over every way to cut the chunks into forwards) and in the
engine, by the order of its events (model calls and the events sent to the requests), never by time: a
tiny Q8_0 model run by the fused C++ step, as Llama runs the default model on the CPU. Greedy answers
must equal each request run alone, token for token, whatever the order.
"""

from __future__ import annotations

import itertools
import random
import threading
from types import SimpleNamespace

import pytest
import torch

from llamaforge.generation.engine import Delta, Engine, Failure, Finish, Job
from llamaforge.generation.prefill_plan import allot, plan
from llamaforge.generation.sampler import SamplingParams
from llamaforge.model import ModelArgs, Transformer
from llamaforge.quantize import quantize_model_weights
from llamaforge.runtime import DecodeStep

CPU = torch.device("cpu")
VOCAB, MAX_SEQ, CHUNK = 96, 128, 8


def act(n_prompt: int, next_pos: int = 0):
    return SimpleNamespace(job=SimpleNamespace(prompt=[1] * n_prompt), next_pos=next_pos)


def waiting_time(forwards, fixed_rows, others):
    """What `plan` minimises: each final unit waits until its forward ends (its first token) and until the last
    one does (its second); `others` until the last one does."""
    clock, total = 0.0, 0.0
    for fw in forwards:
        clock += fixed_rows + len(fw) * max(u.rows for u in fw)
        total += clock * sum(u.final for u in fw)
    return total + (others + sum(u.final for fw in forwards for u in fw)) * clock


def test_allot_gives_the_budget_to_the_oldest_prompt_first():
    a, b, c = act(30), act(5), act(20, next_pos=8)
    units = allot([a, b, c], 20, CHUNK)  # a's chunks until the budget is spent; the last may pass it
    assert [(u.act, u.start, u.end, u.final) for u in units] == [(a, 0, 8, False), (a, 8, 16, False),
                                                                 (a, 16, 24, False)]
    units = allot([a, b, c], 40, CHUNK)
    assert [(u.act, u.start, u.end) for u in units] == [(a, 0, 8), (a, 8, 16), (a, 16, 24), (a, 24, 30),
                                                        (b, 0, 5), (c, 8, 16)]
    assert [u.final for u in units] == [False, False, False, True, True, False]
    assert [(u.act, u.start) for u in allot([b, a], 0, CHUNK)] == [(b, 0)]  # a spent budget still computes a chunk


def test_plan_is_the_least_waiting_over_every_cut():
    rng = random.Random(0)
    for _ in range(200):
        acts = [act(rng.choice([1, 3, 8, 13, 20, 40])) for _ in range(rng.randint(1, 5))]
        units = allot(acts, rng.choice([8, 24, 64, 200]), CHUNK)
        fixed, others = rng.choice([0.0, 2.0, 8.0, 50.0]), rng.randint(0, 4)
        got = plan(units, fixed, others)
        assert [u for fw in got for u in fw] == units  # every chunk once, in order
        assert all(len({id(u.act) for u in fw}) == len(fw) for fw in got)  # a prompt at most once per forward
        best = None
        for cuts in itertools.product([False, True], repeat=len(units) - 1):  # every way to cut the sequence
            forwards, cur = [], [units[0]]
            for u, cut in zip(units[1:], cuts):
                if cut:
                    forwards.append(cur)
                    cur = []
                cur.append(u)
            forwards.append(cur)
            if all(len({id(u.act) for u in fw}) == len(fw) for fw in forwards):
                w = waiting_time(forwards, fixed, others)
                best = w if best is None else min(best, w)
        assert waiting_time(got, fixed, others) == pytest.approx(best)


def test_plan_splits_or_shares_forwards_by_their_fixed_cost():
    acts = [act(10) for _ in range(4)]
    units = allot(acts, 256, CHUNK * 2)  # four one-chunk prompts
    assert plan(units, 0.0, 0) == [[u] for u in units]  # nothing to share: each prompt alone, oldest first
    assert plan(units, 1000.0, 0) == [list(units)]  # a forward costs far more than its rows: all in one
    # requests already decoding wait for the whole step, so they push towards fewer forwards
    assert len(plan(units, 2.0, 0)) > len(plan(units, 2.0, 16))
    long_then_short = allot([act(30), act(4)], 256, CHUNK)  # 4 chunks of the first, then the short one
    assert [len(fw) for fw in plan(long_then_short, 0.0, 0)] == [1, 1, 1, 1, 1]
    assert plan([], 8.0, 3) == []


@pytest.fixture(scope="module")
def qmodel():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=256,
                              max_seq_len=MAX_SEQ))
    with torch.no_grad():
        m.output.weight.mul_(8)  # peaked distributions: greedy choices far from ties
    return quantize_model_weights(m.eval(), "q8_0")


def job(prompt, max_tokens):
    return Job(list(prompt), max_tokens, SamplingParams(temperature=0), detokenize=False)


class Recorder:
    """An engine whose model calls and request events land in one list, in the order they happen."""

    def __init__(self, model, *, budget: int, fixed_rows: float, n_slots: int = 4):
        self.eng = Engine(model, None, n_slots=n_slots, max_seq_len=MAX_SEQ, device=CPU, chunk=CHUNK,
                          max_num_batched_tokens=budget, decode_step=DecodeStep(model, fused=True))
        self.eng.batch.fixed_rows = fixed_rows
        self.log: list[tuple] = []
        self.prompts: list[list[int]] = []
        prefill, decode = self.eng.runner.prefill, self.eng.runner.decode

        def on_prefill(cache, chunks):  # ("prefill", [(job k, chunk start), ...])
            self.log.append(("prefill", [(self.job_of(c.tokens, c.start), c.start) for c in chunks]))
            return prefill(cache, chunks)

        def on_decode(cache, tokens, *a, **kw):
            self.log.append(("decode", len(tokens)))
            return decode(cache, tokens, *a, **kw)

        self.eng.runner.prefill, self.eng.runner.decode = on_prefill, on_decode
        self.tokens: list[list[int]] = []
        self.done = threading.Semaphore(0)

    def job_of(self, tokens, start) -> int:
        return next(k for k, p in enumerate(self.prompts) if p[start:start + len(tokens)] == list(tokens))

    def sink(self, k):
        def sink(ev):
            if isinstance(ev, Delta):
                self.log.append(("token", k))
                self.tokens[k] += [t.id for t in ev.tokens]
            elif isinstance(ev, (Finish, Failure)):
                assert not isinstance(ev, Failure), ev
                self.done.release()
        return sink

    def submit(self, prompts, max_tokens):
        ks = list(range(len(self.prompts), len(self.prompts) + len(prompts)))
        self.prompts += prompts
        self.tokens += [[] for _ in prompts]
        self.eng.submit_all([job(p, max_tokens) for p in prompts], [self.sink(k) for k in ks])
        return ks

    def wait(self, n):
        for _ in range(n):
            assert self.done.acquire(timeout=60), "the engine did not finish"

    def first(self, kind, pred) -> int:
        return next(i for i, e in enumerate(self.log) if e[0] == kind and pred(e[1]))


def solo(model, prompts, max_tokens):
    rec = Recorder(model, budget=64, fixed_rows=8.0)
    rec.eng.start()
    try:
        out = []
        for p in prompts:
            (k,) = rec.submit([p], max_tokens)
            rec.wait(1)
            out.append(rec.tokens[k])
        return out
    finally:
        rec.eng.close()


def test_four_prompts_together_the_first_answers_before_the_last_is_prefilled(qmodel):
    rng = random.Random(1)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 12, 7, 3)]
    for fixed_rows, alone in ((0.0, True), (1000.0, False)):
        rec = Recorder(qmodel, budget=64, fixed_rows=fixed_rows)
        rec.eng.start()
        try:
            rec.submit(prompts, 6)
            rec.wait(4)
        finally:
            rec.eng.close()
        first_token = rec.first("token", lambda k: k == 0)
        last_prefill = rec.first("prefill", lambda rows: any(k == 3 for k, _ in rows))
        prefills = [e[1] for e in rec.log if e[0] == "prefill"]
        if alone:  # each prompt in its own forward, oldest first: prompt 0 answers before prompt 3 is computed
            assert first_token < last_prefill
            assert prefills == [[(0, 0)], [(1, 0)], [(1, 8)], [(2, 0)], [(3, 0)]]  # prompt 1 is 12 long: 8 + 4
            assert rec.tokens[:4] == solo(qmodel, prompts, 6)
        else:  # a forward costs far more than its rows: the fewest forwards, still in order (prompt 1's chunks apart)
            assert prefills == [[(0, 0), (1, 0)], [(1, 8), (2, 0), (3, 0)]]
            assert rec.tokens[:4] == solo(qmodel, prompts, 6)


def test_a_running_answer_gets_a_token_every_step_while_a_long_prompt_prefills(qmodel):
    rng = random.Random(2)
    short, long_ = [rng.randrange(3, VOCAB) for _ in range(4)], [rng.randrange(3, VOCAB) for _ in range(80)]
    rec = Recorder(qmodel, budget=2 * CHUNK, fixed_rows=8.0)
    submitted, decode = threading.Event(), rec.eng.runner.decode

    def held(*a, **kw):  # the short answer's steps wait for the long prompt: on a busy machine this thread could
        submitted.wait(60)  # otherwise wake after all 40 of its tokens, with nothing left to interleave
        return decode(*a, **kw)

    rec.eng.runner.decode = held
    rec.eng.start()
    try:
        rec.submit([short], 40)
        while not rec.tokens[0]:  # the short answer is running (its first token is the prefill's)
            threading.Event().wait(0.001)
        rec.submit([long_], 4)
        submitted.set()
        rec.wait(2)
    finally:
        rec.eng.close()
    start = rec.first("prefill", lambda rows: rows[0][0] == 1)
    end = rec.first("token", lambda k: k == 1)
    during = rec.log[start:end]
    chunks = [e[1] for e in during if e[0] == "prefill"]
    assert all(len(rows) == 1 for rows in chunks) and len(chunks) == 10  # 80 tokens: ten chunks of 8, one per forward
    # between two decode steps at most the budget less the decode row: two chunks (the last may pass the budget)
    runs, n = [], 0
    for e in during:
        if e[0] == "prefill":
            n += 1
        elif e[0] == "decode":
            runs.append(n)
            n = 0
    assert max(runs + [n]) <= 2 and sum(e[0] == "decode" for e in during) >= 4
    assert rec.tokens[:2] == solo(qmodel, [short, long_], 40)[:1] + solo(qmodel, [long_], 4)
