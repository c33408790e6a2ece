"""Delivers state reports in order and in batches, retrying while the orchestrator is unreachable.

An outcome is never dropped for a mere outage: it is retried until delivered or refused. Until then
its job stays in the heartbeat's ``running`` list, so the orchestrator does not sweep it as orphaned.

Two senders take reports from the head of one queue, each holding ``delivering`` until its batch is
answered, so reports land in the order they were made: the reporter thread, and the claim loop,
whose claim carries the reports waiting at that moment (a final report frees its job's slots for
that very claim). A busy agent so spends a claim and one batch of "running" reports per batch of jobs,
where it spent three requests per task. The thread lingers briefly before it sends, so that a claim
about to go takes what it can.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

from airflow_remote_exec.agent.client import AgentApiError, AgentClient, SessionGone, Unreachable
from airflow_remote_exec.agent.ledger import Ledger
from airflow_remote_exec.agent.runner import JobKey
from airflow_remote_exec.api.datamodels import MAX_REPORTS, JobReport, RefusedReport, StateReport

log = logging.getLogger(__name__)

# How long a report waits for a claim to carry it before the reporter thread sends it alone.
LINGER_SECONDS = 0.1


class PendingReport(NamedTuple):
    key: JobKey
    report: StateReport
    session_id: str
    final: bool

    def as_job_report(self) -> JobReport:
        return JobReport(job_id=self.key.job_id, **self.report.model_dump())


class Reporter:
    def __init__(
        self,
        client: AgentClient,
        ledger: Ledger,
        abandon: Callable[[JobKey, str], None],
        contact: Callable[[], None],
    ):
        self._client = client
        self._ledger = ledger
        self._abandon = abandon
        self._contact = contact
        self._queue: deque[PendingReport] = deque()
        self._changed = threading.Condition()
        self._in_flight = 0
        self.delivering = threading.Lock()  # held by whoever sends a batch, until it is answered
        self.give_up = threading.Event()  # set at shutdown once the flush time is over

    def put(self, key: JobKey, report: StateReport, session_id: str) -> None:
        final = report.state != "running"
        if final:
            self._ledger.awaiting_report(key, session_id)
        with self._changed:
            self._queue.append(PendingReport(key, report, session_id, final))
            self._changed.notify_all()
        if final:  # a full agent's claim loop wakes now, and carries this report to free the slots
            self._ledger.slot_freed.set()

    def pending(self) -> int:
        """Reports not yet answered: queued or in flight."""
        with self._changed:
            return len(self._queue) + self._in_flight

    def take(self, session_id: str | None = None) -> list[PendingReport]:
        """The reports at the head of the queue that belong to one session (``session_id``, or the
        first report's), at most a request's worth. The caller must hold ``delivering`` and then
        ``settle`` or ``put_back`` them."""
        with self._changed:
            if not self._queue:
                return []
            session_id = session_id or self._queue[0].session_id
            batch = []
            while self._queue and self._queue[0].session_id == session_id and len(batch) < MAX_REPORTS:
                batch.append(self._queue.popleft())
            self._in_flight += len(batch)
            return batch

    @contextmanager
    def carried(self, session_id: str) -> Iterator[list[PendingReport]]:
        """The reports a claim of ``session_id`` can carry: those waiting now, unless another batch is
        being sent. Held under ``delivering`` until the block ends; the block settles, drops or puts
        them back."""
        if not self.delivering.acquire(blocking=False):
            yield []
            return
        try:
            yield self.take(session_id)
        finally:
            self.delivering.release()

    def put_back(self, batch: list[PendingReport]) -> None:
        """Undelivered: back to the head of the queue, in order, for the next sender."""
        with self._changed:
            self._queue.extendleft(reversed(batch))
            self._in_flight -= len(batch)
            self._changed.notify_all()

    def settle(self, batch: list[PendingReport], refused: Iterable[RefusedReport]) -> None:
        """The orchestrator answered: refused reports end their try for us, the rest landed."""
        refusals = {(r.job_id, r.attempt, r.state): r for r in refused}
        try:
            for item in batch:
                refusal = refusals.get((item.key.job_id, item.key.attempt, item.report.state))
                if refusal is not None:
                    # 409 stale attempt, 403 not ours, 404 deleted: this try is over for us.
                    log.warning(
                        "Report %s on job %s attempt %s refused (%s: %s)",
                        item.report.state, *item.key, refusal.status, refusal.detail,
                    )  # fmt: skip
                    self._abandon(item.key, f"its {item.report.state} report was refused")
        finally:
            self._done(batch)

    def drop(self, batch: list[PendingReport], why: str) -> None:
        for item in batch:
            log.warning("Report %s on job %s dropped: %s", item.report.state, item.key.job_id, why)
        self._done(batch)

    def _done(self, batch: list[PendingReport]) -> None:
        with self._changed:
            self._in_flight -= len(batch)
        for item in batch:
            if item.final:
                self._ledger.reported(item.key)

    def step(self) -> None:
        """Deliver what is queued, if anything arrives within half a second: one round of the thread."""
        with self._changed:
            if not self._queue and not self._changed.wait_for(lambda: self._queue, timeout=0.5):
                return
        time.sleep(LINGER_SECONDS)
        with self.delivering:
            batch = self.take()
            if not batch:
                return
            try:
                self._deliver(batch)
            except BaseException:  # not answered (an unreadable reply, say): the next sender retries
                self.put_back(batch)
                raise

    def _deliver(self, batch: list[PendingReport]) -> None:
        session_id = batch[0].session_id
        try:
            refused = self._client.report_many(
                session_id,
                [item.as_job_report() for item in batch],
                keep_trying=lambda: not self.give_up.is_set(),
            )
        except SessionGone:
            self.drop(batch, f"session {session_id} is over")
            return
        except Unreachable:
            self.drop(batch, "undelivered at shutdown")
            return
        except AgentApiError as err:  # the whole request refused (403: not our session)
            self.settle(batch, [_refusal(item, err) for item in batch])
            return
        self._contact()
        self.settle(batch, refused)


def _refusal(item: PendingReport, err: AgentApiError) -> RefusedReport:
    return RefusedReport(
        job_id=item.key.job_id,
        attempt=item.key.attempt,
        state=item.report.state,
        status=err.status_code,
        detail=err.detail,
    )
