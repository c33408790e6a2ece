"""The sentinel: watches an agent's components from outside them and tells the orchestrator.

A component reports its own health on ``/healthz``; but a component that hangs, crash-loops or lost its
network says nothing to the orchestrator, which then sees only silence. The sentinel probes each
component's ``/healthz`` as Kubernetes does, and sends the whole picture to the orchestrator at the
cadence the orchestrator sets, where ``airflow remote-exec agents list`` shows it.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
from urllib.parse import urlsplit

import httpx

from airflow_remote_exec.agent.client import AgentApiError, AgentClient, Unauthorized, Unreachable
from airflow_remote_exec.agent.session import AgentSession, ComponentSettings, register_or_explain
from airflow_remote_exec.api.datamodels import ComponentHealth, SentinelReply, SentinelReport

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 5.0
# A /healthz answer is a few hundred bytes; more than this is not read.
PROBE_MAX_BYTES = 64 * 1024
# Until the orchestrator names its cadence (its first answer).
FIRST_REPORT_EVERY_SECONDS = 30.0
_WATCH_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,250}$")


def parse_watch(items: list[str]) -> dict[str, str]:
    """``NAME=URL`` pairs (also comma-separated) into a mapping; raises ValueError naming a bad one."""
    watched: dict[str, str] = {}
    for item in (part.strip() for entry in items for part in entry.split(",")):
        if not item:
            continue
        name, sep, url = item.partition("=")
        if not sep or not _WATCH_NAME.match(name) or not url.startswith(("http://", "https://")):
            raise ValueError(f"--watch {item!r}: expected NAME=http(s)://HOST:PORT/healthz")
        try:
            host = urlsplit(url).hostname
        except ValueError as err:
            raise ValueError(f"--watch {item!r}: {err}") from err
        if not host:
            raise ValueError(f"--watch {item!r}: the URL names no host")
        if name in watched:
            raise ValueError(f"--watch names {name!r} twice")
        watched[name] = url
    if not watched:
        raise ValueError("--watch needs at least one NAME=URL")
    return watched


def probe(http: httpx.Client, url: str) -> ComponentHealth:
    """One component's health as its probe sees it: a 200 is healthy; anything else says why not. What
    a component answers is read only so far, and never stops the sentinel."""
    deadline = time.monotonic() + PROBE_TIMEOUT_SECONDS  # the whole answer, not each read
    try:
        with http.stream("GET", url, timeout=PROBE_TIMEOUT_SECONDS) as response:
            body = b""
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) >= PROBE_MAX_BYTES:
                    break
                if time.monotonic() > deadline:
                    return _unhealthy(f"HTTP {response.status_code}, answer too slow")
    except Exception as err:  # noqa: BLE001 - unreachable, or an answer no HTTP client can read
        return _unhealthy(f"unreachable: {type(err).__name__}: {err}")
    if response.status_code == 200:
        return ComponentHealth(healthy=True)
    return _unhealthy(f"HTTP {response.status_code}{_why(body)}")


def _unhealthy(detail: str) -> ComponentHealth:
    """Printable ASCII only: operators read it in a terminal (``agents list``)."""
    return ComponentHealth(healthy=False, detail="".join(c if " " <= c <= "~" else "?" for c in detail)[:500])


def _why(answer: bytes) -> str:
    """The reason an agent's ``/healthz`` gives, if it gives one."""
    try:
        body = json.loads(answer)
    except (ValueError, RecursionError):
        return ""
    if not isinstance(body, dict):
        return ""
    if body.get("fatal"):
        return f": {body['fatal']}"
    if body.get("dead_threads"):
        return f": dead threads {body['dead_threads']}"
    since = body.get("seconds_since_orchestrator_contact", body.get("seconds_since_heartbeat"))
    return f": no orchestrator contact for {since} s" if since is not None else ""


class SentinelAgent:
    def __init__(
        self, settings: ComponentSettings, client: AgentClient | None = None, http: httpx.Client | None = None
    ):
        self.stop = threading.Event()
        self.session = AgentSession(settings, self.stop, client)
        self.watched = settings.watch
        # Components are probed directly, never through a proxy the environment names for the orchestrator.
        self.http = http or httpx.Client(trust_env=False)
        self.report_every = FIRST_REPORT_EVERY_SECONDS
        self._last: dict[str, ComponentHealth] = {}

    def _on_signal(self, signum, _frame) -> None:
        log.info("Received %s: stopping", signal.Signals(signum).name)
        self.stop.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.session.serve_probes()  # before registering: liveness must answer while the orchestrator is down
        refused = register_or_explain(self.session)
        if refused is not None:
            return refused
        self.session.start_heartbeats()
        log.info("Watching %s", ", ".join(f"{name} at {url}" for name, url in self.watched.items()))
        code = 0
        try:
            while not self.stop.is_set():
                if not self.report_once():
                    code = 1
                    break
                self.stop.wait(self.report_every)
        finally:
            self.session.deregister()
            self.http.close()
        return code

    def check(self) -> dict[str, ComponentHealth]:
        seen = {name: probe(self.http, url) for name, url in self.watched.items()}
        for name, health in seen.items():
            before = self._last.get(name)
            if before is None or before.healthy != health.healthy:
                level = logging.INFO if health.healthy else logging.WARNING
                log.log(
                    level, "%s is %s", name, "healthy" if health.healthy else f"unhealthy ({health.detail})"
                )
        self._last = seen
        return seen

    def report_once(self) -> bool:
        """Probe every component and report; False when the token is rejected (nothing more to do)."""
        report = SentinelReport(components=self.check())
        try:
            reply = SentinelReply.model_validate(self.session.call("POST", "/health", report, max_tries=1))
        except Unauthorized as err:
            log.error("Agent token rejected (%s); stopping", err)
            return False
        except (AgentApiError, Unreachable) as err:
            log.warning("Could not send the health report: %s", err)
            return True
        self.report_every = float(reply.report_every_seconds)
        return True
