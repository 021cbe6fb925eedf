"""POST /v1/completions and POST /v1/chat/completions: whole JSON answers or server-sent events."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from llamaforge.server.errors import APIError
from llamaforge.server.respond import ClientGone, JobRun, ResponseBuilder, collect, stream_events
from llamaforge.server.routes.common import ERRORS
from llamaforge.server.schemas import ChatCompletionRequest, CompletionRequest
from llamaforge.server.state import Served, served

router = APIRouter()


async def start(kind: str, req, s: Served, fill: bool = False) -> tuple[JobRun, ResponseBuilder]:
    """Prepare and submit an OpenAI request ("completion" or "chat"); also what the Ollama routes run
    (with `fill`: max_tokens counts at most to a full context, as Ollama's num_predict)."""
    if s.shutting_down:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    prepared = await run_in_threadpool(s.prep.completion if kind == "completion" else s.prep.chat, req, fill)
    return JobRun(s.engine, prepared), ResponseBuilder(kind, prepared, prepared.jobs[0].adapter or s.name, s.llama.tokenizer)


async def observed(body: AsyncIterator, run: JobRun, endpoint: str, s: Served) -> AsyncIterator:
    """`body` passed through; the request counted in /metrics and logged when it ends (or is abandoned)."""
    try:
        async for item in body:
            yield item
    finally:
        await body.aclose()
        s.metrics.request_done(endpoint, run.timing, run.outcome)


async def _generate(kind: str, req, request: Request, s: Served):
    endpoint = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    run, rb = await start(kind, req, s)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(observed(stream_events(run, rb, include_usage), run, endpoint, s),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return await collect(run, rb, request.receive)
    except ClientGone:
        return Response(status_code=499)
    finally:
        s.metrics.request_done(endpoint, run.timing, run.outcome)


@router.post("/v1/completions", responses=ERRORS)
async def completions(req: CompletionRequest, request: Request, s: Served = Depends(served)):
    return await _generate("completion", req, request, s)


@router.post("/v1/chat/completions", responses=ERRORS)
async def chat_completions(req: ChatCompletionRequest, request: Request, s: Served = Depends(served)):
    return await _generate("chat", req, request, s)
