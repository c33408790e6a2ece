"""Request bodies are cut off at a size limit while they arrive, not after.

Why: FastAPI reads a whole body into memory before it validates anything, and a client sending with
``Transfer-Encoding: chunked`` declares no length. Counting bytes as they come turns an oversized
body into a 413 after at most the limit has been read, whatever the client declared.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_LIMIT = 1024 * 1024  # every agent request but a parsing result is a few KiB


class BodyTooLarge(HTTPException):
    """Raised from ``receive``: FastAPI passes an HTTPException raised while it reads a body on to its
    exception handler, which answers it like any other 413."""

    def __init__(self, limit: int):
        super().__init__(413, _detail(limit))


class BodyLimit:
    """ASGI middleware: a body longer than ``limit_for(path)`` bytes gets 413 ``{"detail": ...}``."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _too_large(send, limit)
            return
        received, started = 0, False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _too_large(send, limit)


def _detail(limit: int) -> str:
    return f"The request body is larger than this route's {limit} bytes."


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps({"detail": _detail(limit)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
