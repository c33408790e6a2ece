"""The session of an agent component that runs one of Airflow's own loops (dag processor, triggerer):
registration, a heartbeat thread, and registering again when the orchestrator ends the session (it
declared the agent lost). The worker keeps its own, which also reports the jobs it holds."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, field
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


class AgentSession:
    """This component's session with the orchestrator."""

    def __init__(self, settings: ComponentSettings, stop: threading.Event, client: AgentClient | None = None):
        self.settings = settings
        self.stop = stop
        self.client = client or AgentClient(settings.api_url, settings.token, stop=stop)
        self._lock = threading.Lock()
        self.session_id = ""
        self.heartbeat_interval = 10.0
        self.executors = ""

    def register(self) -> None:
        settings = self.settings
        request = register_request(
            settings.name, settings.queues, 1, [settings.component], installed_versions()
        )
        reply = register_until_name_free(self.client, request, self.stop, NAME_TAKEN_RETRY_SECONDS)
        self.session_id, self.heartbeat_interval = reply.session_id, float(reply.heartbeat_interval)
        self.executors = reply.executors
        log.info("Registered as %s (session %s)", settings.name, reply.session_id)

    def register_again(self, gone: str) -> None:
        with self._lock:
            if self.session_id == gone:
                log.warning("Session %s is over; registering again", gone)
                self.register()

    def beat_forever(self) -> None:
        """The heartbeat thread. A rejected token stops the agent (SIGTERM to itself, which Airflow's
        loop turns into a clean exit)."""
        while not self.stop.wait(self.heartbeat_interval):
            session_id = self.session_id
            try:
                self.client.heartbeat(
                    session_id, HeartbeatRequest(running=[], free_slots=0), self.heartbeat_interval
                )
            except SessionGone:
                try:
                    self.register_again(session_id)
                except (AgentApiError, Unreachable) as err:  # tried again at the next beat
                    log.error("Could not register again: %s", err)
            except Unauthorized as err:
                log.error("Agent token rejected (%s); stopping", err)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except (AgentApiError, Unreachable) as err:
                log.warning("Heartbeat failed: %s", err)

    def start_heartbeats(self) -> None:
        threading.Thread(target=self.beat_forever, name="heartbeat", daemon=True).start()

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
