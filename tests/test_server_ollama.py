"""Ollama's API and /metrics on a real `llamaforge serve` process, driven by the official `ollama` client.

The same greedy request through Ollama's /api routes and through the OpenAI routes must give the same
text (one engine, one sampler); counts in the final line must equal the OpenAI usage; errors come as
Ollama's `{"error": ...}` with 404 for a model not served and 400 for bad options. /metrics is parsed with
prometheus_client's own parser and must count what was sent.
"""

from __future__ import annotations

import json

import pytest

ollama = pytest.importorskip("ollama")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")

from tests.test_server import start_server, stop_server  # noqa: E402

OPTS = {"temperature": 0, "num_predict": 8}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served():
    proc, base = start_server()
    name = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    yield {"base": base, "name": name, "client": ollama.Client(host=base)}
    stop_server(proc)


def openai_chat(served, messages, max_tokens=8) -> dict:
    r = httpx.post(served["base"] + "/v1/chat/completions", timeout=60,
                   json={"messages": messages, "max_tokens": max_tokens, "temperature": 0})
    r.raise_for_status()
    return r.json()


def test_tags_ps_show_describe_the_served_model(served):
    client, name = served["client"], served["name"]
    models = client.list().models
    assert [m.model for m in models] == [name]
    details = models[0].details
    assert details.format == "gguf" and details.family == "llama"
    assert details.quantization_level.startswith("Q")  # the default model's file is quantized
    assert models[0].size > 10_000_000
    shown = client.show(name)
    assert shown.modelinfo["llama.context_length"] == 256
    assert "im_start" in shown.template  # SmolLM2's own chat template
    assert client.ps().models[0].context_length == 256
    assert client.show(name + ":latest").details.family == "llama"


def test_head_answers_where_ollama_s_server_does(served):
    """The `ollama` command line sends `HEAD /` before each command and gives up on anything but a 2xx."""
    for path in ("/", "/api/tags", "/api/version"):
        r = httpx.head(served["base"] + path, timeout=30)
        assert r.status_code == 200, (path, r.status_code, r.text)
        assert r.content == b"", path  # a HEAD answer has no body
    assert httpx.post(served["base"] + "/", timeout=30).status_code == 405
    assert "<html" in httpx.get(served["base"] + "/", timeout=30).text.lower()


def test_chat_equals_the_openai_route(served):
    client, name = served["client"], served["name"]
    reply = client.chat(model=name, messages=QUESTION, options=OPTS)
    want = openai_chat(served, QUESTION)
    assert reply.message.role == "assistant"
    assert reply.message.content == want["choices"][0]["message"]["content"]
    assert reply.done and reply.done_reason == ("length" if want["choices"][0]["finish_reason"] == "length" else "stop")
    assert reply.eval_count == want["usage"]["completion_tokens"]
    assert reply.prompt_eval_count == want["usage"]["prompt_tokens"]
    assert reply.total_duration >= reply.eval_duration > 0


def test_chat_stream_pieces_add_up_to_the_whole_answer(served):
    client, name = served["client"], served["name"]
    parts = list(client.chat(model=name, messages=QUESTION, options=OPTS, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == client.chat(model=name, messages=QUESTION,
                                                                   options=OPTS).message.content
    assert parts[-1].eval_count > 0


def test_generate_applies_the_template_unless_raw(served):
    client, name = served["client"], served["name"]
    templated = client.generate(model=name, prompt=QUESTION[0]["content"], options=OPTS)
    assert templated.response == openai_chat(served, QUESTION)["choices"][0]["message"]["content"]
    raw = client.generate(model=name, prompt="The capital of France is", raw=True, options=OPTS)
    want = httpx.post(served["base"] + "/v1/completions", timeout=60,
                      json={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}).json()
    assert raw.response == want["choices"][0]["text"]
    streamed = list(client.generate(model=name, prompt="The capital of France is", raw=True, options=OPTS,
                                    stream=True))
    assert "".join(p.response for p in streamed) == raw.response


def test_format_json_schema_constrains_the_answer(served):
    pytest.importorskip("llguidance")
    client, name = served["client"], served["name"]
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    reply = client.chat(model=name, messages=QUESTION, format=schema, options={"temperature": 0, "num_predict": 40})
    assert isinstance(json.loads(reply.message.content)["city"], str)


def test_embed_equals_the_openai_embeddings(served):
    client, name = served["client"], served["name"]
    got = client.embed(model=name, input=["llamas", "alpacas"]).embeddings
    want = httpx.post(served["base"] + "/v1/embeddings", json={"input": ["llamas", "alpacas"]},
                      timeout=60).json()["data"]  # httpx's default 5 s is too short on a loaded CI machine
    assert len(got) == 2
    for g, w in zip(got, want):
        assert g == pytest.approx(w["embedding"], abs=1e-6)
    assert client.embeddings(model=name, prompt="llamas").embedding == pytest.approx(got[0], abs=1e-6)


def test_errors_are_ollama_shaped(served):
    client = served["client"]
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="no-such-model", messages=QUESTION)
    assert err.value.status_code == 404 and "not found" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=served["name"], messages=QUESTION, options={"temperature": "hot"})
    assert err.value.status_code == 400 and "temperature" in err.value.error
    r = httpx.post(served["base"] + "/api/chat", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = httpx.post(served["base"] + "/api/chat", json={"model": served["name"], "messages": [
        {"role": "user", "content": "hi", "images": ["aGVsbG8="]}]})
    assert r.status_code == 400 and "images" in r.json()["error"]


def test_an_empty_chat_only_loads(served):
    reply = served["client"].chat(model=served["name"], messages=[])
    assert reply.done and reply.done_reason == "load"
    for keep_alive in (0, "0", "0s"):  # Ollama's way to unload: its clients look for "unload"
        reply = served["client"].generate(model=served["name"], prompt="", keep_alive=keep_alive)
        assert reply.done and reply.done_reason == "unload"
    assert served["client"].chat(model=served["name"], messages=[], keep_alive="5m").done_reason == "load"


def _samples(text: str) -> dict:
    out = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_tokens_and_latency(served):
    base = served["base"]
    before = _samples(httpx.get(base + "/metrics").text)
    body = openai_chat(served, QUESTION, max_tokens=4)
    httpx.get(base + "/v1/models/no-such-model")
    r = httpx.get(base + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = _samples(r.text)

    def grew(name, labels=()):
        key = (name, tuple(sorted(labels)))
        return after.get(key, 0) - before.get(key, 0)

    stop = {"stop", "length"}
    assert sum(grew("llamaforge_requests_total", {("endpoint", "/v1/chat/completions"), ("finish_reason", r)})
               for r in stop) == 1
    assert grew("llamaforge_generation_tokens_total") == body["usage"]["completion_tokens"]
    assert grew("llamaforge_prompt_tokens_total") == body["usage"]["prompt_tokens"]
    assert grew("llamaforge_time_to_first_token_seconds_count", {("endpoint", "/v1/chat/completions")}) == 1
    assert grew("llamaforge_http_requests_total", {("route", "/v1/models/{id}"), ("status", "404")}) == 1
    assert after[("llamaforge_slots", ())] == 4
    blocks = [after[(f"llamaforge_kv_blocks{part}", ())] for part in ("", "_in_use", "_cached", "_free")]
    assert blocks[0] > 0 and blocks[1] == 0 and blocks[0] == sum(blocks[1:])  # idle: nothing held by a sequence
    assert after[("llamaforge_queue_depth", ())] == 0
    assert after[("llamaforge_engine_generated_tokens_total", ())] >= body["usage"]["completion_tokens"]


def test_the_api_key_guards_the_ollama_routes_too(default_tokenizer):
    """In process (no second server): /api routes answer 401 without the key, and work with it."""
    from starlette.testclient import TestClient

    from llamaforge.server.app import create_app
    from tests.conftest import tiny_llama

    tok = default_tokenizer
    llama = tiny_llama(tok, 64)
    with TestClient(create_app(llama, model_name="tiny", api_key="k")) as c:
        assert c.get("/api/tags").status_code == 401
        r = c.get("/api/tags", headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and r.json()["models"][0]["details"]["quantization_level"] == "F32"
        r = c.post("/api/generate", headers={"Authorization": "Bearer k"},
                   json={"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 3}})
        assert r.status_code == 200 and r.json()["done"] and r.json()["eval_count"] <= 3
