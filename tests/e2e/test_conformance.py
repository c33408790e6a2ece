"""Conformance: under RemoteExecutor, DAGs behave as they do under Airflow's stock LocalExecutor.

One set of DAGs (dags/conformance_dags.py) runs on two stacks that differ only in where work runs:
stock LocalExecutor with a stock triggerer, and RemoteExecutor with one worker agent (queue
``default``, 4 slots, default settings) and one triggerer agent, the orchestrator running no triggerer
(on Airflow 3.2, where the agent triggerer refuses to start, Airflow's own triggerer instead).
Each scenario runs on both stacks at once; the test checks what LocalExecutor did, then asserts the
user sees the same thing under RemoteExecutor: the same final task states, the same try numbers (task
instance and its list of tries) and comparable timings (Remote may be slower only within a generous
margin).  Scenarios: clearing a running task, retries (plain and
mapped), a deferrable sensor, a reschedule-mode sensor, a deadline alert's SyncCallback, and a task
that needs more pool slots than one.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from airflow_remote_exec import compat
from dev.services import BasicAuthServer
from dev.stack import Agent, AirflowClient, Orchestrator, TriggererAgent, create_agent_token, wait_until
from tests.conftest import make_orchestrator
from tests.e2e.dags import conformance_dags as dags
from tests.versions import needs_connection_tests

pytestmark = pytest.mark.e2e

DAG_FILE = Path(dags.__file__)
LOCAL_EXECUTOR = "LocalExecutor"
REMOTE_EXECUTOR = "airflow_remote_exec.executor.RemoteExecutor"
SHIPPED_LOGS = "airflow_remote_exec.logging_config.LOGGING_CONFIG"
LOCAL_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
REMOTE_COMPONENTS = ("api-server", "scheduler", "dag-processor")
AGENT_NAME = "agent-1"
AGENT_SLOTS = 4
# Remote may be slower than Local by this much, never more (a loaded 2-core machine: keep it generous).
SLACK_SECONDS = 15.0
RUN_TIMEOUT = 180.0


# ------------------------------------------------------------------------------------------- stacks


@dataclass
class Stack:
    name: str
    orch: Orchestrator
    markers: Path
    agent: Agent | None = None
    triggerer: TriggererAgent | None = None

    def client(self) -> AirflowClient:
        return self.orch.client()

    @property
    def scheduler(self):
        return self.orch.processes["scheduler"]


@contextlib.contextmanager
def _running_stack(name, executor, postgres, home: Path, dags_folder: Path) -> Iterator[Stack]:
    """Orchestrator (with a triggerer for LocalExecutor) and, for RemoteExecutor, a worker agent and a
    triggerer agent; all stopped on exit."""
    markers = home / "markers"
    markers.mkdir(parents=True)
    env = {
        "CONFORMANCE_MARKER_DIR": str(markers),
        "CONFORMANCE_RUNNER": "orchestrator",
        "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",  # the UI's "Test" button
    }
    db_url = postgres.create_database(f"airflow_{uuid.uuid4().hex[:12]}")
    remote = executor == REMOTE_EXECUTOR
    agent_triggerer = remote and compat.AIRFLOW_MINOR >= compat.AGENT_COMPONENTS_MINOR
    components = REMOTE_COMPONENTS if agent_triggerer else LOCAL_COMPONENTS
    # Task logs: LocalExecutor's are files on the orchestrator; RemoteExecutor's, what its agent shipped.
    orch_env = {**env, "AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS": SHIPPED_LOGS} if remote else env
    orch = make_orchestrator(home / "orchestrator", db_url, executor, dags_folder, orch_env, components)
    agent = triggerer = None
    try:
        if remote:
            token = create_agent_token(orch, "conformance", ["default"], components=["worker", "triggerer"])
            agent_env = {**env, "CONFORMANCE_RUNNER": AGENT_NAME}
            # Like LocalExecutor's workers, it tests whatever details a connection test carries.
            agent = Agent(orch.api_url, home / AGENT_NAME, dags_folder, token, AGENT_NAME,
                          ["default"], AGENT_SLOTS, extra_env=agent_env,
                          args=["--connection-tests", "any"])  # fmt: skip
            agent.start()
            if agent_triggerer:
                triggerer = TriggererAgent(orch.api_url, home / "triggerer", token, "triggerer-1")
                triggerer.start()
        yield Stack(name, orch, markers, agent, triggerer)
    finally:
        try:
            for process in (triggerer, agent):
                if process is not None:
                    process.stop()
        finally:
            orch.stop()


@pytest.fixture(scope="module")
def dags_folder(tmp_path_factory) -> Path:
    """The one DAG file both stacks (and the agent) run, alone in its folder."""
    folder = tmp_path_factory.mktemp("conformance-dags")
    shutil.copy(DAG_FILE, folder / DAG_FILE.name)
    return folder


@pytest.fixture(scope="module")
def local(postgres, tmp_path_factory, dags_folder) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("conformance-local")
    with _running_stack("local", LOCAL_EXECUTOR, postgres, home, dags_folder) as stack:
        yield stack


@pytest.fixture(scope="module")
def remote(postgres, tmp_path_factory, dags_folder) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("conformance-remote")
    with _running_stack("remote", REMOTE_EXECUTOR, postgres, home, dags_folder) as stack:
        yield stack


def _remote(request: pytest.FixtureRequest) -> Stack:
    return request.getfixturevalue("remote")


def _side_by_side(
    local: Stack, request: pytest.FixtureRequest, scenario: Callable[[Stack], dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one scenario on both stacks at once (the runs mostly wait on Airflow's own delays, so this
    halves the wall time); return (Local's result, Remote's result), raising Local's error first."""
    remote = _remote(request)  # started (the first time) before either scenario runs
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="conformance") as pool:
        on_local = pool.submit(scenario, local)
        on_remote = pool.submit(scenario, remote)
        return on_local.result(), on_remote.result()


# ------------------------------------------------------------------------------------------ helpers


def _check_alive(stack: Stack) -> None:
    """Fail at once, with the log, if the scheduler (or the agent) died: no point waiting further."""
    procs = [stack.scheduler] + [a.process for a in (stack.agent, stack.triggerer) if a is not None]
    for proc in procs:
        if not proc.alive:
            raise AssertionError(
                f"{stack.name}: {proc.name} died (exit code {proc.returncode}):\n{proc.log_tail(40)}"
            )


def _wait(stack: Stack, predicate: Callable[[], Any], timeout: float, what: str) -> None:
    """``wait_until`` that aborts as soon as the stack's scheduler or agent dies."""

    def check() -> Any:
        _check_alive(stack)
        return predicate()

    wait_until(check, timeout, interval=0.5, what=f"{stack.name}: {what}")


def _trigger(stack: Stack, dag_id: str) -> str:
    with stack.client() as client:
        client.wait_for_dag(dag_id)
        return client.trigger(dag_id)


def _ti(stack: Stack, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
    with stack.client() as client:
        return client.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")


def _wait_for_run(stack: Stack, dag_id: str, run_id: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """Poll until the run is success or failed; the run document (fails naming the task states)."""
    with stack.client() as client:
        try:
            _wait(
                stack,
                lambda: client.dag_run(dag_id, run_id)["state"] in ("success", "failed"),
                timeout,
                f"run {dag_id}/{run_id} to finish",
            )
        except TimeoutError as e:
            tis = client.task_instances(dag_id, run_id)
            states = {(t["task_id"], t["map_index"]): t["state"] for t in tis}
            raise AssertionError(f"{e}; task states: {states}") from e
        return client.dag_run(dag_id, run_id)


def _outcome(stack: Stack, dag_id: str, run_id: str) -> dict[tuple[str, int], dict[str, Any]]:
    """Per task instance: final state, try number, every try's (try number, state) and the milestones
    of each try's log as the REST API serves it (once the agent reported its jobs: Airflow's supervisor
    sets a task's state a moment before the agent ships the log's last lines)."""
    if stack.agent is not None:
        _wait(stack, lambda: not _unreported_jobs(stack, dag_id, run_id), 60, "the agent to report its jobs")
    with stack.client() as client:
        outcome = {}
        for ti in client.task_instances(dag_id, run_id):
            key = (ti["task_id"], ti["map_index"])
            tries = client.task_tries(dag_id, run_id, *key)
            outcome[key] = {
                "state": ti["state"],
                "try_number": ti["try_number"],
                "tries": [(t["try_number"], t["state"]) for t in tries],
                "logs": [_log_milestones(client, dag_id, run_id, *key, t["try_number"]) for t in tries],
            }
        return outcome


def _unreported_jobs(stack: Stack, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    return _db_rows(
        stack,
        "SELECT id FROM remote_job WHERE dag_id = :d AND run_id = :r "
        "AND state IN ('queued', 'claimed', 'running')",
        d=dag_id,
        r=run_id,
    )


# What a try's log says happened to it: the same lines must be there whichever executor ran it.
LOG_MILESTONES = re.compile(
    r"Pausing task as DEFERRED|Rescheduling task|Task failed with exception|Done\. Returned value"
)


def _log_milestones(client: AirflowClient, dag_id, run_id, task_id, map_index, try_number) -> list[str]:
    if try_number < 1:
        return []
    events = client.task_log(dag_id, run_id, task_id, try_number, map_index)
    return [m.group(0) for event in events for m in LOG_MILESTONES.finditer(event)]


def _markers(stack: Stack, dag_id: str, run_id: str, event: str) -> list[dict[str, Any]]:
    path = stack.markers / dags.marker_name(dag_id, run_id, event)
    try:
        return [json.loads(line) for line in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


def _watch_states(stack: Stack, dag_id: str, run_id: str, task_id: str) -> tuple[dict, list[str]]:
    """Run to the end while recording each distinct state ``task_id`` passes through (polled)."""
    seen: list[str] = []
    with stack.client() as client:

        def finished() -> bool:
            state = client.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")["state"]
            if not seen or seen[-1] != state:
                seen.append(state)
            return client.dag_run(dag_id, run_id)["state"] in ("success", "failed")

        _wait(stack, finished, RUN_TIMEOUT, f"run {dag_id}/{run_id} to finish")
    return _wait_for_run(stack, dag_id, run_id), seen


def _abandon_unfinished(stack: Stack, dag_id: str, run_id: str) -> None:
    """Cleanup: mark a run that is still going failed, so it holds nothing for later tests."""
    with contextlib.suppress(Exception), stack.client() as client:
        if client.dag_run(dag_id, run_id)["state"] not in ("success", "failed"):
            client.request("PATCH", f"/dags/{dag_id}/dagRuns/{run_id}", json={"state": "failed"})


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _run_seconds(run: dict[str, Any]) -> float:
    """From the run's trigger to its end, what a user waits for (``queued_at`` is reset by a clear)."""
    return _seconds(run["run_after"], run["end_date"])


def _show(stack: Stack, result: dict[str, Any]) -> None:
    """Print a scenario's timings (visible with ``pytest -s``)."""
    timings = {"run": _run_seconds(result["run"])} if result["run"].get("end_date") else {}
    timings.update({k: v for k, v in result.items() if k.endswith("_seconds")})
    dag_id = result["run"]["dag_id"]
    print(f"\n{stack.name:6} {dag_id}: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    for key, ti in result.get("outcome", {}).items():
        print(f"{stack.name:6}   {key} log milestones per try: {ti['logs']}")


def _assert_same(local_value: Any, remote_value: Any, what: str) -> None:
    assert remote_value == local_value, f"{what} differs:\n  local:  {local_value}\n  remote: {remote_value}"


def _assert_not_slower(local_seconds: float, remote_seconds: float, what: str) -> None:
    print(f"\n{what}: local {local_seconds:.1f}s, remote {remote_seconds:.1f}s")
    assert remote_seconds <= local_seconds + SLACK_SECONDS, (
        f"{what}: remote took {remote_seconds:.1f}s, local {local_seconds:.1f}s"
        f" (allowed +{SLACK_SECONDS:.0f}s)"
    )


def _db_rows(stack: Stack, query: str, **params: Any) -> list[dict[str, Any]]:
    engine = sa.create_engine(stack.orch.db_url, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            return [dict(row._mapping) for row in conn.execute(sa.text(query), params)]
    finally:
        engine.dispose()


# -------------------------------------------------------------------- 1. clearing a running task


def _clear_running_task(stack: Stack) -> dict[str, Any]:
    dag_id, task_id = "conformance_clear_running", "sleeper"
    run_id = _trigger(stack, dag_id)
    try:
        _wait(stack, lambda: _markers(stack, dag_id, run_id, "started"), 120, "the task to start")
        _wait(stack, lambda: _ti(stack, dag_id, run_id, task_id)["state"] == "running", 60, "state running")
        cleared_at = time.time()
        with stack.client() as client:
            body = {"dry_run": False, "task_ids": [task_id], "only_failed": False, "dag_run_id": run_id}
            client.request("POST", f"/dags/{dag_id}/clearTaskInstances", json=body)
        seen: list[str] = []

        def restarted() -> bool:
            state = _ti(stack, dag_id, run_id, task_id)["state"]
            if not seen or seen[-1] != state:
                seen.append(state)
            if state == "up_for_retry":
                raise AssertionError(
                    f"{stack.name}: clearing the running task spent its retry: it went {seen} "
                    f"(retry_delay 5 min) instead of restarting at once"
                )
            return len(_markers(stack, dag_id, run_id, "started")) >= 2

        _wait(stack, restarted, 90, "the cleared task to run again")
        starts = _markers(stack, dag_id, run_id, "started")
        run = _wait_for_run(stack, dag_id, run_id)
        return {
            "run": run,
            "outcome": _outcome(stack, dag_id, run_id),
            "states_after_clear": seen,
            "start_tries": [m["try_number"] for m in starts],
            "restart_seconds": starts[1]["time"] - cleared_at,
        }
    finally:
        _abandon_unfinished(stack, dag_id, run_id)


def test_clear_running_task_restarts_without_spending_a_retry(local, request):
    expected, actual = _side_by_side(local, request, _clear_running_task)
    _show(local, expected)
    assert expected["run"]["state"] == "success", expected
    assert expected["states_after_clear"][0] == "restarting", expected
    assert expected["start_tries"] == [1, 2], expected
    (sleeper,) = expected["outcome"].values()
    assert (sleeper["state"], sleeper["try_number"]) == ("success", 2), expected
    assert expected["restart_seconds"] < 60, expected

    remote = _remote(request)
    _show(remote, actual)
    assert actual["run"]["state"] == "success", actual
    _assert_same(expected["start_tries"], actual["start_tries"], "tries that started")
    _assert_same(expected["outcome"], actual["outcome"], "task states and tries")
    _assert_not_slower(expected["restart_seconds"], actual["restart_seconds"], "clear -> running again")
    _assert_not_slower(_run_seconds(expected["run"]), _run_seconds(actual["run"]), "cleared run duration")


# ----------------------------------------------------------------------------------- 2. retries


def _run_retry_dag(stack: Stack) -> dict[str, Any]:
    dag_id = "conformance_retry"
    run_id = _trigger(stack, dag_id)
    try:
        run = _wait_for_run(stack, dag_id, run_id)
        return {"run": run, "outcome": _outcome(stack, dag_id, run_id)}
    finally:
        _abandon_unfinished(stack, dag_id, run_id)


def test_failed_try_is_retried_with_the_same_states_and_tries(local, request):
    expected, actual = _side_by_side(local, request, _run_retry_dag)
    _show(local, expected)
    assert expected["run"]["state"] == "success", expected
    tries = {key: (ti["state"], ti["try_number"]) for key, ti in expected["outcome"].items()}
    assert tries == {
        ("flaky", -1): ("success", 2),
        ("flaky_mapped", 0): ("success", 1),
        ("flaky_mapped", 1): ("success", 2),
        ("flaky_mapped", 2): ("success", 1),
    }, expected
    assert [s for _, s in expected["outcome"][("flaky", -1)]["tries"]] == ["failed", "success"], expected
    assert expected["outcome"][("flaky", -1)]["logs"] == [
        ["Task failed with exception"],
        ["Done. Returned value"],
    ]

    remote = _remote(request)
    _show(remote, actual)
    assert actual["run"]["state"] == "success", actual
    _assert_same(expected["outcome"], actual["outcome"], "task states, map indexes and tries")
    _assert_not_slower(_run_seconds(expected["run"]), _run_seconds(actual["run"]), "retry run duration")


# ---------------------------------------------------------------------------------- 3. deferral


def _run_deferral_dag(stack: Stack) -> dict[str, Any]:
    dag_id = "conformance_deferral"
    run_id = _trigger(stack, dag_id)
    try:
        run, seen = _watch_states(stack, dag_id, run_id, "wait")
        fires_at = run["data_interval_end"] or run["run_after"]  # the sensor's base time, plus its delta
        resumed_at = _ti(stack, dag_id, run_id, "wait")["end_date"]
        fired_to_resumed = _seconds(fires_at, resumed_at) - dags.DEFERRAL_SECONDS
        return {
            "run": run,
            "outcome": _outcome(stack, dag_id, run_id),
            "sensor_states": seen,
            "fired_to_resumed_seconds": fired_to_resumed,
        }
    finally:
        _abandon_unfinished(stack, dag_id, run_id)


def test_deferred_sensor_resumes_in_the_same_try(local, request):
    expected, actual = _side_by_side(local, request, _run_deferral_dag)
    _show(local, expected)
    assert expected["run"]["state"] == "success", expected
    assert "deferred" in expected["sensor_states"], expected
    assert {(ti["state"], ti["try_number"]) for ti in expected["outcome"].values()} == {("success", 1)}
    assert expected["outcome"][("wait", -1)]["tries"] == [(1, "success")], expected
    assert expected["outcome"][("wait", -1)]["logs"] == [["Pausing task as DEFERRED"]], expected

    remote = _remote(request)
    _show(remote, actual)
    assert actual["run"]["state"] == "success", actual
    assert "deferred" in actual["sensor_states"], actual
    _assert_same(expected["outcome"], actual["outcome"], "task states and tries")
    _assert_not_slower(_run_seconds(expected["run"]), _run_seconds(actual["run"]), "deferral run duration")


# -------------------------------------------------------------------------------- 4. reschedule


def _run_reschedule_dag(stack: Stack) -> dict[str, Any]:
    dag_id = "conformance_reschedule"
    run_id = _trigger(stack, dag_id)
    try:
        run, seen = _watch_states(stack, dag_id, run_id, "poke_three_times")
        pokes = _markers(stack, dag_id, run_id, "poke")
        return {
            "run": run,
            "outcome": _outcome(stack, dag_id, run_id),
            "sensor_states": seen,
            "poke_tries": [p["try_number"] for p in pokes],
        }
    finally:
        _abandon_unfinished(stack, dag_id, run_id)


def test_rescheduled_sensor_pokes_three_times_in_one_try(local, request):
    expected, actual = _side_by_side(local, request, _run_reschedule_dag)
    _show(local, expected)
    assert expected["run"]["state"] == "success", expected
    assert "up_for_reschedule" in expected["sensor_states"], expected
    assert expected["poke_tries"] == [1] * dags.POKES_TO_SUCCEED, expected
    (sensor,) = expected["outcome"].values()
    assert (sensor["state"], sensor["try_number"]) == ("success", 1), expected
    # One try, three pokes: its log holds both reschedules (a shipped log is one stream per poke).
    assert sensor["logs"] == [["Rescheduling task"] * (dags.POKES_TO_SUCCEED - 1)], expected

    remote = _remote(request)
    _show(remote, actual)
    assert actual["run"]["state"] == "success", actual
    assert "up_for_reschedule" in actual["sensor_states"], actual
    _assert_same(expected["poke_tries"], actual["poke_tries"], "pokes (by try number)")
    _assert_same(expected["outcome"], actual["outcome"], "task states and tries")
    _assert_not_slower(_run_seconds(expected["run"]), _run_seconds(actual["run"]), "reschedule run duration")


# ----------------------------------------------------------------------------- 5. deadline alert

_DEADLINE_QUERY = """
SELECT c.id AS callback_id, c.state AS callback_state, d.deadline_time, d.missed
FROM deadline d JOIN callback c ON c.id = d.callback_id JOIN dag_run r ON r.id = d.dagrun_id
WHERE r.dag_id = :dag_id AND r.run_id = :run_id
"""


def _revive_scheduler(stack: Stack, dag_id: str, run_id: str) -> None:
    """Cleanup after a scheduler crash: settle this run's deadline (so it cannot crash it again), restart."""
    if stack.scheduler.alive:
        return
    runs = "SELECT id FROM dag_run WHERE dag_id = :dag_id AND run_id = :run_id"
    _db_rows(stack, f"UPDATE deadline SET missed = true WHERE dagrun_id IN ({runs}) RETURNING id",
             dag_id=dag_id, run_id=run_id)  # fmt: skip
    _db_rows(stack, "UPDATE callback SET state = 'failed' WHERE id IN "
             f"(SELECT callback_id FROM deadline WHERE dagrun_id IN ({runs})) RETURNING id",
             dag_id=dag_id, run_id=run_id)  # fmt: skip
    stack.orch.start_process("scheduler")

    def healthy() -> bool:
        doc = stack.orch.health() or {}
        return stack.scheduler.alive and (doc.get("scheduler") or {}).get("status") == "healthy"

    wait_until(healthy, 120, interval=1, what=f"{stack.name}: restarted scheduler to be healthy")


def _run_deadline_dag(stack: Stack) -> dict[str, Any]:
    dag_id = "conformance_deadline"
    run_id = _trigger(stack, dag_id)
    try:

        def callback_done() -> bool:
            rows = _db_rows(stack, _DEADLINE_QUERY, dag_id=dag_id, run_id=run_id)
            return bool(rows) and rows[0]["callback_state"] in ("success", "failed")

        _wait(stack, lambda: _markers(stack, dag_id, run_id, "deadline_missed"), 120, "the deadline callback")
        _wait(stack, callback_done, 60, "the callback's state to be final")
        run = _wait_for_run(stack, dag_id, run_id)
        time.sleep(3)  # a crash right after the callback would show now
        _check_alive(stack)
        (deadline,) = _db_rows(stack, _DEADLINE_QUERY, dag_id=dag_id, run_id=run_id)
        (marker,) = _markers(stack, dag_id, run_id, "deadline_missed")
        return {
            "run": run,
            "outcome": _outcome(stack, dag_id, run_id),
            "deadline": deadline,
            "marker": marker,
            "callback_seconds": marker["time"] - deadline["deadline_time"].timestamp(),
        }
    finally:
        _abandon_unfinished(stack, dag_id, run_id)
        _revive_scheduler(stack, dag_id, run_id)


@pytest.mark.skipif(
    compat.AIRFLOW_MINOR < (3, 3),
    reason="Airflow 3.2's executors import a deadline callback by module path, which a DAG file's callback "
    "has not: stock LocalExecutor never runs it either",
)
def test_missed_deadline_runs_its_callback_on_the_executor(local, request):
    expected, actual = _side_by_side(local, request, _run_deadline_dag)
    _show(local, expected)
    assert expected["run"]["state"] == "success", expected
    assert expected["deadline"]["missed"] is True, expected
    assert expected["deadline"]["callback_state"] == "success", expected
    assert expected["marker"]["alert"] == "too slow", expected
    assert expected["marker"]["runner"] == "orchestrator", expected  # LocalExecutor's own workers
    assert 0 <= expected["callback_seconds"] < 60, expected

    remote = _remote(request)
    _show(remote, actual)
    assert actual["run"]["state"] == "success", actual
    assert actual["deadline"]["callback_state"] == "success", actual
    assert actual["marker"]["alert"] == "too slow", actual
    assert actual["marker"]["runner"] == AGENT_NAME, f"the callback did not run on the agent: {actual}"
    _assert_same(expected["outcome"], actual["outcome"], "task states and tries")
    _assert_not_slower(expected["callback_seconds"], actual["callback_seconds"], "deadline -> callback ran")


# ------------------------------------------------------------------------- 6. wide pool slots


def _run_wide_dag(stack: Stack) -> dict[str, Any]:
    dag_id = "conformance_wide_pool_slots"
    run_id = _trigger(stack, dag_id)
    try:
        run = _wait_for_run(stack, dag_id, run_id, timeout=120)
        return {"run": run, "outcome": _outcome(stack, dag_id, run_id)}
    finally:
        _abandon_unfinished(stack, dag_id, run_id)


@pytest.mark.xfail(
    compat.AIRFLOW_MINOR < (3, 3),
    reason="open defect on Airflow 3.2: the wide task waits about 17 s for a claim (a claim's full wait) "
    "where LocalExecutor starts it at once",
    strict=False,
)
def test_task_wider_than_one_slot_runs(local, request):
    assert dags.WIDE_POOL_SLOTS > AGENT_SLOTS
    expected, actual = _side_by_side(local, request, _run_wide_dag)
    _show(local, expected)
    assert expected["run"]["state"] == "success", expected
    assert expected["outcome"][("wide", -1)]["try_number"] == 1, expected

    remote = _remote(request)
    _show(remote, actual)
    assert actual["run"]["state"] == "success", actual
    _assert_same(expected["outcome"], actual["outcome"], "task states and tries")
    _assert_not_slower(_run_seconds(expected["run"]), _run_seconds(actual["run"]), "wide task run duration")


# ------------------------------------------------------------------------- 7. connection tests


def _run_connection_tests(stack: Stack) -> dict[str, Any]:
    """The UI's "Test" button on an HTTP connection, with the right password and with a wrong one."""
    with BasicAuthServer("probe", "right") as target, stack.client() as client:
        connection = {
            "connection_id": f"conformance_http_{stack.name}",
            "conn_type": "http",
            "host": "127.0.0.1",
            "port": target.port,
            "schema": "http",
            "login": "probe",
        }
        # The first request to the Execution API's connection-test routes can be slow (a cold
        # api-server): Airflow's client then retries the one-time fetch and gets a 409. Warm it up.
        client.test_connection({**connection, "password": "warm-up"})
        started = time.monotonic()
        right = client.test_connection({**connection, "password": "right"})
        took = time.monotonic() - started
        wrong = client.test_connection({**connection, "password": "wrong"})
    return {
        "states": (right["state"], wrong["state"]),
        "wrong_message": wrong["result_message"],
        "authorized": target.authorized,
        "test_seconds": took,
    }


@needs_connection_tests
def test_connection_tests_give_the_same_results(local, request):
    expected, actual = _side_by_side(local, request, _run_connection_tests)
    assert expected["states"] == ("success", "failed"), expected
    assert expected["authorized"] == 1, expected  # the right password once; the warm-up's was wrong
    _assert_same(expected["states"], actual["states"], "connection test states")
    assert actual["authorized"] == 1, actual
    assert "401" in actual["wrong_message"] and "401" in expected["wrong_message"], (expected, actual)
    _assert_not_slower(expected["test_seconds"], actual["test_seconds"], "connection test request to result")
