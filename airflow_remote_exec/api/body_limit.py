"""Request bodies are cut off at a size limit while they arrive, not after.

Why: FastAPI reads a whole body into memory before it validates anything, and a client sending with
``Transfer-Encoding: chunked`` declares no length. Counting bytes as they come turns an oversized
body into a 413 after at most the limit has been read, whatever the client declared. A route that
takes more than ``DEFAULT_LIMIT`` reads a body that may be larger (a declared length above it, or a
chunked one) only once ``admit`` has accepted the caller (its token), so nobody without a token can
make the server parse megabytes of JSON.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_LIMIT = 1024 * 1024  # every agent request but a parsing result is a few KiB


class BodyTooLarge(HTTPException):
    """Raised from ``receive``: FastAPI passes an HTTPException raised while it reads a body on to its
    exception handler, which answers it like any other 413."""

    def __init__(self, limit: int):
        super().__init__(413, _detail(limit))


# A refusal: status, detail and headers of the response.
Refusal = tuple[int, str, dict[str, str]]


class BodyLimit:
    """ASGI middleware: a body longer than ``limit_for(path)`` bytes gets 413 ``{"detail": ...}``, and
    a route taking more than ``DEFAULT_LIMIT`` first asks ``admit(headers)`` (None: go on)."""

    def __init__(
        self,
        app: ASGIApp,
        limit_for: Callable[[str], int],
        admit: Callable[[dict[bytes, bytes]], Awaitable[Refusal | None]],
    ):
        self.app = app
        self.limit_for = limit_for
        self.admit = admit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _too_large(send, limit)
            return
        # A body larger than the default comes with a declared length above it, or in chunks; only
        # then is the caller asked for, and any other body is held to the default.
        if b"transfer-encoding" in headers or (declared.isdigit() and int(declared) > DEFAULT_LIMIT):
            if limit > DEFAULT_LIMIT:
                try:
                    refusal = await self.admit(headers)
                except HTTPException as err:  # no database thread in time, say
                    refusal = (err.status_code, str(err.detail), dict(err.headers or {}))
                if refusal is not None:
                    await _respond(send, *refusal)
                    return
        else:
            limit = min(limit, DEFAULT_LIMIT)
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
    await _respond(send, 413, _detail(limit), {})


async def _respond(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
