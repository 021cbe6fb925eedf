"""Generation semantics of shared/DESIGN.md, each pinned against the Meta oracle in tests/reference.py.

Tolerances: greedy tokens must be identical; logprobs agree within 1e-4 absolute (cached vs full
recomputation in float32).
"""

import pytest
import torch

from llamaforge.errors import GenerationError
from llamaforge.generation import SamplingParams, generate, sample_top_p
from llamaforge.generation.sampler import sample
from llamaforge.model import ModelArgs, Transformer
from tests.reference import meta_generate

VOCAB = 97
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=128,
                              max_seq_len=64))
    # Larger output weights give peaked distributions, so greedy choices are far from ties.
    with torch.no_grad():
        m.output.weight.mul_(8)
    return m.eval()


def run(model, prompts, max_gen_len=8, stop_ids=(VOCAB - 1,), max_seq_len=64, temperature=0.0, **kw):
    params = SamplingParams(temperature=temperature, top_p=kw.pop("top_p", 0.9))
    return generate(model, prompts, max_gen_len=max_gen_len, max_seq_len=max_seq_len, params=params,
                    stop_ids=stop_ids, device=CPU, **kw)


PROMPTS = [[1, 5, 9, 13, 20, 7], [1, 3], [1, 40, 41, 42]]


@pytest.mark.parametrize("echo", [False, True])
@pytest.mark.parametrize("logprobs", [False, True])
def test_greedy_matches_meta_oracle(model, echo, logprobs):
    ours = run(model, PROMPTS, max_gen_len=10, logprobs=logprobs, echo=echo)
    ref = meta_generate(model, PROMPTS, 10, 64, (VOCAB - 1,), temperature=0, logprobs=logprobs, echo=echo)
    assert ours[0] == ref[0]
    if logprobs:
        for a, b in zip(ours[1], ref[1]):
            assert a == pytest.approx(b, abs=1e-4)
    else:
        assert ours[1] is None


def test_ragged_batch_equals_each_prompt_alone(model):
    batch, batch_lp = run(model, PROMPTS, max_gen_len=12, logprobs=True, echo=True)
    for i, prompt in enumerate(PROMPTS):
        alone, alone_lp = run(model, [prompt], max_gen_len=12, logprobs=True, echo=True)
        assert batch[i] == alone[0]
        assert batch_lp[i] == pytest.approx(alone_lp[0], abs=1e-4)


def test_echo_returns_prompt_and_first_logprob_is_zero(model):
    toks, lps = run(model, PROMPTS, max_gen_len=4, logprobs=True, echo=True)
    for prompt, t, lp in zip(PROMPTS, toks, lps):
        assert t[: len(prompt)] == prompt
        assert lp[0] == 0.0
        assert all(x <= 0 for x in lp)
        assert len(lp) == len(t)


def test_logprobs_are_log_probabilities_of_the_returned_tokens(model):
    prompt = PROMPTS[0]
    toks, lps = run(model, [prompt], max_gen_len=5, logprobs=True)
    full = torch.tensor([prompt + toks[0]])
    logp = torch.log_softmax(model(full)[0], dim=-1)
    expected = [logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(toks[0])]
    assert lps[0] == pytest.approx(expected, abs=1e-4)


def test_stops_when_a_stop_id_is_generated_and_cuts_before_it(model):
    free, _ = run(model, [PROMPTS[0]], max_gen_len=10, stop_ids=())
    stop = free[0][3]  # make the 4th generated token a stop id
    first = free[0].index(stop)
    toks, _ = run(model, [PROMPTS[0]], max_gen_len=10, stop_ids=(stop,))
    assert toks[0] == free[0][:first]
    ref, _ = meta_generate(model, [PROMPTS[0]], 10, 64, (stop,), temperature=0)
    assert toks == ref


def test_stop_id_inside_prompt_does_not_stop_generation(model):
    free, _ = run(model, [PROMPTS[0]], max_gen_len=6, stop_ids=())
    stop = next(t for t in PROMPTS[0][1:] if t not in free[0])
    cut = PROMPTS[0].index(stop)
    toks, _ = run(model, [PROMPTS[0]], max_gen_len=6, stop_ids=(stop,))
    assert toks[0] == free[0]
    # With echo, Meta cuts the echoed row at the first stop id, even inside the prompt.
    echoed, _ = run(model, [PROMPTS[0]], max_gen_len=6, stop_ids=(stop,), echo=True)
    assert echoed[0] == PROMPTS[0][:cut]


def test_max_gen_len_and_max_seq_len_bound_the_output(model):
    toks, _ = run(model, PROMPTS, max_gen_len=3, stop_ids=())
    assert [len(t) for t in toks] == [3, 3, 3]
    toks, _ = run(model, PROMPTS, max_gen_len=50, stop_ids=(), max_seq_len=10)
    # total_len = min(max_seq_len, max_gen_len + max_prompt_len) = 10 for every row
    assert [len(t) for t in toks] == [10 - len(p) for p in PROMPTS]
    toks, _ = run(model, PROMPTS, max_gen_len=0)
    assert toks == [[], [], []]


def test_logprobs_when_nothing_can_be_generated_are_not_shifted(model):
    prompt = PROMPTS[0]
    toks, lps = run(model, [prompt], max_gen_len=5, logprobs=True, echo=True, max_seq_len=len(prompt))
    assert toks[0] == prompt
    logp = torch.log_softmax(model(torch.tensor([prompt]))[0], dim=-1)
    expected = [0.0] + [logp[j - 1, prompt[j]].item() for j in range(1, len(prompt))]
    assert lps[0] == pytest.approx(expected, abs=1e-4)


def test_sampling_matches_meta_oracle_with_same_seed(model):
    torch.manual_seed(123)
    ours = run(model, PROMPTS, max_gen_len=8, temperature=1.0, top_p=0.8)
    torch.manual_seed(123)
    ref = meta_generate(model, PROMPTS, 8, 64, (VOCAB - 1,), temperature=1.0, top_p=0.8)
    assert ours[0] == ref[0]


def test_seeded_generator_is_reproducible(model):
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a = run(model, PROMPTS, max_gen_len=8, temperature=1.2, top_p=1.0, generator=gen())
    b = run(model, PROMPTS, max_gen_len=8, temperature=1.2, top_p=1.0, generator=gen())
    assert a == b


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        seen.add(int(sample_top_p(probs.clone(), 0.6, gen)))
    # cumulative before each token: 0, 0.5, 0.8, 0.95 -> tokens 0 and 1 stay (1 crosses 0.6)
    assert seen == {0, 1}
    seen = {int(sample_top_p(probs.clone(), 0.45, gen)) for _ in range(200)}
    assert seen == {0}  # token 0 alone already crosses 0.45; the mass before token 1 (0.5) exceeds it


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p="0.9"), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(frequency_penalty=3), "frequency_penalty"),
        (dict(logit_bias={"5": 1.0}), "logit_bias"),
        (dict(logit_bias={5: 101}), "logit_bias"),
    ],
)
def test_bad_sampling_values_raise(kwargs, match):
    with pytest.raises(GenerationError, match=match):
        SamplingParams(**kwargs)


def test_a_temperature_past_float32_keeps_top_k_masked():
    """1e300 is inf in float32: masked logits (-inf) over it were NaN and torch.multinomial raised."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample(logits, SamplingParams(temperature=1e300, top_k=2, top_p=1.0), gen)) for _ in range(100)}
    assert seen == {0, 1}  # the two kept tokens, equally likely at this temperature


def test_top_p_zero_is_meta_greedy(model):
    """Meta accepts top_p = 0: the nucleus keeps only the most likely token, so sampling is greedy."""
    greedy, _ = run(model, PROMPTS, max_gen_len=8)
    torch.manual_seed(0)
    sampled, _ = run(model, PROMPTS, max_gen_len=8, temperature=1.5, top_p=0.0)
    assert sampled == greedy


@pytest.mark.parametrize(
    "prompts, kw, match",
    [
        ([], {}, "no prompts"),
        ([[]], {}, "empty"),
        ([[1, VOCAB]], {}, "outside"),
        ([[1, -3]], {}, "outside"),
        ([list(range(1, 20))], dict(max_seq_len=10), "max_seq_len"),
        ([[1, 2]], dict(max_gen_len=-1), "max_gen_len"),
    ],
)
def test_bad_prompts_raise(model, prompts, kw, match):
    with pytest.raises(GenerationError, match=match):
        run(model, prompts, **kw)
