"""What every route of one app shares: the served `Llama`, its engine, the request preparer, the model ids."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Optional

from fastapi import Request

from llamaforge.api import Engine, Llama
from llamaforge.server.metrics import Metrics
from llamaforge.server.prepare import Preparer


@dataclass
class Served:
    llama: Llama
    engine: Engine
    prep: Preparer
    name: str
    names: set[str]
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))
    shutting_down: bool = False
    admin: bool = False  # the adapter routes are open (the server has an API key)

    def knows(self, model: str) -> bool:
        """Is `model` an id of the served model or one of its adapters (Ollama's clients add ":latest")?"""
        ids = self.names | set(self.llama.adapters.names())
        return model in ids or model.removesuffix(":latest") in ids

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "llamaforge",
                "max_model_len": self.llama.max_seq_len}

    def cards(self) -> list[dict]:
        """The base model's card, then one per LoRA adapter (its `parent` the base model, as vLLM lists them)."""
        return [self.card()] + [{**self.card(), "id": name, "parent": self.name}
                                for name in self.llama.adapters.names()]

    def begin_shutdown(self, grace: Optional[float] = None) -> None:
        """Refuse new requests (503); after `grace` seconds end the running ones, each stream with an
        error event and `[DONE]` (so no client sees a cut connection). Called on the event loop."""
        self.shutting_down = True
        if grace is not None:
            asyncio.get_running_loop().call_later(max(0.0, grace), self.engine.drain,
                                                  "the server is shutting down")


def served(request: Request) -> Served:
    """The app's `Served` (a FastAPI dependency)."""
    return request.app.state.served
