"""GET /metrics: Prometheus' text format (see server/metrics.py for what is counted)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from llamaforge.server.metrics import CONTENT_TYPE
from llamaforge.server.state import Served, served

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(s: Served = Depends(served)):
    return Response(s.metrics.render(), media_type=CONTENT_TYPE)
