"""The session of an agent component that runs one of Airflow's own loops (dag processor, triggerer):
registration, a heartbeat thread, registering again when the orchestrator ends the session (it
declared the agent lost), and the local /healthz and /metrics. The worker keeps its own, which also
reports the jobs it holds."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

from airflow_remote_exec.agent.client import (
    AgentApiError,
    AgentClient,
    SessionGone,
    Stopped,
    Unauthorized,
    Unreachable,
    VersionMismatch,
)
from airflow_remote_exec.agent.health import recent_contact, seconds_since, serve_health
from airflow_remote_exec.agent.metrics import AgentMetrics
from airflow_remote_exec.agent.registration import (
    installed_versions,
    register_request,
    register_until_name_free,
    version_mismatch_message,
)
from airflow_remote_exec.api.datamodels import HeartbeatRequest

log = logging.getLogger(__name__)

NAME_TAKEN_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class ComponentSettings:
    """Who the component is and what it registers as."""

    api_url: str
    token: str
    name: str
    component: str  # its routes are /agents/{session}/{component}/...
    queues: list[str] = field(default_factory=list)
    capacity: int = 0  # a triggerer's: how many triggers it runs at once
    log_format: str = "text"  # the agent's own log lines: text or json
    watch: dict[str, str] = field(default_factory=dict)  # a sentinel's: component name -> its /healthz URL
    health_host: str = "0.0.0.0"
    health_port: int | None = None  # serves /healthz and /metrics when set


class AgentSession:
    """This component's session with the orchestrator."""

    def __init__(self, settings: ComponentSettings, stop: threading.Event, client: AgentClient | None = None):
        self.settings = settings
        self.stop = stop
        self.metrics = AgentMetrics(settings.name, settings.component)
        self.client = client or AgentClient(settings.api_url, settings.token, stop=stop, metrics=self.metrics)
        self._lock = threading.Lock()
        self.session_id = ""
        self.heartbeat_interval = 10.0
        self.lost_after_missed_heartbeats = 3
        self.executors = ""
        self._last_beat = 0.0  # monotonic: when the orchestrator last accepted us (0.0: never)
        self._heartbeats: threading.Thread | None = None
        self.metrics.read("heartbeat_age_seconds", lambda: seconds_since(self._last_beat))

    def register(self) -> None:
        settings = self.settings
        request = register_request(
            settings.name, settings.queues, 1, [settings.component], installed_versions()
        )
        reply = register_until_name_free(self.client, request, self.stop, NAME_TAKEN_RETRY_SECONDS)
        self.session_id, self.heartbeat_interval = reply.session_id, float(reply.heartbeat_interval)
        self.lost_after_missed_heartbeats = reply.lost_after_missed_heartbeats
        self.executors = reply.executors
        self._last_beat = time.monotonic()
        log.info("Registered as %s (session %s)", settings.name, reply.session_id)

    def register_again(self, gone: str) -> None:
        with self._lock:
            if self.session_id == gone:
                log.warning("Session %s is over; registering again", gone)
                self.register()

    def beat_forever(self) -> None:
        """The heartbeat thread. A rejected token, or a registration refused for the Airflow version,
        stops the agent."""
        while not self.stop.wait(self.heartbeat_interval):
            session_id = self.session_id
            try:
                self.client.heartbeat(
                    session_id, HeartbeatRequest(running=[], free_slots=0), self.heartbeat_interval
                )
                self._last_beat = time.monotonic()
            except SessionGone:
                try:
                    self.register_again(session_id)
                except VersionMismatch as err:  # the orchestrator moved to another Airflow minor
                    self._stop_self(version_mismatch_message(err))
                    return
                except (AgentApiError, Unreachable) as err:  # tried again at the next beat
                    log.error("Could not register again: %s", err)
            except Unauthorized as err:
                self._stop_self(f"Agent token rejected ({err}); stopping")
                return
            except (AgentApiError, Unreachable) as err:
                log.warning("Heartbeat failed: %s", err)
            except Exception:  # an answer it cannot read (a proxy's HTML page, say): the next beat goes on
                log.exception("Unexpected error in the heartbeat thread; carrying on")

    @staticmethod
    def _stop_self(reason: str) -> None:
        """Log why and SIGTERM this process, which Airflow's loop turns into a clean exit."""
        log.error(reason)
        os.kill(os.getpid(), signal.SIGTERM)

    def start_heartbeats(self) -> None:
        self._heartbeats = threading.Thread(target=self.beat_forever, name="heartbeat", daemon=True)
        self._heartbeats.start()

    def live(self) -> tuple[bool, dict]:
        """Whether this process works, whatever the orchestrator does: its heartbeat thread runs (once
        started, until the agent stops)."""
        thread = self._heartbeats
        dead = (
            ["heartbeat"] if thread is not None and not thread.is_alive() and not self.stop.is_set() else []
        )
        return not dead, {"agent": self.settings.name, "live": not dead, "dead_threads": dead}

    def health(self) -> tuple[bool, dict]:
        """Healthy while registered and heard from within the time the orchestrator gives us before it
        declares us lost."""
        window = self.lost_after_missed_heartbeats * self.heartbeat_interval
        recent, since = recent_contact(self._last_beat, window)
        healthy = bool(self.session_id) and recent
        return healthy, {
            "agent": self.settings.name,
            "component": self.settings.component,
            "healthy": healthy,
            "stopping": self.stop.is_set(),
            "seconds_since_heartbeat": round(since, 1) if since is not None else None,
        }

    def serve_probes(self) -> ThreadingHTTPServer | None:
        """``/healthz``, ``/livez`` and ``/metrics`` on the health port, if one is set."""
        settings = self.settings
        if settings.health_port is None:
            return None
        return serve_health(
            settings.health_host, settings.health_port, self.health, self.metrics.render, self.live
        )

    def call(self, method: str, path: str, body: Any = None, **options: Any) -> Any:
        """A route of this component's session; registers again once if the session is over."""
        session_id = self.session_id
        try:
            return self.client.request(method, self._path(session_id, path), body, **options)
        except SessionGone:
            self.register_again(session_id)
            return self.client.request(method, self._path(self.session_id, path), body, **options)

    def _path(self, session_id: str, path: str) -> str:
        return f"/agents/{session_id}/{self.settings.component}{path}"

    def deregister(self) -> None:
        try:
            self.client.deregister(self.session_id)
        except (AgentApiError, Unreachable) as err:
            log.warning("Could not deregister: %s", err)


def register_or_explain(session: AgentSession) -> int | None:
    """Register; on a refusal, log why in one line and return the exit code (0 if stopped meanwhile)."""
    try:
        session.register()
    except VersionMismatch as err:
        log.error(version_mismatch_message(err))
        return 1
    except AgentApiError as err:
        log.error("Registration refused: %s", err)
        return 1
    except Stopped:
        return 0
    return None
