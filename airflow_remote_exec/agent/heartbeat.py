"""Liveness towards the orchestrator, and fencing ourselves when it cannot hear us.

The orchestrator declares an agent lost after ``lost_after_missed_heartbeats`` silent intervals and
hands its tasks to other agents, whose retry may start ``reroute_fence_seconds`` later. An agent cut
off from it stops its own tasks half an interval before it would be declared lost, so a task never
runs here while its retry runs elsewhere.

The agent cannot tell being cut off from the agent API being down: a refused connection may be a
firewall's REJECT, and a 503 may come from its own egress proxy while the API serves every other
agent. So it fences on any silence; an api-server outage longer than ``fence_after`` stops the
tasks running on agents, and Airflow retries them (run two api-servers to avoid that).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from airflow_remote_exec.agent.client import (
    AgentApiError,
    AgentClient,
    SessionGone,
    Unauthorized,
    Unreachable,
)
from airflow_remote_exec.agent.ledger import Ledger, Session
from airflow_remote_exec.agent.runner import JobKey
from airflow_remote_exec.api.datamodels import HeartbeatRequest

log = logging.getLogger(__name__)


class HeartbeatHost(Protocol):
    client: AgentClient
    ledger: Ledger

    @property
    def session(self) -> Session | None: ...

    def draining(self) -> bool: ...

    def contact(self) -> None: ...

    def abandon(self, key: JobKey, why: str) -> None: ...

    def stop_own_jobs(self, reason: str) -> None: ...

    def session_gone(self, session_id: str) -> None: ...

    def token_rejected(self, err: AgentApiError) -> None: ...


def fence_after(session: Session) -> float:
    """Seconds of silence after which the agent stops its own tasks.

    Half an interval before the orchestrator may declare it lost: that tolerates an api-server stalled
    for several intervals, and the orchestrator's ``reroute_fence_seconds`` (10 s by default) covers
    the rest, with the 5 s grace a stopped task gets before SIGKILL, before a retry may start.
    """
    return (session.lost_after_missed_heartbeats - 0.5) * session.heartbeat_interval


class Heartbeat:
    """Sends a heartbeat every interval, measured from each request's start, and fences on silence."""

    def __init__(self, host: HeartbeatHost, done: threading.Event):
        self._host = host
        self._done = done
        self._next_at = time.monotonic()
        self._lock = threading.Lock()
        self._last_ok = 0.0  # start of the latest accepted heartbeat, or of the session
        self._ok_session: str | None = None
        self._fenced_session: str | None = None  # the session whose jobs we stopped for silence

    def step(self) -> None:
        """Wait for the next beat (or the fencing deadline) and send it: one round of the thread."""
        session = self._host.session
        if session is None:
            self._done.wait(0.5)
            return
        wait = self._next_at - time.monotonic()
        if wait > 0 and self._done.wait(wait):
            return
        started = time.monotonic()
        # Fixed rate: the next beat is due one interval after this one started, however long it takes.
        self._next_at = started + session.heartbeat_interval
        self.beat(session, started)

    def beat(self, session: Session, started: float | None = None) -> None:
        """Tell the orchestrator what this session holds; stop whatever it says is no longer ours."""
        started = time.monotonic() if started is None else started
        host = self._host
        request = HeartbeatRequest(
            running=host.ledger.heartbeat_jobs(session.session_id),
            free_slots=max(0, host.ledger.free_slots()),
            draining=host.draining(),
        )
        try:
            reply = host.client.heartbeat(session.session_id, request, session.heartbeat_interval)
        except SessionGone:
            host.session_gone(session.session_id)
            return
        except Unauthorized as err:
            host.token_rejected(err)
            return
        except (AgentApiError, Unreachable) as err:
            log.warning("Heartbeat failed: %s", err)
            self.check_partition()
            return
        if self._heard_from(session, started):
            log.info("Heartbeat accepted again")
        host.contact()
        for job in reply.stop:
            host.abandon(JobKey(job.job_id, job.attempt), "the orchestrator says it is no longer ours")

    def _heard_from(self, session: Session, started: float) -> bool:
        """Restart the silence clock from ``started``: the orchestrator cannot count us silent before it.
        Returns whether we had fenced ourselves meanwhile."""
        with self._lock:
            if self._ok_session == session.session_id:
                self._last_ok = max(self._last_ok, started)
            else:
                self._ok_session, self._last_ok = session.session_id, started
            was_fenced = self._fenced_session is not None
            self._fenced_session = None
        return was_fenced

    def silence(self, session: Session, now: float | None = None) -> float:
        """Seconds since this session's latest accepted heartbeat started (or since it registered)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            since = self._last_ok if self._ok_session == session.session_id else session.started
        return now - since

    def check_partition(self) -> None:
        """Stop our tasks once silent for ``fence_after`` seconds. Called after each failed heartbeat and
        from the outcomes thread's frequent wake-ups, so a hung request cannot delay it past the moment
        the orchestrator reroutes our tasks."""
        session = self._host.session
        if session is None:
            return
        limit = fence_after(session)
        silent = self.silence(session)
        with self._lock:
            if self._fenced_session == session.session_id or silent < limit:
                return
            self._fenced_session = session.session_id
        lost_at = session.lost_after_missed_heartbeats * session.heartbeat_interval
        running = len(self._host.ledger.active())
        log.error(
            "No heartbeat accepted for %.0fs; the orchestrator declares this agent lost after %.0fs and "
            "retries its tasks elsewhere, so stopping our %d running jobs now",
            silent,
            lost_at,
            running,
        )
        self._host.stop_own_jobs(f"stopped by the agent: no heartbeat accepted for {silent:.0f}s")
