"""Small pieces of the server, each on its own: stop strings, tool calls, token bytes (the KV block pool: test_kv_blocks.py)."""

from __future__ import annotations

import json

import pytest

from llamaforge.generation.text import TextStream
from llamaforge.server.tools import forced_call_schema, hermes_messages, parse_tool_calls


class CharDecoder:
    """A stream decoder over a toy vocabulary: token id -> its string."""

    def __init__(self, vocab):
        self.vocab = vocab

    def push(self, token_id):
        return self.vocab[token_id]

    def flush(self):
        return ""


def feed(stops, pieces):
    vocab = dict(enumerate(pieces))
    ts = TextStream(CharDecoder(vocab), stops)
    out, hit = [], False
    for i in range(len(pieces)):
        text, hit = ts.push(i)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(ts.flush())
    return out, hit


def test_stop_string_spanning_tokens_is_cut_and_never_leaks():
    out, hit = feed(["END"], ["Hello ", "wor", "ld E", "N", "D more"])
    assert hit and "".join(out) == "Hello world "
    assert out == ["Hello ", "wor", "ld ", "", ""]  # "E" and "N" are held back until settled


def test_held_back_text_is_released_when_it_is_not_a_stop():
    out, hit = feed(["END"], ["a E", "N", "x", "b"])
    assert not hit and "".join(out) == "a ENxb" and out[:2] == ["a ", ""]
    out, hit = feed(["END"], ["tail E"])  # generation ends inside a possible stop: flushed
    assert not hit and "".join(out) == "tail E"


def test_earliest_of_several_stops_wins():
    out, hit = feed(["cd", "b"], ["abcd"])
    assert hit and out == ["a"]
    out, hit = feed(["\n\n"], ["one\n", "\ntwo"])
    assert hit and "".join(out) == "one"


def test_tool_calls_are_parsed_from_hermes_blocks_and_bare_json():
    names = {"get_weather", "add"}
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = parse_tool_calls(text, names)
    assert content == "Sure." and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    content, calls = parse_tool_calls('{"name": "add", "parameters": {"a": 1, "b": 2}}', names)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert parse_tool_calls('{"name": "rm_rf", "arguments": {}}', names) == ('{"name": "rm_rf", "arguments": {}}', [])
    assert parse_tool_calls("<tool_call>not json</tool_call>", names)[1] == []


def test_hermes_rewrite_of_a_tool_dialog():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    out = hermes_messages(msgs, tools)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and '"name": "add"' in out[0]["content"]
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in out[2]["content"]
    assert out[3]["content"] == "<tool_response>\n3\n</tool_response>"


def test_forced_call_schema():
    tools = [{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "b"}}]
    assert forced_call_schema(tools, "b")["properties"]["name"] == {"const": "b"}
    assert len(forced_call_schema(tools, None)["anyOf"]) == 2


def test_token_bytes_spell_the_text():
    from llamaforge.default_model import default_model_path
    from llamaforge.tokenizer import Tokenizer

    from llamaforge.errors import CheckpointNotFoundError

    try:  # only a missing default model package skips; a tokenizer that fails to load is a failure
        path = default_model_path()
    except CheckpointNotFoundError as exc:
        pytest.skip(f"default model package not installed: {exc}")
    tok = Tokenizer.from_file(path)
    table = tok.token_bytes_table()
    for text in ["Hello, wörld!", "日本語 🙂", "  spaces\tand\nnewlines", '{"a": [1, 2]}']:
        assert b"".join(table[i] for i in tok.encode(text)) == text.encode("utf-8")
    assert table[tok.eos_id] == tok.id_to_piece(tok.eos_id).encode()


def test_validation_errors_name_the_json_path():
    from llamaforge.server.errors import from_validation_errors

    err = from_validation_errors([{"loc": ("body", "messages", 0, "content", "str"), "msg": "bad", "type": "x"}])
    assert err.status == 400 and err.param == "messages.0.content"
    err = from_validation_errors([{"loc": ("body",), "msg": "x", "type": "json_invalid", "ctx": {"error": "eof"}}])
    assert err.code == "invalid_json"


def test_the_server_imports_nothing_below_the_api():
    """server/ is HTTP only: of llamaforge it imports `api` (the engine's types come through it),
    `errors`, the package root (its `__version__`) and itself; the CLI and spaCy reach generation only
    through `api` too."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "llamaforge"
    allowed = {"server": ("llamaforge.server", "llamaforge.api", "llamaforge.errors")}
    for package, ok in allowed.items():
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                for name in names:
                    if name.startswith("llamaforge"):
                        assert name == "llamaforge" or name.startswith(ok), f"{path.relative_to(root)} imports {name}"
    for package in ("cli", "integrations"):
        for path in (root / package).rglob("*.py"):
            assert "llamaforge.generation" not in path.read_text(encoding="utf-8"), path


@pytest.mark.parametrize("parallel, expected", [(None, 2), (True, 2), (False, 1)])
def test_parallel_tool_calls_false_keeps_only_the_first_call(default_tokenizer, parallel, expected):
    """OpenAI's parallel_tool_calls=false: at most one call per answer (both calls were returned)."""
    from llamaforge.api import Delta, Finish, Job
    from llamaforge.server.prepare import Prepared
    from llamaforge.server.respond import ResponseBuilder

    answer = "".join(f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{c}"}}}}\n</tool_call>\n'
                     for c in ("Paris", "Oslo"))
    prepared = Prepared([Job([1, 2], 8)], 1, tool_names={"get_weather"}, one_tool_call=parallel is False)
    rb = ResponseBuilder("chat", prepared, "tiny", default_tokenizer)
    rb.add(0, Delta(0, answer, []))
    rb.add(0, Finish(0, "stop", 30))
    choice = rb.body()["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Oslo"][:expected]
    assert choice["finish_reason"] == "tool_calls"
