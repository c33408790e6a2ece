"""Processes that run claimed workloads with Airflow's own Task SDK supervisor.

Each runner is a long-lived process forked from a forkserver that has Airflow pre-imported, so a
task starts without paying for Python and Airflow imports. A runner takes one workload at a time
and calls ``BaseExecutor.run_workload`` (which calls ``supervise_task``) exactly as LocalExecutor
does, against the orchestrator's ``/execution/`` API with the workload's own token.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass
from multiprocessing.queues import SimpleQueue
from typing import NamedTuple

log = logging.getLogger(__name__)

PRELOAD = ["airflow_remote_exec.agent.preload"]
_PR_SET_PDEATHSIG = 1


class Assignment(NamedTuple):
    job_id: int
    attempt: int
    workload_json: str


class Outcome(NamedTuple):
    job_id: int
    attempt: int
    exit_code: int
    error: str | None


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    Applied to runners and, through ``os.register_at_fork``, to the supervisor's task processes:
    when the agent dies, its tasks die with it instead of running on unsupervised while their
    retries start on another agent.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _runner_main(inbox: SimpleQueue, outbox, server: str) -> None:
    """Loop of one runner process: run each assignment and post its outcome."""
    _die_with_parent()
    os.register_at_fork(after_in_child=_die_with_parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when tasks stop
    from airflow.executors.base_executor import BaseExecutor
    from airflow.executors.workloads import ExecuteTask

    while True:
        assignment = inbox.get()
        if assignment is None:
            return
        try:
            workload = ExecuteTask.model_validate_json(assignment.workload_json)
            exit_code = BaseExecutor.run_workload(
                workload, server=server, proctitle=f"airflow-remote-agent task {workload.display_name}"
            )
            outbox.put(Outcome(assignment.job_id, assignment.attempt, exit_code, None))
        except BaseException as err:  # noqa: BLE001 - any failure is the task's outcome, never the agent's
            outbox.put(Outcome(assignment.job_id, assignment.attempt, 1, f"{type(err).__name__}: {err}"))


@dataclass
class Runner:
    process: multiprocessing.Process
    inbox: SimpleQueue
    job: Assignment | None = None


class RunnerPool:
    """A fixed number of runner processes; a dead runner is reported and replaced."""

    def __init__(self, size: int, server: str):
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        self._server = server
        self.outcomes = self._ctx.Queue()
        self._runners = [self._spawn() for _ in range(size)]

    def _spawn(self) -> Runner:
        inbox = self._ctx.SimpleQueue()
        process = self._ctx.Process(
            target=_runner_main,
            args=(inbox, self.outcomes, self._server),
            name="remote-agent-runner",
            daemon=False,
        )
        process.start()
        return Runner(process=process, inbox=inbox)

    def idle_count(self) -> int:
        return sum(1 for r in self._runners if r.job is None)

    def start(self, assignment: Assignment) -> None:
        runner = next(r for r in self._runners if r.job is None)
        runner.job = assignment
        runner.inbox.put(assignment)

    def finished(self, job_id: int) -> None:
        for runner in self._runners:
            if runner.job is not None and runner.job.job_id == job_id:
                runner.job = None

    def reap_dead(self) -> list[Outcome]:
        """Replace runners that died; return a failed outcome for each job they were running."""
        lost: list[Outcome] = []
        for index, runner in enumerate(self._runners):
            if runner.process.is_alive():
                continue
            code = runner.process.exitcode
            reason = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            if runner.job is not None:
                log.error("Runner running job %s died (%s)", runner.job.job_id, reason)
                lost.append(
                    Outcome(runner.job.job_id, runner.job.attempt, code or 1, f"task process died ({reason})")
                )
            self._runners[index] = self._spawn()
        return lost

    def stop_job(self, job_id: int, sig: int = signal.SIGTERM) -> bool:
        """Stop the runner holding ``job_id`` (and its task process group); it is replaced on reap."""
        for runner in self._runners:
            if runner.job is not None and runner.job.job_id == job_id:
                _signal_tree(runner.process.pid, sig)
                return True
        return False

    def running_jobs(self) -> list[Assignment]:
        return [r.job for r in self._runners if r.job is not None]

    def shutdown(self, timeout: float = 10.0) -> None:
        for runner in self._runners:
            if runner.job is None and runner.process.is_alive():
                runner.inbox.put(None)
        for runner in self._runners:
            if runner.job is not None:
                _signal_tree(runner.process.pid, signal.SIGTERM)
        for runner in self._runners:
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
