"""GET / (the chat page), /favicon.ico, GET /health, GET /v1/models and GET /v1/models/{id}.

`/` also answers HEAD, as Ollama's server does: the `ollama` command line checks that a server is up with
`HEAD /` before every command (run, list, show, pull, ps), so a 405 there would make it say no server runs.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, JSONResponse, Response

from llamaforge.server.errors import APIError
from llamaforge.server.routes.common import ERRORS
from llamaforge.server.state import Served, served

STATIC = Path(__file__).resolve().parent.parent / "static"
CHAT_PAGE, FAVICON = STATIC / "chat.html", STATIC / "favicon.ico"

router = APIRouter()


@router.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
async def chat_page():
    return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))


@router.get("/favicon.ico", include_in_schema=False)
async def favicon():
    return Response(FAVICON.read_bytes(), media_type="image/x-icon", headers={"Cache-Control": "public, max-age=86400"})


@router.get("/health")
async def health(s: Served = Depends(served)):
    if s.shutting_down:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    return {"status": "ok", "model": s.name, "max_seq_len": s.llama.max_seq_len, **s.engine.stats()}


@router.get("/v1/models", responses=ERRORS)
async def models(s: Served = Depends(served)):
    return {"object": "list", "data": s.cards()}


@router.get("/v1/models/{model_id:path}", responses=ERRORS)
async def model(model_id: str, s: Served = Depends(served)):
    card = next((c for c in s.cards() if c["id"] == model_id), s.card() if model_id in s.names else None)
    if card is None:
        raise APIError(404, f"the model {model_id!r} is not served here; see GET /v1/models", param="model",
                       code="model_not_found")
    return card
