"""Ollama-compatible endpoints on the same engine as the OpenAI routes.

    POST /api/chat        chat in the model's own format; streams newline-delimited JSON unless "stream": false
    POST /api/generate    a prompt (the chat template applied, as Ollama does) or, with "raw": true, plain text
    POST /api/embed       {"input": str | [str]} -> {"embeddings": [[...]]}; POST /api/embeddings (legacy, one prompt)
    GET  /api/tags        the served model, as `ollama list` shows it; GET /api/ps the same as loaded models
    POST /api/show        details, parameters, template and model_info of the served model
    POST /api/pull        success for the served model (already here), 404 for any other; push, create,
                          copy and delete answer 501 (the server serves the one model it loaded)
    GET  /api/version     the llamaforge version

Each request is translated into the OpenAI request the /v1 routes take (so it is validated, admitted,
batched and sampled in exactly the same way), and the OpenAI chunks are translated back. Errors are
Ollama's shape, `{"error": "message"}`, with the same status codes as the /v1 routes (404 for a model
that is not served).

Where Ollama and this server differ: the context length is the server's `--max-seq-len` (`num_ctx` is
ignored, as are options that tune Ollama's runner: `num_thread`, `num_gpu`, `num_batch`, `use_mmap`, ...);
`repeat_penalty` applies over prompt and output (Ollama's over the last `repeat_last_n` tokens, which is
ignored) and is off unless given; images, `suffix`, `template` overrides and `context` are refused with a 400,
and so are the samplers not served (`mirostat`, `typical_p`, `tfs_z` at other than their neutral values) and a
`keep_alive` that is not a duration. `logprobs` / `top_logprobs` come back as Ollama's `logprobs` entries.
Sampling defaults are Ollama's (temperature 0.8, top_k 40, top_p 0.9).
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional, Union

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import llamaforge
from llamaforge.server.errors import APIError, from_validation_errors
from llamaforge.server.respond import ClientGone, stream_chunks, unless_disconnected
from llamaforge.server.routes.embeddings import embed as openai_embed
from llamaforge.server.routes.generate import observed, start
from llamaforge.server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from llamaforge.server.state import Served, served

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
    context: Optional[list[int]] = None
    images: Optional[list[Any]] = None


class OllamaEmbedRequest(_Loose):
    model: str = Field(min_length=1)
    input: Union[str, list[str]]
    truncate: Optional[bool] = None
    dimensions: Optional[int] = None


class OllamaEmbeddingsRequest(_Loose):
    model: str = Field(min_length=1)
    prompt: str


def _card(s: Served) -> dict:
    """What Ollama's /api/tags, /api/show and /api/ps say of the served model."""
    llama, args = s.llama, s.llama.args
    family = getattr(args, "arch", None) or "llama"
    source = Path(str(llama.source)) if llama.source else None
    files = [source] if source and source.is_file() else \
        [p for p in source.glob("*") if p.is_file()] if source and source.is_dir() else []
    mtime = max((p.stat().st_mtime for p in files), default=s.created)
    n = args.n_params
    details = {"parent_model": "", "format": llama.checkpoint_format, "family": family, "families": [family],
               "parameter_size": f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M",
               "quantization_level": llama.weight_type}
    info = {"general.architecture": family, "general.parameter_count": n,
            f"{family}.context_length": llama.max_seq_len, f"{family}.embedding_length": args.dim,
            f"{family}.block_count": args.n_layers, f"{family}.attention.head_count": args.n_heads,
            f"{family}.attention.head_count_kv": args.n_kv_heads, f"{family}.feed_forward_length": args.hidden_dim,
            f"{family}.vocab_size": args.vocab_size}
    template = llama.tokenizer.chat_template or ""
    return {"details": details, "model_info": info, "template": template,
            "size": sum(p.stat().st_size for p in files),
            "modified_at": datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z"),
            "capabilities": ["completion"] + (["tools"] if "tools" in template else [])}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors())) from exc


def _ollama_words(exc: APIError) -> APIError:
    """An error about the translated OpenAI request, naming the Ollama fields the client sent
    (`max_tokens` -> `options.num_predict`, `response_format` -> `format`)."""
    exc.message = _OPENAI_FIELD.sub(lambda m: OLLAMA_WORDS[m.group(1)], exc.message)
    return exc


class _OllamaChat(ChatCompletionRequest):
    temperature: Optional[float] = Field(None, ge=0, allow_inf_nan=False)  # Ollama takes any temperature, not <= 2


class _OllamaCompletion(CompletionRequest):
    temperature: Optional[float] = Field(None, ge=0, allow_inf_nan=False)


_OLLAMA_BOUNDS = {ChatCompletionRequest: _OllamaChat, CompletionRequest: _OllamaCompletion}


def _translated(model: type[BaseModel], body: dict) -> Any:
    """The OpenAI request an Ollama request becomes (with Ollama's bounds where they are wider than OpenAI's);
    a 400 in Ollama's words if its values are not valid."""
    try:
        return _parse(_OLLAMA_BOUNDS[model], body)
    except APIError as exc:
        raise _ollama_words(exc) from None


def _sampling(req: _GenerateFields) -> dict[str, Any]:
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


def _openai_messages(messages: list[OllamaMessage]) -> list[dict[str, Any]]:
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


def _logprob_fields(req: _GenerateFields, kind: str) -> dict[str, Any]:
    """The OpenAI fields of Ollama's `logprobs` / `top_logprobs` for a chat or completion request."""
    if not req.logprobs:
        if req.top_logprobs:
            raise APIError(400, "top_logprobs needs \"logprobs\": true", param="top_logprobs")
        return {}
    if kind == "completion":
        return {"logprobs": req.top_logprobs or 0}
    return {"logprobs": True, **({"top_logprobs": req.top_logprobs} if req.top_logprobs else {})}


def _tool_calls(calls: list[dict]) -> list[dict]:
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


class _Answer:
    """Accumulates OpenAI chunks of one choice into Ollama's pieces and final statistics."""

    def __init__(self, kind: str):
        self.kind = kind
        self.text: list[str] = []
        self.tool_calls: list[dict] = []
        self.finish: Optional[str] = None
        self.usage: dict = {}
        self.logprobs: list[dict] = []  # Ollama's entries not yet sent (a token's text may come with a later line)

    def add(self, chunk: dict) -> Optional[str]:
        """Take one chunk; return its new text (or None)."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        piece = None
        for choice in chunk.get("choices", []):
            if self.kind == "chat":
                delta = choice.get("delta", {})
                piece = delta.get("content") or None
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


router = APIRouter(prefix="/api", tags=["ollama"])


def _check_model(s: Served, name: str) -> None:
    if not s.knows(name):
        raise APIError(404, f"model '{name}' not found; this server serves '{s.name}' (GET /api/tags)",
                       param="model", code="model_not_found")


def _think(s: Served, think: Optional[Union[bool, str]]) -> dict[str, Any]:
    """The OpenAI fields of Ollama's `think`. `false` on a model whose template switches thinking
    (`enable_thinking`, Qwen3's) turns it off there; `true` or a level is a 400, as Ollama answers for a model
    without a thinking mode (thoughts are not separated into `thinking` here: leave `think` out to get the
    model's default, its thoughts in the content)."""
    if think not in (None, False, "false"):
        raise APIError(400, f"'{s.name}' does not support thinking here: thoughts are not separated into "
                       "\"thinking\" (send \"think\": false or leave it out)", param="think")
    if think is not None and "enable_thinking" in (getattr(s.llama.chat_format, "template", None) or ""):
        return {"chat_template_kwargs": {"enable_thinking": False}}
    return {}


def _check_keep_alive(keep_alive: Optional[Union[int, float, str]]) -> None:
    """A 400 for a keep_alive Ollama would refuse ("time: invalid duration"); the value itself changes nothing
    here (the one model stays loaded)."""
    if isinstance(keep_alive, str) and keep_alive.strip() and not _DURATION.fullmatch(keep_alive.strip()):
        raise APIError(400, f"keep_alive {keep_alive!r} is not a duration: send seconds (300, -1 for ever) or "
                       "a duration such as \"5m\", \"1h\" or \"0\"", param="keep_alive")


def _load_reason(keep_alive: Optional[Union[int, float, str]]) -> str:
    """Ollama's done_reason for an empty request: "unload" when keep_alive is zero ("0", 0, "0s"), else "load".

    This server keeps its one model loaded either way; the answer is the one Ollama clients look for."""
    text = str(keep_alive).strip().lower() if keep_alive is not None else ""
    return "unload" if text.rstrip("smh").strip() in ("0", "0.0") else "load"


def _base(s: Served) -> dict:
    return {"model": s.name, "created_at": _now()}


async def _answer(kind: str, openai_req: Any, stream: bool, shape: Callable[..., dict], request: Request,
                  s: Served, logprobs: bool = False) -> Response:
    """Run an OpenAI request; reply with Ollama's NDJSON stream or one JSON object.

    shape(piece) is a line carrying new text; shape(text, stats, answer) the last line, with the statistics.
    """
    try:  # num_predict past the context generates until it is full, as Ollama does (no 400)
        run, rb = await start(kind, openai_req, s, fill=True)
    except APIError as exc:
        raise _ollama_words(exc) from None
    endpoint = "/api/generate" if request.url.path.endswith("/generate") else "/api/chat"
    chunks = observed(stream_chunks(run, rb, include_usage=True), run, endpoint, s)
    acc = _Answer(kind)

    def with_logprobs(line: dict) -> dict:
        return {**line, "logprobs": acc.take_logprobs()} if logprobs else line

    if stream:
        async def lines() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    piece = acc.add(chunk)
                    if piece:
                        yield json.dumps(with_logprobs(shape(piece)), ensure_ascii=False) + "\n"
                last = with_logprobs(shape("", acc.stats(run.timing), acc))
                yield json.dumps(last, ensure_ascii=False) + "\n"
            except APIError as exc:
                yield json.dumps({"error": exc.message}) + "\n"
            finally:
                await chunks.aclose()
        return StreamingResponse(lines(), media_type=NDJSON)

    async def whole() -> dict:
        async for chunk in chunks:
            acc.add(chunk)
        return with_logprobs(shape("".join(acc.text), acc.stats(run.timing), acc))

    try:
        return JSONResponse(await unless_disconnected(whole(), request.receive))
    except ClientGone:
        return Response(status_code=499)
    finally:
        await chunks.aclose()


@router.post("/chat")
async def chat(request: Request, s: Served = Depends(served)):
    req: OllamaChatRequest = _parse(OllamaChatRequest, await _json(request))
    _check_model(s, req.model)
    thinking = _think(s, req.think)
    _check_keep_alive(req.keep_alive)
    if not req.messages:  # Ollama: an empty chat loads the model
        return {**_base(s), "message": {"role": "assistant", "content": ""}, "done": True,
                "done_reason": _load_reason(req.keep_alive)}
    body: dict[str, Any] = {**_sampling(req), "messages": _openai_messages(req.messages),
                            "stream": True, "stream_options": {"include_usage": True}, **thinking}
    if req.tools:
        body["tools"] = req.tools
    body.update(_logprob_fields(req, "chat"))

    def shape(piece: str, stats: Optional[dict] = None, done: Optional[_Answer] = None) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": piece}
        if stats is None:
            return {**_base(s), "message": message, "done": False}
        if done.tool_calls:
            message["tool_calls"] = _tool_calls(done.tool_calls)
        return {**_base(s), "message": message, "done": True, **stats}

    return await _answer("chat", _translated(ChatCompletionRequest, body), req.stream, shape, request, s,
                         logprobs=bool(req.logprobs))


@router.post("/generate")
async def generate(request: Request, s: Served = Depends(served)):
    req: OllamaGenerateRequest = _parse(OllamaGenerateRequest, await _json(request))
    _check_model(s, req.model)
    thinking = _think(s, req.think)
    _check_keep_alive(req.keep_alive)
    for name in ("suffix", "template", "context", "images"):
        if getattr(req, name):
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    if not req.prompt and not req.system:  # Ollama: an empty prompt loads the model
        return {**_base(s), "response": "", "done": True, "done_reason": _load_reason(req.keep_alive)}
    fields = {**_sampling(req), "stream": True, "stream_options": {"include_usage": True}}
    if req.raw:
        body = {**fields, **_logprob_fields(req, "completion"), "prompt": req.prompt or ""}
        kind, openai_req = "completion", _translated(CompletionRequest, body)
    else:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
            [{"role": "user", "content": req.prompt or ""}]
        body = {**fields, **_logprob_fields(req, "chat"), **thinking, "messages": messages}
        kind, openai_req = "chat", _translated(ChatCompletionRequest, body)

    def shape(piece: str, stats: Optional[dict] = None, done: Optional[_Answer] = None) -> dict:
        if stats is None:
            return {**_base(s), "response": piece, "done": False}
        return {**_base(s), "response": piece, "done": True, **stats}

    return await _answer(kind, openai_req, req.stream, shape, request, s, logprobs=bool(req.logprobs))


@router.post("/embed")
async def embed(request: Request, s: Served = Depends(served)):
    req: OllamaEmbedRequest = _parse(OllamaEmbedRequest, await _json(request))
    _check_model(s, req.model)
    t0 = time.monotonic()
    try:
        body = await openai_embed(_parse(EmbeddingRequest, {"input": req.input, "dimensions": req.dimensions}),
                                  request, s, truncate=req.truncate is not False)  # Ollama: truncate by default
    except ClientGone:
        return Response(status_code=499)
    return {"model": s.name, "embeddings": [d["embedding"] for d in body["data"]],
            "total_duration": int((time.monotonic() - t0) * 1e9), "load_duration": 0,
            "prompt_eval_count": body["usage"]["prompt_tokens"]}


@router.post("/embeddings")
async def embeddings(request: Request, s: Served = Depends(served)):
    req: OllamaEmbeddingsRequest = _parse(OllamaEmbeddingsRequest, await _json(request))
    _check_model(s, req.model)
    try:
        body = await openai_embed(_parse(EmbeddingRequest, {"input": req.prompt}), request, s)
    except ClientGone:
        return Response(status_code=499)
    return {"embedding": body["data"][0]["embedding"]}


def _listing(s: Served) -> dict:
    card = _card(s)
    return {"name": s.name, "model": s.name, "modified_at": card["modified_at"], "size": card["size"],
            "digest": "", "details": card["details"]}


@router.get("/tags")
async def tags(s: Served = Depends(served)):
    return {"models": [_listing(s)]}


@router.get("/ps")
async def ps(s: Served = Depends(served)):
    return {"models": [{**_listing(s), "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
                        "context_length": s.llama.max_seq_len}]}


def _named_model(body: Any, verb: str) -> str:
    """The model a show / pull body names (Ollama's clients send `model`, older ones `name`); 400 if none."""
    name = (body.get("model") or body.get("name")) if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        raise APIError(400, f"'model' is required: the name of the model to {verb}", param="model")
    return name


@router.post("/show")
async def show(request: Request, s: Served = Depends(served)):
    body = await _json(request)
    name = _named_model(body, "show")
    _check_model(s, name)
    card = _card(s)
    return {"license": "", "modelfile": f"# served by llamaforge\nFROM {s.name}\n",
            "parameters": "\n".join(f"{k:<16}{v}" for k, v in DEFAULTS.items()), "template": card["template"],
            "details": card["details"], "model_info": card["model_info"], "capabilities": card["capabilities"],
            "modified_at": card["modified_at"]}


@router.post("/pull")
async def pull(request: Request, s: Served = Depends(served)):
    """The served model is already here: Ollama's success answer (one line when streamed); any other a 404."""
    body = await _json(request)
    name = _named_model(body, "pull")
    if not s.knows(name):
        raise APIError(404, f"model '{name}' is not served here and this server loads no other model; it serves "
                       f"'{s.name}' (to serve another, run `llamaforge pull {name}` and `llamaforge serve {name}`)",
                       param="model", code="model_not_found")
    if body.get("stream", True) is False:
        return {"status": "success"}
    return StreamingResponse(iter([json.dumps({"status": "success"}) + "\n"]), media_type=NDJSON)


async def _not_managed(request: Request):
    raise APIError(501, f"{request.method} {request.url.path} is not supported: this server serves the one model "
                   "it loaded at start and does not create, copy, push or delete models")


for _path, _method in (("/push", "POST"), ("/create", "POST"), ("/copy", "POST"), ("/delete", "DELETE")):
    router.add_api_route(_path, _not_managed, methods=[_method], include_in_schema=False)


@router.get("/version")
async def version():
    return {"version": llamaforge.__version__}


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from exc
    except RecursionError:  # json's C scanner recurses per nesting level
        raise APIError(400, "the request body is nested too deeply") from None
