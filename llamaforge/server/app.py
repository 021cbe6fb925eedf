"""The OpenAI-compatible FastAPI app: routes, authentication, limits and OpenAI-shaped errors.

`create_app(llama)` serves one loaded `Llama` through an `Engine` (continuous batching, started and
stopped with the app's lifespan):

    GET  /                      the chat page (self-contained HTML, no CDN)
    GET  /health                {"status": "ok", ...engine occupancy}; 503 while shutting down
    GET  /v1/models             the served model
    POST /v1/completions        text completion (stream with "stream": true)
    POST /v1/chat/completions   chat in the model's own chat format (stream with "stream": true)
    POST /v1/embeddings         mean-pooled final hidden states, L2-normalised
    POST /tokenize              a prompt's or a dialog's token ids and count (vLLM's extension)

Every error is `{"error": {"message", "type", "param", "code"}}`: 400 for bad requests (wrong types,
out-of-range values, too-long prompts, unknown models), 401 without the API key, 404 for unknown
routes, 413 for bodies over `max_body_bytes`, 429 when the waiting queue is full, 500/503 otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import struct
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamaforge.server.engine import Engine, EngineClosed
from llamaforge.server.errors import APIError, error_body, from_validation_errors
from llamaforge.server.grammar import GrammarCompiler
from llamaforge.server.prepare import Preparer
from llamaforge.server.respond import ClientGone, JobRun, ResponseBuilder, collect, stream_events
from llamaforge.server.schemas import (
    ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ErrorResponse, TokenizeRequest,
)

log = logging.getLogger("llamaforge.server")

CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"
FAVICON = Path(__file__).with_name("static") / "favicon.ico"
DEFAULT_MAX_BODY = 8 * 2**20
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 429, 500, 503)}


class Guard:
    """ASGI middleware: the API key on /v1 routes (401), and request bodies over `limit` bytes (413).

    The body is read up front (bounded) and replayed to the app; later receives pass through, so the
    app still hears of a client that disconnects.
    """

    def __init__(self, app, limit: int, api_key: Optional[str]):
        self.app = app
        self.limit = limit
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        if self.api_key is not None and (path.startswith("/v1") or path == "/tokenize"):
            given = headers.get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not secrets.compare_digest(token, self.api_key):
                return await _send_error(send, 401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                         code="invalid_api_key")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, 413, f"the request body has {int(declared)} bytes; the limit is {self.limit}")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _send_error(send, 413, f"the request body is over the limit of {self.limit} bytes")
            more = message.get("more_body", False)
        body = b"".join(chunks)
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(messages, receive):
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()
    return replayed


async def _send_error(send, status: int, message: str, code: Optional[str] = None) -> None:
    response = JSONResponse(error_body(status, message, code=code), status_code=status)
    await response({"type": "http"}, None, send)


def create_app(
    llama,
    *,
    model_name: Optional[str] = None,
    api_key: Optional[str] = None,
    n_slots: Optional[int] = None,
    max_queue: int = 64,
    prefill_budget: int = 256,
    prefix_reuse: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY,
) -> FastAPI:
    """Build the app serving `llama` (a loaded `llamaforge.Llama`).

    Args:
        llama: the model, tokenizer and chat format to serve.
        model_name: the id clients use (default: the checkpoint's file or folder name).
        api_key: when set, /v1 routes and /tokenize need `Authorization: Bearer <api_key>`.
        n_slots: sequences decoded together (KV cache slots); default `llama.max_batch_size`.
        max_queue: requests that may wait for a slot before new ones get 429.
        prefill_budget: most prompt tokens computed per engine step (in canonical chunks of 64).
        prefix_reuse: reuse cached keys/values of shared prompt prefixes.
        max_body_bytes: larger request bodies get 413.
    """
    source = Path(str(llama.source)) if getattr(llama, "source", None) else None
    name = model_name or (source.name.removesuffix(".gguf") if source else "llamaforge")
    names = {name} | ({str(source), source.name} if source else set())
    engine = Engine(llama.model, llama.tokenizer, n_slots=n_slots or llama.max_batch_size,
                    max_seq_len=llama.max_seq_len, device=llama.device, max_queue=max_queue,
                    prefill_budget=prefill_budget, prefix_reuse=prefix_reuse)
    stop_ids = frozenset(llama.tokenizer.stop_ids) | frozenset(llama.chat_format.stop_ids)
    grammar = GrammarCompiler(llama.tokenizer, llama.model.args.vocab_size, stop_ids)
    prep = Preparer(tokenizer=llama.tokenizer, chat_format=llama.chat_format, max_seq_len=llama.max_seq_len,
                    vocab_size=llama.model.args.vocab_size, n_slots=engine.n_slots, model_id=name, aliases=names,
                    grammar=grammar)
    created = int(time.time())
    state = {"shutting_down": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        log.info("serving %s with %d slots of %d positions", name, engine.n_slots, llama.max_seq_len)
        yield
        state["shutting_down"] = True
        await run_in_threadpool(engine.close)

    app = FastAPI(title="llamaforge", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API over a llamaforge model, with continuous batching.")
    app.state.engine = engine
    app.state.model_name = name
    app.add_middleware(Guard, limit=max_body_bytes, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        err = from_validation_errors(list(exc.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        message = {404: "no such route", 405: "method not allowed on this route"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(exc.status_code, f"{message}: see GET /docs for the API"),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(500, f"internal server error: {type(exc).__name__}"), status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(FAVICON.read_bytes(), media_type="image/x-icon",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/health")
    async def health():
        if state["shutting_down"]:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "model": name, "max_seq_len": llama.max_seq_len, **engine.stats()}

    def card():
        return {"id": name, "object": "model", "created": created, "owned_by": "llamaforge",
                "max_model_len": llama.max_seq_len}

    @app.get("/v1/models", responses=ERRORS)
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}", responses=ERRORS)
    async def model(model_id: str):
        if model_id not in names:
            raise APIError(404, f"the model {model_id!r} is not served here; see GET /v1/models", param="model",
                           code="model_not_found")
        return card()

    async def generate(kind: str, req, request: Request):
        prepared = await run_in_threadpool(prep.completion if kind == "completion" else prep.chat, req)
        run = JobRun(engine, prepared)
        rb = ResponseBuilder(kind, prepared, name, llama.tokenizer)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(run, rb, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await collect(run, rb, request.receive)
        except ClientGone:
            return Response(status_code=499)

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(req: CompletionRequest, request: Request):
        return await generate("completion", req, request)

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await generate("chat", req, request)

    @app.post("/tokenize", responses=ERRORS)
    async def tokenize(req: TokenizeRequest):
        """Count a prompt's tokens, e.g. to choose a max_tokens that fits (the chat page does)."""
        ids = await run_in_threadpool(prep.tokenize, req)
        return {"count": len(ids), "max_model_len": llama.max_seq_len, "tokens": ids}

    @app.post("/v1/embeddings", responses=ERRORS)
    async def embeddings(req: EmbeddingRequest):
        inputs = await run_in_threadpool(prep.embedding_inputs, req, llama.model.args.dim)
        try:
            vectors = await asyncio.wrap_future(engine.embed(inputs))
        except EngineClosed as exc:
            raise APIError(503, str(exc), code="shutting_down") from exc
        data = []
        for i, vec in enumerate(vectors):
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() \
                if req.encoding_format == "base64" else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(x) for x in inputs)
        return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    return app
