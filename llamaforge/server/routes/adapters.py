"""Adding and removing LoRA adapters at run time, with vLLM's routes and bodies (an admin's, behind the API key).

POST /v1/load_lora_adapter {"lora_name", "lora_path"} serves a PEFT adapter folder on the server's disk as
model `lora_name`; POST /v1/unload_lora_adapter {"lora_name"} stops serving it (running requests finish).
A request names a path on the server's machine, so both routes exist only when the server has an API key
(`--api-key`): without one they answer 403.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from llamaforge.errors import LlamaforgeError
from llamaforge.server.errors import APIError
from llamaforge.server.routes.common import ERRORS
from llamaforge.server.schemas import LoadLoraRequest, UnloadLoraRequest
from llamaforge.server.state import Served, served

router = APIRouter()


def _admin(s: Served) -> None:
    if not s.admin:
        raise APIError(403, "managing adapters over HTTP needs an API key: start the server with --api-key "
                       "(or load adapters at start with --lora NAME=PATH)", code="admin_disabled")


@router.post("/v1/load_lora_adapter", responses=ERRORS)
async def load_lora_adapter(req: LoadLoraRequest, s: Served = Depends(served)):
    _admin(s)
    if req.lora_name in s.names:
        raise APIError(400, f"lora_name {req.lora_name!r} is the base model's id; choose another name",
                       param="lora_name")
    try:
        await run_in_threadpool(s.llama.load_adapter, req.lora_name, req.lora_path)
    except LlamaforgeError as exc:
        raise APIError(400, f"could not load the adapter: {exc}", param="lora_path") from None
    return {"status": "loaded", "lora_name": req.lora_name}


@router.post("/v1/unload_lora_adapter", responses=ERRORS)
async def unload_lora_adapter(req: UnloadLoraRequest, s: Served = Depends(served)):
    _admin(s)
    try:
        s.llama.remove_adapter(req.lora_name)
    except LlamaforgeError as exc:
        raise APIError(404, str(exc), param="lora_name", code="model_not_found") from None
    return {"status": "unloaded", "lora_name": req.lora_name}
