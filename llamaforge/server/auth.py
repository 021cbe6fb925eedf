"""ASGI middleware in front of every route: the API key (401) and the request-body limit (413)."""

from __future__ import annotations

import secrets
from typing import Optional

from fastapi.responses import JSONResponse

from llamaforge.server.errors import error_body


class Guard:
    """ASGI middleware: the API key on /v1, /api (Ollama's) and /tokenize routes (401), and bodies over `limit` bytes (413).

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
        if self.api_key is not None and (path.startswith(("/v1", "/api/")) or path == "/tokenize"):
            given = headers.get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not secrets.compare_digest(token, self.api_key):
                return await _send_error(send, path, 401, "missing or incorrect API key: send "
                                         "'Authorization: Bearer <key>'", code="invalid_api_key")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, path, 413, f"the request body has {int(declared)} bytes; the limit is "
                                     f"{self.limit}")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _send_error(send, path, 413, f"the request body is over the limit of {self.limit} bytes")
            more = message.get("more_body", False)
        body = b"".join(chunks)
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(messages, receive):
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()
    return replayed


async def _send_error(send, path: str, status: int, message: str, code: Optional[str] = None) -> None:
    """OpenAI's error body, or Ollama's `{"error": message}` on its /api routes."""
    content = {"error": message} if path.startswith("/api/") else error_body(status, message, code=code)
    response = JSONResponse(content, status_code=status)
    await response({"type": "http"}, None, send)
