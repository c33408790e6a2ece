"""The body limit as an ASGI middleware, with raw requests a test client would not send."""

from __future__ import annotations

import asyncio

from airflow_remote_exec.api.body_limit import DEFAULT_LIMIT, BodyLimit

BIG_ROUTE_LIMIT = 16 * DEFAULT_LIMIT


def _call(headers: list[tuple[bytes, bytes]], body_chunks: list[bytes]) -> tuple[int, list[str]]:
    """Send one request through BodyLimit in front of an app that reads the whole body; return the
    status and what happened (admit asked, app read so many bytes)."""
    events: list[str] = []

    async def admit(found: dict[bytes, bytes]):
        events.append("admit")
        return 401, "no token", {"WWW-Authenticate": "Bearer"}

    async def app(scope, receive, send):
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        events.append(f"read {size}")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    chunks = [
        {"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1}
        for i, c in enumerate(body_chunks)
    ]
    sent: list[dict] = []

    async def receive():
        return chunks.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/agents/s/dag-processor/bundles/b/parsing-results", "headers": headers}
    middleware = BodyLimit(app, limit_for=lambda path: BIG_ROUTE_LIMIT, admit=admit)
    asyncio.run(middleware(scope, receive, send))
    return sent[0]["status"], events


def test_a_chunked_body_is_read_only_once_the_caller_is_admitted_even_with_a_small_declared_length():
    # Content-Length and Transfer-Encoding together: some HTTP parsers frame the body as chunked.
    status, events = _call([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], [b"x" * 100])
    assert (status, events) == (401, ["admit"])


def test_a_body_declared_small_is_held_to_the_default_limit_without_asking():
    status, events = _call([(b"content-length", b"5")], [b"x" * DEFAULT_LIMIT, b"x" * 10])
    assert status == 413 and events == []


def test_a_small_body_goes_through_without_a_token_check():
    status, events = _call([(b"content-length", b"5")], [b"12345"])
    assert (status, events) == (200, ["read 5"])
