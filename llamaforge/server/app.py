"""The OpenAI-compatible FastAPI app: HTTP only, over a typed `Llama` and its engine.

`create_app(llama)` serves one loaded `Llama`: it asks it for an engine with the server's settings
(continuous batching, started and stopped with the app's lifespan) and includes the routers of
`server/routes/`:

    GET  /                      the chat page (self-contained HTML, no CDN)
    GET  /health                {"status": "ok", ...engine occupancy}; 503 while shutting down
    GET  /v1/models             the served model (GET /v1/models/{id}: 404 model_not_found for others)
    POST /v1/completions        text completion (stream with "stream": true)
    POST /v1/chat/completions   chat in the model's own chat format (stream with "stream": true)
    POST /v1/embeddings         mean-pooled final hidden states, L2-normalised
    POST /tokenize              a prompt's or a dialog's token ids and count (vLLM's extension)
    GET  /metrics               Prometheus metrics (server/metrics.py)
    /api/...                    Ollama's API: chat, generate, embed, tags, show, ps, version (routes/ollama.py)

Every error is `{"error": {"message", "type", "param", "code"}}` (on Ollama's /api routes `{"error": "message"}`): 400 for bad requests (wrong types,
out-of-range values, too-long prompts, requests larger than the server's limits), 401 without the API
key, 404 for unknown routes and models, 413 for bodies over `max_body_bytes`, 429 when the waiting
queue is full, 500/503 otherwise. On shutdown (`Served.begin_shutdown`, called by `llamaforge serve`
on Ctrl-C) running requests get a grace period, then end with an error (streams: an error event and
`[DONE]`).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamaforge.api import Llama
from llamaforge.errors import ConfigError
from llamaforge.server.auth import Guard
from llamaforge.server.errors import APIError, from_validation_errors
from llamaforge.server.metrics import CountRequests, Metrics
from llamaforge.server.prepare import REASONING_FORMATS, Preparer
from llamaforge.server.routes import ROUTERS
from llamaforge.server.state import Served

log = logging.getLogger("llamaforge.server")

DEFAULT_MAX_BODY = 8 * 2**20


def create_app(
    llama: Llama,
    *,
    model_name: Optional[str] = None,
    api_key: Optional[str] = None,
    n_slots: Optional[int] = None,
    max_queue: int = 64,
    max_num_batched_tokens: int = 256,
    prefix_reuse: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    kv_memory: Optional[int] = None,
    reasoning_format: str = "auto",
) -> FastAPI:
    """Build the app serving `llama` (a loaded `llamaforge.Llama`).

    Args:
        llama: the model, tokenizer and chat format to serve.
        model_name: the id clients use (default: the checkpoint's file or folder name).
        api_key: when set, /v1 routes and /tokenize need `Authorization: Bearer <api_key>`, and the routes
            that load and unload LoRA adapters (routes/adapters.py) are open.
        n_slots: sequences decoded together (slots of the batch); default `llama.max_batch_size`.
        max_queue: requests that may wait for a slot before new ones get 429.
        max_num_batched_tokens: tokens of one engine step: its decode rows, then prompt tokens, oldest prompt
            first (at least one chunk of 64), as vLLM's.
        prefix_reuse: reuse cached keys/values of shared prompt prefixes.
        max_body_bytes: larger request bodies get 413.
        kv_memory: bytes of the KV cache's block pool (default: every slot at the full context).
        reasoning_format: a thinking model's chat answers on /v1 when a request does not say (llama.cpp's
            `--reasoning-format`): "auto" / "deepseek" put the thoughts in `reasoning_content`, "none" leaves them in
            the content. Ollama's routes follow their `think`.
    """
    if reasoning_format not in REASONING_FORMATS:
        raise ConfigError(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}, got {reasoning_format!r}")
    source = Path(str(llama.source)) if getattr(llama, "source", None) else None
    name = model_name or (source.name.removesuffix(".gguf") if source else "llamaforge")
    names = {name} | ({str(source), source.name} if source else set())
    engine = llama.open_engine(n_slots=n_slots, max_queue=max_queue, max_num_batched_tokens=max_num_batched_tokens,
                               prefix_reuse=prefix_reuse, kv_memory=kv_memory)
    prep = Preparer(llama, n_slots=engine.n_slots, max_queue=max_queue, model_id=name, aliases=names,
                    reasoning_format=reasoning_format)
    metrics = Metrics(engine.stats)
    state = Served(llama, engine, prep, name, names, metrics, admin=api_key is not None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        log.info("serving %s with %d slots of up to %d positions over %d KV blocks of %d", name, engine.n_slots,
                 llama.max_seq_len, engine.pool.n_blocks, engine.pool.block_size)
        yield
        state.shutting_down = True
        await run_in_threadpool(engine.close)

    app = FastAPI(title="llamaforge", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API over a llamaforge model, with continuous batching.")
    app.state.served = state
    app.state.engine = engine
    app.state.model_name = name
    app.add_middleware(Guard, limit=max_body_bytes, api_key=api_key)
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: counts 401s and 413s too
    _install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every failure as OpenAI's error body with its status (Ollama's `{"error": "message"}` on /api routes)."""

    def body(request: Request, exc: APIError) -> JSONResponse:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return body(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return body(request, from_validation_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # FastAPI's words
            return body(request, APIError(400, "the request body cannot be read as JSON: send UTF-8 JSON text, "
                                          "nested at most a few hundred levels deep", code="invalid_json"))
        message = {404: "no such route", 405: "method not allowed on this route"}.get(exc.status_code, str(exc.detail))
        return body(request, APIError(exc.status_code, f"{message}: see GET /docs for the API"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        return body(request, APIError(500, f"internal server error: {type(exc).__name__}"))
