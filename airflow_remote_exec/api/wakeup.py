"""Wake long-polling claims when jobs of their queues become claimable: only those, and no more of
them than there are jobs.

Each api-server process keeps its waiting claims here, at most one per agent session (a newer claim
of the session supersedes the older, which returns empty). When jobs may have been queued, one
query per process counts the claimable jobs of the waiters' queues, and one waiter per job is woken
to claim, oldest waiter first. The signal comes from Postgres ``NOTIFY`` (one ``LISTEN`` thread per
process), with a safety recheck every few seconds in case a notification was lost; databases
without ``LISTEN`` (SQLite) are rechecked every ``[remote_exec] wakeup_poll_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import select
import threading
from dataclasses import dataclass

from airflow import settings
from airflow.utils.session import create_session
from fastapi import HTTPException
from sqlalchemy import func, or_
from sqlalchemy import select as sql_select

from airflow_remote_exec import config
from airflow_remote_exec.api.db_threads import run_db
from airflow_remote_exec.clock import db_now
from airflow_remote_exec.models import JobState, RemoteJob
from airflow_remote_exec.notify import CHANNEL, supports_listen

log = logging.getLogger(__name__)

# With LISTEN, waiters are still rechecked now and then, in case a notification was lost while the
# listening connection was being re-established (or a fenced job's ``not_before`` has passed).
SAFETY_RECHECK_SECONDS = 5.0


def claimable_job_counts(queues: set[str]) -> dict[str, int]:
    """Queued jobs per queue that a claim could take now."""
    with create_session(scoped=False) as session:
        now = db_now(session)
        rows = session.execute(
            sql_select(RemoteJob.queue, func.count())
            .where(
                RemoteJob.state == JobState.QUEUED,
                RemoteJob.queue.in_(sorted(queues)),
                or_(RemoteJob.not_before.is_(None), RemoteJob.not_before <= now),
            )
            .group_by(RemoteJob.queue)
        ).all()
    return {queue: count for queue, count in rows}


@dataclass(eq=False)
class OpenClaim:
    """One claim request of an agent session, from arrival to response."""

    session_id: str
    queues: frozenset[str] = frozenset()
    future: asyncio.Future | None = None  # set while the claim waits
    woken_by: int | None = None  # the signal it was woken for a job by, until it has tried to claim
    fruitless_at: int = -1  # the last signal it was woken by and then took nothing


class JobWakeup:
    def __init__(self) -> None:
        self._open: dict[str, OpenClaim] = {}  # session id -> its newest claim
        self._waiting: dict[str, OpenClaim] = {}  # session id -> its waiting claim, oldest first
        self._signal = 0  # grows with every NOTIFY and every recheck
        self._lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._listening = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recheck: asyncio.Task | None = None
        self._count_task: asyncio.Task | None = None
        self._count_again = False

    # -- claims ------------------------------------------------------------------------------
    def open(self, session_id: str) -> OpenClaim:
        """A new claim of ``session_id``; an older one of the same session stops waiting."""
        claim = OpenClaim(session_id)
        self._open[session_id] = claim
        self._release(self._waiting.pop(session_id, None))
        return claim

    def close(self, claim: OpenClaim) -> None:
        if self._open.get(claim.session_id) is claim:
            del self._open[claim.session_id]

    def superseded(self, claim: OpenClaim) -> bool:
        return self._open.get(claim.session_id) is not claim

    async def wait(self, claim: OpenClaim, queues: frozenset[str], timeout: float) -> None:
        """Return when a job of ``queues`` may be claimable, when the claim is superseded, or after
        ``timeout`` seconds. A claim that cannot take anything now waits with no queues."""
        if self.superseded(claim):
            return
        self._start()
        claim.queues = queues
        claim.future = asyncio.get_running_loop().create_future()
        self._waiting.pop(claim.session_id, None)
        self._waiting[claim.session_id] = claim  # to the end: waiters are woken oldest first
        try:
            await asyncio.wait_for(claim.future, timeout=timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            if self._waiting.get(claim.session_id) is claim:
                del self._waiting[claim.session_id]
            claim.future = None

    def tried(self, claim: OpenClaim, took_jobs: bool) -> None:
        """After the claim attempt a wake-up led to, or instead of it (superseded, timed out, the
        client gone, the attempt raised): count again, so a job it did not take wakes another waiter
        and one it took that was counted for another waiter does not leave that one asleep. A claim
        that took nothing is not woken again before the next signal."""
        if claim.woken_by is None:
            return
        if not took_jobs:
            claim.fruitless_at = claim.woken_by
        claim.woken_by = None
        self.jobs_may_be_queued()

    @staticmethod
    def _release(claim: OpenClaim | None) -> None:
        if claim is not None and claim.future is not None and not claim.future.done():
            claim.future.set_result(None)

    # -- waking ------------------------------------------------------------------------------
    def jobs_may_be_queued(self) -> None:
        """Count the claimable jobs of the waiters' queues and wake that many waiters (one query,
        however many waiters); a call that arrives meanwhile triggers one more count."""
        if self._count_task is not None and not self._count_task.done():
            self._count_again = True
            return
        if self._waiting:
            self._count_task = asyncio.get_running_loop().create_task(self._count_and_wake())

    def _new_signal(self) -> None:
        """Jobs may have been queued (a NOTIFY, a recheck): every waiter may be woken again."""
        self._signal += 1
        self.jobs_may_be_queued()

    async def _count_and_wake(self) -> None:
        try:
            while True:
                self._count_again = False
                queues = set().union(*(claim.queues for claim in self._waiting.values()))
                if queues:
                    self._wake(await run_db(claimable_job_counts, queues))
                if not self._count_again:
                    return
        except HTTPException as busy:  # no database thread free in time: the API is saturated
            log.warning("Could not count claimable jobs (%s); the next recheck tries again", busy.detail)
        except Exception:
            log.warning("Could not count claimable jobs; the next recheck tries again", exc_info=True)

    def _wake(self, counts: dict[str, int]) -> None:
        for claim in list(self._waiting.values()):
            if claim.future is None or claim.future.done() or claim.fruitless_at == self._signal:
                continue
            queue = next((q for q in sorted(claim.queues) if counts.get(q, 0) > 0), None)
            if queue is not None:
                counts[queue] -= 1
                claim.woken_by = self._signal
                self._release(claim)

    # -- signals -----------------------------------------------------------------------------
    @property
    def recheck_interval(self) -> float:
        return SAFETY_RECHECK_SECONDS if self._listening else config.wakeup_poll_interval()

    def _start(self) -> None:
        """Start the recheck task on this event loop and, on Postgres, the ``LISTEN`` thread."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        if self._recheck is None or self._recheck.done() or self._recheck.get_loop() is not loop:
            self._count_task = None  # a count task of an earlier loop is gone with it
            self._recheck = loop.create_task(self._recheck_forever())
        engine = settings.engine
        with self._lock:
            if self._listener is None and engine is not None and supports_listen(engine.dialect.name):
                self._listener = threading.Thread(
                    target=self._listen_forever, name="remote-exec-listen", daemon=True
                )
                self._listener.start()

    async def _recheck_forever(self) -> None:
        while True:
            await asyncio.sleep(self.recheck_interval)
            self._new_signal()

    def _signal_from_thread(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._new_signal)

    def _listen_forever(self) -> None:
        while True:
            try:
                self._listen_once()
            except Exception:
                log.warning("LISTEN connection lost; retrying in 1 s", exc_info=True)
            self._listening = False
            threading.Event().wait(1.0)

    def _listen_once(self) -> None:
        raw = settings.engine.raw_connection()
        try:
            conn = raw.driver_connection
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}")
            self._listening = True
            self._signal_from_thread()  # catch up on anything missed meanwhile
            while True:
                readable, _, _ = select.select([conn], [], [], 30.0)
                if readable:
                    conn.poll()
                else:
                    with conn.cursor() as cursor:
                        cursor.execute("SELECT 1")  # detect a dead connection (and read what came)
                if conn.notifies:
                    conn.notifies.clear()
                    self._signal_from_thread()
        finally:
            raw.invalidate()


job_wakeup = JobWakeup()
