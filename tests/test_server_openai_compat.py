"""The legacy completions `logprobs` object field by field as OpenAI documents it, through the official
`openai` client, in process on a tiny random model (sampled at temperature 1, so the chosen token is often
not the most likely one).

Both failed before their fix: `top_logprobs` maps lacked the chosen token (OpenAI: "the API will always
return the logprob of the sampled token, so there may be up to logprobs+1 elements"; `logprobs=0` gave
empty maps), and every streamed chunk's `text_offset` started at 0 instead of where its text goes.
"""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")
pytest.importorskip("fastapi")

from starlette.testclient import TestClient  # noqa: E402

from tests.test_server_ollama_compat import _InProcess  # noqa: E402


@pytest.fixture(scope="module")
def client(default_tokenizer):
    from llamaforge.api import Llama
    from llamaforge.model import ModelArgs, Transformer
    from llamaforge.server.app import create_app

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=default_tokenizer.n_words,
                                  hidden_dim=64, max_seq_len=64)).eval()
    llama = Llama(model, default_tokenizer, max_seq_len=64, max_batch_size=2, device=torch.device("cpu"))
    with TestClient(create_app(llama, model_name="tiny")) as c:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0,
                            http_client=httpx.Client(transport=_InProcess(c)))


@pytest.mark.parametrize("k", [0, 1, 3])
def test_top_logprobs_hold_the_chosen_token(client, k):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                  seed=7, logprobs=k, echo=True)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first prompt token
    for top, token, logprob in zip(lp.top_logprobs[1:], lp.tokens[1:], lp.token_logprobs[1:]):
        assert top[token] == logprob
        assert max(k, 1) <= len(top) <= k + 1
        assert all(v <= 0 for v in top.values())


def test_streamed_text_offsets_continue_the_text(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=3, logprobs=1)
    for echo in (False, True):
        sent = 0
        chunks = [c for c in client.completions.create(stream=True, echo=echo, **kw) if c.choices]
        for chunk in chunks:
            choice = chunk.choices[0]
            if choice.logprobs is not None and choice.logprobs.tokens:
                assert choice.logprobs.text_offset[0] == sent
                offsets = choice.logprobs.text_offset
                assert offsets == sorted(offsets)
            sent += len(choice.text)
        whole = client.completions.create(echo=echo, **kw).choices[0]
        assert "".join(c.choices[0].text for c in chunks) == whole.text
        assert sent == len(whole.text) and len(chunks) > 3


def test_text_too_long_for_any_tokenization_is_refused_before_tokenizing(client, monkeypatch):
    """Before the fix a 7 MB prompt was tokenized (25 s of a core) only to be refused for its token count."""
    from llamaforge.tokenizer import Tokenizer

    def never(*a, **k):
        raise AssertionError("tokenized text that cannot fit")

    monkeypatch.setattr(Tokenizer, "encode", never)
    huge = "hello world " * 60_000  # 720 kB: more than 64 tokens of at most 4x the longest token's bytes
    for call in (lambda: client.completions.create(model="tiny", prompt=huge, max_tokens=1),
                 lambda: client.completions.create(model="tiny", prompt=["hi", huge], max_tokens=1),
                 lambda: client.chat.completions.create(model="tiny", max_tokens=1, messages=[
                     {"role": "system", "content": huge[:400_000]}, {"role": "user", "content": huge[:400_000]}]),
                 lambda: client.embeddings.create(model="tiny", input=huge)):
        with pytest.raises(openai.BadRequestError) as err:
            call()
        assert err.value.status_code == 400 and err.value.body["code"] == "context_length_exceeded"
        assert "bytes of text" in err.value.body["message"]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.parametrize("extra, param", [
    ({"functions": [TOOLS[0]["function"]]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
])
def test_chat_fields_whose_meaning_is_not_served_are_400s_naming_them(client, extra, param):
    """Each was silently ignored (a text answer to a request for function_call or audio)."""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       **extra)
    assert err.value.body["param"] == param and param in err.value.body["message"]


def test_text_only_modalities_are_served(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       modalities=["text"])
    assert r.choices[0].message.content is not None


@pytest.mark.parametrize("schema", [{"enum": ["yes", "no"]}, '{"enum": ["yes", "no"]}'])
def test_vllms_guided_json_constrains_chat_and_completions(client, schema):
    """vLLM's extension, sent by clients written for vLLM (`extra_body`); it was ignored: free text."""
    pytest.importorskip("llguidance")
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "ok?"}], max_tokens=8,
                                          temperature=1, seed=1, extra_body={"guided_json": schema})
    assert json.loads(chat.choices[0].message.content) in ("yes", "no")
    done = client.completions.create(model="tiny", prompt="ok?", max_tokens=8, temperature=1, seed=2, n=2,
                                     extra_body={"guided_json": schema})
    assert all(json.loads(c.text) in ("yes", "no") for c in done.choices)


@pytest.mark.parametrize("extra, param", [
    ({"guided_regex": "a+"}, "guided_regex"), ({"guided_choice": ["a", "b"]}, "guided_choice"),
    ({"guided_grammar": "root ::= \"a\""}, "guided_grammar"), ({"structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ({"guided_json": "{not json"}, "guided_json"), ({"guided_json": {"type": "object"},
                                                     "response_format": {"type": "json_object"}}, "guided_json"),
])
def test_other_guided_decoding_is_a_400_naming_it(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body=extra)
    assert err.value.body["param"] == param


@pytest.mark.parametrize("name, value", [
    ("min_tokens", 4), ("ignore_eos", True), ("include_stop_str_in_output", True), ("use_beam_search", True),
    ("stop_token_ids", [5]), ("truncate_prompt_tokens", 8), ("skip_special_tokens", False),
    ("add_generation_prompt", False), ("continue_final_message", True), ("echo", True),
])
def test_vllm_extensions_that_would_change_the_answer_are_400s(client, name, value):
    """Clients written for vLLM send these in `extra_body`; they were dropped as unknown fields."""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={name: value})
    assert err.value.body["param"] == name and "vLLM" in err.value.body["message"]


def test_vllm_extensions_at_their_neutral_values_and_other_extras_are_accepted(client):
    neutral = {"min_tokens": 0, "ignore_eos": False, "skip_special_tokens": True, "stop_token_ids": [],
               "add_generation_prompt": True, "some_client_field": {"x": 1}}
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body=neutral)
    assert r.choices[0].message.content is not None
    r = client.completions.create(model="tiny", prompt="hi", max_tokens=2, echo=True, extra_body={"min_tokens": 0})
    assert r.choices[0].text.startswith("hi")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"min_tokens": 3})


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind, param", [("completions", "max_tokens"), ("chat", "max_tokens"),
                                         ("chat", "max_completion_tokens")])
def test_max_tokens_zero_is_a_400_as_vllms_unless_echo_scores_the_prompt(client, kind, param, stream):
    """vLLM: "max_tokens must be at least 1" (a 400, streamed or not); a completion with echo and max_tokens 0
    scores the prompt (vLLM's echo without generation, lm-eval's use). Before: 200s with empty answers."""
    if kind == "chat":
        call = lambda **kw: client.chat.completions.create(  # noqa: E731
            model="tiny", messages=[{"role": "user", "content": "hi"}], stream=stream, **kw)
    else:
        call = lambda **kw: client.completions.create(model="tiny", prompt="hi", stream=stream, **kw)  # noqa: E731
    with pytest.raises(openai.BadRequestError) as exc:
        call(**{param: 0})
    assert exc.value.body["param"] == param and "at least 1" in exc.value.body["message"]
    if kind == "completions":
        out = call(max_tokens=0, echo=True, logprobs=1)
        chunks = list(out) if stream else [out]
        assert "".join(c.choices[0].text for c in chunks) == "hi"
        assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_absent_and_a_string_stop(client, stream):
    """max_tokens absent: 16 on /v1/completions (OpenAI's and vLLM's default), the rest of the context on chat;
    `stop` as a plain string is a one-element list (the answer ends before it, finish_reason "stop")."""
    def text_and_reason(out):
        chunks = list(out) if stream else [out]
        pick = (lambda c: c.choices[0].text) if hasattr(chunks[0].choices[0], "text") else \
            (lambda c: (c.choices[0].delta if stream else c.choices[0].message).content or "")
        return "".join(pick(c) for c in chunks), chunks[-1].choices[0].finish_reason, chunks

    bias = {"0": -100, "1": -100, "2": -100}  # no end token: it runs to its limit
    _, reason, chunks = text_and_reason(client.completions.create(model="tiny", prompt="hi", stream=stream,
                                                                  logit_bias=bias, temperature=0))
    assert reason == "length" and (stream or chunks[0].usage.completion_tokens == 16)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=stream,
                                         logit_bias=bias, temperature=0, stream_options={"include_usage": True}
                                         if stream else None)
    chunks = list(out) if stream else [out]
    usage = chunks[-1].usage
    assert usage.prompt_tokens + usage.completion_tokens == 64  # the context of the fixture's model
    full, _, _ = text_and_reason(client.completions.create(model="tiny", prompt="hi", stream=stream, logit_bias=bias,
                                                           temperature=0, max_tokens=8))
    stop = full[len(full) // 2:][:2]
    cut, reason, _ = text_and_reason(client.completions.create(model="tiny", prompt="hi", stream=stream,
                                                               logit_bias=bias, temperature=0, max_tokens=8, stop=stop))
    assert reason == "stop" and cut == full[:full.index(stop)]
