"""Ollama's request bodies, and their translation into the OpenAI requests the /v1 routes take (sampling
options, messages, tool calls, logprobs, `think`, `keep_alive`), and of the OpenAI chunks back into Ollama's
lines (`Answer`). The routes are routes/ollama.py; its docstring says where this server and Ollama differ.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from llamaforge.server.errors import APIError, from_validation_errors
from llamaforge.server.schemas import ChatCompletionRequest, CompletionRequest
from llamaforge.server.state import Served

# Ollama's defaults (api/types.go DefaultOptions) for what a request does not set
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
# option name -> OpenAI request field
OPTION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                 "repeat_penalty": "repetition_penalty", "seed": "seed", "num_predict": "max_tokens", "stop": "stop"}
# sampling options this server does not implement, with the value that leaves sampling as it is: any other
# value is a 400 (ignoring it would sample otherwise than asked)
UNSERVED_OPTIONS = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0}
NDJSON = "application/x-ndjson"
# OpenAI field -> what an Ollama client sent, for error messages in the words of Ollama's API
OLLAMA_WORDS = {field: f"options.{name}" for name, field in OPTION_FIELDS.items()} | {"response_format": "format"}
# Ollama's keep_alive: seconds (a number, or a number as text) or a Go duration ("5m", "1h30m", "-1s")
_DURATION = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:(?:ns|us|µs|ms|s|m|h)(?:\d+(?:\.\d*)?|\.\d+)?)*"
                       r"(?:ns|us|µs|ms|s|m|h)?")
_OPENAI_FIELD = re.compile(r"\b(" + "|".join(map(re.escape, OLLAMA_WORDS)) + r")\b")


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OllamaMessage(_Loose):
    role: str
    content: Optional[str] = ""
    images: Optional[list[Any]] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_name: Optional[str] = None
    thinking: Optional[str] = None


class _GenerateFields(_Loose):
    model: str = Field(min_length=1)
    stream: bool = True
    format: Optional[Union[str, dict[str, Any]]] = None
    options: Optional[dict[str, Any]] = None
    keep_alive: Optional[Union[int, float, str]] = None
    think: Optional[Union[bool, str]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None


class OllamaChatRequest(_GenerateFields):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: Optional[list[dict[str, Any]]] = None


class OllamaGenerateRequest(_GenerateFields):
    prompt: Optional[str] = ""
    system: Optional[str] = None
    raw: bool = False
    suffix: Optional[str] = None
    template: Optional[str] = None
    context: Optional[list[StrictInt]] = None
    images: Optional[list[Any]] = None


class OllamaEmbedRequest(_Loose):
    model: str = Field(min_length=1)
    input: Union[str, list[str]]
    truncate: Optional[bool] = None
    dimensions: Optional[int] = None


class OllamaEmbeddingsRequest(_Loose):
    model: str = Field(min_length=1)
    prompt: str


def parse_body(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors())) from exc


def in_ollama_words(exc: APIError) -> APIError:
    """An error about the translated OpenAI request, naming the Ollama fields the client sent
    (`max_tokens` -> `options.num_predict`, `response_format` -> `format`)."""
    exc.message = _OPENAI_FIELD.sub(lambda m: OLLAMA_WORDS[m.group(1)], exc.message)
    return exc


class _OllamaChat(ChatCompletionRequest):
    temperature: Optional[float] = Field(None, ge=0, allow_inf_nan=False)  # Ollama takes any temperature, not <= 2
    # /api/generate's `context` (checked by check_context): the prompt continues these ids
    context: Optional[list[int]] = None


class _OllamaCompletion(CompletionRequest):
    temperature: Optional[float] = Field(None, ge=0, allow_inf_nan=False)


_OLLAMA_BOUNDS = {ChatCompletionRequest: _OllamaChat, CompletionRequest: _OllamaCompletion}


def translated(model: type[BaseModel], body: dict) -> Any:
    """The OpenAI request an Ollama request becomes (with Ollama's bounds where they are wider than OpenAI's);
    a 400 in Ollama's words if its values are not valid."""
    try:
        return parse_body(_OLLAMA_BOUNDS[model], body)
    except APIError as exc:
        raise in_ollama_words(exc) from None


def sampling_fields(req: _GenerateFields) -> dict[str, Any]:
    """The OpenAI sampling fields of an Ollama request: its options over Ollama's defaults."""
    if req.options is not None and not isinstance(req.options, dict):
        raise APIError(400, "'options' must be an object", param="options")
    fields: dict[str, Any] = dict(DEFAULTS)
    for name, neutral in UNSERVED_OPTIONS.items():
        value = (req.options or {}).get(name)
        if value is not None and value != neutral:
            raise APIError(400, f"options.{name}={value!r} is not supported by this server (leave it out or send "
                           f"{neutral}); use temperature, top_k, top_p and min_p", param=f"options.{name}")
    for name, value in (req.options or {}).items():
        if name in OPTION_FIELDS and value is not None:
            fields[OPTION_FIELDS[name]] = value
    if isinstance(fields.get("seed"), int) and fields["seed"] < 0:
        del fields["seed"]  # Ollama: -1 is a random seed
    if isinstance(fields.get("max_tokens"), int) and fields["max_tokens"] < 0:
        del fields["max_tokens"]  # -1: until the context is full; -2: fill the context
    if isinstance(fields.get("top_k"), int) and fields["top_k"] == 0:
        fields["top_k"] = -1
    fmt = req.format
    if fmt == "json":
        fields["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    elif fmt not in (None, ""):
        raise APIError(400, f"'format' must be \"json\" or a JSON schema, got {fmt!r}", param="format")
    return fields


def openai_messages(messages: list[OllamaMessage]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's. Ollama's carry no call ids: each call gets one, and each tool result the
    id of the call it answers (the first unanswered one of its `tool_name`, else the first unanswered one),
    so templates that render ids (Mistral's, which require them) see a consistent dialog."""
    out, pending = [], []
    for i, m in enumerate(messages):
        msg = _openai_message(i, m)
        if msg.get("tool_calls"):
            pending = [(c["id"], c["function"]["name"]) for c in msg["tool_calls"]]
        elif m.role == "tool" and pending:
            k = next((k for k, (_, name) in enumerate(pending) if name == m.tool_name), 0)
            msg["tool_call_id"] = pending.pop(k)[0]
        out.append(msg)
    return out


def _openai_message(i: int, m: OllamaMessage) -> dict[str, Any]:
    if m.images:
        raise APIError(400, f"messages[{i}] has images; this model takes text only", param=f"messages.{i}.images")
    out: dict[str, Any] = {"role": m.role, "content": m.content or ""}
    if m.thinking:  # an earlier answer's thoughts, for the template (Ollama passes them as .Thinking)
        out["reasoning_content"] = m.thinking
    if m.tool_calls:
        calls = []
        for j, call in enumerate(m.tool_calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise APIError(400, f"messages[{i}].tool_calls[{j}] needs a function with a name",
                               param=f"messages.{i}.tool_calls")
            args = fn.get("arguments", {})
            # deterministic (the same dialog renders the same prompt: prefix cache, seeds), 9 alphanumerics
            calls.append({"id": f"c{i % 10_000:04d}{j % 10_000:04d}", "type": "function",
                          "function": {"name": fn["name"], "arguments": args if isinstance(args, str)
                                       else json.dumps(args, ensure_ascii=False)}})
        out["tool_calls"] = calls
    if m.tool_name:
        out["name"] = m.tool_name
    return out


def _ollama_logprobs(lp: Optional[dict]) -> list[dict]:
    """A chunk's OpenAI logprobs (chat's `content` list, or the legacy completions object) as Ollama's
    `logprobs` entries: {"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}."""
    if not lp:
        return []
    if "content" in lp:
        return list(lp["content"] or [])
    return [{"token": tok, "logprob": p, "bytes": list(tok.encode("utf-8")),
             "top_logprobs": [{"token": t, "logprob": q, "bytes": list(t.encode("utf-8"))}
                              for t, q in (top or {}).items()]}
            for tok, p, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]) if p is not None]


def logprob_fields(req: _GenerateFields, kind: str) -> dict[str, Any]:
    """The OpenAI fields of Ollama's `logprobs` / `top_logprobs` for a chat or completion request."""
    if not req.logprobs:
        if req.top_logprobs:
            raise APIError(400, "top_logprobs needs \"logprobs\": true", param="top_logprobs")
        return {}
    if kind == "completion":
        return {"logprobs": req.top_logprobs or 0}
    return {"logprobs": True, **({"top_logprobs": req.top_logprobs} if req.top_logprobs else {})}


def ollama_tool_calls(calls: list[dict]) -> list[dict]:
    """OpenAI tool calls (arguments as JSON text) -> Ollama's (arguments as an object)."""
    out = []
    for c in calls:
        fn = c.get("function", {})
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except json.JSONDecodeError:
            args = fn.get("arguments")
        out.append({"function": {"name": fn.get("name"), "arguments": args}})
    return out


class Answer:
    """Accumulates OpenAI chunks of one choice into Ollama's pieces and final statistics."""

    def __init__(self, kind: str):
        self.kind = kind
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.thought: Optional[str] = None  # the thoughts the last chunk carried
        self.exchange: Optional[list[int]] = None  # the finished exchange's ids (/api/generate's `context`)
        self.tool_calls: list[dict] = []
        self.finish: Optional[str] = None
        self.usage: dict = {}
        self.logprobs: list[dict] = []  # Ollama's entries not yet sent (a token's text may come with a later line)

    def add(self, chunk: dict) -> Optional[str]:
        """Take one chunk; return its new text (or None)."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        piece, self.thought = None, None
        for choice in chunk.get("choices", []):
            if self.kind == "chat":
                delta = choice.get("delta", {})
                piece = delta.get("content") or None
                self.thought = delta.get("reasoning_content") or None
                if self.thought:
                    self.thinking.append(self.thought)
                if delta.get("tool_calls"):
                    self.tool_calls.extend(delta["tool_calls"])
            else:
                piece = choice.get("text") or None
            self.logprobs.extend(_ollama_logprobs(choice.get("logprobs")))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
            if piece:
                self.text.append(piece)
        return piece

    def take_logprobs(self) -> list[dict]:
        out, self.logprobs = self.logprobs, []
        return out

    def stats(self, timing) -> dict:
        end = timing.finished or time.monotonic()
        first = timing.first_token or end
        return {"done_reason": "length" if self.finish == "length" else "stop",
                "total_duration": int((end - timing.submitted) * 1e9), "load_duration": 0,
                "prompt_eval_count": self.usage.get("prompt_tokens", timing.prompt_tokens),
                "prompt_eval_duration": int((first - timing.submitted) * 1e9),
                "eval_count": self.usage.get("completion_tokens", timing.completion_tokens),
                "eval_duration": int((end - first) * 1e9)}


THINK_LEVELS = ("high", "medium", "low", "max")  # Ollama's ThinkValue strings: any of them turns thinking on


def think_fields(s: Served, think: Optional[Union[bool, str]]) -> dict[str, Any]:
    """The OpenAI fields of Ollama's `think`.

    As Ollama's server: on a model with a thinking mode (its chat format's `think_tags`) `think` left out means
    true, and true or a level puts the thoughts in `thinking`; `false` leaves the answer as the model writes it
    and turns thinking off where the template switches it (`enable_thinking`, Qwen3's); on a model without one,
    true or a level is a 400 ("... does not support thinking")."""
    if isinstance(think, str) and think not in THINK_LEVELS:
        raise APIError(400, f"invalid think value {think!r}: send true, false or one of {', '.join(THINK_LEVELS)}",
                       param="think")
    fmt = s.llama.chat_format
    wanted = think is None or think is True or isinstance(think, str)
    if getattr(fmt, "think_tags", None) is None:
        if think is not None and wanted:
            raise APIError(400, f'"{s.name}" does not support thinking', param="think")
        return {}
    if wanted:
        return {"reasoning_format": "auto"}  # whatever the server's default for /v1 (--reasoning-format)
    fields: dict[str, Any] = {"reasoning_format": "none"}
    if any("enable_thinking" in t for t in (getattr(fmt, "templates", None) or {}).values()):
        fields["chat_template_kwargs"] = {"enable_thinking": False}
    return fields


def check_context(s: Served, context: Optional[list[int]]) -> None:
    """A 400 for an Ollama `context` that cannot be the ids of an exchange with this model: more ids than its
    context holds (refused before anything else is done with them), or ids outside its vocabulary. Control-token
    ids pass as ids (the context this server returns holds the template's own, `<|im_start|>`, ...), as a
    token-id prompt on /v1/completions does; no text is ever read into them."""
    if context is None:
        return
    limit = s.llama.max_seq_len
    if len(context) >= limit:
        raise APIError(400, f"'context' has {len(context)} token ids but this server's context is {limit} tokens "
                       "(the earlier exchange and the new prompt together, with room for an answer); start a new "
                       "exchange without it", param="context")
    vocab = s.llama.args.vocab_size
    bad = [t for t in context if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"'context' has token ids outside the vocabulary [0, {vocab}): {bad[:5]}; send the "
                       "context an earlier response returned", param="context")


def check_keep_alive(keep_alive: Optional[Union[int, float, str]]) -> None:
    """A 400 for a keep_alive Ollama would refuse ("time: invalid duration"); the value itself changes nothing
    here (the one model stays loaded)."""
    if isinstance(keep_alive, str) and keep_alive.strip() and not _DURATION.fullmatch(keep_alive.strip()):
        raise APIError(400, f"keep_alive {keep_alive!r} is not a duration: send seconds (300, -1 for ever) or "
                       "a duration such as \"5m\", \"1h\" or \"0\"", param="keep_alive")


def load_reason(keep_alive: Optional[Union[int, float, str]]) -> str:
    """Ollama's done_reason for an empty request: "unload" when keep_alive is zero ("0", 0, "0s"), else "load".

    This server keeps its one model loaded either way; the answer is the one Ollama clients look for."""
    text = str(keep_alive).strip().lower() if keep_alive is not None else ""
    return "unload" if text.rstrip("smh").strip() in ("0", "0.0") else "load"
