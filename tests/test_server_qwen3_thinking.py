"""Qwen3's thinking switch through the server: vLLM's `chat_template_kwargs` on /v1/chat/completions and
Ollama's `"think": false` on /api/chat and /api/generate, with Qwen3-0.6B's own chat template
(tests/templates/, as llama.cpp ships it in models/templates), on a tiny random model with a Qwen2-style
byte-level BPE vocabulary. Prompt lengths are compared with transformers' `apply_chat_template(...,
enable_thinking=...)` on the same template and dialog.

(The thoughts' split into `reasoning_content` / `thinking` is tests/test_server_thinking.py's.)

Before: `chat_template_kwargs` was ignored, and `think: false` was accepted and ignored, so the model
thought although asked not to (the template writes an empty <think></think> only when enable_thinking is false).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")

from starlette.testclient import TestClient  # noqa: E402

from tests.test_architectures import write_qwen_tokenizer  # noqa: E402
from tests.test_server_ollama_compat import _InProcess  # noqa: E402

QWEN3 = (Path(__file__).parent / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from llamaforge.server.app import create_app
    from llamaforge.tokenizer import Tokenizer
    from tests.conftest import tiny_llama

    folder = tmp_path_factory.mktemp("qwen3-tok")
    write_qwen_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN3}))
    tok = Tokenizer.from_file(folder)
    llama = tiny_llama(tok, 256)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    with TestClient(create_app(llama, model_name="qwen3")) as c:
        yield c, hf


def _hf_len(hf, **kwargs) -> int:
    return len(hf.apply_chat_template(DIALOG, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs))


def test_chat_template_kwargs_reach_the_template(qwen3):
    c, hf = qwen3
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0,
                           http_client=httpx.Client(transport=_InProcess(c)))

    def prompt_tokens(**extra) -> int:
        return client.chat.completions.create(model="qwen3", messages=DIALOG, max_tokens=1, **extra).usage.prompt_tokens

    off, default = _hf_len(hf, enable_thinking=False), _hf_len(hf)
    assert off > default  # the empty <think></think> the template writes
    assert prompt_tokens() == default
    assert prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": False}}) == off
    assert prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": True}}) == default


@pytest.mark.parametrize("kwargs", [{"enable_thinking": "no"}, {"messages": 1}, {"bad name": True}, [1]])
def test_chat_template_kwargs_take_only_named_scalars(qwen3, kwargs):
    """Text values could reach the prompt untraced (control tokens); the template's own names are not callers'."""
    c, _ = qwen3
    r = c.post("/v1/chat/completions", json={"messages": DIALOG, "max_tokens": 1, "chat_template_kwargs": kwargs})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text


def test_ollama_think_false_turns_thinking_off(qwen3):
    c, hf = qwen3
    client = ollama.Client(host="http://testserver", transport=_InProcess(c))
    off, default = _hf_len(hf, enable_thinking=False), _hf_len(hf)
    chat = lambda **kw: client.chat(model="qwen3", messages=DIALOG, options={"num_predict": 1}, **kw)  # noqa: E731
    assert chat(think=False).prompt_eval_count == off  # was the default: thinking on
    assert chat().prompt_eval_count == default
    generate = client.generate(model="qwen3", system=DIALOG[0]["content"], prompt=DIALOG[1]["content"], think=False,
                               options={"num_predict": 1})
    assert generate.prompt_eval_count == off
    assert chat(think=True).prompt_eval_count == default  # the template has a thinking mode: Ollama's default
