"""The worker agent: claims jobs over the agent API and runs them in its runner processes.

Threads, each with one job:
- main: claim loop (long-poll) while slots are free, then drain on SIGTERM;
- outcomes: collects finished tasks from the runners and replaces dead runners;
- reporter: delivers state reports in order, retrying while the orchestrator is unreachable;
- heartbeat: tells the orchestrator what runs here and stops jobs that are no longer ours.
"""

from __future__ import annotations

import logging
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass

from airflow_remote_exec import __version__
from airflow_remote_exec.agent.client import AgentApiError, AgentClient, SessionGone, Stopped, Unauthorized
from airflow_remote_exec.agent.health import serve_health
from airflow_remote_exec.agent.runner import Assignment, Outcome, RunnerPool
from airflow_remote_exec.api.datamodels import HeartbeatRequest, HeldJob, RegisterRequest, StateReport

log = logging.getLogger(__name__)

# At shutdown, how long to keep retrying undelivered reports before giving up.
REPORT_FLUSH_SECONDS = 60.0


@dataclass(frozen=True)
class WorkerSettings:
    api_url: str
    token: str
    queues: list[str]
    slots: int
    name: str = socket.gethostname()
    health_host: str = "0.0.0.0"
    health_port: int | None = None
    drain_timeout: float = 300.0


@dataclass
class HeldJobState:
    attempt: int
    pool_slots: int
    session_id: str


class Worker:
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self._stop = threading.Event()  # SIGTERM/SIGINT: stop claiming, drain
        self._done = threading.Event()  # drained: background threads end
        self._give_up_reports = threading.Event()  # shutdown flush timed out
        self.client = AgentClient(settings.api_url, settings.token, stop=self._stop)
        self._lock = threading.Lock()
        self._held: dict[int, HeldJobState] = {}
        self._slot_freed = threading.Event()
        self._reports: queue.Queue[tuple[HeldJob, StateReport, str]] = queue.Queue()
        self._session_id: str | None = None
        self._heartbeat_interval = 10
        self._claim_wait = 20
        self._last_contact = 0.0
        self._fatal: str | None = None
        self.pool: RunnerPool | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            self._register()
        except (Unauthorized, AgentApiError) as err:
            log.error("Registration refused: %s", err)
            return 1
        except Stopped:
            return 0
        self.pool = RunnerPool(self.settings.slots, server=f"{self.settings.api_url}/execution/")
        if self.settings.health_port is not None:
            serve_health(self.settings.health_host, self.settings.health_port, self.health)
        threads = [
            threading.Thread(target=self._collect_outcomes, name="outcomes", daemon=True),
            threading.Thread(target=self._deliver_reports, name="reporter", daemon=True),
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
        ]
        for thread in threads:
            thread.start()
        log.info(
            "Agent %s serving queues %s with %d slots",
            self.settings.name,
            self.settings.queues,
            self.settings.slots,
        )
        self._claim_loop()
        self._drain()
        return 1 if self._fatal else 0

    def _on_signal(self, signum, _frame) -> None:
        if not self._stop.is_set():
            log.info(
                "Received %s: no new jobs; draining %d running", signal.Signals(signum).name, len(self._held)
            )
        self._stop.set()
        self._slot_freed.set()

    def _register(self) -> None:
        reply = self.client.register(
            RegisterRequest(
                name=self.settings.name,
                hostname=socket.gethostname(),
                version=__version__,
                queues=self.settings.queues,
                slots=self.settings.slots,
            )
        )
        self._session_id = reply.session_id
        self._heartbeat_interval = reply.heartbeat_interval
        self._claim_wait = reply.claim_wait_seconds
        self._last_contact = time.monotonic()
        log.info("Registered as %s (session %s)", self.settings.name, reply.session_id)

    def _start_new_session(self, gone_session: str) -> None:
        """The orchestrator ended our session (we were declared lost): our jobs went elsewhere."""
        with self._lock:
            if self._session_id != gone_session:
                return  # another thread already re-registered
            log.warning(
                "Session %s is over; stopping %d jobs that were taken from us", gone_session, len(self._held)
            )
            for job_id in list(self._held):
                self._abandon(job_id)
            self._register()

    def _fail(self, message: str) -> None:
        log.error(message)
        self._fatal = message
        self._stop.set()

    # -- claiming --------------------------------------------------------------------------
    def free_slots(self) -> int:
        with self._lock:
            return self.settings.slots - sum(job.pool_slots for job in self._held.values())

    def _claim_loop(self) -> None:
        while not self._stop.is_set():
            free = min(self.free_slots(), self.pool.idle_count())
            if free <= 0:
                self._slot_freed.wait(1.0)
                self._slot_freed.clear()
                continue
            session_id = self._session_id
            try:
                jobs = self.client.claim(session_id, free, wait_seconds=self._claim_wait)
            except SessionGone:
                self._start_new_session(session_id)
                continue
            except Unauthorized as err:
                self._fail(f"Agent token rejected ({err}); no more claims.")
                return
            except Stopped:
                return
            except AgentApiError as err:
                log.error("Claim refused: %s", err)
                self._stop.wait(self._heartbeat_interval)
                continue
            self._last_contact = time.monotonic()
            for job in jobs:
                self._start_job(job.job_id, job.attempt, job.pool_slots, job.workload, session_id)

    def _start_job(self, job_id: int, attempt: int, pool_slots: int, workload: str, session_id: str) -> None:
        with self._lock:
            self._held[job_id] = HeldJobState(attempt=attempt, pool_slots=pool_slots, session_id=session_id)
            self.pool.start(Assignment(job_id, attempt, workload))
        log.info("Started job %s (attempt %s)", job_id, attempt)
        self._report(job_id, StateReport(attempt=attempt, state="running"))

    # -- outcomes and reports ---------------------------------------------------------------
    def _collect_outcomes(self) -> None:
        while not self._done.is_set():
            try:
                outcomes = [self.pool.outcomes.get(timeout=0.5)]
            except queue.Empty:
                outcomes = []
            outcomes += self.pool.reap_dead()
            for outcome in outcomes:
                self._finish_job(outcome)

    def _finish_job(self, outcome: Outcome) -> None:
        with self._lock:
            held = self._held.get(outcome.job_id)
            if held is None or held.attempt != outcome.attempt:
                return  # abandoned: it is not ours to report any more
            del self._held[outcome.job_id]
            self.pool.finished(outcome.job_id)
        state = "success" if outcome.exit_code == 0 else "failed"
        detail = outcome.error or (
            None if state == "success" else f"task process exit code {outcome.exit_code}"
        )
        log.info("Job %s finished: %s%s", outcome.job_id, state, f" ({detail})" if detail else "")
        self._report(
            outcome.job_id,
            StateReport(attempt=outcome.attempt, state=state, exit_code=outcome.exit_code, detail=detail),
            session_id=held.session_id,
        )
        self._slot_freed.set()

    def _report(self, job_id: int, report: StateReport, session_id: str | None = None) -> None:
        self._reports.put(
            (HeldJob(job_id=job_id, attempt=report.attempt), report, session_id or self._session_id)
        )

    def _deliver_reports(self) -> None:
        while not (self._done.is_set() and self._reports.empty()):
            try:
                job, report, session_id = self._reports.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                # Outcomes are never dropped for a mere outage: retry until delivered or refused.
                self.client.report(
                    session_id, job, report, keep_trying=lambda: not self._give_up_reports.is_set()
                )
                self._last_contact = time.monotonic()
            except SessionGone:
                log.warning("Report on job %s dropped: session %s is over", job.job_id, session_id)
            except Stopped:
                log.error(
                    "Report on job %s undelivered at shutdown: %s %s", job.job_id, report.state, report.detail
                )
            except AgentApiError as err:
                log.warning("Report on job %s refused (%s); stopping it", job.job_id, err)
                with self._lock:
                    self._abandon(job.job_id)
            finally:
                self._reports.task_done()

    def _abandon(self, job_id: int) -> None:
        """Stop a job that is no longer ours without reporting on it. Caller holds the lock."""
        if self._held.pop(job_id, None) is not None:
            self.pool.stop_job(job_id)
            self.pool.finished(job_id)
            self._slot_freed.set()

    # -- heartbeat -------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._done.is_set():
            self._heartbeat()
            self._done.wait(self._heartbeat_interval)

    def _heartbeat(self) -> None:
        """Tell the orchestrator what runs here; stop whatever it says is no longer ours."""
        session_id = self._session_id
        with self._lock:
            running = [HeldJob(job_id=i, attempt=h.attempt) for i, h in self._held.items()]
        request = HeartbeatRequest(
            running=running, free_slots=max(0, self.free_slots()), draining=self._stop.is_set()
        )
        try:
            reply = self.client.heartbeat(session_id, request)
        except SessionGone:
            if not self._stop.is_set():
                self._start_new_session(session_id)
            return
        except Unauthorized as err:
            self._fail(f"Agent token rejected ({err}); stopping.")
            return
        except (AgentApiError, Stopped) as err:
            log.warning("Heartbeat failed: %s", err)
            return
        self._last_contact = time.monotonic()
        if reply.stop:
            with self._lock:
                for job_id in reply.stop:
                    log.warning("Orchestrator says job %s is no longer ours; stopping it", job_id)
                    self._abandon(job_id)

    def health(self) -> tuple[bool, dict]:
        since = time.monotonic() - self._last_contact if self._last_contact else None
        healthy = (
            since is not None and since < 3 * self._heartbeat_interval + self._claim_wait and not self._fatal
        )
        return healthy, {
            "agent": self.settings.name,
            "healthy": healthy,
            "draining": self._stop.is_set(),
            "running_jobs": len(self._held),
            "free_slots": self.free_slots(),
            "seconds_since_orchestrator_contact": round(since, 1) if since is not None else None,
        }

    # -- shutdown --------------------------------------------------------------------------
    def _drain(self) -> None:
        deadline = time.monotonic() + self.settings.drain_timeout
        while self._held and time.monotonic() < deadline:
            self._slot_freed.wait(1.0)
            self._slot_freed.clear()
        with self._lock:
            leftover = dict(self._held)
        if leftover:
            log.warning("Drain timeout: terminating %d running jobs", len(leftover))
            for job_id in leftover:
                self.pool.stop_job(job_id)
        # Outcomes of terminated jobs arrive via the outcomes thread; give them a moment.
        wait_until = time.monotonic() + 15
        while self._held and time.monotonic() < wait_until:
            time.sleep(0.2)
        flush_deadline = time.monotonic() + REPORT_FLUSH_SECONDS
        while self._reports.unfinished_tasks and time.monotonic() < flush_deadline:
            time.sleep(0.1)
        self._give_up_reports.set()
        self._done.set()
        self.pool.shutdown()
        if self._session_id and not self._fatal:
            try:
                self.client.deregister(self._session_id)
            except (AgentApiError, Stopped) as err:
                log.warning("Could not deregister: %s", err)
        self.client.close()
        log.info("Agent %s stopped", self.settings.name)
