"""A small HTTP reverse proxy that breaks the network on request, for the chaos tests.

Run it as its own process and point a client (an agent's ``--api-url``) at it::

    python -m dev.faultproxy --listen-port 8081 --upstream http://127.0.0.1:8080

Every request is forwarded to the upstream unchanged (method, path, query, headers, body), except
while a fault applies to it.  Faults are set on the same port under the reserved prefix
``/__faultproxy__/`` (never forwarded), with a JSON body:

- ``POST /__faultproxy__/block {"path_contains": "", "path_regex": ""}``: from now on, matching
  requests (all of them by default) are *held*: not forwarded and not answered.  Only one block is
  active at a time; ``POST /__faultproxy__/unblock`` lifts it.
- ``POST /__faultproxy__/delay {"path_contains": "/heartbeat", "seconds": 15, "count": 1}``: the next
  ``count`` matching requests are each held ``seconds`` before they are forwarded.
- ``POST /__faultproxy__/reset``: drop every rule (held requests are released as after ``unblock``).
- ``GET /__faultproxy__/status``: the active rules, counters, and an event list (``at`` is wall-clock
  ``time.time()``) of every request that was held or delayed, what became of it, and every response
  with a status of 400 or more, so a test can assert that a fault really happened and what the
  server answered afterwards.

Why holding models a network partition best: a partition drops packets, it does not answer them.
A client behind one sees its requests hang until its own timeout fires; it never gets a quick
"503" or "connection refused" that would tell it at once that something is wrong.  So a held
request is never forwarded while the fault lasts; if its client gives up (closes the connection),
the request is dropped, as if it had been lost on the wire; if the block is lifted while the
client still waits, the request is forwarded then, as TCP retransmission would deliver it once the
network heals.  A delayed request that its client abandons during the delay is dropped too: the
upstream never sees a request its sender already counted as failed.  One difference from a real
partition: the proxy still accepts new TCP connections, so a client's connect timeout never fires,
only its read timeout (every client used here has one).

If the upstream is unreachable the proxy answers 502, as a load balancer would.  Responses are
buffered, not streamed (the APIs proxied here return small JSON documents).

Dependencies: what the project's venv has (uvicorn, httpx).  Start it from tests with
``FaultProxy`` below, which runs it under ``dev.stack.ManagedProcess`` so it is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

CONTROL_PREFIX = "/__faultproxy__/"
MAX_HOLD_SECONDS = 600.0  # a held request whose client never gives up is dropped after this
MAX_EVENTS = 5000
# Hop-by-hop headers (RFC 9110 section 7.6.1) are the proxy's own business, never forwarded.
_HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"host",
    b"content-length",
}


@dataclass
class Rule:
    path_contains: str = ""
    path_regex: str = ""
    seconds: float = 0.0
    count: int | None = None  # None: unlimited
    since: float = field(default_factory=time.time)

    def matches(self, path: str) -> bool:
        if self.path_contains and self.path_contains not in path:
            return False
        return not (self.path_regex and re.search(self.path_regex, path) is None)

    def describe(self) -> dict[str, Any]:
        return {
            "path_contains": self.path_contains,
            "path_regex": self.path_regex,
            "seconds": self.seconds,
            "count": self.count,
            "since": self.since,
        }


class FaultState:
    def __init__(self) -> None:
        self.block: Rule | None = None
        self.unblocked = asyncio.Event()
        self.delays: list[Rule] = []
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.counts: Counter[str] = Counter()

    def record(self, event: str, method: str, path: str, **extra: Any) -> None:
        self.events.append({"at": time.time(), "event": event, "method": method, "path": path, **extra})

    def set_block(self, rule: Rule) -> None:
        if self.block is None:  # requests held by an earlier, still active block keep waiting
            self.unblocked = asyncio.Event()
        self.block = rule

    def lift_block(self) -> None:
        self.block = None
        self.unblocked.set()

    def take_delay(self, path: str) -> Rule | None:
        for rule in self.delays:
            if rule.matches(path):
                if rule.count is not None:
                    rule.count -= 1
                    if rule.count <= 0:
                        self.delays.remove(rule)
                return rule
        return None

    def status(self) -> dict[str, Any]:
        return {
            "block": self.block.describe() if self.block else None,
            "delays": [rule.describe() for rule in self.delays],
            "counts": dict(self.counts),
            "events": list(self.events),
        }


def _rule_from(body: Mapping[str, Any]) -> Rule:
    count = body.get("count")
    rule = Rule(
        path_contains=str(body.get("path_contains") or ""),
        path_regex=str(body.get("path_regex") or ""),
        seconds=float(body.get("seconds") or 0.0),
        count=int(count) if count is not None else None,
    )
    if rule.path_regex:
        re.compile(rule.path_regex)
    return rule


class FaultProxyApp:
    """The ASGI application: the control endpoints plus the forwarding itself."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.state: FaultState | None = None
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.state = FaultState()
                self.client = httpx.AsyncClient(
                    base_url=self.upstream,
                    timeout=httpx.Timeout(120.0, connect=10.0),
                    limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.state is not None:
                    self.state.lift_block()
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if path.startswith(CONTROL_PREFIX):
            status, document = self._control(scope["method"], path[len(CONTROL_PREFIX) :], body)
            await _respond(
                send, status, json.dumps(document).encode(), [(b"content-type", b"application/json")]
            )
            return
        # From here on the request body is read: the next message can only be the client going away.
        gone = asyncio.ensure_future(receive())
        try:
            await self._forward(scope, body, send, gone)
        finally:
            gone.cancel()

    def _control(self, method: str, action: str, body: bytes) -> tuple[int, dict[str, Any]]:
        state = self.state
        assert state is not None
        try:
            data = json.loads(body) if body.strip() else {}
            if method == "GET" and action == "status":
                return 200, state.status()
            if method != "POST":
                return 405, {"error": f"{method} /{CONTROL_PREFIX}{action} not supported"}
            if action == "block":
                state.set_block(_rule_from(data))
            elif action == "unblock":
                state.lift_block()
            elif action == "delay":
                rule = _rule_from(data)
                if rule.seconds <= 0:
                    return 400, {"error": "delay needs seconds > 0"}
                state.delays.append(rule)
            elif action == "reset":
                state.lift_block()
                state.delays.clear()
            else:
                return 404, {"error": f"unknown control action {action!r}"}
        except (ValueError, TypeError, re.error) as err:
            return 400, {"error": str(err)}
        return 200, state.status()

    async def _forward(self, scope, body: bytes, send, gone: asyncio.Future) -> None:
        state = self.state
        assert state is not None and self.client is not None
        method, path = scope["method"], scope["path"]
        held_at = time.time()
        if state.block is not None and state.block.matches(path):
            state.counts["blocked"] += 1
            unblocked = asyncio.ensure_future(state.unblocked.wait())
            done, _ = await asyncio.wait(
                {unblocked, gone}, timeout=MAX_HOLD_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            unblocked.cancel()
            held = round(time.time() - held_at, 2)
            if unblocked not in done:  # the client gave up (or we did): lost on the wire
                state.counts["blocked_dropped"] += 1
                state.record("blocked", method, path, held_seconds=held, outcome="dropped")
                return
            state.counts["blocked_released"] += 1
            state.record("blocked", method, path, held_seconds=held, outcome="forwarded after unblock")
        rule = state.take_delay(path)
        if rule is not None:
            state.counts["delayed"] += 1
            try:
                await asyncio.wait_for(asyncio.shield(gone), timeout=rule.seconds)
            except asyncio.TimeoutError:
                state.record("delayed", method, path, seconds=rule.seconds, outcome="forwarded")
            else:
                state.counts["delayed_dropped"] += 1
                state.record(
                    "delayed",
                    method,
                    path,
                    seconds=rule.seconds,
                    held_seconds=round(time.time() - held_at, 2),
                    outcome="dropped: the client gave up first",
                )
                return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        target = path + (("?" + scope["query_string"].decode("latin-1")) if scope["query_string"] else "")
        try:
            request = self.client.build_request(method, target, headers=headers, content=body)
            response = await self.client.send(request)
            content = response.content
        except httpx.HTTPError as err:
            state.counts["upstream_errors"] += 1
            state.record("upstream error", method, path, error=f"{type(err).__name__}: {err}")
            await _respond(send, 502, f"fault proxy: upstream unreachable: {err}".encode(), [])
            return
        state.counts["forwarded"] += 1
        if response.status_code >= 400:
            state.record("response", method, path, status=response.status_code, body=response.text[:300])
        out_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in response.headers.items()
            if k.lower().encode() not in _HOP_BY_HOP and k.lower() != "content-encoding"
        ]
        await _respond(send, response.status_code, content, out_headers)


async def _respond(send, status: int, content: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(content)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m dev.faultproxy", description=__doc__.splitlines()[0])
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument(
        "--upstream", required=True, help="base URL to forward to, e.g. http://127.0.0.1:8080"
    )
    args = parser.parse_args(argv)
    uvicorn.run(
        FaultProxyApp(args.upstream),
        host=args.listen_host,
        port=args.listen_port,
        log_level="warning",
        timeout_graceful_shutdown=2,
    )


# ------------------------------------------------------------------------------- handle for the tests


class FaultProxy:
    """A fault proxy process in front of ``upstream`` plus its control calls (used by the tests)."""

    def __init__(self, upstream: str, log_path: Path, name: str = "faultproxy") -> None:
        from dev.stack import REPO_ROOT, ManagedProcess, free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable,
            "-m",
            "dev.faultproxy",
            "--listen-port",
            str(self.port),
            "--upstream",
            upstream,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env["PYTHONPATH"] = str(REPO_ROOT)
        self.process = ManagedProcess(name, argv, env, log_path, cwd=REPO_ROOT)

    def start(self, timeout: float = 30) -> None:
        from dev.stack import wait_until

        self.process.start()

        def answering() -> bool:
            if self.process.returncode is not None:
                raise RuntimeError(f"fault proxy exited early:\n{self.process.log_tail(30)}")
            try:
                return httpx.get(f"{self.url}{CONTROL_PREFIX}status", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answering, timeout, what=f"fault proxy on port {self.port}")

    def stop(self) -> None:
        self.process.stop(timeout=10)

    def _control(self, action: str, **body: Any) -> dict[str, Any]:
        response = httpx.post(f"{self.url}{CONTROL_PREFIX}{action}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def block(self, path_contains: str = "", path_regex: str = "") -> dict[str, Any]:
        return self._control("block", path_contains=path_contains, path_regex=path_regex)

    def unblock(self) -> dict[str, Any]:
        return self._control("unblock")

    def delay(self, seconds: float, count: int | None = 1, path_contains: str = "", path_regex: str = ""):
        return self._control(
            "delay", seconds=seconds, count=count, path_contains=path_contains, path_regex=path_regex
        )

    def reset(self) -> dict[str, Any]:
        return self._control("reset")

    def status(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}{CONTROL_PREFIX}status", timeout=10)
        response.raise_for_status()
        return response.json()


if __name__ == "__main__":
    main()
