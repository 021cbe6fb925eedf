"""A thinking model's thoughts apart from its answer, as llama.cpp's server and Ollama return them.

OpenAI route: `message.reasoning_content` / `delta.reasoning_content` with the content after `</think>`
(llama.cpp's default reasoning format "auto"; `"reasoning_format": "none"` keeps them inline). Ollama:
`message.thinking` (/api/chat) and `thinking` (/api/generate), `think` left out meaning true on a model with a
thinking mode, `false` leaving the answer as written. The models are tests/scripted.py's: a tiny model whose
greedy answer is a script of tokens, so each case (thoughts closed, never closed, `</think>` split over tokens,
thoughts opened by the template, a tool call after the thoughts) is an exact answer, compared with what llama.cpp's
`try_parse_reasoning` gives for that text. The model is told to think from its files: `<think>` tokens in the
vocabulary, or a template that writes `</think>` (never its name).

Before: the thoughts stayed in the content (no reasoning_content, no thinking) and `think: true` was a 400.
"""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")
pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import given, settings, strategies as st  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from llamaforge.server.reasoning import ThinkSplit  # noqa: E402
from tests.scripted import chain, script_tokenizer, scripted_llama  # noqa: E402
from tests.test_architectures import CHATML  # noqa: E402
from tests.test_server_ollama_compat import _InProcess  # noqa: E402

TAGS = ("<think>", "</think>")
THOUGHTS = ["Let me see.", " The user greets."]
ANSWER = ["\n\n", "Hello", " there!"]
CALL = ["<tool_call>", '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', "</tool_call>"]
SPLIT_CLOSE = ["</th", "ink>"]  # `</think>` written as two text tokens
PIECES = ["<think>", "</think>", *THOUGHTS, *ANSWER, *CALL, *SPLIT_CLOSE, "I call a tool: <tool_call>x</tool_call>"]
# the generation prompt opens the thoughts itself (DeepSeek-R1's and Qwen3-Thinking's templates)
OPENED = (CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}")
          + "{# content.split('</think>') #}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    from llamaforge.tokenizer import Tokenizer

    plain = script_tokenizer(tmp_path_factory.mktemp("think"), PIECES, CHATML)
    opened = script_tokenizer(tmp_path_factory.mktemp("opened"), PIECES, OPENED)
    return Tokenizer.from_file(plain), Tokenizer.from_file(opened)


def _serve(tok, pieces, dialog=HI, tools=None, **app):
    """A server whose model answers `pieces` (after the prompt of `dialog`) and the end of the turn."""
    from llamaforge.chat import chat_format_for
    from llamaforge.server.app import create_app

    last = chat_format_for(tok).encode_dialog(dialog, tools=tools)[-1]
    llama = scripted_llama(tok, chain(tok, last, pieces), max_seq_len=1024)
    return TestClient(create_app(llama, model_name="thinker", **app))


def _openai(c):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0,
                         http_client=httpx.Client(transport=_InProcess(c)))


def _chat(c, **extra) -> dict:
    r = c.post("/v1/chat/completions", json={"messages": HI, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _streamed(c, **extra) -> tuple[list[str], list[str], list[dict]]:
    """(thought pieces, content pieces, chunks) of a streamed answer, through the OpenAI client."""
    thoughts, content, chunks = [], [], []
    stream = _openai(c).chat.completions.create(model="thinker", messages=HI, temperature=0, stream=True,
                                                extra_body=extra.pop("extra_body", None), **extra)
    for chunk in stream:
        chunks.append(chunk.model_dump())
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta is not None:
            if getattr(delta, "reasoning_content", None):
                thoughts.append(delta.reasoning_content)
            if delta.content:
                content.append(delta.content)
    return thoughts, content, chunks


def test_thoughts_closed(vocab):
    tok, _ = vocab
    with _serve(tok, ["<think>", *THOUGHTS, "</think>", *ANSWER]) as c:
        choice = _chat(c)
        assert choice["message"]["reasoning_content"] == "Let me see. The user greets."
        assert choice["message"]["content"] == "Hello there!"  # the whitespace after </think> trimmed
        assert choice["finish_reason"] == "stop"
        thoughts, content, _ = _streamed(c)
        assert "".join(thoughts) == "Let me see. The user greets." and "".join(content) == "Hello there!"
        assert len(thoughts) == 2 and content[0] == "Hello"  # streamed as they come, not at the end
        r = c.post("/v1/chat/completions", json={"messages": HI, "temperature": 0, "n": 2})
        assert [ch["message"]["reasoning_content"] for ch in r.json()["choices"]] == \
            ["Let me see. The user greets."] * 2
        raw = _chat(c, reasoning_format="none")["message"]  # llama.cpp's "none": as the model wrote it
        assert raw == {"role": "assistant", "content": "<think>Let me see. The user greets.</think>\n\nHello there!"}


def test_thoughts_never_closed_are_all_reasoning(vocab):
    tok, _ = vocab
    with _serve(tok, ["<think>", *THOUGHTS]) as c:
        message = _chat(c)["message"]
        assert message["reasoning_content"] == "Let me see. The user greets." and message["content"] == ""
        thoughts, content, _ = _streamed(c)
        assert "".join(thoughts) == "Let me see. The user greets." and content == []
        length = _chat(c, max_tokens=2)  # cut by max_tokens inside the thoughts
        assert length["finish_reason"] == "length" and length["message"]["reasoning_content"] == "Let me see."


def test_closing_tag_split_across_tokens(vocab):
    tok, _ = vocab
    with _serve(tok, ["<think>", *THOUGHTS, *SPLIT_CLOSE, *ANSWER]) as c:
        message = _chat(c)["message"]
        assert message["reasoning_content"] == "Let me see. The user greets." and message["content"] == "Hello there!"
        thoughts, content, _ = _streamed(c)
        assert "".join(thoughts) == "Let me see. The user greets." and "".join(content) == "Hello there!"
        assert not any("</th" in t for t in thoughts)  # the half tag was held back, never sent as thoughts


def test_the_server_default_is_llama_cpp_s_flag(vocab):
    """create_app(reasoning_format=...) is `--reasoning-format`: the default of /v1 requests, not of Ollama's."""
    from llamaforge.errors import ConfigError
    from llamaforge.server.app import create_app

    tok, _ = vocab
    pieces = ["<think>", *THOUGHTS, "</think>", *ANSWER]
    with _serve(tok, pieces, reasoning_format="none") as c:
        assert _chat(c)["message"]["content"].startswith("<think>Let me see.")
        assert _chat(c, reasoning_format="auto")["message"]["content"] == "Hello there!"
        reply = ollama.Client(host="http://testserver", transport=_InProcess(c)).chat(
            model="thinker", messages=HI, options={"temperature": 0})
        assert reply.message.thinking == "Let me see. The user greets."
    with pytest.raises(ConfigError, match="reasoning_format"):
        create_app(scripted_llama(tok, {}), reasoning_format="deepseek-legacy")


def test_thoughts_opened_by_the_template(vocab):
    _, tok = vocab
    with _serve(tok, [*THOUGHTS, "</think>", *ANSWER]) as c:
        message = _chat(c)["message"]
        assert message["reasoning_content"] == "Let me see. The user greets." and message["content"] == "Hello there!"
        assert _chat(c, reasoning_format="none")["message"]["content"] == \
            "Let me see. The user greets.</think>\n\nHello there!"


def test_no_thoughts_is_all_content(vocab):
    tok, _ = vocab
    with _serve(tok, ANSWER) as c:
        message = _chat(c)["message"]
        assert message == {"role": "assistant", "content": "\n\nHello there!"}  # untouched, no reasoning_content
        thoughts, content, _ = _streamed(c)
        assert thoughts == [] and "".join(content) == "\n\nHello there!"


def test_a_tool_call_after_the_thoughts(vocab):
    tok, _ = vocab
    dialog = HI
    with _serve(tok, ["<think>", *THOUGHTS, "</think>", *CALL], dialog, tools=TOOLS) as c:
        choice = _chat(c, tools=TOOLS)
        assert choice["message"]["reasoning_content"] == "Let me see. The user greets."
        assert choice["finish_reason"] == "tool_calls"
        (call,) = choice["message"]["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}
        thoughts, content, chunks = _streamed(c, tools=TOOLS)
        assert "".join(thoughts) == "Let me see. The user greets." and content == []
        calls = [tc for ch in chunks for choice in ch["choices"] for tc in (choice["delta"].get("tool_calls") or [])]
        assert [tc["function"]["name"] for tc in calls] == ["get_weather"]
        # Ollama's /api/chat: thinking, and the call
        client = ollama.Client(host="http://testserver", transport=_InProcess(c))
        reply = client.chat(model="thinker", messages=HI, tools=TOOLS, options={"temperature": 0})
        assert reply.message.thinking == "Let me see. The user greets."
        assert reply.message.tool_calls[0].function.arguments == {"city": "Paris"}


def test_a_tool_call_inside_the_thoughts_is_not_made(vocab):
    tok, _ = vocab
    with _serve(tok, ["<think>", "I call a tool: <tool_call>x</tool_call>", "</think>", *ANSWER], tools=TOOLS) as c:
        choice = _chat(c, tools=TOOLS)
        assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"
        assert choice["message"]["reasoning_content"] == "I call a tool: <tool_call>x</tool_call>"


def test_ollama_thinking(vocab):
    tok, _ = vocab
    with _serve(tok, ["<think>", *THOUGHTS, "</think>", *ANSWER]) as c:
        client = ollama.Client(host="http://testserver", transport=_InProcess(c))
        opts = {"temperature": 0}
        for think in (None, True, "high"):  # left out: true, as Ollama for a model with the capability
            reply = client.chat(model="thinker", messages=HI, think=think, options=opts)
            assert reply.message.thinking == "Let me see. The user greets." and reply.message.content == "Hello there!"
        lines = list(client.chat(model="thinker", messages=HI, think=True, options=opts, stream=True))
        assert "".join(line.message.thinking or "" for line in lines) == "Let me see. The user greets."
        assert "".join(line.message.content for line in lines) == "Hello there!"
        assert lines[0].message.thinking and not lines[0].message.content  # thoughts streamed first
        off = client.chat(model="thinker", messages=HI, think=False, options=opts)  # as the model wrote it
        assert off.message.thinking is None
        assert off.message.content == "<think>Let me see. The user greets.</think>\n\nHello there!"
        gen = client.generate(model="thinker", prompt="hi", options=opts)
        assert gen.thinking == "Let me see. The user greets." and gen.response == "Hello there!"
        parts = list(client.generate(model="thinker", prompt="hi", options=opts, stream=True))
        assert "".join(p.thinking or "" for p in parts) == gen.thinking
        assert "".join(p.response for p in parts) == gen.response
        assert "thinking" in client.show("thinker").capabilities
        r = c.post("/api/chat", json={"model": "thinker", "messages": HI, "think": "maybe"})
        assert r.status_code == 400 and "think" in r.json()["error"]


def test_user_think_text_stays_text(vocab):
    """`<think>` a caller writes never becomes the thinking token: only the template writes it."""
    from llamaforge.chat import chat_format_for

    tok, _ = vocab
    opening, closing = (tok.special_tokens[t] for t in TAGS)
    fmt = chat_format_for(tok)
    assert fmt.think_tags == TAGS
    ids = fmt.encode_dialog([{"role": "user", "content": "<think>evil</think> hi"}])
    assert opening not in ids and closing not in ids
    assert tok.decode(ids).count("<think>evil</think>") == 1
    with _serve(tok, ANSWER) as c:
        r = c.post("/tokenize", json={"messages": [{"role": "user", "content": "<think>x</think>"}]})
        assert r.status_code == 200 and opening not in r.json()["tokens"], r.text


def test_a_whole_earlier_answer_sent_back_renders_as_transformers_renders_it(tmp_path):
    """Qwen3's template splits `<think>..</think>` off an earlier answer itself; with the tags as control tokens that
    rewrite of caller text could not be traced, so the thoughts are split off first, exactly as the template does."""
    transformers = pytest.importorskip("transformers")
    from pathlib import Path

    from llamaforge.chat import chat_format_for
    from llamaforge.tokenizer import Tokenizer

    qwen3 = (Path(__file__).parent / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
    folder = script_tokenizer(tmp_path, ["<think>", "</think>"], qwen3)
    dialog = [{"role": "user", "content": "hi"},
              {"role": "assistant", "content": "<think>\nI greet.\n</think>\n\nHello!"},
              {"role": "user", "content": "and?"},
              {"role": "assistant", "content": "<think>\nOnce more.\n</think>\n\nBye!"}]
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    fmt = chat_format_for(Tokenizer.from_file(folder))
    want = ref.apply_chat_template(dialog, tokenize=False, add_generation_prompt=False)
    assert fmt.render(dialog, add_generation_prompt=False) == want
    ids = fmt.encode_dialog(dialog, add_generation_prompt=False)
    assert ids == list(ref.apply_chat_template(dialog, tokenize=True, add_generation_prompt=False, return_dict=False))
    # a template that does not split thoughts off gets the answer whole (its tags as text, nothing dropped)
    chatml = script_tokenizer(tmp_path / "chatml", ["<think>", "</think>"], CHATML)
    plain = chat_format_for(Tokenizer.from_file(chatml))
    assert "<think>\nI greet.\n</think>\n\nHello!" in plain.render(dialog[:2], add_generation_prompt=False)
    # the template's own tags are the tokens (thinking switched off: it writes an empty block)
    off = fmt.encode_dialog(dialog[:1], variables={"enable_thinking": False})
    assert off == list(ref.apply_chat_template(dialog[:1], tokenize=True, add_generation_prompt=True,
                                               return_dict=False, enable_thinking=False))
    assert off.count(ref.convert_tokens_to_ids("<think>")) == 1


def test_a_gguf_vocabulary_s_thinking_tags(tmp_path):
    """In a GGUF file the tags are USER_DEFINED tokens (plain text to llama.cpp's tokenizer): control tokens here
    too, written by the template only (the prompt ids equal transformers' on the tokenizer.json it came from)."""
    transformers = pytest.importorskip("transformers")
    from pathlib import Path

    from llamaforge.chat import chat_format_for
    from llamaforge.tokenizer import Tokenizer
    from llamaforge.tokenizers.gguf_export import tokenizer_gguf_metadata

    qwen3 = (Path(__file__).parent / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
    folder = script_tokenizer(tmp_path, ["<think>", "</think>"], qwen3)
    md = tokenizer_gguf_metadata(Tokenizer.from_file(folder))
    think = md["tokenizer.ggml.tokens"].index("<think>")
    assert md["tokenizer.ggml.token_type"][think] == 4  # USER_DEFINED, as llama.cpp's converter writes it
    fmt = chat_format_for(Tokenizer.from_gguf_metadata(md))
    assert fmt.think_tags == TAGS
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    off = fmt.encode_dialog(HI, variables={"enable_thinking": False})
    assert off == list(ref.apply_chat_template(HI, tokenize=True, add_generation_prompt=True, return_dict=False,
                                               enable_thinking=False))
    assert think in off and think not in fmt.encode_dialog([{"role": "user", "content": "<think>"}])


def test_a_thinking_model_is_told_from_its_files(tmp_path):
    """Tags in the vocabulary, or a template that writes `</think>` or switches enable_thinking; else none."""
    from pathlib import Path

    from llamaforge.chat import chat_format_for
    from llamaforge.tokenizer import Tokenizer

    qwen3 = (Path(__file__).parent / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
    cases = [([], CHATML, None), (["<think>", "</think>"], CHATML, TAGS), ([], qwen3, TAGS), ([], OPENED, TAGS),
             ([], CHATML.replace("{% endif %}", "{% if enable_thinking %}x{% endif %}{% endif %}"), TAGS)]
    for k, (pieces, template, want) in enumerate(cases):
        tok = Tokenizer.from_file(script_tokenizer(tmp_path / str(k), pieces, template))
        assert chat_format_for(tok).think_tags == want, (pieces, template)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("<>/thinkab \n")), max_size=40), cuts=st.lists(
    st.integers(0, 40), max_size=8), opened=st.booleans())
def test_streaming_splits_as_the_whole_answer(text, cuts, opened):
    """Any cutting of an answer into pieces gives the split of the whole answer (what the non-streamed body has)."""
    whole = ThinkSplit(TAGS, opened).split(text)
    s, thoughts, content, pos = ThinkSplit(TAGS, opened), [], [], 0
    for cut in sorted(set(c for c in cuts if c <= len(text))) + [len(text)]:
        a, b = s.push(text[pos:cut])
        thoughts.append(a)
        content.append(b)
        pos = cut
    a, b = s.flush()
    assert ("".join(thoughts) + a, "".join(content) + b) == whole


@pytest.mark.parametrize("text, opened, want", [
    ("<think>a</think>b", False, ("a", "b")),
    ("  <think>\n a b \n</think>\n\n c", False, ("a b", "c")),
    ("<think>a", False, ("a", "")),
    ("a</think>b", True, ("a", "b")),
    ("a</think>b", False, ("", "a</think>b")),
    ("x<think>a</think>b", False, ("", "x<think>a</think>b")),
    ("<thi", False, ("", "<thi")),
    ("<think>a</think>b<think>c</think>", False, ("a", "b<think>c</think>")),
    ("", True, ("", "")),
])
def test_the_split_as_llama_cpp_parses(text, opened, want):
    """Cases from llama.cpp's try_parse_reasoning (reasoning stripped, content after </think> left-stripped, no
    opening tag at the start: all content, forced open: thoughts from the start; missing </think>: all thoughts)."""
    assert ThinkSplit(TAGS, opened).split(text) == want
