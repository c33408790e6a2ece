"""Local endpoints for Kubernetes probes and Prometheus; they never receive orchestrator traffic.

``/healthz`` (readiness) says whether the agent is in touch with the orchestrator and can work.
``/livez`` (liveness) says only whether the process itself works: an orchestrator outage must not get
an agent restarted, which would kill the tasks it runs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

# A probe that connects and then sends nothing (or reads nothing) cannot hold a thread for longer.
SOCKET_TIMEOUT_SECONDS = 5.0


def seconds_since(mark: float) -> float | None:
    """Seconds since a ``time.monotonic()`` mark; None if the mark is 0.0 (it never happened)."""
    return time.monotonic() - mark if mark else None


def recent_contact(mark: float, window: float) -> tuple[bool, float | None]:
    """Whether the orchestrator was last heard from (at ``mark``) within ``window`` seconds, and how long
    ago: an agent it has not heard from in that long is about to be, or already is, declared lost."""
    since = seconds_since(mark)
    return since is not None and since < window, since


def _answering() -> tuple[bool, dict]:
    return True, {"live": True}


def serve_health(
    host: str,
    port: int,
    status: Callable[[], tuple[bool, dict]],
    metrics: Callable[[], bytes] | None = None,
    live: Callable[[], tuple[bool, dict]] | None = None,
) -> ThreadingHTTPServer:
    """Serve, in a daemon thread, ``GET /healthz``: 200 when ``status()`` says healthy, else 503;
    ``GET /livez``: the same for ``live()`` (200 if not given: the process answers); and
    ``GET /metrics``, the text ``metrics()`` renders, if given."""

    class Handler(BaseHTTPRequestHandler):
        timeout = SOCKET_TIMEOUT_SECONDS

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            path = self.path.rstrip("/")
            if path in ("/healthz", "/livez"):
                check = status if path == "/healthz" else live or _answering
                healthy, body = check()
                self._send(200 if healthy else 503, "application/json", json.dumps(body).encode())
            elif path == "/metrics" and metrics is not None:
                self._send(200, CONTENT_TYPE_LATEST, metrics())
            else:
                self.send_error(404)

        def _send(self, code: int, content_type: str, payload: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server signature
            log.debug(format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="healthz", daemon=True).start()
    served = "/healthz, /livez and /metrics" if metrics is not None else "/healthz and /livez"
    log.info("Serving %s on %s:%d", served, host, server.server_address[1])
    return server
