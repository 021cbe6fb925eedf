"""Speculative greedy decoding (llamaforge.generation.speculative): output equal to plain greedy decoding.

The reference is `llamaforge.generation.generate` at temperature 0 on the same tiny random model (prefill,
then one-token steps). Equality is exact (token ids), and so is the verification forward: each row's logits
bit for bit those of a one-token step at its position, which is what the equality rests on.
No test asserts on time; the Speedometer is driven by a fake clock.
"""

from __future__ import annotations

import pytest
import torch

from llamaforge import kernels
from llamaforge.errors import GenerationError
from llamaforge.generation import SamplingParams, generate
from llamaforge.generation.speculative import (
    ModelDrafter,
    NgramDrafter,
    SpecStats,
    Speedometer,
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


PROMPTS = [
    [1, 5, 9, 2, 7, 5, 9, 2, 7, 5, 9, 2, 3],  # repetitive: prompt lookup finds matches
    [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 38, 46, 26, 43],
]


@needs_kernels
@pytest.mark.parametrize("scheme", ["q8_0", "q4_0", None])
def test_verify_rows_equal_one_token_steps(scheme):
    """The batched verification forward is row- and position-exact against one-token steps."""
    model = make_model(scheme)
    one, many = model_steps(model, SEQ), model_steps(model, SEQ)
    prompt, rows = PROMPTS[1], [4, 17, 33, 2, 60]
    one.prefill(prompt)
    many.prefill(prompt)
    singles = torch.stack([one.verify([t], len(prompt) + i)[0] for i, t in enumerate(rows)])
    batched = many.verify(rows, len(prompt))
    assert torch.equal(singles, batched)


@needs_kernels
@pytest.mark.parametrize("scheme", ["q8_0", "q4_1", None])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_ngram_drafting_gives_the_plain_greedy_output(scheme, prompt):
    model = make_model(scheme)
    want = plain(model, prompt, 40)
    stats = SpecStats()
    got = speculative_greedy(model_steps(model, SEQ), prompt, 40, NgramDrafter(), k=4, stats=stats,
                             speedometer=Speedometer(backoff=0))
    assert got == want
    assert stats.tokens == 40 and stats.accepted <= stats.drafted


@needs_kernels
@pytest.mark.parametrize("draft_seed", [0, 1])
def test_draft_model_gives_the_plain_greedy_output(draft_seed):
    """Seed 0: the draft is the target itself (every draft accepted); seed 1: an unrelated model."""
    target = make_model("q8_0")
    draft = make_model("q4_0", seed=draft_seed) if draft_seed else make_model("q8_0")
    prompt = PROMPTS[1]
    want = plain(target, prompt, 36)
    stats = SpecStats()
    never_off = Speedometer(clock=lambda: 0.0)  # equal (zero) times: drafting never turns itself off
    got = speculative_greedy(model_steps(target, SEQ), prompt, 36, ModelDrafter(model_steps(draft, SEQ)), k=3,
                             stats=stats, speedometer=never_off)
    assert got == want
    assert stats.rounds > 0
    if draft_seed == 0:
        assert stats.accepted == stats.drafted  # the same model drafts exactly what it verifies
        assert stats.rounds + stats.plain_steps < 36  # several tokens per round
    else:
        assert stats.accepted < stats.drafted


@needs_kernels
def test_stop_ids_cut_like_plain_decoding():
    model = make_model("q8_0")
    prompt = PROMPTS[0]
    full = plain(model, prompt, 30)
    stop = full[7]
    got = speculative_greedy(model_steps(model, SEQ), prompt, 30, NgramDrafter(), stop_ids=[stop])
    assert got == full[: full.index(stop) + 1]


def test_ngram_drafter_proposes_what_followed_the_latest_match():
    d = NgramDrafter(max_ngram=2, min_ngram=1)
    assert d.propose([1, 2, 3, 4, 1, 2, 5, 6, 1, 2], 3) == [5, 6, 1]  # latest "1 2" is followed by 5 6 1
    assert d.propose([1, 2, 3, 4, 9, 3], 2) == [4, 9]  # no 2-gram match: the 1-gram "3"
    assert d.propose([1, 2, 3], 4) == []
    with pytest.raises(GenerationError):
        NgramDrafter(max_ngram=1, min_ngram=2)


def test_speedometer_turns_drafting_off_when_rounds_are_slower_and_probes_again():
    m = Speedometer(backoff=3, reprobe=100)
    assert not m.should_draft()  # no plain rate yet: measure one plain step first
    m.record(False, 1.0, 1)
    assert m.should_draft()
    m.record(True, 1.0, 2)  # 0.5 s per token: faster than plain, stays on
    assert m.should_draft()
    m.record(True, 4.0, 2)  # EMA 0.3 * 2.0 + 0.7 * 0.5 = 0.95 < 1.0: still on
    assert m.should_draft()
    m.record(True, 8.0, 1)  # 0.3 * 8 + 0.7 * 0.95 > 1.0: off for 3 steps
    assert [m.should_draft() for _ in range(4)] == [False, False, False, True]
    m.record(True, 2.0, 1)  # the retry is slower again: off for twice as long
    assert [m.should_draft() for _ in range(7)] == [False] * 6 + [True]
    m.record(True, 0.5, 1)  # a round that pays resets the wait
    m.record(True, 50.0, 1)
    assert [m.should_draft() for _ in range(4)] == [False, False, False, True]


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
    plain_rows, _ = llm.generate(prompts, max_gen_len=24, temperature=0)
    assert llm.generate(prompts, max_gen_len=24, temperature=0, speculative="ngram")[0] == plain_rows
    assert llm.generate(prompts, max_gen_len=24, temperature=0, speculative=draft)[0] == plain_rows
    with pytest.raises(GenerationError, match="temperature=0"):
        llm.generate(prompts, max_gen_len=4, temperature=0.7, speculative="ngram")
    with pytest.raises(GenerationError, match="'ngram' or a draft Llama"):
        llm.generate(prompts, max_gen_len=4, temperature=0, speculative="eagle")
