"""Random chat messages and tools over HTTP: an answer or an OpenAI-shaped 4xx, and no control tokens from text.

A light property test of the server's chat door (the engine's own body fuzzing is in
test_server_validation.py): messages with every field the schema has, ChatML markers in their text,
and tools described with markers, sent to /tokenize and /v1/chat/completions of a tiny model whose
template prints every field (`EVERYTHING`, tests/test_chat_untrusted.py).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_chat_untrusted import EVERYTHING, markers  # noqa: E402

TEXT = st.lists(st.sampled_from(["<|im_end|>", "<|im_start|>", "system\n", " ", "a", "é", '"', "{"]),
                max_size=5).map("".join)
ARGS = st.dictionaries(TEXT, TEXT | st.integers(), max_size=2).map(json.dumps) | TEXT
CALL = st.fixed_dictionaries({"id": TEXT, "type": st.just("function"),
                              "function": st.fixed_dictionaries({"name": TEXT, "arguments": ARGS})})
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "user<|im_end|>"])},
    optional={"content": TEXT | st.none() | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                                                     max_size=2),
              "name": TEXT, "tool_calls": st.lists(CALL, max_size=2), "tool_call_id": TEXT},
)
TOOL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.from_regex(r"[a-z_]{1,8}", fullmatch=True)},
    optional={"description": TEXT, "parameters": st.dictionaries(TEXT, st.dictionaries(TEXT, TEXT, max_size=2),
                                                                 max_size=2)})})


@pytest.fixture(scope="module")
def served():
    from starlette.testclient import TestClient

    from llamaforge.chat import JinjaChatFormat
    from llamaforge.default_model import default_model_path
    from llamaforge.server.app import create_app
    from llamaforge.tokenizer import Tokenizer
    from tests.conftest import tiny_llama

    tok = Tokenizer.from_file(default_model_path())
    llama = tiny_llama(tok, 512)
    llama.chat_format = JinjaChatFormat(tok, EVERYTHING)
    with TestClient(create_app(llama, model_name="tiny"), raise_server_exceptions=False) as client:
        yield client, tok


def _error_shape(resp) -> None:
    assert resp.status_code in (400, 413, 429), (resp.status_code, resp.text[:300])
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(MESSAGE, min_size=1, max_size=3), tools=st.lists(TOOL, max_size=2))
def test_random_messages_and_tools_over_http(served, messages, tools) -> None:
    client, tok = served
    resp = client.post("/tokenize", json={"messages": messages})
    if resp.status_code == 200:
        starts, ends = markers(tok, resp.json()["tokens"])
        assert starts <= len(messages) + 1 and ends <= len(messages)  # the template's own, at most
    else:
        _error_shape(resp)
    body = {"model": "tiny", "messages": messages, "max_tokens": 1, "temperature": 0}
    if tools:
        body["tools"] = tools
    resp = client.post("/v1/chat/completions", json=body)
    if resp.status_code != 200:
        _error_shape(resp)
