"""`Llama` on the one engine: the engine's sampling surface from Python, concurrency, and API == server.

A tiny random Llama (dim 64, 2 layers, peaked outputs) with the default model's real tokenizer.
Tolerances: token ids identical (greedy, and seeded sampling with the same seed); logprobs within 1e-4
(float32) between the Python API and the server, which run the same engine code.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

from llamaforge.errors import GenerationError
from llamaforge.model import ModelArgs, Transformer

MAX_SEQ = 96
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama(default_tokenizer):
    from llamaforge.api import Llama

    tok = default_tokenizer
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                  hidden_dim=128, max_seq_len=MAX_SEQ))
    with torch.no_grad():
        model.output.weight.mul_(8)  # peaked distributions: greedy choices far from ties
    return Llama(model.eval(), tok, max_seq_len=MAX_SEQ, max_batch_size=4, device=CPU)


PROMPTS = ["Hello there", "The capital of France is", "Once upon a time"]


def ids(llama, text):
    return llama.tokenizer.encode(text, bos=llama.tokenizer.add_bos)


def reference_greedy(llama, prompt, n, *, bias=None, repetition=1.0, frequency=0.0, presence=0.0):
    """Greedy decoding by full recomputation, with the penalties written out as their formulas."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = llama.model(torch.tensor([prompt + out]))[0, -1].clone()
            for t, b in (bias or {}).items():
                logits[t] += b
            seen = set(prompt) | set(out)
            for t in seen:
                logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
            for t in set(out):
                logits[t] -= out.count(t) * frequency + presence
            out.append(int(torch.argmax(logits)))
    return out


def test_penalties_and_logit_bias_from_python_follow_their_formulas(llama):
    p = ids(llama, PROMPTS[1])
    kw = dict(repetition=1.5, frequency=2.0, presence=2.0, bias={42: 30.0})
    got = llama.generate([p], 12, temperature=0, stop_ids=[], repetition_penalty=1.5, frequency_penalty=2.0,
                         presence_penalty=2.0, logit_bias={42: 30.0})[0][0]
    assert got == reference_greedy(llama, p, 12, **kw)
    # the bias makes token 42 the answer until the penalties on its repeats outweigh it
    assert got[:2] == [42, 42] and 42 not in got[2:]
    forced = llama.generate([p], 5, temperature=0, stop_ids=[], logit_bias={42: 100})[0][0]
    assert forced == [42] * 5


def test_min_p_one_is_greedy_and_top_p_zero_too(llama):
    prompts = [ids(llama, t) for t in PROMPTS]
    greedy = llama.generate(prompts, 10, temperature=0, stop_ids=[])[0]
    assert llama.generate(prompts, 10, temperature=1.3, min_p=1.0, stop_ids=[], seed=5)[0] == greedy
    assert llama.generate(prompts, 10, temperature=1.3, top_p=0.0, stop_ids=[], seed=5)[0] == greedy


def test_stop_strings_from_python(llama):
    free = llama.text_completion([PROMPTS[0]], temperature=0, max_gen_len=24)[0]["generation"]
    assert len(free) > 6
    stop = free[3:6]
    cut = free.index(stop)
    out = llama.text_completion([PROMPTS[0]], temperature=0, max_gen_len=24, stop=[stop, "never-there"])
    assert out[0]["generation"] == free[:cut]
    streamed = "".join(llama.stream_text_completion(PROMPTS[0], 24, temperature=0, stop=stop))
    assert streamed == free[:cut]


def test_n_choices_use_seed_plus_index(llama):
    p = ids(llama, PROMPTS[2])
    rows, _ = llama.generate([p], 10, temperature=1.0, top_p=1.0, n=3, seed=11, stop_ids=[])
    assert len(rows) == 3
    for j in range(3):
        assert rows[j] == llama.generate([p], 10, temperature=1.0, top_p=1.0, seed=11 + j, stop_ids=[])[0][0]
    assert len({tuple(r) for r in rows}) > 1
    out = llama.text_completion(PROMPTS[:2], temperature=1.0, max_gen_len=4, n=2, seed=1)
    assert len(out) == 4


def test_json_schema_answer_from_python(llama):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "ok"],
              "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    out = llama.chat_completion([[{"role": "user", "content": "Give me JSON"}]], temperature=1.0, seed=3,
                                max_gen_len=60, response_format=fmt)
    obj = json.loads(out[0]["generation"]["content"])
    assert set(obj) == {"name", "ok"} and isinstance(obj["ok"], bool) and len(obj["name"]) <= 6
    with pytest.raises(GenerationError, match="response_format"):
        llama.chat_completion([[{"role": "user", "content": "x"}]], response_format={"type": "yaml"})


def test_concurrent_threads_share_decode_steps_and_get_their_solo_answers(llama):
    prompts = [ids(llama, t) for t in PROMPTS[:2]]
    solo = [llama.generate([p], 20, temperature=0, stop_ids=[])[0][0] for p in prompts]
    engine = llama.open_engine(n_slots=4)  # not started: both requests wait, then join one batch
    results = [None, None]

    def call(i):
        results[i] = llama.generate([prompts[i]], 20, temperature=0, stop_ids=[])[0][0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for _ in range(500):
        if engine.stats()["waiting"] == 2:
            break
        threading.Event().wait(0.01)
    assert engine.stats()["waiting"] == 2
    engine.start()
    for t in threads:
        t.join(60)
    assert results == solo
    # 20 tokens each: the first comes from the prefill, then 19 decode steps that both requests share
    assert engine.steps == 19
    engine.close()


def test_wrong_typed_arguments_are_clear_errors(llama):
    p = ids(llama, PROMPTS[0])
    cases = [
        (dict(prompt_tokens=[p], max_gen_len=4, seed=1.5), "seed"),
        (dict(prompt_tokens=[p], max_gen_len=4, seed="7"), "seed"),
        (dict(prompt_tokens=[p], max_gen_len=4, top_k="3"), "top_k"),
        (dict(prompt_tokens=[p], max_gen_len=4, stop_ids="ab"), "stop_ids"),
        (dict(prompt_tokens=[p], max_gen_len=4, stop_ids=[1.5]), "stop_ids"),
        (dict(prompt_tokens=None, max_gen_len=4), "prompt_tokens"),
        (dict(prompt_tokens=[None], max_gen_len=4), "prompt 0"),
        (dict(prompt_tokens=[[1, None]], max_gen_len=4), "outside"),
        (dict(prompt_tokens=[p], max_gen_len=4.0), "max_gen_len"),
        (dict(prompt_tokens=[p], max_gen_len=4, n=0), "n must"),
        (dict(prompt_tokens=[p], max_gen_len=4, stop=[3]), "stop"),
        (dict(prompt_tokens=[p], max_gen_len=4, logit_bias={10**9: 1.0}), "logit_bias"),
    ]
    for kwargs, match in cases:
        with pytest.raises(GenerationError, match=match):
            llama.generate(**kwargs)
    with pytest.raises(GenerationError, match="list of strings"):
        llama.text_completion(None)
    with pytest.raises(GenerationError, match="must be a string"):
        llama.text_completion([None])
    with pytest.raises(GenerationError, match="dialogs"):
        llama.chat_completion(None)


def test_python_api_and_server_give_the_same_tokens(llama):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from llamaforge.server.app import create_app

    p = ids(llama, PROMPTS[1])
    cases = [dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=3)]
    api = [llama.generate([p], 12, logprobs=True, stop_ids=llama.tokenizer.stop_ids, **kw) for kw in cases]
    with TestClient(create_app(llama, model_name="tiny")) as client:
        for kw, (tokens, lps) in zip(cases, api):
            body = client.post("/v1/completions", json={"prompt": p, "max_tokens": 12, "logprobs": 0, **kw}).json()
            got = body["choices"][0]["logprobs"]
            assert got["tokens"] == [llama.tokenizer.token_bytes(t).decode("utf-8", "replace") for t in tokens[0]]
            assert got["token_logprobs"] == pytest.approx(lps[0], abs=1e-4)


def _threads_of_model_calls(llama, fn):
    """The names of the threads on which `fn()` called the model (a forward pre-hook records them)."""
    names = []
    handle = llama.model.register_forward_pre_hook(lambda m, a: names.append(threading.current_thread().name))
    try:
        fn()
    finally:
        handle.remove()
    return names


def test_lockstep_and_speculative_calls_run_on_the_engine_thread(llama):
    # A caller's thread that does the model's OpenMP work keeps a libgomp pool beside the engine's, which
    # slows every later engine step; Meta's lock-step mode and speculative decoding go to the engine thread.
    prompts = [ids(llama, p) for p in PROMPTS[:2]]
    lockstep = _threads_of_model_calls(llama, lambda: llama.generate(prompts, 6, temperature=0.8, seed=3))
    spec = _threads_of_model_calls(llama, lambda: llama.generate(prompts[:1], 6, temperature=0, speculative="ngram"))
    assert lockstep and spec
    assert set(lockstep) == set(spec) == {"llamaforge-engine"}


def test_engine_call_returns_raises_and_refuses_when_closed(llama):
    from llamaforge.api import EngineClosed

    engine = llama.engine
    assert engine.call(lambda: threading.current_thread().name).result(timeout=30) == "llamaforge-engine"
    with pytest.raises(ZeroDivisionError):
        engine.call(lambda: 1 / 0).result(timeout=30)
    # From the engine thread itself (a sink, say) it runs at once instead of waiting for itself.
    assert engine.call(lambda: engine.call(lambda: 7).result(timeout=0)).result(timeout=30) == 7
    engine.close()
    with pytest.raises(EngineClosed):
        engine.call(lambda: None)
    assert llama.engine is not engine and llama.engine.call(lambda: 1).result(timeout=30) == 1  # a fresh one
