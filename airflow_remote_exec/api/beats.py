"""Heartbeats of many agents written together, in one statement per batch.

A fleet's heartbeats are most of the agent API's requests, and nearly all of them are the same "still
here" of an active agent. Each api-server process hands those to one thread, which writes every
heartbeat waiting at that moment in one statement (on PostgreSQL; one statement per heartbeat
elsewhere) and answers each with the jobs its agent holds. No heartbeat waits for a batch to fill: the
thread takes whatever is waiting, so a lone heartbeat is written at once, and under load batches grow
by themselves. The requests wait on the event loop, not in the shared thread pool.

Only an active agent with a live token and no drain request is written here. An agent whose row another
transaction holds (a claim being made) is skipped rather than waited for. Every heartbeat not written
here takes the full path in ``agents.py``, which explains refusals and records state changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import deque
from datetime import datetime
from typing import Any, NamedTuple

from airflow.utils.session import create_session
from airflow.utils.sqlalchemy import UtcDateTime
from sqlalchemy import Connection, Row, String, and_, bindparam, func, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY

from airflow_remote_exec.clock import db_now
from airflow_remote_exec.models import AgentState, JobState, RemoteAgent, RemoteJob, RemoteToken

log = logging.getLogger(__name__)

MAX_BATCH = 500
MAX_WAITING = 5 * MAX_BATCH


class Beat(NamedTuple):
    """A heartbeat written: the database time it was written at, and the jobs the agent holds."""

    now: datetime
    held_jobs: list[Row]  # id, attempt, claimed_at


# Built once: building them costs more than running them. (A bind parameter named after a column would
# become a SET value of an UPDATE, hence the names.)
_JOB_COLUMNS = (RemoteJob.id, RemoteJob.attempt, RemoteJob.claimed_at)
HELD_JOBS = select(*_JOB_COLUMNS).where(
    RemoteJob.agent_name == bindparam("holder"), RemoteJob.state.in_(JobState.HELD)
)


# An active agent with no drain request: a heartbeat changes nothing else for it.
_AGENT_WRITABLE = (RemoteAgent.state == AgentState.ACTIVE, RemoteAgent.drain_requested.is_(False))


def _token_live(token_hash: Any, now: Any) -> tuple:
    return (
        RemoteToken.token_hash == token_hash,
        RemoteToken.revoked_at.is_(None),
        or_(RemoteToken.expires_at.is_(None), RemoteToken.expires_at > now),
    )


# PostgreSQL: every heartbeat of the batch, and the jobs of each agent written, in one statement.
_NOW = func.statement_timestamp()
_BATCH = select(
    func.unnest(bindparam("sessions", type_=ARRAY(String))).label("session_id"),
    func.unnest(bindparam("secret_hashes", type_=ARRAY(String))).label("token_hash"),
).cte("batch")
_WRITABLE = (
    select(RemoteAgent.name, _BATCH.c.session_id, _BATCH.c.token_hash)
    .join(_BATCH, RemoteAgent.session_id == _BATCH.c.session_id)
    .join(RemoteToken, RemoteToken.id == RemoteAgent.token_id)
    .where(*_AGENT_WRITABLE, *_token_live(_BATCH.c.token_hash, _NOW))
    .with_for_update(of=RemoteAgent, skip_locked=True)
    .subquery("writable")
)
_WRITTEN = (
    update(RemoteAgent)
    .where(RemoteAgent.name == _WRITABLE.c.name)
    .values(last_heartbeat_at=_NOW)
    .returning(
        RemoteAgent.name,
        _WRITABLE.c.session_id,
        _WRITABLE.c.token_hash,
        RemoteAgent.last_heartbeat_at.label("now"),
    )
    .cte("written")
)
_WRITE_BATCH = (
    select(_WRITTEN.c.session_id, _WRITTEN.c.token_hash, _WRITTEN.c.now, *_JOB_COLUMNS)
    .select_from(_WRITTEN)
    .outerjoin(RemoteJob, and_(RemoteJob.agent_name == _WRITTEN.c.name, RemoteJob.state.in_(JobState.HELD)))
)

# Other databases: one heartbeat at a time.
_ONE_NOW = bindparam("now", type_=UtcDateTime())
_WRITE_ONE = (
    update(RemoteAgent)
    .where(
        RemoteAgent.session_id == bindparam("beating_session"),
        *_AGENT_WRITABLE,
        RemoteAgent.token_id.in_(
            select(RemoteToken.id).where(*_token_live(bindparam("secret_hash"), _ONE_NOW))
        ),
    )
    .values(last_heartbeat_at=_ONE_NOW)
    .returning(RemoteAgent.name, RemoteAgent.last_heartbeat_at.label("now"))
)


def write_beats(beats: list[tuple[str, str]]) -> dict[tuple[str, str], Beat]:
    """Write the heartbeats of these (session id, token hash) pairs that need nothing more than a
    timestamp; the others are left out of the result."""
    written: dict[tuple[str, str], Beat] = {}
    with create_session(scoped=False) as session:
        connection = session.connection()  # Core statements: none of the ORM's bookkeeping
        if connection.dialect.name == "postgresql":
            rows = connection.execute(
                _WRITE_BATCH,
                {"sessions": [sid for sid, _ in beats], "secret_hashes": [h for _, h in beats]},
            ).all()
            for row in rows:
                beat = written.setdefault((row.session_id, row.token_hash), Beat(row.now, []))
                if row.id is not None:
                    beat.held_jobs.append(row)
        elif connection.dialect.update_returning:
            now = db_now(session)
            for session_id, secret_hash in dict.fromkeys(beats):
                beat = _write_one(connection, session_id, secret_hash, now)
                if beat is not None:
                    written[session_id, secret_hash] = beat
    return written


def _write_one(connection: Connection, session_id: str, secret_hash: str, now: datetime) -> Beat | None:
    params = {"beating_session": session_id, "secret_hash": secret_hash, "now": now}
    agent = connection.execute(_WRITE_ONE, params).first()
    if agent is None:
        return None
    return Beat(agent.now, connection.execute(HELD_JOBS, {"holder": agent.name}).all())


class _Waiting(NamedTuple):
    session_id: str
    secret_hash: str
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[Beat | None]


def _settle(done: asyncio.Future[Beat | None], beat: Beat | None) -> None:
    if not done.done():  # else the request was cancelled (its client went away): written anyway
        done.set_result(beat)


class HeartbeatWriter:
    """The one thread of this process that writes heartbeats in batches.

    It never holds a heartbeat up for long: one it has not written within ``WAIT_SECONDS`` (the
    database is slow, or the thread is gone), or could not write at all, takes the full path, which
    answers or fails on its own. A thread that died is started again by the next heartbeat.
    """

    WAIT_SECONDS = 2.0

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked process starts its own thread

    def _reset(self) -> None:
        self._waiting: deque[_Waiting] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    async def beat(self, session_id: str, secret_hash: str) -> Beat | None:
        """Write this heartbeat with whatever others are waiting; None if it needs the full path."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Beat | None] = loop.create_future()
        with self._wake:
            if len(self._waiting) >= MAX_WAITING:  # the writer is stuck: do not pile up behind it
                return None
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._write_forever, name="remote-exec-heartbeats", daemon=True
                )
                self._thread.start()
            self._waiting.append(_Waiting(session_id, secret_hash, loop, done))
            self._wake.notify()
        try:
            return await asyncio.wait_for(done, self.WAIT_SECONDS)
        except asyncio.TimeoutError:
            return None

    def _write_forever(self) -> None:
        while True:
            with self._wake:
                while not self._waiting:
                    self._wake.wait()
                taken = [self._waiting.popleft() for _ in range(min(MAX_BATCH, len(self._waiting)))]
            # A heartbeat whose request stopped waiting has taken the full path: writing it late would
            # only make its agent look alive for longer than it was.
            batch = [w for w in taken if not w.done.done()]
            if not batch:
                continue
            written: dict[tuple[str, str], Beat] = {}
            try:
                written = write_beats([(w.session_id, w.secret_hash) for w in batch])
            except BaseException as e:  # the full path answers each, with its own error if any
                log.warning("Could not write a batch of %d heartbeats (%s)", len(batch), type(e).__name__)
            for w in batch:
                with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody waits
                    w.loop.call_soon_threadsafe(_settle, w.done, written.get((w.session_id, w.secret_hash)))


heartbeat_writer = HeartbeatWriter()
