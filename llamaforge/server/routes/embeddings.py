"""POST /v1/embeddings: mean-pooled final hidden states, L2-normalised, computed in the engine's schedule.

The work shares the engine's steps with generation (a slice per step, see `generation/embed.py`) and is
cancelled when the client goes away.
"""

from __future__ import annotations

import base64
import struct
from functools import partial

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from llamaforge.api import EngineClosed
from llamaforge.errors import GenerationError
from llamaforge.server.errors import APIError, bad_request
from llamaforge.server.respond import ClientGone, wait_or_cancel
from llamaforge.server.routes.common import ERRORS
from llamaforge.server.schemas import EmbeddingRequest
from llamaforge.server.state import Served, served

router = APIRouter()


@router.post("/v1/embeddings", responses=ERRORS)
async def embeddings(req: EmbeddingRequest, request: Request, s: Served = Depends(served)):
    try:
        return await embed(req, request, s)
    except ClientGone:
        return Response(status_code=499)


async def embed(req: EmbeddingRequest, request: Request, s: Served, *, truncate: bool = False) -> dict:
    """The OpenAI embeddings body of `req` (ClientGone if the client leaves first); the Ollama routes use it too
    (`truncate`: inputs longer than the context are cut to it instead of refused, Ollama's /api/embed default)."""
    if s.shutting_down:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    inputs = await run_in_threadpool(partial(s.prep.embedding_inputs, truncate=truncate), req, s.llama.args.dim)
    try:
        fut = s.engine.embed(inputs)
    except EngineClosed as exc:
        raise APIError(503, str(exc), code="shutting_down") from exc
    except GenerationError as exc:
        raise bad_request(str(exc), "input", "request_too_large") from exc
    try:
        vectors = await wait_or_cancel(fut, request.receive)
    except EngineClosed as exc:
        raise APIError(503, str(exc), code="shutting_down") from exc
    data = []
    for i, vec in enumerate(vectors):
        emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() \
            if req.encoding_format == "base64" else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = sum(len(x) for x in inputs)
    return {"object": "list", "data": data, "model": s.name, "usage": {"prompt_tokens": n, "total_tokens": n}}
