"""What Ollama clients send that the Ollama routes must answer as Ollama does, in process on a tiny model.

Each case failed before its fix: a deeply nested body was a 500 (json's RecursionError) that also cut
the connection; option errors named the OpenAI fields they were translated to (`max_tokens`) rather than
what the client sent (`options.num_predict`); a `num_predict` past the context was a 400 where Ollama
generates until the context is full, and a raw generate without `num_predict` stopped after 16 tokens
(the /v1/completions default) where Ollama's default is "until the end"; `ollama pull` of the served model
was a 404 and unknown /api routes, 401s and 413s had OpenAI's error shape, which the `ollama` client shows
as a dict.
"""

from __future__ import annotations

import json

import pytest

ollama = pytest.importorskip("ollama")
pytest.importorskip("fastapi")
torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

CTX = 48


@pytest.fixture(scope="module")
def app_client(default_tokenizer):
    from llamaforge.server.app import create_app
    from tests.conftest import tiny_llama

    tok = default_tokenizer
    llama = tiny_llama(tok, CTX)
    with TestClient(create_app(llama, model_name="tiny", max_body_bytes=2**20)) as c:
        yield c


class _InProcess(httpx.BaseTransport):
    """An httpx transport answering from the app through the TestClient (whole bodies, no socket)."""

    def __init__(self, c: TestClient):
        self.c = c

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.c.request(request.method, str(request.url), content=request.read(), headers=request.headers)
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)


def ollama_client(c: TestClient):
    """The official client over the in-process app."""
    return ollama.Client(host="http://testserver", transport=_InProcess(c))


def test_a_deeply_nested_body_is_a_400_and_the_server_stays_up(app_client):
    body = b'{"model": "tiny", "options": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for route in ("/api/chat", "/api/generate", "/api/show", "/api/pull"):
        r = app_client.post(route, content=body)
        assert r.status_code == 400, (route, r.text)
        assert "nested too deeply" in r.json()["error"]
    assert app_client.get("/api/tags").status_code == 200


def test_option_errors_name_the_ollama_fields(app_client):
    client = ollama_client(app_client)
    for options, word in (({"num_predict": "many"}, "options.num_predict"), ({"temperature": -1}, "options.temperature"),
                          ({"repeat_penalty": "x"}, "options.repeat_penalty"), ({"stop": 3}, "options.stop")):
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model="tiny", prompt="hi", options=options)
        assert err.value.status_code == 400
        assert word in err.value.error and "max_tokens" not in err.value.error, err.value.error


def test_a_temperature_above_openais_bound_samples_as_ollama_does(app_client):
    client = ollama_client(app_client)  # Ollama bounds a temperature below only; OpenAI's requests stop at 2
    r = client.generate(model="tiny", prompt="hi", raw=True, options={"temperature": 9, "num_predict": 4, "seed": 1})
    assert r.done and r.eval_count == 4
    assert app_client.post("/v1/completions", json={"prompt": "hi", "temperature": 9}).status_code == 400


def test_num_predict_past_the_context_generates_until_it_is_full(app_client):
    client = ollama_client(app_client)
    prompt_len = len(app_client.post("/tokenize", json={"prompt": "hello"}).json()["tokens"])
    # greedy on this random model never reaches a stop token within the context, so the answer fills it
    r = client.generate(model="tiny", prompt="hello", raw=True, options={"num_predict": 10_000, "temperature": 0})
    assert r.done_reason == "length" and r.eval_count == CTX - prompt_len
    r = client.generate(model="tiny", prompt="hello", raw=True, options={"temperature": 0})  # no num_predict
    assert r.done_reason == "length" and r.eval_count == CTX - prompt_len
    r = client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 10_000})
    assert r.done and 0 < r.eval_count <= CTX
    r = client.generate(model="tiny", prompt="hello", raw=True, options={"num_predict": 5, "temperature": 0})
    assert r.eval_count == 5  # a num_predict that fits is kept


def test_pull_of_the_served_model_succeeds_and_others_are_clear_errors(app_client):
    client = ollama_client(app_client)
    assert client.pull("tiny").status == "success"
    assert client.pull("tiny:latest").status == "success"
    assert [p.status for p in client.pull("tiny", stream=True)] == ["success"]
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("llama3.2")
    assert err.value.status_code == 404 and "llamaforge serve llama3.2" in err.value.error
    for call in (lambda: client.delete("tiny"), lambda: client.copy("tiny", "other"),
                 lambda: client.push("tiny"), lambda: client.create(model="other", from_="tiny")):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 501 and "one model" in err.value.error


def test_every_api_error_has_ollamas_shape(app_client):
    r = app_client.get("/api/no-such-route")
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = app_client.get("/api/chat")  # wrong method
    assert r.status_code == 405 and isinstance(r.json()["error"], str)
    r = app_client.post("/api/chat", content=b"x" * (2**20 + 1))
    assert r.status_code == 413 and isinstance(r.json()["error"], str)
    r = app_client.get("/v1/no-such-route")  # the OpenAI routes keep OpenAI's shape
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_the_api_key_error_on_api_routes_is_ollama_shaped(default_tokenizer):
    from llamaforge.api import Llama
    from llamaforge.model import ModelArgs, Transformer
    from llamaforge.server.app import create_app

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=default_tokenizer.n_words,
                                  hidden_dim=32, max_seq_len=16)).eval()
    llama = Llama(model, default_tokenizer, max_seq_len=16, max_batch_size=1, device=torch.device("cpu"))
    with TestClient(create_app(llama, model_name="tiny", api_key="k")) as c:
        r = c.get("/api/tags")
        assert r.status_code == 401 and "API key" in r.json()["error"]
        with pytest.raises(ollama.ResponseError) as err:
            ollama_client(c).list()
        assert err.value.status_code == 401 and "API key" in err.value.error
        assert json.loads(c.get("/v1/models").text)["error"]["code"] == "invalid_api_key"


def test_unreadable_bodies_on_the_openai_routes_say_what_to_send(app_client):
    """Invalid UTF-8 and too-deep nesting got FastAPI's "There was an error parsing the body"."""
    for body in (b'{"prompt": "\xff\xfe", "max_tokens": 1}', b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        r = app_client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
        assert "UTF-8 JSON" in r.json()["error"]["message"]
    assert app_client.get("/v1/models").status_code == 200


def test_embed_truncates_a_long_input_by_default_as_ollama_does(app_client):
    """Ollama's /api/embed cuts each input to the context unless `truncate` is false (then it is an error)."""
    client = ollama_client(app_client)
    long = "one two three four five six seven eight nine ten " * 10  # far more than CTX tokens
    cut = client.embed(model="tiny", input=long)
    assert cut.prompt_eval_count == CTX and len(cut.embeddings) == 1
    ids = app_client.post("/tokenize", json={"prompt": long}).json()["tokens"][:CTX]
    same = app_client.post("/v1/embeddings", json={"input": ids}).json()["data"][0]["embedding"]
    assert cut.embeddings[0] == pytest.approx(same, abs=1e-6)  # the first CTX tokens, embedded alone
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="tiny", input=long, truncate=False)
    assert err.value.status_code == 400 and "context" in err.value.error
    r = app_client.post("/v1/embeddings", json={"input": long})  # OpenAI's route never truncates
    assert r.status_code == 400


def test_think_on_a_model_without_thinking_is_a_400_as_in_ollama(app_client):
    client = ollama_client(app_client)
    for call in (lambda think: client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], think=think,
                                           options={"num_predict": 2}),
                 lambda think: client.generate(model="tiny", prompt="hi", think=think, options={"num_predict": 2})):
        for think in (True, "high"):
            with pytest.raises(ollama.ResponseError) as err:
                call(think)
            assert err.value.status_code == 400 and "thinking" in err.value.error
        assert call(False).done  # "think": false is what a client sends for a model without it


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_generate_logprobs_come_back_in_ollamas_shape_and_equal_the_openai_routes(app_client, raw, stream):
    """`logprobs` / `top_logprobs` (Ollama 0.12.11+) were ignored on /api/generate and dropped from /api/chat's
    answer. Greedy, so the chosen token is the most likely one; the values equal the /v1 route's."""
    client = ollama_client(app_client)
    options = {"temperature": 0, "num_predict": 4}
    if stream:
        parts = list(client.generate(model="tiny", prompt="hi", raw=raw, logprobs=True, top_logprobs=2,
                                     options=options, stream=True))
        got = [lp for p in parts for lp in (p.logprobs or [])]
        text = "".join(p.response for p in parts)
    else:
        r = client.generate(model="tiny", prompt="hi", raw=raw, logprobs=True, top_logprobs=2, options=options)
        got, text = list(r.logprobs), r.response
    assert len(got) == 4 and "".join(lp.token for lp in got) == text
    for lp in got:
        assert lp.top_logprobs[0].token == lp.token and lp.top_logprobs[0].logprob == pytest.approx(lp.logprob)
        assert len(lp.top_logprobs) == 2 or raw  # raw: the legacy map, which also holds the chosen token
    if raw:
        ref = app_client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "temperature": 0,
                                                        "logprobs": 2}).json()["choices"][0]["logprobs"]
        assert [lp.logprob for lp in got] == pytest.approx(ref["token_logprobs"], abs=1e-6)
    else:
        ref = app_client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}).json()["choices"][0]["logprobs"]["content"]
        assert [lp.logprob for lp in got] == pytest.approx([x["logprob"] for x in ref], abs=1e-6)


def test_chat_logprobs_are_in_the_answer(app_client):
    r = ollama_client(app_client).chat(model="tiny", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                       options={"temperature": 0, "num_predict": 3})
    assert len(r.logprobs) == 3 and "".join(lp.token for lp in r.logprobs) == r.message.content
    assert r.logprobs[0].top_logprobs == []


@pytest.mark.parametrize("option, value", [("mirostat", 2), ("typical_p", 0.5), ("tfs_z", 0.9)])
def test_sampling_options_not_served_are_400s_unless_neutral(app_client, option, value):
    """Were silently ignored: another sampler than the one asked for."""
    client = ollama_client(app_client)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="tiny", prompt="hi", options={option: value, "num_predict": 1})
    assert err.value.status_code == 400 and f"options.{option}" in err.value.error
    neutral = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0}[option]
    assert client.generate(model="tiny", prompt="hi", options={option: neutral, "num_predict": 1}).done


@pytest.mark.parametrize("keep_alive, ok", [("5m", True), ("1h30m", True), ("0", True), ("-1", True), (300, True),
                                            (-1, True), ("10", True), ("", True), ("bogus", False), ("5 m", False)])
def test_keep_alive_takes_ollamas_durations_and_refuses_others(app_client, keep_alive, ok):
    client = ollama_client(app_client)
    call = lambda: client.generate(model="tiny", prompt="hi", keep_alive=keep_alive, options={"num_predict": 1})  # noqa: E731
    if ok:
        assert call().done
    else:
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 400 and "keep_alive" in err.value.error
