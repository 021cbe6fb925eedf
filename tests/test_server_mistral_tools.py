"""Function calling through a Mistral chat template (Mistral-Nemo-Instruct-2407's, as llama.cpp ships it in
models/templates), over the official `openai` and `ollama` clients, in process on a tiny random model with a
byte-level BPE vocabulary holding Mistral's control tokens.

Mistral's templates refuse a tool call or result whose id is not 9 characters ("Tool call IDs should be
alphanumeric strings with length 9!"). Before the fix every tool-result turn failed with a 400: the ids the
server handed out were OpenAI's `call_` + 24 characters, and Ollama's messages (which carry no ids) got
`call_i_j` for calls and none for results. The prompt is compared with transformers' `apply_chat_template`
on the same template and dialog; the answer parser takes Mistral's `[TOOL_CALLS][{...}, ...]` list.
"""

from __future__ import annotations

import json
import random

import pytest

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("llguidance")

from starlette.testclient import TestClient  # noqa: E402

from tests.test_server_ollama_compat import _InProcess  # noqa: E402

# mistralai/Mistral-Nemo-Instruct-2407's chat_template (llama.cpp models/templates), whitespace control as there
NEMO = """{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}{%- set
loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}{%- if not tools is defined
%}{%- set tools = none %}{%- endif %}{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") |
list %}{%- set ns = namespace() %}{%- set ns.index = 0 %}{%- for message in loop_messages %}{%- if not (message.role
== "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none))
%}{%- if (message["role"] == "user") != (ns.index % 2 == 0) %}{{- raise_exception("After the optional system
message, conversation roles must alternate user/assistant/user/assistant/...") }}{%- endif %}{%- set ns.index =
ns.index + 1 %}{%- endif %}{%- endfor %}{{- bos_token }}{%- for message in loop_messages %}{%- if message["role"] ==
"user" %}{%- if tools is not none and (message == user_messages[-1]) %}{{- "[AVAILABLE_TOOLS][" }}{%- for tool in
tools %}{%- set tool = tool.function %}{{- '{"type": "function", "function": {' }}{%- for key, val in tool.items()
if key != "return" %}{%- if val is string %}{{- '"' + key + '": "' + val + '"' }}{%- else %}{{- '"' + key + '": '
+ val|tojson }}{%- endif %}{%- if not loop.last %}{{- ", " }}{%- endif %}{%- endfor %}{{- "}}" }}{%- if not
loop.last %}{{- ", " }}{%- else %}{{- "]" }}{%- endif %}{%- endfor %}{{- "[/AVAILABLE_TOOLS]" }}{%- endif %}{%- if
loop.last and system_message is defined %}{{- "[INST]" + system_message + "\\n\\n" + message["content"] + "[/INST]"
}}{%- else %}{{- "[INST]" + message["content"] + "[/INST]" }}{%- endif %}{%- elif (message.tool_calls is defined and
message.tool_calls is not none) %}{{- "[TOOL_CALLS][" }}{%- for tool_call in message.tool_calls %}{%- set out =
tool_call.function|tojson %}{{- out[:-1] }}{%- if not tool_call.id is defined or tool_call.id|length != 9 %}{{-
raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}{%- endif %}{{- ', "id": "' +
tool_call.id + '"}' }}{%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" + eos_token }}{%- endif %}{%- endfor
%}{%- elif message["role"] == "assistant" %}{{- message["content"] + eos_token}}{%- elif message["role"] ==
"tool_results" or message["role"] == "tool" %}{%- if message.content is defined and message.content.content is
defined %}{%- set content = message.content.content %}{%- else %}{%- set content = message.content %}{%- endif
%}{{- '[TOOL_RESULTS]{"content": ' + content|string + ", " }}{%- if not message.tool_call_id is defined or
message.tool_call_id|length != 9 %}{{- raise_exception("Tool call IDs should be alphanumeric strings with length
9!") }}{%- endif %}{{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}{%- else %}{{-
raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system
message!") }}{%- endif %}{%- endfor %}"""
SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
    "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from llamaforge.api import Llama
    from llamaforge.model import ModelArgs, Transformer
    from llamaforge.server.app import create_app
    from llamaforge.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("mistral-tok")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    words = 'the weather in Paris is sunny city get_weather {"name": "arguments": 21C what'.split()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, "chat_template": NEMO}))
    ours = Tokenizer.from_file(folder)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=ours.n_words, hidden_dim=64,
                                  max_seq_len=512)).eval()
    llama = Llama(model, ours, max_seq_len=512, max_batch_size=2, device=torch.device("cpu"))
    with TestClient(create_app(llama, model_name="mistral")) as c:
        yield c, transformers.PreTrainedTokenizerFast.from_pretrained(folder)


def test_an_openai_tool_round_trip_renders_as_transformers_renders_it(mistral):
    c, hf = mistral
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0,
                           http_client=httpx.Client(transport=_InProcess(c)))
    r = client.chat.completions.create(model="mistral", messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=40, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert len(call.id) == 9 and call.id.isalnum()
    dialog = ASK + [r.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    answer = client.chat.completions.create(model="mistral", messages=dialog, tools=TOOLS, max_tokens=3)
    assert answer.usage.prompt_tokens > 0  # was a 400: the template refused the id
    for m in dialog:  # the HF convention: arguments as an object
        for tc in m.get("tool_calls") or []:
            tc["function"]["arguments"] = json.loads(tc["function"]["arguments"])
    expected = hf.apply_chat_template(dialog, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
    assert answer.usage.prompt_tokens == len(expected)
    assert f'"call_id": "{call.id}"' in hf.decode(expected)


def test_an_ollama_tool_round_trip_gets_ids_the_template_takes(mistral):
    c, hf = mistral
    client = ollama.Client(host="http://testserver", transport=_InProcess(c))
    dialog = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"function": {"name": "get_time", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "noon", "tool_name": "get_time"},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    assert client.chat(model="mistral", messages=dialog, tools=TOOLS, options={"num_predict": 2}).done
    # was a 400: the calls' ids had 8 characters, the results none. The client rewrites the tools' schemas
    # (its own Tool model), so the prompt is compared on the wire body as sent
    r = c.post("/api/chat", json={"model": "mistral", "messages": dialog, "tools": TOOLS, "stream": False,
                                  "options": {"num_predict": 2}}).json()
    # the same dialog with the ids the server gives (message 1's calls 0 and 1), each result the id of its call
    # by tool_name, rendered by transformers
    calls = [{"id": f"c0001000{j}", "type": "function", "function": tc["function"]}
             for j, tc in enumerate(dialog[1]["tool_calls"])]
    explicit = ASK + [{"role": "assistant", "content": "", "tool_calls": calls},
                      {"role": "tool", "tool_call_id": "c00010001", "content": "noon"},
                      {"role": "tool", "tool_call_id": "c00010000", "content": "sunny"}]
    expected = hf.apply_chat_template(explicit, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
    assert r["prompt_eval_count"] == len(expected)


@pytest.mark.parametrize("text, names", [
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "get_weather", "arguments": {"city": "Oslo"}}]', ["Paris", "Oslo"]),
    ('[{"name": "get_weather", "arguments": {"city": "Paris"}}]', ["Paris"]),  # [TOOL_CALLS] decoded to ""
    ('[TOOL_CALLS] {"name": "get_weather", "arguments": {"city": "Paris"}}', ["Paris"]),
])
def test_mistral_call_lists_are_parsed(text, names):
    from llamaforge.server.tools import parse_tool_calls

    content, calls = parse_tool_calls(text, {"get_weather"})
    assert content is None and [json.loads(c["function"]["arguments"])["city"] for c in calls] == names
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in calls)


def test_a_list_with_an_unknown_function_stays_text():
    from llamaforge.server.tools import parse_tool_calls

    text = '[{"name": "get_weather", "arguments": {}}, {"name": "rm_rf", "arguments": {}}]'
    assert parse_tool_calls(text, {"get_weather"}) == (text, [])


def test_mistral_small_named_calls_are_parsed():
    """Mistral-Small-3.2's template writes calls as [TOOL_CALLS]name[CALL_ID]id[ARGS]{...}; its answers too."""
    from llamaforge.server.tools import parse_tool_calls

    text = ('Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
            '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Oslo"}')
    content, calls = parse_tool_calls(text, {"get_weather"})
    assert content == "Let me check."
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    for bad in ('[TOOL_CALLS]rm_rf[ARGS]{}', '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"} and more text',
                '[TOOL_CALLS]get_weather[ARGS]not json',
                '[TOOL_CALLS]get_weather[ARGS]{} so [TOOL_CALLS]get_weather[ARGS]{}'):
        assert parse_tool_calls(bad, {"get_weather"}) == (bad, [])


def test_ids_from_elsewhere_are_shortened_for_a_template_that_takes_only_nine(mistral):
    """A dialog replayed from another server (OpenAI's `call_` + 24 ids) was a 400 from Mistral's template; each
    id becomes 9 characters derived from it, so a call and its result still match."""
    c, _ = mistral
    long_id = "call_" + "Ab3" * 8
    dialog = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": long_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": long_id, "content": "sunny"}]
    r = c.post("/v1/chat/completions", json={"messages": dialog, "tools": TOOLS, "max_tokens": 1})
    assert r.status_code == 200, r.text
    from llamaforge.server.tools import _nine, nine_char_ids

    short = _nine(long_id)
    assert len(short) == 9 and short.isalnum() and _nine(short) == short and nine_char_ids(NEMO)
    same = [dict(m) for m in dialog]
    same[1] = {**same[1], "tool_calls": [{**same[1]["tool_calls"][0], "id": short}]}
    same[2] = {**same[2], "tool_call_id": short}
    again = c.post("/v1/chat/completions", json={"messages": same, "tools": TOOLS, "max_tokens": 1}).json()
    assert again["usage"]["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the very same prompt
