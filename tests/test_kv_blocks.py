"""The KV cache as a block pool: the pool's books, the prefix cache on blocks, preemption, paged decode.

Tiny random models (no tokenizer: jobs are token ids without text). Tolerances: token ids identical
(greedy, and seeded sampling); the fused C++ step against the PyTorch modules on a paged cache within
1e-4 relative (float32, sums in another order), and bit for bit between a paged and a contiguous layout.
"""

from __future__ import annotations

import copy
import random
import threading

import pytest
import torch

from llamaforge.errors import ConfigError, GenerationError
from llamaforge.generation.blocks import BlockPool
from llamaforge.generation.engine import Delta, Engine, Failure, Finish, Job, wait_idle
from llamaforge.generation.runner import PrefillChunk, Runner, decode_logits
from llamaforge.generation.sampler import SamplingParams
from llamaforge.model import KVCache, ModelArgs, StepInput, Transformer
from llamaforge.quantize import quantize_model_weights
from llamaforge.runtime import DecodeStep

CPU = torch.device("cpu")
MAX_SEQ = 128
VOCAB = 512


@pytest.fixture(scope="module")
def qmodel():
    """A Q8_0 model run by the fused C++ step, as Llama runs the default model on the CPU."""
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=256,
                              max_seq_len=MAX_SEQ))
    with torch.no_grad():
        m.output.weight.mul_(8)  # peaked distributions: greedy choices far from ties
    return quantize_model_weights(m.eval(), "q8_0")


def engine(model, *, kv_blocks=None, n_slots=4, chunk=8, **kw) -> Engine:
    return Engine(model, None, n_slots=n_slots, max_seq_len=MAX_SEQ, device=CPU, chunk=chunk,
                  max_num_batched_tokens=32, decode_step=DecodeStep(model, fused=True), kv_blocks=kv_blocks, **kw)


def job(prompt, max_tokens, **kw) -> Job:
    return Job(list(prompt), max_tokens, kw.pop("params", SamplingParams(temperature=0)), detokenize=False, **kw)


def run(eng, jobs, timeout=60.0, on_event=None):
    """Submit jobs together; per job the tokens of each choice (None for a failed job)."""
    out = [[[] for _ in range(j.n)] for j in jobs]
    left, done, lock = [sum(j.n for j in jobs)], threading.Event(), threading.Lock()
    ids = []

    def sink_for(k):
        def sink(ev):
            if on_event is not None:
                on_event(k, ev, ids)
            if isinstance(ev, Delta):
                out[k][ev.index] += [t.id for t in ev.tokens]
            elif isinstance(ev, (Finish, Failure)):
                if isinstance(ev, Failure):
                    out[k] = None
                with lock:
                    left[0] -= 1 if isinstance(ev, Finish) else jobs[k].n
                    if left[0] <= 0:
                        done.set()
        return sink

    ids += eng.submit_all(jobs, [sink_for(k) for k in range(len(jobs))])
    assert done.wait(timeout), "jobs did not finish"
    return out


def ledger(eng) -> list[int]:
    """Each block's references as the scheduler's sequences hold them (must equal the pool's counts)."""
    refs = [0] * eng.pool.n_blocks
    for act in eng.sched.running():
        for b in act.reserved:
            refs[b] += 1
        for seq in act.seqs:
            for b in seq.blocks:
                refs[b] += 1
    return refs


def checked(eng):
    """Check the pool's books before every model call (on the engine thread, between steps)."""
    for name in ("prefill", "decode"):
        fn = getattr(eng.runner, name)

        def wrapped(*args, _fn=fn, **kw):
            eng.pool.check()
            assert ledger(eng) == eng.pool.refs
            return _fn(*args, **kw)

        setattr(eng.runner, name, wrapped)
    return eng


def solo(model, prompts, max_tokens, **kw):
    eng = engine(model)
    eng.start()
    try:
        return [run(eng, [job(p, m, **kw)])[0] for p, m in zip(prompts, max_tokens)]
    finally:
        eng.close()


def test_block_pool_shares_prefixes_and_evicts_the_least_recently_used():
    pool = BlockPool(4, 2)
    a = [pool.take(), pool.take()]  # prompt [1, 2, 3, 4] in two full blocks
    pool.register(a, [1, 2, 3, 4, 5], 2, owner=0)
    assert pool.match([1, 2, 3, 4, 9], 0, limit=4) == a
    assert pool.match([1, 2, 7, 7], 0, limit=4) == a[:1]  # the parent key keeps prefixes apart
    assert pool.match([1, 2, 3, 4], 0, limit=3) == a[:1]  # never past the limit
    assert pool.match([1, 2, 3, 4], 5, limit=4) == []  # another adapter's keys and values are not ours
    pool.share(a[0])
    pool.release(a)  # a[0] still referenced once, a[1] cached
    assert (pool.n_in_use, pool.n_cached, pool.n_free) == (1, 1, 2)
    pool.release([a[0]])
    pool.check()
    assert pool.n_cached == 2 and pool.refs == [0, 0, 0, 0]
    got = [pool.take(), pool.take(), pool.take()]  # two free ones, then the least recently released
    assert got[2] == a[1] and pool.stats.evictions == 1
    assert pool.match([1, 2, 3, 4], 0, limit=4) == a[:1]  # a[0] is still cached
    pool.release(got, keep=False)
    pool.check()
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([got[0]])


def test_block_pool_accounting_under_churn(qmodel):
    """Random admissions, finishes, cancellations, prefix hits, evictions and preemptions on a pool too small
    for everything at once: before every model call free + in use + cached == total and each block's count
    is the number of tables holding it; all free or cached at the end; every finished greedy answer is its
    solo answer."""
    rng = random.Random(0)
    shared = [rng.randrange(3, VOCAB) for _ in range(24)]
    prompts, lengths = [], []
    for i in range(14):
        head = shared[: rng.choice([0, 8, 16, 24])]
        prompts.append(head + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 20))])
        lengths.append(rng.randrange(1, 50))
    choices = [2 if k % 4 == 1 else 1 for k in range(14)]  # two greedy choices: forks, both the solo answer
    lengths = [min(m, 64 - len(p)) if n == 2 else m for p, m, n in zip(prompts, lengths, choices)]  # fit 16 blocks
    want = solo(qmodel, prompts, lengths)
    eng = checked(engine(qmodel, kv_blocks=16, n_slots=6))
    cancel_at = {k: rng.randrange(1, 6) for k in rng.sample(range(14), 4)}

    def on_event(k, ev, ids):
        if isinstance(ev, Delta) and k in cancel_at:
            cancel_at[k] -= 1
            if cancel_at[k] == 0:
                eng.cancel(ids[k])

    try:
        results = [[None] * n for n in choices]

        def sink_for(k, ids):
            toks = [[] for _ in range(choices[k])]

            def sink(ev):
                on_event(k, ev, ids)
                if isinstance(ev, Delta):
                    toks[ev.index].extend(t.id for t in ev.tokens)
                if isinstance(ev, Finish):
                    results[k][ev.index] = toks[ev.index]
                if isinstance(ev, Failure):
                    results[k] = "failed"
            return sink

        ids: list[int] = []
        for k in range(14):  # more than the pool holds: they are admitted as blocks come back
            ids.append(eng.submit(job(prompts[k], lengths[k], n=choices[k]), sink_for(k, ids)))
        eng.start()  # after the submissions: the same schedule on every run
        assert wait_idle(eng, 60)
        cancelled = [k for k in cancel_at if cancel_at[k] <= 0]
        assert cancelled  # some requests went away mid-way
        for k in range(14):
            if k not in cancelled:
                assert results[k] == want[k] * choices[k], k
        pool = eng.pool
        pool.check()
        assert pool.n_in_use == 0 and all(r == 0 for r in pool.refs)
        assert pool.n_free + pool.n_cached == pool.n_blocks
        stats = eng.stats()
        assert stats["prompt_tokens_cached"] > 0 and stats["kv_block_evictions"] > 0, stats
        assert stats["preemptions"] > 0, stats
        assert stats["kv_blocks_in_use"] == 0 and stats["slots_free"] == 6
    finally:
        eng.close()


def test_many_short_or_a_few_long_requests_in_one_budget(qmodel):
    """32 blocks of 8 positions (256 positions): eight short requests decode together, or two long ones
    whose contexts would not fit a slot each of a quarter of the memory; answers are their solo answers."""
    rng = random.Random(1)
    short = [[rng.randrange(3, VOCAB) for _ in range(5)] for _ in range(8)]
    long = [[rng.randrange(3, VOCAB) for _ in range(60)] for _ in range(2)]
    want_short = solo(qmodel, short, [3] * 8)
    want_long = solo(qmodel, long, [60] * 2)
    eng = checked(engine(qmodel, kv_blocks=32, n_slots=8))
    widths = []
    decode = eng.runner.decode
    eng.runner.decode = lambda cache, tokens, *a, **kw: (widths.append(len(tokens)), decode(cache, tokens, *a, **kw))[1]
    eng.start()
    try:
        assert run(eng, [job(p, 3) for p in short]) == want_short
        assert max(widths) == 8  # all eight in one batch
        widths.clear()
        assert run(eng, [job(p, 60) for p in long]) == want_long  # 15 blocks each
        assert max(widths) == 2 and eng.stats()["preemptions"] == 0
    finally:
        eng.close()
    with pytest.raises(GenerationError, match="need 30 KV blocks of 8 positions, but the pool holds 16"):
        engine(qmodel, kv_blocks=16).check(job(long[0], 60, n=2))
    with pytest.raises(ConfigError, match="cannot hold one sequence of max_seq_len 128"):
        engine(qmodel, kv_blocks=15)


def test_a_pool_with_every_slot_at_full_context_admits_every_slot_at_once(qmodel):
    """The default pool (n_slots x full context) keeps no watermark: with it, the last of four prompts that
    together claim the whole pool waited for the others to finish, and a batch of 4 decoded as 3 + 1."""
    rng = random.Random(2)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(MAX_SEQ - 7)] for _ in range(4)]  # all 16 blocks of a slot each
    eng = checked(engine(qmodel))  # kv_blocks None: 4 slots x 16 blocks, all claimed by the prompts
    in_use = []  # sequences admitted at each prefill forward
    prefill = eng.runner.prefill
    eng.runner.prefill = lambda cache, chunks: (in_use.append(eng.sched.seqs_in_use), prefill(cache, chunks))[1]
    eng.start()
    try:
        assert run(eng, [job(p, 4) for p in prompts]) == solo(qmodel, prompts, [4] * 4)
        # the prompts are prefilled one after another (oldest first), but all four held their slots at once
        assert max(in_use) == 4
    finally:
        eng.close()


def test_a_preempted_request_resumes_with_its_solo_answer(qmodel):
    """Three requests that outgrow the pool together: the youngest is preempted (its blocks go back) and
    later resumed (prompt prefilled again, its tokens replayed by decode steps), and every answer, greedy
    and seeded sampling alike, is the request's answer alone."""
    rng = random.Random(2)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(12)] for _ in range(3)]
    seeded = dict(params=SamplingParams(temperature=0.9, top_p=0.95), seed=5)
    want = solo(qmodel, prompts, [50] * 3)
    want_seeded = solo(qmodel, prompts[:1], [50], **seeded)
    eng = checked(engine(qmodel, kv_blocks=18, n_slots=4))  # each needs 8 blocks at the end
    eng.start()
    try:
        got = run(eng, [job(p, 50) for p in prompts] + [job(prompts[0], 50, **seeded)])
        assert got[:3] == want and got[3] == want_seeded[0]
        assert eng.stats()["preemptions"] >= 1
        assert wait_idle(eng, 5) and eng.pool.n_in_use == 0
    finally:
        eng.close()


def test_choices_fork_from_shared_prompt_blocks(qmodel):
    """n = 3 choices share the prompt's full blocks (one reference each) and copy its partial last block."""
    prompt = list(range(3, 23))  # 20 tokens: two full blocks of 8 and a partial one
    params = SamplingParams(temperature=1.0, top_p=1.0)
    eng = checked(engine(qmodel))
    seen = {}

    def on_event(k, ev, ids):
        if isinstance(ev, Delta) and "refs" not in seen:
            seen["refs"] = sorted(eng.pool.refs, reverse=True)[:3]

    eng.start()
    try:
        got = run(eng, [job(prompt, 6, params=params, n=3, seed=3)], on_event=on_event)[0]
        for i in range(3):
            assert got[i] == run(eng, [job(prompt, 6, params=params, seed=3 + i)])[0][0]
        assert seen["refs"][:2] == [3, 3]
    finally:
        eng.close()


@pytest.mark.parametrize("block_size", [64, 8])
def test_fused_step_equals_the_modules_on_a_paged_cache(qmodel, block_size):
    """Rows whose blocks lie scattered in the pool: the fused C++ step equals the PyTorch path (within 1e-4)
    and equals itself on a contiguous slot cache bit for bit (addressing never changes the numbers)."""
    g = torch.Generator().manual_seed(3)
    fmodel = copy.deepcopy(qmodel)  # the same quantized layers: the modules run them, the fused step too
    runner = Runner(fmodel, CPU, DecodeStep(fmodel, fused=True))
    lengths = [5, 70, 100]
    width = -(-MAX_SEQ // block_size)
    pool = runner.new_pool(3 * width + 3, MAX_SEQ, block_size)
    order = torch.randperm(pool.n_blocks, generator=g).tolist()
    tables = [order[i * width:(i + 1) * width] for i in range(3)]
    slots = runner.new_cache(3, MAX_SEQ)
    slot_tables = slots.slot_tables.tolist()
    with torch.no_grad():
        for cache, tabs in ((pool, tables), (slots, slot_tables)):
            for n, tab in zip(lengths, tabs):
                ids = torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                for start in range(0, n, block_size):
                    runner.prefill(cache, [PrefillChunk(ids[start:start + block_size], start, tab)])
        tokens, pos = torch.tensor([[7], [8], [9]]), torch.tensor([[n] for n in lengths])
        fused_pool = decode_logits(runner.decode_step, pool, tokens, pos, blocks=tables)
        assert runner.decode_step.ran_fused
        modules = decode_logits(DecodeStep(fmodel), copy.deepcopy(pool), tokens, pos, blocks=tables)
        assert ((fused_pool - modules).norm() / modules.norm()).item() < 1e-4
        fused_slots = decode_logits(runner.decode_step, slots, tokens, pos, slots=torch.arange(3))
        if block_size == 64:  # the slot cache has blocks of 64 too: the same tiles, the same sums
            assert torch.equal(fused_pool, fused_slots)
        else:
            assert ((fused_pool - fused_slots).norm() / fused_slots.norm()).item() < 1e-5


def test_a_pooled_cache_needs_block_tables():
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32, hidden_dim=32, max_seq_len=16)
    cache = KVCache.pool(args, 4, 16, dtype=torch.float32, device=CPU, block_size=8)
    k = torch.zeros(1, 1, 1, 8)
    with pytest.raises(ConfigError, match="block table"):
        cache.update(0, StepInput.make(torch.tensor([[0]]), 1, 1, device=CPU, cache_len=16), k, k)
