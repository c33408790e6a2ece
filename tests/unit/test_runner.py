"""Runner outcomes as LocalExecutor reports them, and runner processes that stop for real."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from airflow.executors.workloads import ExecuteCallback, ExecuteTask
from airflow.sdk.api.client import ServerResponseError

from airflow_remote_exec import compat
from airflow_remote_exec.agent import runner as runner_module
from airflow_remote_exec.agent.runner import Assignment, Outcome, RunnerPool, run_assignment
from airflow_remote_exec.api.datamodels import DETAIL_MAX_CHARS, StateReport
from tests.factories import make_callback_workload, make_workload
from tests.unit.runner_stubs import stubborn_runner

SERVER = "http://orchestrator/execution/"


def _task(job_id: int = 1, attempt: int = 1) -> Assignment:
    return Assignment(job_id, attempt, make_workload().model_dump_json(), "task")


@pytest.fixture
def run_workload(monkeypatch):
    """Replace the supervisor call; the test sets ``result`` (an exit code or an exception)."""
    calls: list = []

    class Fake:
        result: int | BaseException = 0

    def fake(workload, server, proctitle):
        calls.append(workload)
        if isinstance(Fake.result, BaseException):
            raise Fake.result
        return Fake.result

    monkeypatch.setattr(compat, "run_workload", fake)
    Fake.calls = calls
    return Fake


def _refusal(status: int) -> ServerResponseError:
    request = httpx.Request("PATCH", "http://orchestrator/execution/task-instances/x/run")
    response = httpx.Response(status, json={"detail": "nope"}, request=request)
    return ServerResponseError("refused", request=request, response=response)


@pytest.mark.parametrize("exit_code", [0, 1, -9])
def test_returned_run_workload_is_success_whatever_the_exit_code(run_workload, exit_code):
    run_workload.result = exit_code
    outcome = run_assignment(_task(), SERVER)
    assert (outcome.state, outcome.exit_code) == ("success", exit_code)
    assert (outcome.detail is None) == (exit_code == 0)


def test_raising_run_workload_is_failed(run_workload):
    run_workload.result = RuntimeError("bundle not found")
    outcome = run_assignment(_task(), SERVER)
    assert outcome.state == "failed"
    assert "RuntimeError: bundle not found" in outcome.detail


@pytest.mark.parametrize("status", [404, 409, 410])
def test_ti_run_refused_by_execution_api_is_not_started(run_workload, status):
    run_workload.result = _refusal(status)
    assert run_assignment(_task(), SERVER).state == "not_started"


def test_other_execution_api_error_is_failed(run_workload):
    run_workload.result = _refusal(500)
    assert run_assignment(_task(), SERVER).state == "failed"


def test_unreadable_workload_is_returned_without_running(run_workload):
    outcome = run_assignment(Assignment(1, 1, '{"type": "ExecuteTask", "ti": {}}', "task"), SERVER)
    assert outcome.state == "returned"
    assert run_workload.calls == []


def test_callback_job_runs_as_execute_callback(run_workload):
    callback = make_callback_workload()
    outcome = run_assignment(Assignment(3, 1, callback.model_dump_json(), "callback"), SERVER)
    assert outcome.state == "success"
    assert [type(w) for w in run_workload.calls] == [ExecuteCallback]
    run_assignment(_task(), SERVER)
    assert type(run_workload.calls[-1]) is ExecuteTask


def test_error_message_over_1000_chars_is_cut_and_still_reportable(run_workload):
    run_workload.result = ValueError("x" * 5000)
    outcome = run_assignment(_task(), SERVER)
    assert outcome.state == "failed"
    assert len(outcome.detail) <= DETAIL_MAX_CHARS
    assert StateReport(attempt=1, state="failed", detail="y" * 5000).detail.endswith("…")


# -- real runner processes, with a stand-in for the supervisor ------------------------------------


@pytest.fixture
def pool(monkeypatch):
    monkeypatch.setattr(runner_module, "STOP_GRACE_SECONDS", 0.5)
    pool = RunnerPool(1, SERVER, target=stubborn_runner, preload=[])
    yield pool
    pool.shutdown(timeout=1)


def _collect_until(pool: RunnerPool, seconds: float) -> list[Outcome]:
    deadline, outcomes = time.monotonic() + seconds, []
    while not outcomes and time.monotonic() < deadline:
        outcomes = pool.collect(timeout=0.1)
    return outcomes


def _wait_for(path: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, "runner never started its assignment"
        time.sleep(0.05)


def test_stopped_runner_stays_busy_until_killed_and_replaced(pool, tmp_path):
    ready = tmp_path / "ready"
    assert pool.start(Assignment(5, 1, f"60:{ready}"))
    _wait_for(ready)
    old_pid = pool._runners[0].process.pid
    assert pool.stop_job(5, 1)
    assert pool.collect(timeout=0.1) == []  # SIGTERM ignored: still running, still busy
    assert pool.idle_count() == 0
    outcomes = _collect_until(pool, 10)
    assert [(o.job_id, o.attempt, o.state) for o in outcomes] == [(5, 1, "failed")]
    assert "signal 9" in outcomes[0].detail
    assert pool.idle_count() == 1
    assert pool._runners[0].process.pid != old_pid


def test_stale_stop_for_old_attempt_leaves_new_attempt_running(pool):
    assert pool.start(Assignment(7, 2, "0.5"))
    assert not pool.stop_job(7, 1)
    outcomes = _collect_until(pool, 10)
    assert [(o.key, o.state) for o in outcomes] == [((7, 2), "success")]


def test_finished_runner_is_reused_at_once(pool):
    pid = pool._runners[0].process.pid
    assert pool.start(Assignment(8, 1, "0"))
    assert [o.state for o in _collect_until(pool, 10)] == ["success"]
    assert pool.idle_count() == 1 and pool._runners[0].process.pid == pid


def test_refused_callback_is_failed_not_dropped(run_workload):
    """A callback has no try running elsewhere: a refusal must reach Airflow as a failure."""
    callback = make_callback_workload()
    run_workload.result = _refusal(409)
    assert run_assignment(Assignment(3, 1, callback.model_dump_json(), "callback"), SERVER).state == "failed"


_POOL_OWNER = """
import sys, time
from airflow_remote_exec.agent.runner import RunnerPool
pool = RunnerPool(2, server="http://127.0.0.1:9/execution/")
print("RUNNERS", *(r.process.pid for r in pool._runners), flush=True)
time.sleep(600)
"""


def test_runners_die_when_the_agent_process_is_killed():
    """The runners' parent is the forkserver, which must itself die with the agent (real processes)."""
    owner = subprocess.Popen([sys.executable, "-c", _POOL_OWNER], stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("RUNNERS"):  # Airflow may log to stdout first
            line = owner.stdout.readline()
            assert line, "the pool owner exited before starting its runners"
        runner_pids = [int(pid) for pid in line.split()[1:]]
        assert len(runner_pids) == 2
        owner.kill()  # kill -9 of the agent alone, as when its container's main process is killed
        owner.wait(10)
        deadline = time.monotonic() + 30
        while [pid for pid in runner_pids if _alive(pid)]:
            assert time.monotonic() < deadline, "runners outlived the agent"
            time.sleep(0.2)
    finally:
        owner.kill()
        owner.wait(10)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.skipif(
    compat.AIRFLOW_MINOR >= (3, 3), reason="3.3 runs callbacks under Airflow's callback supervisor"
)
def test_on_airflow_3_2_a_callback_runs_in_the_runner_as_its_local_executor_runs_it(tmp_path):
    marker = tmp_path / "ran"
    workload = make_callback_workload(
        path="tests.factories.write_marker", kwargs={"marker": str(marker), "text": "deadline missed"}
    )
    assert compat.run_workload(workload, SERVER, "airflow-remote-agent callback test") == 0
    assert marker.read_text() == "deadline missed"
    broken = make_callback_workload(path="tests.factories.no_such_callback")
    with pytest.raises(RuntimeError, match="no_such_callback"):
        compat.run_workload(broken, SERVER, "airflow-remote-agent callback test")
