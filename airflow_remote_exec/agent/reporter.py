"""Delivers state reports in order, retrying while the orchestrator is unreachable.

An outcome is never dropped for a mere outage: it is retried until delivered or refused. Until then
its job stays in the heartbeat's ``running`` list, so the orchestrator does not sweep it as orphaned.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import NamedTuple

from airflow_remote_exec.agent.client import AgentApiError, AgentClient, SessionGone, Unreachable
from airflow_remote_exec.agent.ledger import Ledger
from airflow_remote_exec.agent.runner import JobKey
from airflow_remote_exec.api.datamodels import HeldJob, StateReport

log = logging.getLogger(__name__)


class PendingReport(NamedTuple):
    key: JobKey
    report: StateReport
    session_id: str
    final: bool


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
        self._queue: queue.Queue[PendingReport] = queue.Queue()
        self.give_up = threading.Event()  # set at shutdown once the flush time is over

    def put(self, key: JobKey, report: StateReport, session_id: str) -> None:
        final = report.state != "running"
        if final:
            self._ledger.awaiting_report(key, session_id)
        self._queue.put(PendingReport(key, report, session_id, final))

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def step(self) -> None:
        """Deliver the next report, if one arrives within half a second: one round of the thread."""
        try:
            item = self._queue.get(timeout=0.5)
        except queue.Empty:
            return
        try:
            self._deliver(item)
        finally:
            if item.final:
                self._ledger.reported(item.key)
            self._queue.task_done()

    def _deliver(self, item: PendingReport) -> None:
        key, report = item.key, item.report
        try:
            self._client.report(
                item.session_id,
                HeldJob(job_id=key.job_id, attempt=key.attempt),
                report,
                keep_trying=lambda: not self.give_up.is_set(),
            )
            self._contact()
        except SessionGone:
            log.warning("Report on job %s dropped: session %s is over", key.job_id, item.session_id)
        except Unreachable:
            log.error(
                "Report on job %s undelivered at shutdown: %s %s", key.job_id, report.state, report.detail
            )
        except AgentApiError as err:
            # 409 stale attempt, 403 not ours, 404 deleted: this try is over for us.
            log.warning("Report %s on job %s attempt %s refused (%s)", report.state, *key, err)
            self._abandon(key, f"its {report.state} report was refused")
