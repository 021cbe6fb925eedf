"""Named chat templates (Hermes-2-Pro's and Command-R's `default` + `tool_use`), as transformers picks them.

transformers' `get_chat_template`: with a dict of templates, `tools is not None` and a "tool_use" entry
choose "tool_use", else "default". The templates come from tokenizer_config.json's list of {"name",
"template"}, or from `chat_template.jinja` + `additional_chat_templates/NAME.jinja` (what transformers'
`save_pretrained` writes), or from a GGUF's `tokenizer.chat_template.NAME` (gguf-py's `add_chat_template`
of such a list; llama.cpp reads `tokenizer.chat_template.tool_use` when tools are given). Renders are
compared with transformers' `apply_chat_template` on the same files; the server's prompt tokens with its
token ids.

Before: only "default" was kept and GGUF's `tool_use` not read, so a request with tools rendered the default.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from llamaforge.chat import JinjaChatFormat, chat_format_for  # noqa: E402
from llamaforge.tokenizer import Tokenizer  # noqa: E402
from llamaforge.tokenizers.gguf_export import tokenizer_gguf_metadata  # noqa: E402
from tests.test_architectures import CHATML, write_qwen_tokenizer  # noqa: E402

# Hermes-2-Pro's shape: a ChatML default, and a tool_use template that lists the tools in the system turn
TOOL_USE = (
    "{{- '<|im_start|>system\\nYou are a function calling AI model. Tools: <tools> ' }}"
    "{%- for tool in tools %}{{ tool | tojson }}{% endfor %}{{- ' </tools><|im_end|>\\n' }}"
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
DIALOG = [{"role": "user", "content": "Weather in Paris?"}]
NAMED = [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": TOOL_USE}]


@pytest.fixture(scope="module")
def listed(tmp_path_factory) -> Path:
    """A tokenizer folder whose tokenizer_config.json holds the list of named templates."""
    folder = tmp_path_factory.mktemp("named")
    write_qwen_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": NAMED}))
    return folder


def _ours(folder_or_file: Path) -> JinjaChatFormat:
    fmt = chat_format_for(Tokenizer.from_file(folder_or_file))
    assert isinstance(fmt, JinjaChatFormat)
    return fmt


@pytest.mark.parametrize("tools", [TOOLS, [], None], ids=["tools", "empty-list", "none"])
def test_tool_use_is_picked_as_transformers_picks_it(listed: Path, tools) -> None:
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(listed)
    want = ref.apply_chat_template(DIALOG, tools=tools, tokenize=False, add_generation_prompt=True)
    fmt = _ours(listed)
    assert fmt.render(DIALOG, tools=tools) == want
    assert fmt.template_name(tools) == ("default" if tools is None else "tool_use")
    ids = ref.apply_chat_template(DIALOG, tools=tools, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert fmt.encode_dialog(DIALOG, tools=tools) == list(ids)


def test_templates_saved_by_transformers_as_files(listed: Path, tmp_path: Path) -> None:
    """transformers saves named templates as chat_template.jinja + additional_chat_templates/*.jinja."""
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(listed)
    ref.save_pretrained(tmp_path)
    assert (tmp_path / "additional_chat_templates" / "tool_use.jinja").is_file()
    reloaded = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    fmt = _ours(tmp_path)
    for tools in (TOOLS, None):
        assert fmt.render(DIALOG, tools=tools) == reloaded.apply_chat_template(
            DIALOG, tools=tools, tokenize=False, add_generation_prompt=True)


def test_our_saved_tokenizer_keeps_the_named_templates(listed: Path, tmp_path: Path) -> None:
    Tokenizer.from_file(listed).save(tmp_path)
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert ref.apply_chat_template(DIALOG, tools=TOOLS, tokenize=False, add_generation_prompt=True) == \
        _ours(listed).render(DIALOG, tools=TOOLS)
    assert Tokenizer.from_file(tmp_path).chat_templates == {"tool_use": TOOL_USE}


def _gguf_vocab(path: Path, md: dict, templates) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(md["tokenizer.ggml.model"])
    w.add_tokenizer_pre(md["tokenizer.ggml.pre"])
    w.add_token_list(md["tokenizer.ggml.tokens"])
    w.add_token_types(md["tokenizer.ggml.token_type"])
    w.add_token_merges(md["tokenizer.ggml.merges"])
    w.add_eos_token_id(md["tokenizer.ggml.eos_token_id"])
    w.add_chat_template(templates)  # gguf-py's own writing of a tokenizer_config.json list
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_tool_use_template(listed: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_file(listed)
    md = tokenizer_gguf_metadata(tok)
    # our export writes the keys gguf-py writes for the list
    assert md["tokenizer.chat_template"] == CHATML and md["tokenizer.chat_template.tool_use"] == TOOL_USE
    assert md["tokenizer.chat_templates"] == ["tool_use"]
    fmt = _ours(_gguf_vocab(tmp_path / "vocab.gguf", md, NAMED))
    assert fmt.templates == {"default": CHATML, "tool_use": TOOL_USE}
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(listed)
    for tools in (TOOLS, None):
        assert fmt.render(DIALOG, tools=tools) == ref.apply_chat_template(
            DIALOG, tools=tools, tokenize=False, add_generation_prompt=True)


def test_a_broken_named_template_is_refused_by_name(listed: Path) -> None:
    from llamaforge.errors import ChatFormatError

    tok = Tokenizer.from_file(listed)
    with pytest.raises(ChatFormatError, match="tool_use.*does not compile"):
        JinjaChatFormat(tok, CHATML, named={"tool_use": "{% for %}"})


def test_the_server_renders_requests_with_tools_with_tool_use(listed: Path) -> None:
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from llamaforge.server.app import create_app
    from tests.conftest import tiny_llama

    tok = Tokenizer.from_file(listed)
    llama = tiny_llama(tok, 512)
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(listed)
    with TestClient(create_app(llama, model_name="named")) as c:
        def prompt_tokens(**extra) -> int:
            r = c.post("/v1/chat/completions", json={"messages": DIALOG, "max_tokens": 1, **extra})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens"]

        def hf_len(tools) -> int:
            return len(ref.apply_chat_template(DIALOG, tools=tools, tokenize=True, add_generation_prompt=True,
                                               return_dict=False))

        assert prompt_tokens(tools=TOOLS) == hf_len(TOOLS) > hf_len(None)
        assert prompt_tokens() == hf_len(None)
        assert prompt_tokens(tools=TOOLS, tool_choice="none") == hf_len(None)  # no tools offered: the default
        r = c.post("/api/chat", json={"model": "named", "messages": DIALOG, "tools": TOOLS, "stream": False,
                                      "options": {"num_predict": 1}})
        assert r.status_code == 200 and r.json()["prompt_eval_count"] == hf_len(TOOLS), r.text
