"""Processes that run claimed workloads with Airflow's own Task SDK supervisor.

Each runner is a long-lived process forked from a forkserver that has Airflow pre-imported, so a
workload starts without paying for Python and Airflow imports. A runner takes one workload at a time
and runs it exactly as the installed Airflow's LocalExecutor does (``compat.run_workload``), against
the orchestrator's ``/execution/`` API with the workload's own token.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from multiprocessing.queues import SimpleQueue
from typing import NamedTuple

from airflow_remote_exec.api.datamodels import DETAIL_MAX_CHARS, JobKind, ReportedState

log = logging.getLogger(__name__)

PRELOAD = ["airflow_remote_exec.agent.preload"]
_PR_SET_PDEATHSIG = 1

# A stopped task gets this long between SIGTERM (its on_kill and cleanup) and SIGKILL: long enough for
# on_kill to cancel external work, short enough that a fenced try is dead well before its retry starts.
STOP_GRACE_SECONDS = 5.0

# Execution-API answers to ``ti_run`` meaning "this try is not yours to start": 404 unknown try,
# 409 not queued any more (running elsewhere, or finished), 410 archived by a clear or retry.
_REFUSED_TO_START = frozenset({HTTPStatus.NOT_FOUND, HTTPStatus.CONFLICT, HTTPStatus.GONE})


class JobKey(NamedTuple):
    """A job row is reused with a higher attempt for a reschedule or deferral resume, so everything the
    agent knows about a job is keyed by both: a stale message about an old attempt must not touch a new
    one."""

    job_id: int
    attempt: int


class Assignment(NamedTuple):
    job_id: int
    attempt: int
    workload_json: str
    kind: JobKind = "task"

    @property
    def key(self) -> JobKey:
        return JobKey(self.job_id, self.attempt)


class Outcome(NamedTuple):
    job_id: int
    attempt: int
    state: ReportedState
    exit_code: int | None
    detail: str | None

    @property
    def key(self) -> JobKey:
        return JobKey(self.job_id, self.attempt)


# The pid of the runners' forkserver, recorded by ``preload`` in the forkserver and inherited by
# every runner it forks, so a runner can tell whether its parent died before it asked to follow it.
FORKSERVER_PID: int | None = None
# Set by the agent for its forkserver: the agent's pid, for the same check one level up.
AGENT_PID_ENV = "AIRFLOW_REMOTE_AGENT_PID"


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    Applied to the forkserver, to runners and, through ``os.register_at_fork``, to the supervisor's
    task processes: when the agent dies, its tasks die with it instead of running on unsupervised
    while their retries start on another agent. The kernel only acts on deaths after the call, so a
    process whose ``parent`` is already gone exits at once.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent and os.getppid() != parent:
        os._exit(1)


def _describe(err: BaseException) -> str:
    """``Type: message``, cut to what a report can carry; an exception whose ``str`` fails is still named."""
    try:
        text = f"{type(err).__name__}: {err}"
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the outcome
        text = type(err).__name__
    return text if len(text) <= DETAIL_MAX_CHARS else text[: DETAIL_MAX_CHARS - 1] + "…"


def run_assignment(assignment: Assignment, server: str) -> Outcome:
    """Run one workload and classify its outcome the way LocalExecutor does.

    ``run_workload`` returning means the supervisor saw the workload through, whatever the exit code:
    the task instance's own state in Airflow says how it ended. Only an exception (or a runner that
    dies) is a failure of the run itself.
    """
    from airflow.executors.workloads import ExecuteCallback, ExecuteTask
    from airflow.sdk.api.client import ServerResponseError
    from pydantic import ValidationError

    from airflow_remote_exec import compat
    from airflow_remote_exec.agent.connection_test import run_connection_test

    def outcome(state: ReportedState, exit_code: int | None, detail: str | None) -> Outcome:
        return Outcome(assignment.job_id, assignment.attempt, state, exit_code, detail)

    if assignment.kind == "connection_test" and not compat.CONNECTION_TESTS:
        return outcome("failed", None, compat.NO_CONNECTION_TESTS)
    model = {"callback": ExecuteCallback, "connection_test": compat.TestConnection}.get(
        assignment.kind, ExecuteTask
    )
    try:
        workload = model.model_validate_json(assignment.workload_json)
    except ValidationError as err:
        # This agent's Airflow cannot read what the orchestrator's wrote: hand the job back.
        return outcome("returned", None, _describe(err))
    try:
        if assignment.kind == "connection_test":
            exit_code = run_connection_test(workload, server)
        else:
            exit_code = compat.run_workload(
                workload, server, f"airflow-remote-agent {assignment.kind} {compat.display_name(workload)}"
            )
    except ServerResponseError as err:
        status = err.response.status_code if err.response is not None else None
        if status in _REFUSED_TO_START and assignment.kind == "task":
            return outcome("not_started", None, f"Airflow refused to start this try: {_describe(err)}")
        return outcome("failed", None, _describe(err))
    except BaseException as err:  # noqa: BLE001 - any failure is the workload's outcome, never the agent's
        return outcome("failed", None, _describe(err))
    detail = None if exit_code == 0 else f"{assignment.kind} process exit code {exit_code}"
    return outcome("success", exit_code, detail)


def _runner_main(inbox: SimpleQueue, outbox, server: str) -> None:
    """Loop of one runner process: run each assignment and post its outcome."""
    die_with_parent(FORKSERVER_PID)
    os.register_at_fork(after_in_child=die_with_parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when tasks stop
    while True:
        assignment = inbox.get()
        if assignment is None:
            return
        outbox.put(run_assignment(assignment, server))


RunnerTarget = Callable[[SimpleQueue, object, str], None]


@dataclass
class Runner:
    process: multiprocessing.Process
    inbox: SimpleQueue
    job: Assignment | None = None
    kill_at: float | None = None  # set once stopping: SIGKILL at this monotonic time
    result: Outcome | None = None  # what a stopping runner posted before it died, if anything

    @property
    def stopping(self) -> bool:
        return self.kill_at is not None


class RunnerPool:
    """A fixed number of runner processes; a dead runner is reported and replaced.

    A runner that is being stopped stays busy until its process is dead and replaced, so its slot is
    never handed to a new job while the old task may still be running.
    """

    def __init__(
        self,
        size: int,
        server: str,
        *,
        target: RunnerTarget = _runner_main,
        preload: list[str] | None = None,
    ):
        os.environ[AGENT_PID_ENV] = str(os.getpid())  # read by the forkserver (see ``preload``)
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD if preload is None else preload)
        self._server = server
        self._target = target
        self._lock = threading.Lock()
        self.outcomes = self._ctx.Queue()
        self._runners = [self._spawn() for _ in range(size)]

    def _spawn(self) -> Runner:
        inbox = self._ctx.SimpleQueue()
        process = self._ctx.Process(
            target=self._target,
            args=(inbox, self.outcomes, self._server),
            name="remote-agent-runner",
            daemon=False,
        )
        process.start()
        return Runner(process=process, inbox=inbox)

    def _holding(self, key: JobKey) -> Runner | None:
        return next((r for r in self._runners if r.job is not None and r.job.key == key), None)

    def idle_count(self) -> int:
        with self._lock:
            return sum(1 for r in self._runners if r.job is None)

    def start(self, assignment: Assignment) -> bool:
        """Hand the assignment to an idle runner; False if none is idle."""
        with self._lock:
            runner = next((r for r in self._runners if r.job is None), None)
            if runner is None:
                return False
            runner.job = assignment
            runner.inbox.put(assignment)
            return True

    def stop_job(self, job_id: int, attempt: int) -> bool:
        """SIGTERM the tree of the runner holding this exact attempt; ``collect`` SIGKILLs it after
        ``STOP_GRACE_SECONDS`` and replaces it once dead. Returns whether such a runner was found."""
        with self._lock:
            runner = self._holding(JobKey(job_id, attempt))
            if runner is None:
                return False
            if not runner.stopping:
                runner.kill_at = time.monotonic() + STOP_GRACE_SECONDS
                _signal_tree(runner.process.pid, signal.SIGTERM)
            return True

    def collect(self, timeout: float = 0.5) -> list[Outcome]:
        """Outcomes of jobs whose runner is free again: finished normally, or dead and replaced.

        Also escalates overdue stops to SIGKILL. Each job yields at most one outcome, and only once
        its runner can take new work.
        """
        posted: list[Outcome] = []
        with contextlib.suppress(queue.Empty):
            posted.append(self.outcomes.get(timeout=timeout))
            while True:
                posted.append(self.outcomes.get_nowait())
        released: list[Outcome] = []
        with self._lock:
            for outcome in posted:
                runner = self._holding(outcome.key)
                if runner is None:
                    log.debug("Outcome for job %s attempt %s has no runner", outcome.job_id, outcome.attempt)
                elif runner.stopping:
                    runner.result = outcome  # released when its process is dead
                else:
                    runner.job = None
                    released.append(outcome)
            released += self._reap_locked()
        return released

    def _reap_locked(self) -> list[Outcome]:
        lost: list[Outcome] = []
        now = time.monotonic()
        for index, runner in enumerate(self._runners):
            if runner.process.is_alive():
                if runner.kill_at is not None and now >= runner.kill_at:
                    log.warning("Runner %s ignored SIGTERM; killing it", runner.process.pid)
                    _signal_tree(runner.process.pid, signal.SIGKILL)
                    runner.kill_at = float("inf")  # killed once; wait for the kernel
                continue
            runner.process.join(0)
            code = runner.process.exitcode
            reason = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            if runner.job is not None:
                if runner.result is not None:
                    lost.append(runner.result)
                else:
                    if not runner.stopping:
                        log.error(
                            "Runner running job %s died (%s)",
                            runner.job.job_id,
                            reason,
                            extra={"job_id": runner.job.job_id},
                        )
                    lost.append(
                        Outcome(
                            runner.job.job_id, runner.job.attempt, "failed", code, f"runner died ({reason})"
                        )
                    )
            with contextlib.suppress(Exception):
                runner.process.close()
                runner.inbox.close()
            self._runners[index] = self._spawn()
        return lost

    def reap_dead(self) -> list[Outcome]:
        """Replace runners that died; return an outcome for each job they were running."""
        with self._lock:
            return self._reap_locked()

    def running_jobs(self) -> list[Assignment]:
        with self._lock:
            return [r.job for r in self._runners if r.job is not None]

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._lock:
            runners = list(self._runners)
        for runner in runners:
            if runner.job is None and runner.process.is_alive():
                runner.inbox.put(None)
        for runner in runners:
            if runner.job is not None:
                _signal_tree(runner.process.pid, signal.SIGTERM)
        for runner in runners:
            runner.process.join(timeout)
            if runner.process.is_alive():
                _signal_tree(runner.process.pid, signal.SIGKILL)
                runner.process.join(5)


def _signal_tree(pid: int, sig: int) -> None:
    """Signal a runner and the supervisor/task processes it forked."""
    for child in _children(pid):
        _signal_tree(child, sig)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []
