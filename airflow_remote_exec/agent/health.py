"""A local ``/healthz`` endpoint for Kubernetes probes; it never receives orchestrator traffic."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

# A probe that connects and then sends nothing (or reads nothing) cannot hold a thread for longer.
SOCKET_TIMEOUT_SECONDS = 5.0


def serve_health(host: str, port: int, status: Callable[[], tuple[bool, dict]]) -> ThreadingHTTPServer:
    """Serve ``GET /healthz`` in a daemon thread: 200 when ``status()`` says healthy, else 503."""

    class Handler(BaseHTTPRequestHandler):
        timeout = SOCKET_TIMEOUT_SECONDS

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            if self.path.rstrip("/") != "/healthz":
                self.send_error(404)
                return
            healthy, body = status()
            payload = json.dumps(body).encode()
            self.send_response(200 if healthy else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server signature
            log.debug(format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="healthz", daemon=True).start()
    log.info("Serving /healthz on %s:%d", host, server.server_address[1])
    return server
