"""Speculative greedy decoding (llamaforge.generation.speculative, drafting): output equal to plain greedy decoding.

The reference is `llamaforge.generation.generate` at temperature 0 on the same tiny random model (prefill,
then one-token steps). Equality is exact (token ids), and so is the verification forward: each row's logits
bit for bit those of a one-token step at its position, which is what the equality rests on.
No test asserts on time: planners run on a fake clock, advanced by a cost per verified row.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from llamaforge import kernels
from llamaforge.errors import GenerationError
from llamaforge.generation import SamplingParams, generate
from llamaforge.generation.speculative import (
    DraftPlanner,
    ModelDrafter,
    NgramDrafter,
    SpecStats,
    Steps,
    check_same_vocabulary,
    model_steps,
    speculative_greedy,
)
from llamaforge.runtime import DecodeStep
from llamaforge.model import ModelArgs, Transformer
from llamaforge.quantize import quantize_model_weights

needs_kernels = pytest.mark.skipif(kernels.get_extension() is None, reason="the C++ kernels are not available here")
CPU = torch.device("cpu")
SEQ = 96


def make_model(scheme: str | None, seed: int = 0, dim: int = 64, layers: int = 3) -> Transformer:
    """A random tiny model, quantized (`scheme`) or float32."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2, vocab_size=64,
                                  hidden_dim=2 * dim + 32, max_seq_len=SEQ))
    with torch.no_grad():
        model.output.weight.mul_(6)  # peaked distributions
    model.eval()
    return model if scheme is None else quantize_model_weights(model, scheme)


def plain(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding with the decode step speculation verifies with (the fused one on the CPU)."""
    tokens, _ = generate(model, [prompt], max_gen_len=n, max_seq_len=SEQ, params=SamplingParams(temperature=0.0),
                         stop_ids=(), device=CPU, decode_step=DecodeStep(model, fused=True))
    return tokens[0]


class CostClock:
    """A fake clock for a planner: each target call advances it by base + per_row * (rows - 1)."""

    def __init__(self, base: float = 1.0, per_row: float = 0.1):
        self.now, self.base, self.per_row = 0.0, base, per_row

    def __call__(self) -> float:
        return self.now

    def charge(self, steps: Steps) -> Steps:
        def verify(tokens, start):
            self.now += self.base + self.per_row * (len(tokens) - 1)
            return steps.verify(tokens, start)

        return Steps(steps.prefill, verify, steps.max_seq_len)


def always_draft(k: int = 7) -> DraftPlanner:
    """A planner on a clock that never moves: every length costs nothing, so it always drafts the most."""
    return DraftPlanner(k=k, clock=lambda: 0.0)


PROMPTS = [
    [1, 5, 9, 2, 7, 5, 9, 2, 7, 5, 9, 2, 3],  # repetitive: prompt lookup finds matches
    [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 38, 46, 26, 43],
    [8, 1, 8, 1, 8, 1, 8, 1],
]


@needs_kernels
@pytest.mark.parametrize("start", [17, 60])
@pytest.mark.parametrize("kv_type", [None, "float16", "bfloat16", "q8_0"])
@pytest.mark.parametrize("scheme", ["q8_0", "q4_0", "q4_1", None])
def test_verify_rows_equal_one_token_steps(scheme, kv_type, start):
    """The batched verification forward is row- and position-exact against one-token steps, at every row count a
    draft of up to 8 tokens gives (the integer kernels' tiles take 1-8 rows in one pass over the weights) and at
    9 (two weight groups per 512-bit tile), over a float32 cache, the float16 one a GGUF model's Llama uses, and
    bfloat16 / q8_0; its rows attend together (qattn_rows.h), from 60 across the first 64-key tile and block."""
    model = make_model(scheme, dim=128 if kv_type == "q8_0" else 64)  # q8_0 rows: head_dim a multiple of 32
    one, many = (model_steps(model, SEQ, DecodeStep(model, fused=True, kv_type=kv_type)) for _ in range(2))
    prompt = PROMPTS[1] if start == 17 else [(7 * i + 3) % 64 for i in range(start)]
    rows = [4, 17, 33, 2, 60, 7, 7, 1, 50]
    one.prefill(prompt)
    many.prefill(prompt)
    singles = torch.stack([one.verify([t], len(prompt) + i)[0] for i, t in enumerate(rows)])
    for n in range(1, len(rows) + 1):
        assert torch.equal(singles[:n], many.verify(rows[:n], len(prompt))), f"{n} rows"


@needs_kernels
@pytest.mark.parametrize("scheme", ["q8_0", "q4_1", None])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_ngram_drafting_gives_the_plain_greedy_output(scheme, prompt):
    model = make_model(scheme)
    want = plain(model, prompt, 40)
    for planner in (always_draft(), DraftPlanner(k=5)):
        stats = SpecStats()
        got = speculative_greedy(model_steps(model, SEQ), prompt, 40, NgramDrafter(), stats=stats, planner=planner)
        assert got == want
        assert stats.tokens == 40 and stats.accepted <= stats.drafted
        assert stats.rounds + stats.plain_steps + stats.accepted == 39  # each call: its accepted tokens + 1


@needs_kernels
@pytest.mark.parametrize("n", [0, 1, 2, 3, 8])
def test_short_outputs_and_the_end_of_the_cache(n):
    """max_new_tokens edges: none, one (the prefill's token only), a draft that would run past the limit, and
    an output that ends exactly at the last position of the cache."""
    model = make_model("q8_0")
    prompt = PROMPTS[0]
    want = plain(model, prompt, n) if n else []
    assert speculative_greedy(model_steps(model, SEQ), prompt, n, NgramDrafter(), planner=always_draft()) == want
    long_prompt = (PROMPTS[0] * 8)[: SEQ - n]
    got = speculative_greedy(model_steps(model, SEQ), long_prompt, n, NgramDrafter(), planner=always_draft())
    assert got == (plain(model, long_prompt, n) if n else [])


@needs_kernels
@pytest.mark.parametrize("draft_seed", [0, 1])
def test_draft_model_gives_the_plain_greedy_output(draft_seed):
    """Seed 0: the draft is the target itself (every draft accepted); seed 1: an unrelated model."""
    target = make_model("q8_0")
    draft = make_model("q4_0", seed=draft_seed) if draft_seed else make_model("q8_0")
    prompt = PROMPTS[1]
    want = plain(target, prompt, 36)
    stats = SpecStats()
    got = speculative_greedy(model_steps(target, SEQ), prompt, 36, ModelDrafter(model_steps(draft, SEQ)),
                             stats=stats, planner=always_draft(3))
    assert got == want
    assert stats.rounds > 0
    if draft_seed == 0:
        assert stats.accepted == stats.drafted  # the same model drafts exactly what it verifies
        assert stats.rounds + stats.plain_steps < 36 // 2  # several tokens per round
    else:
        assert stats.accepted < stats.drafted


@needs_kernels
@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_stop_ids_cut_like_plain_decoding(drafter):
    model = make_model("q8_0")
    prompt = PROMPTS[0]
    full = plain(model, prompt, 30)
    for stop in (full[0], full[7], full[-1]):  # the prefill's token, one inside a draft, the last
        d = NgramDrafter() if drafter == "ngram" else ModelDrafter(model_steps(model, SEQ))
        got = speculative_greedy(model_steps(model, SEQ), prompt, 30, d, stop_ids=[stop], planner=always_draft())
        assert got == full[: full.index(stop) + 1]


class NaiveLookup:
    """Prompt lookup by scans of the whole context, the rule NgramDrafter's docstring states (defaults)."""

    def __init__(self, max_n: int = 4, max_match: int = 32, window: int = 8, bonus: int = 2, candidates: int = 16):
        self.max_n, self.max_match, self.window, self.bonus = max_n, max_match, window, bonus
        self.candidates = candidates
        self.source, self.seen = None, []

    def match(self, ctx: list[int], end: int) -> int:
        tail = len(ctx)
        return max(j for j in range(min(self.max_match, end) + 1) if j == 0 or ctx[end - j : end] == ctx[tail - j :])

    def propose(self, ctx: list[int], k: int) -> tuple[list[int], int]:
        if ctx[: len(self.seen)] != self.seen:
            self.source = None
        elif self.source is not None:
            self.source += len(ctx) - len(self.seen)
        self.seen = list(ctx)
        best = None
        for n in range(min(self.max_n, len(ctx) - 1), 0, -1):
            starts = [s for s in range(len(ctx) - n) if ctx[s : s + n] == ctx[-n:]][-self.candidates :]
            if starts:
                found = [(self.match(ctx, s + n) if n == self.max_n else n, s + n) for s in starts]
                best = max(found)  # the longest match, then the latest
                break
        if self.source is not None:
            lo, hi = max(1, self.source - self.window), min(len(ctx) - 1, self.source + self.window)
            near = [(self.match(ctx, e), -abs(e - self.source), -e, e) for e in range(lo, hi + 1)]
            near = [c for c in near if c[0] >= 1]
            if near:
                m, _, _, e = max(near)  # the longest, then the nearest, then the earlier
                if best is None or m + self.bonus >= best[0]:
                    best = (m, e)
        if best is None:
            return [], 0
        self.source = best[1]
        return ctx[best[1] : best[1] + k], best[0].bit_length()


def test_ngram_drafter_proposes_what_followed_the_longest_latest_match():
    d = NgramDrafter(max_ngram=2, min_ngram=1)
    assert d.propose([1, 2, 3, 4, 1, 2, 5, 6, 1, 2], 3) == [5, 6, 1]  # latest "1 2" is followed by 5 6 1
    assert d.last_key == 2  # a match of 2-3 tokens
    assert d.propose([1, 2, 3, 4, 9, 3], 2) == [4, 9]  # no 2-gram match: the 1-gram "3"
    assert d.last_key == 1
    assert d.propose([1, 2, 3], 4) == [] and d.last_key == 0
    # "1 2" occurs twice; the earlier one is preceded by 7 as the context's is: a 3-token match beats the latest
    long = NgramDrafter(max_ngram=2)
    assert long.propose([7, 1, 2, 3, 9, 1, 2, 4, 7, 1, 2], 2) == [3, 9]
    assert long.propose([5, 6, 7, 8, 9, 1, 2, 5, 6, 7, 8], 2) == [9, 1] and long.last_key == 3  # 4-7 tokens
    with pytest.raises(GenerationError):
        NgramDrafter(max_ngram=1, min_ngram=2)
    with pytest.raises(GenerationError):
        NgramDrafter(window=-1)


def test_ngram_drafter_resumes_a_copy_after_an_edit():
    """After an edited token the copy resumes where its source was, not at the latest match of a short tail."""
    text = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    ctx = text + [20, 5, 30, 31, 0, 1, 2, 3]  # elsewhere "5" is followed by 30 31; then a copy of the text begins
    d = NgramDrafter()
    assert d.propose(ctx, 3) == [4, 5, 6]
    ctx += [40, 5]  # the answer edited 4 into 40 and goes on copying
    assert d.propose(ctx, 3) == [6, 7, 8] and d.last_key == 1  # a 1-token match, near the source
    assert NgramDrafter().propose(ctx, 3) == [30, 31, 0]  # without the source: the latest "5"


def test_ngram_index_equals_a_scan_as_the_context_grows_and_changes():
    """The incremental index and the tracked source propose what scans of the whole context do, as the context
    grows by one or several tokens and when a new context is not an extension of the last one."""
    rng = random.Random(0)
    d, ref = NgramDrafter(max_ngram=3, window=4), NaiveLookup(max_n=3, window=4)
    for _ in range(4):
        ctx = [rng.randrange(6) for _ in range(5)]
        for _ in range(100):
            assert (d.propose(ctx, 5), d.last_key) == ref.propose(ctx, 5)
            ctx += [rng.randrange(6) for _ in range(rng.choice([1, 1, 2, 4]))]


def test_planner_drafts_the_length_with_most_tokens_per_second():
    p = DraftPlanner(k=7, prior=(0.0, 1.0))
    p.cost = {0: 1.0, 3: 1.3, 7: 2.1}
    assert p.round_cost(1) == pytest.approx(1.1) and p.round_cost(5) == pytest.approx(1.7)
    assert p.best_length("any", 7) == 0  # a prior of zero acceptance: never worth it
    for _ in range(50):
        p.record_acceptance("long", 7, 7)  # always accepted
        p.record_acceptance("short", 7, 0)  # never
    assert p.best_length("long", 7) == 7  # ~7.4 tokens for 2.1 beats ~3.8 for 1.3
    assert p.best_length("long", 3) == 3  # no more than the proposal holds
    assert p.best_length("short", 7) == 0
    p.cost[7] = 8.5
    assert p.best_length("long", 7) == 3  # now 4 tokens for 1.3 is best
    with pytest.raises(GenerationError, match="k >= 1"):
        DraftPlanner(k=0)


def test_a_new_kind_of_proposal_starts_from_what_drafting_achieved():
    p = DraftPlanner(prior=(2.0, 1.0))
    assert p.acceptance("new", 1) == pytest.approx(2 / 3)  # nothing measured: the prior
    for _ in range(40):
        p.record_acceptance(1, 3, 0)  # 1-token matches: never continued
    assert p.acceptance("new", 1) < 0.1  # a first 4-token match is not trusted more than drafting has earned
    for _ in range(10):
        p.record_acceptance(4, 3, 3)
    assert p.acceptance(4, 1) > 0.6 > p.acceptance(1, 1)  # each kind learns its own rate


def test_planner_backs_off_a_costly_drafter_and_tries_again():
    p = DraftPlanner(k=4, backoff=3, prior=(1.0, 1.0))
    assert p.length(None, 4, learns_unverified=False) == 0  # c(0) first
    p.record_round(0, 1.0)
    p.cost.update({d: 1.0 + 0.25 * d for d in range(1, 5)})  # each drafted token costs a quarter step
    assert p.length(None, 4, learns_unverified=False) > 0  # the prior says 1/2: worth a try
    for _ in range(3):
        p.record_acceptance(None, 4, 0)
    # off for 3 steps, then afresh: costs and acceptance forgotten, so the prior and a cost of 0.1 step a token
    assert [p.length(None, 4, learns_unverified=False) for _ in range(5)] == [0, 0, 0, 0, 2]
    p.record_round(2, 1.5)
    for _ in range(3):
        p.record_acceptance(None, 2, 0)
    assert [p.length(None, 4, learns_unverified=False) for _ in range(8)] == [0] * 7 + [2]  # waits twice as long


@needs_kernels
def test_drafting_turns_itself_off_when_it_does_not_pay_and_on_when_it_does():
    """With rows that cost a full step each, a drafter that is never right is soon not verified at all; prompt
    lookup on text that repeats itself keeps drafting. Output equal to plain decoding either way."""

    class Wrong:
        cheap = True
        last_key = None

        def propose(self, context, k):
            return [(context[-1] + 1 + i) % 64 for i in range(k)]  # never what the model says (checked below)

    model = make_model("q8_0")
    prompt = PROMPTS[2]
    want = plain(model, prompt, 60)
    clock = CostClock(base=1.0, per_row=1.0)  # a row costs as much as a step: only sure drafts pay
    stats = SpecStats()
    got = speculative_greedy(clock.charge(model_steps(model, SEQ)), prompt, 60, Wrong(), stats=stats,
                             planner=DraftPlanner(clock=clock))
    assert got == want and stats.accepted == 0
    assert stats.rounds <= 3 and stats.plain_steps >= 56  # a few tries, then plain steps
    clock = CostClock(base=1.0, per_row=0.05)
    stats = SpecStats()
    got = speculative_greedy(clock.charge(model_steps(model, SEQ)), prompt, 60, NgramDrafter(), stats=stats,
                             planner=DraftPlanner(clock=clock))
    assert got == want
    assert stats.tokens_per_call > 1.5 and stats.acceptance > 0.5  # the model repeats the prompt's loop


def test_bad_arguments_are_clear_errors():
    model = make_model(None, layers=1)
    steps = model_steps(model, 32)
    with pytest.raises(GenerationError, match="empty"):
        speculative_greedy(steps, [], 4, NgramDrafter())
    with pytest.raises(GenerationError, match="max_seq_len"):
        speculative_greedy(steps, [1] * 30, 4, NgramDrafter())
    with pytest.raises(GenerationError, match="k >= 1"):
        speculative_greedy(steps, [1, 2], 4, NgramDrafter(), k=0)
    with pytest.raises(GenerationError, match="exceeds"):
        model_steps(model, SEQ + 1)


def word_tokenizer(tmp_path, words):
    """A WordLevel tokenizer.json over `words` (ids in order), loaded as a llamaforge Tokenizer."""
    from llamaforge.tokenizer import Tokenizer

    path = tmp_path / f"tok{abs(hash(tuple(words)))}.json"
    path.write_text(json.dumps({
        "version": "1.0", "added_tokens": [], "normalizer": None, "post_processor": None, "decoder": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)}, "unk_token": words[0]},
    }))
    return Tokenizer.from_file(path)


def test_a_draft_tokenizer_must_be_the_targets(tmp_path):
    words = [f"w{i}" for i in range(64)]
    same, other = word_tokenizer(tmp_path, words), word_tokenizer(tmp_path, words[:10] + ["x"] + words[11:])
    check_same_vocabulary(same, word_tokenizer(tmp_path, list(words)))
    with pytest.raises(GenerationError, match="token 10"):
        check_same_vocabulary(same, other)
    with pytest.raises(GenerationError, match="63 tokens"):
        check_same_vocabulary(same, word_tokenizer(tmp_path, words[:63]))


def test_llama_generate_speculative_equals_plain_greedy(default_tokenizer):
    """The API's speculative=... gives Llama.generate's own greedy rows (prompt lookup and a draft model)."""
    from llamaforge.api import Llama

    tok = default_tokenizer

    def tiny(seed):
        torch.manual_seed(seed)
        model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                      hidden_dim=96, max_seq_len=SEQ)).eval()
        with torch.no_grad():
            model.output.weight.mul_(6)
        model = quantize_model_weights(model, "q8_0")
        return Llama(model, tok, max_seq_len=SEQ, max_batch_size=2, device=CPU,
                     decode_step=DecodeStep(model, fused=kernels.get_extension() is not None))

    llm, draft = tiny(0), tiny(1)
    prompts = [PROMPTS[0], [5, 9, 2, 7, 5, 9, 2, 7]]
    for max_gen_len in (1, 24, SEQ):  # SEQ: bounded by the cache, as plain decoding is
        plain_rows, _ = llm.generate(prompts, max_gen_len=max_gen_len, temperature=0)
        assert llm.generate(prompts, max_gen_len=max_gen_len, temperature=0, speculative="ngram")[0] == plain_rows
        assert llm.generate(prompts, max_gen_len=max_gen_len, temperature=0, speculative=draft)[0] == plain_rows
    stop = plain_rows[0][5]
    want = llm.generate(prompts, max_gen_len=24, temperature=0, stop_ids=[stop])[0]
    assert llm.generate(prompts, max_gen_len=24, temperature=0, stop_ids=[stop], speculative="ngram")[0] == want
    with pytest.raises(GenerationError, match="temperature=0"):
        llm.generate(prompts, max_gen_len=4, temperature=0.7, speculative="ngram")
    with pytest.raises(GenerationError, match="'ngram' or a draft Llama"):
        llm.generate(prompts, max_gen_len=4, temperature=0, speculative="eagle")



@needs_kernels
def test_default_model_steps_compute_as_the_engine_and_speculation_equals_plain(default_tokenizer):
    """On the default model as shipped (Q4_1 on the int8 kernels), model_steps' prefill (the engine's canonical
    chunks) gives the logits the engine gives Llama.generate: its logprob of the first token, to float
    rounding (the model's forward over the whole prompt moves the logits by ~0.5 there, which becomes another
    token a few dozen tokens on); and prompt lookup gives exactly Llama.generate's plain rows."""
    from llamaforge.api import Llama

    llm = Llama.build(max_seq_len=256, max_batch_size=2, device="cpu", progress=False)
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    prompts = [llm.tokenizer.encode(chat.format("Write an email to a colleague."), allow_special=True),
               llm.tokenizer.encode(chat.format("Repeat exactly: " + "The quick brown fox jumps over the lazy dog. " * 3),
                                    allow_special=True)]
    rows, lps = llm.generate(prompts[:1], max_gen_len=1, temperature=0, logprobs=True)
    from llamaforge.runtime import DecodeStep

    # the Llama's KV element type (float16 for this block-quantized file), as Llama.generate's steps use it
    first = model_steps(llm.model, 256, DecodeStep(llm.model, fused=True, kv_type=llm.kv_type)).prefill(prompts[0])
    assert int(first.argmax()) == rows[0][0]
    assert float(torch.log_softmax(first, -1)[rows[0][0]]) == pytest.approx(lps[0][0], abs=1e-5)
    plain_rows, _ = llm.generate(prompts, max_gen_len=24, temperature=0)
    assert llm.generate(prompts, max_gen_len=24, temperature=0, speculative="ngram")[0] == plain_rows
