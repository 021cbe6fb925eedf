"""Ollama-compatible endpoints on the same engine as the OpenAI routes.

    POST /api/chat        chat in the model's own format; streams newline-delimited JSON unless "stream": false
    POST /api/generate    a prompt (the chat template applied, as Ollama does) or, with "raw": true, plain text
    POST /api/embed       {"input": str | [str]} -> {"embeddings": [[...]]}; POST /api/embeddings (legacy, one prompt)
    GET  /api/tags        the served model, as `ollama list` shows it; GET /api/ps the same as loaded models
    POST /api/show        details, parameters, template and model_info of the served model
    POST /api/pull        success for the served model (already here), 404 for any other; push, create,
                          copy and delete answer 501 (the server serves the one model it loaded)
    GET  /api/version     the llamaforge version
    (/api/tags and /api/version answer HEAD too, as Ollama's server does; `HEAD /` is in routes/models.py)

Each request is translated into the OpenAI request the /v1 routes take (so it is validated, admitted,
batched and sampled in exactly the same way), and the OpenAI chunks are translated back (both in
routes/ollama_wire.py). Errors are
Ollama's shape, `{"error": "message"}`, with the same status codes as the /v1 routes (404 for a model
that is not served).

Where Ollama and this server differ: the context length is the server's `--max-seq-len` (`num_ctx` is
ignored, as are options that tune Ollama's runner: `num_thread`, `num_gpu`, `num_batch`, `use_mmap`, ...);
`repeat_penalty` applies over prompt and output (Ollama's over the last `repeat_last_n` tokens, which is
ignored) and is off unless given; images, `suffix` and `template` overrides are refused with a 400, and so are
the samplers not served (`mirostat`, `typical_p`, `tfs_z` at other than their neutral values) and a
`keep_alive` that is not a duration. `logprobs` / `top_logprobs` come back as Ollama's `logprobs` entries.
`think` is Ollama's (true by default on a model with a thinking mode, thoughts in `thinking`); /api/generate's
`context` holds the exchange's token ids as the model saw and wrote them, and a continued prompt is those ids
then the new turn (Ollama detokenizes and tokenizes them again, which can make an earlier turn's text into
control tokens); raw mode takes and returns none. Raw prompts are not split into thoughts (Ollama's are).
Sampling defaults are Ollama's (temperature 0.8, top_k 40, top_p 0.9).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

import llamaforge
from llamaforge.server.errors import APIError
from llamaforge.server.respond import ClientGone, stream_chunks, unless_disconnected
from llamaforge.server.routes.embeddings import embed as openai_embed
from llamaforge.server.routes.generate import observed, start
from llamaforge.server.routes.ollama_wire import (DEFAULTS, NDJSON, Answer, OllamaChatRequest, OllamaEmbeddingsRequest,
                                                 OllamaEmbedRequest, OllamaGenerateRequest, check_context,
                                                 check_keep_alive, in_ollama_words, load_reason, logprob_fields,
                                                 ollama_tool_calls, openai_messages, parse_body, sampling_fields,
                                                 think_fields, translated)
from llamaforge.server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from llamaforge.server.state import Served, served

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
    tools = any("tools" in t for t in [template, *llama.tokenizer.chat_templates.values()])
    thinking = getattr(llama.chat_format, "think_tags", None) is not None
    return {"details": details, "model_info": info, "template": template,
            "size": sum(p.stat().st_size for p in files),
            "modified_at": datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z"),
            "capabilities": ["completion"] + (["tools"] if tools else []) + (["thinking"] if thinking else [])}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


router = APIRouter(prefix="/api", tags=["ollama"])


def _check_model(s: Served, name: str) -> None:
    if not s.knows(name):
        raise APIError(404, f"model '{name}' not found; this server serves '{s.name}' (GET /api/tags)",
                       param="model", code="model_not_found")


def _base(s: Served) -> dict:
    return {"model": s.name, "created_at": _now()}


async def _answer(kind: str, openai_req: Any, stream: bool, shape: Callable[..., dict], request: Request,
                  s: Served, logprobs: bool = False) -> Response:
    """Run an OpenAI request; reply with Ollama's NDJSON stream or one JSON object.

    shape(piece, thinking) is a line carrying new text (thoughts too, when split off); shape(text, stats, answer,
    thinking) the last line, with the statistics.
    """
    try:  # num_predict past the context generates until it is full, as Ollama does (no 400)
        run, rb = await start(kind, openai_req, s, fill=True)
    except APIError as exc:
        raise in_ollama_words(exc) from None
    endpoint = "/api/generate" if request.url.path.endswith("/generate") else "/api/chat"
    chunks = observed(stream_chunks(run, rb, include_usage=True), run, endpoint, s)
    acc = Answer(kind)

    def with_logprobs(line: dict) -> dict:
        return {**line, "logprobs": acc.take_logprobs()} if logprobs else line

    if stream:
        async def lines() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    piece = acc.add(chunk)
                    if piece or acc.thought:
                        yield json.dumps(with_logprobs(shape(piece or "", thinking=acc.thought)),
                                         ensure_ascii=False) + "\n"
                acc.exchange = rb.exchange(0)
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
        acc.exchange = rb.exchange(0)
        return with_logprobs(shape("".join(acc.text), acc.stats(run.timing), acc, thinking="".join(acc.thinking)))

    try:
        return JSONResponse(await unless_disconnected(whole(), request.receive))
    except ClientGone:
        return Response(status_code=499)
    finally:
        await chunks.aclose()


@router.post("/chat")
async def chat(request: Request, s: Served = Depends(served)):
    req: OllamaChatRequest = parse_body(OllamaChatRequest, await _json(request))
    _check_model(s, req.model)
    thinking = think_fields(s, req.think)
    check_keep_alive(req.keep_alive)
    if not req.messages:  # Ollama: an empty chat loads the model
        return {**_base(s), "message": {"role": "assistant", "content": ""}, "done": True,
                "done_reason": load_reason(req.keep_alive)}
    body: dict[str, Any] = {**sampling_fields(req), "messages": openai_messages(req.messages),
                            "stream": True, "stream_options": {"include_usage": True}, **thinking}
    if req.tools:
        body["tools"] = req.tools
    body.update(logprob_fields(req, "chat"))

    def shape(piece: str, stats: Optional[dict] = None, done: Optional[Answer] = None,
              thinking: Optional[str] = None) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": piece}
        if thinking:
            message["thinking"] = thinking
        if stats is None:
            return {**_base(s), "message": message, "done": False}
        if done.tool_calls:
            message["tool_calls"] = ollama_tool_calls(done.tool_calls)
        return {**_base(s), "message": message, "done": True, **stats}

    return await _answer("chat", translated(ChatCompletionRequest, body), req.stream, shape, request, s,
                         logprobs=bool(req.logprobs))


@router.post("/generate")
async def generate(request: Request, s: Served = Depends(served)):
    req: OllamaGenerateRequest = parse_body(OllamaGenerateRequest, await _json(request))
    _check_model(s, req.model)
    thinking = think_fields(s, req.think)
    check_keep_alive(req.keep_alive)
    for name in ("suffix", "template", "images"):
        if getattr(req, name):
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    if req.raw and (req.system or req.context):  # Ollama's words
        raise APIError(400, "raw mode does not support template, system, or context",
                       param="system" if req.system else "context")
    check_context(s, req.context)
    if not req.prompt and not req.system:  # Ollama: an empty prompt loads the model
        return {**_base(s), "response": "", "done": True, "done_reason": load_reason(req.keep_alive)}
    fields = {**sampling_fields(req), "stream": True, "stream_options": {"include_usage": True}}
    if req.raw:
        body = {**fields, **logprob_fields(req, "completion"), "prompt": req.prompt or ""}
        kind, openai_req = "completion", translated(CompletionRequest, body)
    else:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
            [{"role": "user", "content": req.prompt or ""}]
        body = {**fields, **logprob_fields(req, "chat"), **thinking, "messages": messages,
                **({"context": req.context} if req.context else {})}
        kind, openai_req = "chat", translated(ChatCompletionRequest, body)

    def shape(piece: str, stats: Optional[dict] = None, done: Optional[Answer] = None,
              thinking: Optional[str] = None) -> dict:
        line = {**_base(s), "response": piece, **({"thinking": thinking} if thinking else {})}
        if stats is None:
            return {**line, "done": False}
        line = {**line, "done": True, **stats}
        if done.exchange is not None and not req.raw:  # Ollama: the ids of the exchange, to continue it
            line["context"] = done.exchange
        return line

    return await _answer(kind, openai_req, req.stream, shape, request, s, logprobs=bool(req.logprobs))


@router.post("/embed")
async def embed(request: Request, s: Served = Depends(served)):
    req: OllamaEmbedRequest = parse_body(OllamaEmbedRequest, await _json(request))
    _check_model(s, req.model)
    t0 = time.monotonic()
    try:
        body = await openai_embed(parse_body(EmbeddingRequest, {"input": req.input, "dimensions": req.dimensions}),
                                  request, s, truncate=req.truncate is not False)  # Ollama: truncate by default
    except ClientGone:
        return Response(status_code=499)
    return {"model": s.name, "embeddings": [d["embedding"] for d in body["data"]],
            "total_duration": int((time.monotonic() - t0) * 1e9), "load_duration": 0,
            "prompt_eval_count": body["usage"]["prompt_tokens"]}


@router.post("/embeddings")
async def embeddings(request: Request, s: Served = Depends(served)):
    req: OllamaEmbeddingsRequest = parse_body(OllamaEmbeddingsRequest, await _json(request))
    _check_model(s, req.model)
    try:
        body = await openai_embed(parse_body(EmbeddingRequest, {"input": req.prompt}), request, s)
    except ClientGone:
        return Response(status_code=499)
    return {"embedding": body["data"][0]["embedding"]}


def _listing(s: Served) -> dict:
    card = _card(s)
    return {"name": s.name, "model": s.name, "modified_at": card["modified_at"], "size": card["size"],
            "digest": "", "details": card["details"]}


@router.api_route("/tags", methods=["GET", "HEAD"])
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


@router.api_route("/version", methods=["GET", "HEAD"])
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
