"""Ollama-compatible endpoints on the same engine as the OpenAI routes.

    POST /api/chat        chat in the model's own format; streams newline-delimited JSON unless "stream": false
    POST /api/generate    a prompt (the chat template applied, as Ollama does) or, with "raw": true, plain text
    POST /api/embed       {"input": str | [str]} -> {"embeddings": [[...]]}; POST /api/embeddings (legacy, one prompt)
    GET  /api/tags        the served model, as `ollama list` shows it; GET /api/ps the same as loaded models
    POST /api/show        details, parameters, template and model_info of the served model
    GET  /api/version     the llamaforge version

Each request is translated into the OpenAI request the /v1 routes take (so it is validated, admitted,
batched and sampled in exactly the same way), and the OpenAI chunks are translated back. Errors are
Ollama's shape, `{"error": "message"}`, with the same status codes as the /v1 routes (404 for a model
that is not served).

Where Ollama and this server differ: the context length is the server's `--max-seq-len` (`num_ctx` is
ignored, as are options that tune Ollama's runner: `num_thread`, `num_gpu`, `num_batch`, `use_mmap`, ...);
`repeat_penalty` applies over prompt and output (Ollama's over the last `repeat_last_n` tokens, which is
ignored) and is off unless given; images, `suffix`, `template` overrides and `context` are refused with a 400.
Sampling defaults are Ollama's (temperature 0.8, top_k 40, top_p 0.9).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llamaforge.server.errors import APIError, from_validation_errors
from llamaforge.server.respond import ClientGone, unless_disconnected
from llamaforge.server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

# Ollama's defaults (api/types.go DefaultOptions) for what a request does not set
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
# option name -> OpenAI request field
OPTION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                 "repeat_penalty": "repetition_penalty", "seed": "seed", "num_predict": "max_tokens", "stop": "stop"}
NDJSON = "application/x-ndjson"


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


class OllamaChatRequest(_GenerateFields):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: Optional[list[dict[str, Any]]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None


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


@dataclass
class Backend:
    """What the Ollama routes need of the app: the same admission, batching and sampling as /v1."""

    model_name: str
    knows: Callable[[str], bool]  # is this model name served here?
    # (kind, OpenAI request) -> (its OpenAI chunks, ending with a usage chunk, and its respond.Timing);
    # a failure while iterating raises APIError; closing the iterator early cancels the request
    chunks: Callable[[str, Any], Awaitable[tuple[AsyncIterator[dict], Any]]]
    embed: Callable[[EmbeddingRequest], Awaitable[dict]]  # the OpenAI embeddings body
    details: dict  # format, family, families, parameter_size, quantization_level
    size: int  # bytes of the model's files
    modified_at: str  # RFC 3339
    template: str
    model_info: dict
    context_length: int
    capabilities: list[str]
    version: str


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors())) from exc


def _sampling(req: _GenerateFields) -> dict[str, Any]:
    """The OpenAI sampling fields of an Ollama request: its options over Ollama's defaults."""
    if req.options is not None and not isinstance(req.options, dict):
        raise APIError(400, "'options' must be an object", param="options")
    fields: dict[str, Any] = dict(DEFAULTS)
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
            calls.append({"id": f"call_{i}_{j}", "type": "function",
                          "function": {"name": fn["name"], "arguments": args if isinstance(args, str)
                                       else json.dumps(args, ensure_ascii=False)}})
        out["tool_calls"] = calls
    if m.tool_name:
        out["name"] = m.tool_name
    return out


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
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
            if piece:
                self.text.append(piece)
        return piece

    def stats(self, timing) -> dict:
        end = timing.finished or time.monotonic()
        first = timing.first_token or end
        return {"done_reason": "length" if self.finish == "length" else "stop",
                "total_duration": int((end - timing.submitted) * 1e9), "load_duration": 0,
                "prompt_eval_count": self.usage.get("prompt_tokens", timing.prompt_tokens),
                "prompt_eval_duration": int((first - timing.submitted) * 1e9),
                "eval_count": self.usage.get("completion_tokens", timing.completion_tokens),
                "eval_duration": int((end - first) * 1e9)}


def ollama_router(backend: Backend) -> APIRouter:
    """The /api routes, serving `backend`."""
    router = APIRouter(prefix="/api", tags=["ollama"])

    def check_model(name: str) -> None:
        if not backend.knows(name):
            raise APIError(404, f"model '{name}' not found; this server serves '{backend.model_name}' "
                                f"(GET /api/tags)", param="model", code="model_not_found")

    async def answer(kind: str, openai_req: Any, stream: bool, shape: Callable[..., dict],
                     request: Request) -> Response:
        """Run an OpenAI request; reply with Ollama's NDJSON stream or one JSON object.

        shape(piece, None) is a line carrying new text; shape(text, stats) the last line, with the statistics.
        """
        chunks, timing = await backend.chunks(kind, openai_req)
        acc = _Answer(kind)
        if stream:
            async def lines() -> AsyncIterator[str]:
                try:
                    async for chunk in chunks:
                        piece = acc.add(chunk)
                        if piece:
                            yield json.dumps(shape(piece, None), ensure_ascii=False) + "\n"
                    yield json.dumps(shape("", acc.stats(timing), acc), ensure_ascii=False) + "\n"
                except APIError as exc:
                    yield json.dumps({"error": exc.message}) + "\n"
                finally:
                    await chunks.aclose()
            return StreamingResponse(lines(), media_type=NDJSON)

        async def whole() -> dict:
            async for chunk in chunks:
                acc.add(chunk)
            return shape("".join(acc.text), acc.stats(timing), acc)

        try:
            return JSONResponse(await unless_disconnected(whole(), request.receive))
        except ClientGone:
            return Response(status_code=499)
        finally:
            await chunks.aclose()

    def base() -> dict:
        return {"model": backend.model_name, "created_at": _now()}

    @router.post("/chat")
    async def chat(request: Request):
        req: OllamaChatRequest = _parse(OllamaChatRequest, await _json(request))
        check_model(req.model)
        if not req.messages:  # Ollama: an empty chat loads the model
            return {**base(), "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"}
        fields = _sampling(req)
        body: dict[str, Any] = {**fields, "messages": [_openai_message(i, m) for i, m in enumerate(req.messages)],
                                "stream": True, "stream_options": {"include_usage": True}}
        if req.tools:
            body["tools"] = req.tools
        if req.logprobs:
            body["logprobs"] = True
            if req.top_logprobs:
                body["top_logprobs"] = req.top_logprobs
        openai_req = _parse(ChatCompletionRequest, body)

        def shape(piece: str, stats: Optional[dict] = None, done: Optional[_Answer] = None) -> dict:
            message: dict[str, Any] = {"role": "assistant", "content": piece}
            if stats is None:
                return {**base(), "message": message, "done": False}
            if done.tool_calls:
                message["tool_calls"] = _tool_calls(done.tool_calls)
            return {**base(), "message": message, "done": True, **stats}

        return await answer("chat", openai_req, req.stream, shape, request)

    @router.post("/generate")
    async def generate(request: Request):
        req: OllamaGenerateRequest = _parse(OllamaGenerateRequest, await _json(request))
        check_model(req.model)
        for name in ("suffix", "template", "context", "images"):
            if getattr(req, name):
                raise APIError(400, f"'{name}' is not supported by this server", param=name)
        if not req.prompt and not req.system:
            return {**base(), "response": "", "done": True, "done_reason": "load"}
        fields = _sampling(req)
        if req.raw:
            kind = "completion"
            openai_req = _parse(CompletionRequest, {**fields, "prompt": req.prompt or "", "stream": True,
                                                    "stream_options": {"include_usage": True}})
        else:
            kind = "chat"
            messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
                [{"role": "user", "content": req.prompt or ""}]
            openai_req = _parse(ChatCompletionRequest, {**fields, "messages": messages, "stream": True,
                                                        "stream_options": {"include_usage": True}})

        def shape(piece: str, stats: Optional[dict] = None, done: Optional[_Answer] = None) -> dict:
            if stats is None:
                return {**base(), "response": piece, "done": False}
            return {**base(), "response": piece, "done": True, **stats}

        return await answer(kind, openai_req, req.stream, shape, request)

    @router.post("/embed")
    async def embed(request: Request):
        req: OllamaEmbedRequest = _parse(OllamaEmbedRequest, await _json(request))
        check_model(req.model)
        t0 = time.monotonic()
        body = await backend.embed(_parse(EmbeddingRequest, {"input": req.input, "dimensions": req.dimensions}))
        return {"model": backend.model_name, "embeddings": [d["embedding"] for d in body["data"]],
                "total_duration": int((time.monotonic() - t0) * 1e9), "load_duration": 0,
                "prompt_eval_count": body["usage"]["prompt_tokens"]}

    @router.post("/embeddings")
    async def embeddings(request: Request):
        req: OllamaEmbeddingsRequest = _parse(OllamaEmbeddingsRequest, await _json(request))
        check_model(req.model)
        body = await backend.embed(_parse(EmbeddingRequest, {"input": req.prompt}))
        return {"embedding": body["data"][0]["embedding"]}

    def listing() -> dict:
        return {"name": backend.model_name, "model": backend.model_name, "modified_at": backend.modified_at,
                "size": backend.size, "digest": "", "details": backend.details}

    @router.get("/tags")
    async def tags():
        return {"models": [listing()]}

    @router.get("/ps")
    async def ps():
        return {"models": [{**listing(), "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
                            "context_length": backend.context_length}]}

    @router.post("/show")
    async def show(request: Request):
        body = await _json(request)
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise APIError(400, "'model' is required: the name of the model to show", param="model")
        check_model(name)
        return {"license": "", "modelfile": f"# served by llamaforge\nFROM {backend.model_name}\n",
                "parameters": "\n".join(f"{k:<16}{v}" for k, v in DEFAULTS.items()), "template": backend.template,
                "details": backend.details, "model_info": backend.model_info, "capabilities": backend.capabilities,
                "modified_at": backend.modified_at}

    @router.get("/version")
    async def version():
        return {"version": backend.version}

    return router


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from exc


def error_response(exc: APIError) -> JSONResponse:
    """An APIError in Ollama's shape, `{"error": "message"}`."""
    return JSONResponse({"error": exc.message}, status_code=exc.status)
