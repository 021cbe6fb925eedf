"""OpenAI-compatible HTTP server with continuous batching (`llamaforge serve`).

`create_app(llama)` builds the FastAPI app; FastAPI and uvicorn come with `pip install 'llamaforge[serve]'`
and are imported only when this package's parts are used.
"""

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from llamaforge.server.app import create_app

        return create_app
    raise AttributeError(f"module 'llamaforge.server' has no attribute {name!r}")
