"""The worker agent: claims jobs over the agent API and runs them in its runner processes.

Threads, each with one job:
- main: claim loop (long-poll) while slots are free, then drain on SIGTERM;
- outcomes: collects finished jobs from the runners, replaces dead runners, fences on silence;
- reporter: delivers state reports in order, retrying while the orchestrator is unreachable;
- heartbeat: tells the orchestrator what runs here and stops jobs that are no longer ours;
- logs: ships the log file of every task as it grows.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass

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
from airflow_remote_exec.agent.heartbeat import Heartbeat
from airflow_remote_exec.agent.ledger import Holding, Ledger, Session
from airflow_remote_exec.agent.log_format import job as job_extra
from airflow_remote_exec.agent.log_shipper import LogShipper, base_log_folder, task_log_path
from airflow_remote_exec.agent.metrics import AgentMetrics
from airflow_remote_exec.agent.registration import (
    installed_versions,
    register_request,
    register_until_name_free,
    use_orchestrator_executors,
    version_mismatch_message,
)
from airflow_remote_exec.agent.reporter import PendingReport, Reporter
from airflow_remote_exec.agent.runner import STOP_GRACE_SECONDS, Assignment, JobKey, Outcome, RunnerPool
from airflow_remote_exec.agent.threads import GuardedThreads
from airflow_remote_exec.api.datamodels import ClaimedJob, StateReport

log = logging.getLogger(__name__)

# At shutdown, how long to keep retrying undelivered reports before giving up; and then task logs.
REPORT_FLUSH_SECONDS = 60.0
LOG_FLUSH_SECONDS = 30.0
# A finished job's report waits this long at most for the end of its log to be shipped, so that a job
# reported finished has its whole log on the orchestrator (it waits not at all while unreachable).
LOG_TAIL_WAIT_SECONDS = 5.0
# After terminating jobs at the drain timeout, how long beyond the SIGTERM grace to wait for their
# runners to be reaped: reaping runs every half second, so a few seconds is plenty.
REAP_MARGIN_SECONDS = 5.0
# Wait before registering again when another live agent holds our name. The other agent is usually our
# own killed predecessor, whose name frees two heartbeat intervals (20 s) after its last heartbeat: a
# steady, short retry gets a restarted agent back within seconds of that, where a growing backoff
# overshot it by up to half a minute.
NAME_TAKEN_RETRY_SECONDS = 5.0


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
    ship_task_logs: bool = True  # --task-logs ship; keep: task logs stay on the agent
    log_backlog_bytes: int = 512 * 1024 * 1024
    log_format: str = "text"


class Worker:
    def __init__(
        self, settings: WorkerSettings, client: AgentClient | None = None, pool: RunnerPool | None = None
    ):
        self.settings = settings
        self._stop = threading.Event()  # SIGTERM/SIGINT or fatal error: stop claiming, drain
        self._done = threading.Event()  # drained: background threads end
        self.metrics = AgentMetrics(settings.name, "worker")
        self.client = client or AgentClient(
            settings.api_url, settings.token, stop=self._stop, metrics=self.metrics
        )
        self.ledger = Ledger(settings.slots)
        self.pool = pool
        self.reporter = Reporter(self.client, self.ledger, self.abandon, self.contact)
        self.heartbeat = Heartbeat(self, self._done)
        self.shipper = LogShipper(
            self.client,
            lambda: self._session.session_id if self._session else None,
            base_log_folder(),
            settings.log_backlog_bytes,
        )
        self.threads = GuardedThreads(self._done)
        self._register_lock = threading.Lock()  # one registration at a time; never held with ledger.lock
        self._session: Session | None = None
        self._last_contact = 0.0
        self._fatal: str | None = None
        self._token_rejected = False  # nothing more can be delivered: the drain sends no reports nor logs
        self._executors: str | None = None  # the orchestrator's [core] executor, from registration
        self._read_gauges()

    @property
    def session(self) -> Session | None:
        return self._session

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if self.settings.health_port is not None:  # before registering: liveness answers meanwhile
            serve_health(
                self.settings.health_host,
                self.settings.health_port,
                self.health,
                self.metrics.render,
                self.live,
            )
        try:
            self._register()
        except VersionMismatch as err:
            log.error(self._version_mismatch(err))
            return 1
        except AgentApiError as err:
            log.error("Registration refused: %s", err)
            return 1
        except Stopped:
            return 0
        self._use_orchestrator_executors()
        if self.pool is None:
            self.pool = RunnerPool(self.settings.slots, server=f"{self.settings.api_url}/execution/")
        self.start_threads()
        log.info(
            "Agent %s serving queues %s with %d slots",
            self.settings.name,
            self.settings.queues,
            self.settings.slots,
        )
        self._claim_loop()
        self._drain()
        return 1 if self._fatal else 0

    def start_threads(self) -> None:
        self.threads.start("outcomes", self._collect_outcomes)
        self.threads.start("reporter", self.reporter.step)
        self.threads.start("heartbeat", self.heartbeat.step)
        self.threads.start("logs", self.shipper.step)

    def _on_signal(self, signum, _frame) -> None:
        if not self._stop.is_set():
            log.info(
                "Received %s: no new jobs; draining %d running",
                signal.Signals(signum).name,
                self.ledger.count(),
            )
        self._stop.set()
        self.ledger.slot_freed.set()

    def draining(self) -> bool:
        return self._stop.is_set()

    def contact(self) -> None:
        self._last_contact = time.monotonic()

    def fail(self, message: str) -> None:
        """Stop for good: drain what runs, then exit 1."""
        if message != self._fatal:
            log.error(message)
        self._fatal = self._fatal or message
        self._stop.set()
        self.ledger.slot_freed.set()

    def token_rejected(self, err: AgentApiError) -> None:
        """Our token expired or was revoked: nothing we run can be reported any more, and the
        orchestrator will declare us lost and retry it, so stop it all now rather than at the drain
        timeout (or the self-fence), and exit."""
        self._token_rejected = True
        self.stop_own_jobs(f"the agent token was rejected ({err})")
        self.fail(f"Agent token rejected ({err}); stopping the running jobs and exiting.")

    # -- sessions --------------------------------------------------------------------------
    def _register(self) -> None:
        """Register, waiting while another live agent holds our name. Raises on any other refusal."""
        request = register_request(
            self.settings.name, self.settings.queues, self.settings.slots, ["worker"], installed_versions()
        )
        started = time.monotonic()
        reply = register_until_name_free(self.client, request, self._stop, NAME_TAKEN_RETRY_SECONDS)
        if self._executors is not None and reply.executors != self._executors:
            log.warning(
                "The orchestrator's [core] executor is now %r; restart the agent to parse DAGs with it",
                reply.executors,
            )
        self._executors = self._executors if self._executors is not None else reply.executors
        self._session = Session(
            session_id=reply.session_id,
            heartbeat_interval=float(reply.heartbeat_interval),
            lost_after_missed_heartbeats=reply.lost_after_missed_heartbeats,
            claim_wait_seconds=float(reply.claim_wait_seconds),
            started=started,
        )
        self.contact()
        log.info("Registered as %s (session %s)", self.settings.name, reply.session_id)

    def _use_orchestrator_executors(self) -> None:
        use_orchestrator_executors(self._executors)

    @staticmethod
    def _version_mismatch(err: VersionMismatch) -> str:
        return version_mismatch_message(err)

    def session_gone(self, gone_session: str) -> None:
        """The orchestrator ended our session (we were declared lost): our jobs went elsewhere."""
        with self._register_lock:
            if self._session is None or self._session.session_id != gone_session:
                return  # another thread already re-registered
            keys = self.ledger.abandon_all()
            log.warning(
                "Session %s is over; stopping %d jobs that were taken from us", gone_session, len(keys)
            )
            for key in keys:
                self.pool.stop_job(*key)
            if self._stop.is_set():
                return
            try:
                self._register()
            except Stopped:
                return
            except VersionMismatch as err:
                self.fail(self._version_mismatch(err))
            except AgentApiError as err:
                self.fail(f"Registration refused: {err}")

    # -- claiming --------------------------------------------------------------------------
    def _claim_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._claim_once()
            except Exception:
                log.exception("Unexpected error while claiming; carrying on")
                self._stop.wait(1.0)

    def _claim_once(self) -> None:
        self.ledger.slot_freed.clear()  # before counting, so a slot freed after the count wakes the wait
        session = self._session
        if session is None:
            self.ledger.slot_freed.wait(1.0)
            return
        with self.reporter.carried(session.session_id) as reports:
            # Reports are delivered by this claim, which is answered at once.
            refusal = self._claim(session, reports) if reports else None
        if not reports:
            refusal = self._claim(session, [])
        if refusal:  # outside ``carried``: the reporter thread must not wait out our back-off
            log.error("Claim refused: %s", refusal)
            self._stop.wait(session.heartbeat_interval)

    def _claim(self, session: Session, reports: list[PendingReport]) -> AgentApiError | None:
        """One claim carrying ``reports``; returns the refusal to back off from, if refused."""
        try:
            finals = {item.key for item in reports if item.final}
            free = max(0, min(self.ledger.free_slots(reporting=finals), self.pool.idle_count()))
            if not free and not reports:
                self.ledger.slot_freed.wait(1.0)
                return None
            self.metrics.claims.inc()
            reply = self.client.claim(
                session.session_id,
                free,
                # Carried reports are answered at once; then the next claim waits for jobs.
                wait_seconds=0 if reports else session.claim_wait_seconds,
                reports=[item.as_job_report() for item in reports],
            )
        except SessionGone:
            self.reporter.drop(reports, f"session {session.session_id} is over")
            self.session_gone(session.session_id)
            return None
        except Unauthorized as err:
            self.reporter.put_back(reports)
            self.token_rejected(err)
            return None
        except Stopped:
            self.reporter.put_back(reports)  # the reporter flushes them while the agent drains
            return None
        except AgentApiError as err:
            self.reporter.put_back(reports)
            return err
        except BaseException:
            self.reporter.put_back(reports)
            raise
        self.contact()
        self.metrics.jobs_claimed.inc(len(reply.jobs))
        self.reporter.settle(reports, reply.refused)
        for job in reply.jobs:
            self._start_job(job, session.session_id)
        return None

    def _start_job(self, job: ClaimedJob, session_id: str) -> None:
        key = JobKey(job.job_id, job.attempt)
        self.ledger.add(Holding(key, job.kind, job.pool_slots, session_id))
        if job.kind == "task" and self.settings.ship_task_logs and (log_path := task_log_path(job.workload)):
            self.shipper.track(key, log_path)
        if not self.pool.start(Assignment(job.job_id, job.attempt, job.workload, job.kind)):
            # Cannot happen while claims ask for at most the idle runners; hand it back if it does.
            self.ledger.release(key)
            self.shipper.end(key)
            log.error("No idle runner for job %s attempt %s; handing it back", *key, **job_extra(key.job_id))
            report = StateReport(attempt=job.attempt, state="returned", detail="no idle runner on the agent")
            self.reporter.put(key, report, session_id)
            return
        log.info("Started %s job %s (attempt %s)", job.kind, job.job_id, job.attempt, **job_extra(job.job_id))
        self.reporter.put(key, StateReport(attempt=job.attempt, state="running"), session_id)

    # -- outcomes and stops ----------------------------------------------------------------
    def _collect_outcomes(self) -> None:
        for outcome in self.pool.collect(timeout=0.5):
            self._finish_job(outcome)
        self.heartbeat.check_partition()

    def _finish_job(self, outcome: Outcome) -> None:
        held = self.ledger.release(outcome.key)  # an abandoned job's slots are free at once
        if held is None:
            return
        if held.abandoned:
            self.shipper.end(outcome.key)
            log.info(
                "Job %s attempt %s stopped; it is not ours to report",
                *outcome.key,
                **job_extra(outcome.job_id),
            )
            return
        state, detail = outcome.state, outcome.detail
        if held.stop_reason and state == "failed":
            detail = f"{held.stop_reason} ({detail})" if detail else held.stop_reason
        log.info(
            "Job %s attempt %s finished: %s%s",
            *outcome.key,
            state,
            f" ({detail})" if detail else "",
            **job_extra(outcome.job_id),
        )
        report = StateReport(attempt=outcome.attempt, state=state, exit_code=outcome.exit_code, detail=detail)
        # Reported once the end of its log is shipped: a job reported finished has its whole log there.
        self.shipper.end(
            outcome.key,
            lambda: self.reporter.put(outcome.key, report, held.session_id),
            LOG_TAIL_WAIT_SECONDS,
        )
        if state == "returned":
            self.fail(
                f"Cannot read the workload of job {outcome.job_id}; handed it back. This agent's Airflow "
                f"does not match the orchestrator's: {(detail or '')[:200]}"
            )

    def abandon(self, key: JobKey, why: str) -> None:
        """Stop a job that is no longer ours; it gets no report. Its slots stay taken until its runner
        is dead and replaced."""
        if self.ledger.abandon(key):
            log.warning("Stopping job %s attempt %s: %s", *key, why, **job_extra(key.job_id))
            self.pool.stop_job(*key)

    def stop_own_jobs(self, reason: str) -> None:
        """Stop every job still ours; each is reported failed with ``reason`` once its runner is dead."""
        for key in self.ledger.mark_stopping(reason):
            self.pool.stop_job(*key)

    # -- health ----------------------------------------------------------------------------
    def _read_gauges(self) -> None:
        """The worker's gauges, read at every scrape of /metrics."""
        self.metrics.read("slots", lambda: self.settings.slots)
        self.metrics.read("running_jobs", self.ledger.count)
        self.metrics.read("free_slots", lambda: max(0, self.ledger.free_slots()))
        self.metrics.read("heartbeat_age_seconds", lambda: seconds_since(self._last_contact))

    def live(self) -> tuple[bool, dict]:
        """Whether this process works, whatever the orchestrator does: its loops all run."""
        dead = self.threads.dead()
        return not dead, {"agent": self.settings.name, "live": not dead, "dead_threads": dead}

    def health(self) -> tuple[bool, dict]:
        session = self._session
        window = 3 * session.heartbeat_interval + session.claim_wait_seconds if session else 0.0
        recent, since = recent_contact(self._last_contact, window)
        dead = self.threads.dead()
        healthy = recent and not self._fatal and not dead
        return healthy, {
            "agent": self.settings.name,
            "healthy": healthy,
            "draining": self._stop.is_set(),
            "running_jobs": self.ledger.count(),
            "free_slots": self.ledger.free_slots(),
            "dead_threads": dead,
            "fatal": self._fatal,
            "seconds_since_orchestrator_contact": round(since, 1) if since is not None else None,
        }

    # -- shutdown --------------------------------------------------------------------------
    def _deliver_what_is_left(self) -> None:
        """Reports first, then task logs, each for a while; nothing once our token is rejected, since
        no request of ours can get through then."""
        if self._token_rejected:
            log.warning("Token rejected: %d job reports and the unshipped task logs are not delivered",
                        self.ledger.unreported())  # fmt: skip
            self.reporter.give_up.set()
            return
        flush_deadline = time.monotonic() + REPORT_FLUSH_SECONDS
        # A finished job is unreported from its release on, before its report waits on its log.
        while self.ledger.unreported() and time.monotonic() < flush_deadline:
            time.sleep(0.1)
        self.reporter.give_up.set()
        self.shipper.flush(time.monotonic() + LOG_FLUSH_SECONDS)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.settings.drain_timeout
        while self.ledger.count() and time.monotonic() < deadline:
            self.ledger.slot_freed.wait(1.0)
            self.ledger.slot_freed.clear()
        if self.ledger.active():
            reason = f"terminated at drain timeout after {self.settings.drain_timeout:.0f} s"
            log.warning("Drain timeout: terminating %d running jobs", len(self.ledger.active()))
            self.stop_own_jobs(reason)
        # Terminated runners are SIGKILLed after the grace period and reaped by the outcomes thread.
        wait_until = time.monotonic() + STOP_GRACE_SECONDS + REAP_MARGIN_SECONDS
        while self.ledger.count() and time.monotonic() < wait_until:
            time.sleep(0.2)
        self._deliver_what_is_left()
        self._done.set()
        self.pool.shutdown()
        session = self._session
        if session is not None:
            try:
                self.client.deregister(session.session_id)
            except (AgentApiError, Unreachable) as err:
                log.warning("Could not deregister: %s", err)
        self.client.close()
        log.info("Agent %s stopped", self.settings.name)
