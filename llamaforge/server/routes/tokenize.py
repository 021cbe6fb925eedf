"""POST /tokenize (vLLM's extension): a prompt's or a dialog's token ids and count."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from llamaforge.server.routes.common import ERRORS
from llamaforge.server.schemas import TokenizeRequest
from llamaforge.server.state import Served, served

router = APIRouter()


@router.post("/tokenize", responses=ERRORS)
async def tokenize(req: TokenizeRequest, s: Served = Depends(served)):
    """Count a prompt's tokens, e.g. to choose a max_tokens that fits (the chat page does)."""
    ids = await run_in_threadpool(s.prep.tokenize, req)
    return {"count": len(ids), "max_model_len": s.llama.max_seq_len, "tokens": ids}
