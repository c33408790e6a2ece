"""End to end: deferred tasks' triggers and asset watchers run on triggerer agents. The orchestrator
runs an api-server and a scheduler only (no triggerer, no dag processor); a dag-processor agent parses
the DAGs, a worker agent runs the tasks, triggerer agents run the triggers."""

from __future__ import annotations

import hashlib
import json
import signal
import time
import uuid
from pathlib import Path

import pytest

from dev.stack import (
    Agent,
    DagProcessorAgent,
    TriggererAgent,
    create_agent_token,
    local_bundles,
    query,
    wait_until,
)
from tests.conftest import make_orchestrator

pytestmark = pytest.mark.e2e

EXECUTOR = "airflow_remote_exec.executor.RemoteExecutor"
TRIGGERS_DIR = Path(__file__).parent / "triggers"
SECRET = "only-the-triggerer-agent-knows-" + uuid.uuid4().hex
DAGS = """
import datetime
from airflow.sdk import DAG, Asset, AssetWatcher
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.sensors.external_task import ExternalTaskSensor
from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor
from airflow.providers.standard.triggers.file import FileDeleteTrigger
from remote_triggers import DeferTo

START = datetime.datetime(2024, 1, 1)

with DAG("trig_secret", schedule=None, start_date=START):
    sensor = TimeDeltaSensor(task_id="sensor", delta=datetime.timedelta(seconds=3), deferrable=True)
    sensor >> DeferTo(task_id="secret", kind="secret", key="trigger_secret")

with DAG("trig_fail", schedule=None, start_date=START):
    DeferTo(task_id="fail", kind="fail", retries=0)

with DAG("trig_many", schedule=None, start_date=START, max_active_tasks=256):
    DeferTo.partial(task_id="wait", kind="sleep", seconds=20).expand(index=list(range({many})))

with DAG("trig_failover", schedule=None, start_date=START):
    DeferTo.partial(task_id="wait", kind="sleep", seconds=20).expand(index=list(range(5)))

with DAG("trig_upstream", schedule=None, start_date=START):
    EmptyOperator(task_id="done")

with DAG("trig_external", schedule=None, start_date=START):
    ExternalTaskSensor(task_id="wait_upstream", external_dag_id="trig_upstream", external_task_id="done",
                       deferrable=True, poke_interval=2, timeout=240)

watched = Asset("trig_watched", watchers=[
    AssetWatcher(name="file", trigger=FileDeleteTrigger(filepath="{watched}", poke_interval=1.0))
])
with DAG("trig_watcher", schedule=[watched], start_date=START):
    EmptyOperator(task_id="fired")
"""
MANY = 200


@pytest.fixture(scope="module")
def stack(postgres, tmp_path_factory):
    home = tmp_path_factory.mktemp("triggerer-stack")
    bundle = home / "bundle"
    bundle.mkdir()
    watched = home / "watched-file"
    (bundle / "trigger_dags.py").write_text(DAGS.format(many=MANY, watched=watched))
    empty = home / "orchestrator-dags"
    empty.mkdir()
    db_url = postgres.create_database(f"airflow_{uuid.uuid4().hex[:12]}")
    orch = make_orchestrator(
        home / "orchestrator", db_url, EXECUTOR, empty, components=("api-server", "scheduler")
    )
    started = []
    try:
        token = create_agent_token(
            orch, "triggers", ["default"], components=["dag-processor", "worker", "triggerer"]
        )
        bundles = local_bundles(triggers=bundle)
        common = {"PYTHONPATH": str(TRIGGERS_DIR), "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": bundles}
        processor = DagProcessorAgent(orch.api_url, home / "dp", token, "dp-1", bundles, common)
        processor.start()
        started.append(processor)
        worker = Agent(orch.api_url, home / "worker", bundle, token, "worker-1", ["default"], 16, common)
        worker.start()
        started.append(worker)
        # The secret lives in the triggerer agent's own secrets backend, nowhere else.
        variables = home / "triggerer-variables.json"
        variables.write_text(json.dumps({"trigger_secret": SECRET}))
        backend = {
            "AIRFLOW__WORKERS__SECRETS_BACKEND": "airflow.secrets.local_filesystem.LocalFilesystemBackend",
            "AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS": json.dumps({"variables_file_path": str(variables)}),
        }
        triggerer = TriggererAgent(
            orch.api_url, home / "trig-a", token, "trig-a", extra_env={**common, **backend}
        )
        triggerer.start()
        started.append(triggerer)
        with orch.client() as client:
            client.wait_for_dag("trig_secret", timeout=120)
        yield orch, home, token, worker, triggerer, common, backend, watched
    finally:
        for process in reversed(started):
            process.stop()
        orch.stop()


def _task_log(agent_home: Path, dag_id: str, task_id: str) -> str:
    logs = sorted((agent_home / "logs" / f"dag_id={dag_id}").rglob(f"task_id={task_id}/attempt=1.log"))
    return "".join(path.read_text(errors="replace") for path in logs)


def _tries(orch, dag_id: str, run_id: str) -> dict[str, tuple[str, int]]:
    with orch.client() as client:
        return {
            f"{ti['task_id']}[{ti['map_index']}]": (ti["state"], ti["try_number"])
            for ti in client.task_instances(dag_id, run_id)
        }


def test_a_deferrable_sensor_and_a_trigger_reading_an_agent_secret_complete(stack):
    orch, home, *_ = stack
    with orch.client() as client:
        run_id = client.trigger("trig_secret")
        assert client.wait_for_run("trig_secret", run_id, timeout=180) == "success", orch.logs()
        digest = client.get(
            f"/dags/trig_secret/dagRuns/{run_id}/taskInstances/secret/xcomEntries/return_value"
        )["value"]
    # Each task deferred once and resumed in the same try, as under LocalExecutor.
    assert _tries(orch, "trig_secret", run_id) == {"sensor[-1]": ("success", 1), "secret[-1]": ("success", 1)}
    assert hashlib.sha256(SECRET.encode()).hexdigest() in str(digest)
    # The trigger's own log lines are in Airflow's trigger log beside the task's log, on the triggerer.
    trigger_logs = list((home / "trig-a" / "logs").rglob("task_id=secret/attempt=1.log.trigger.*.log"))
    assert trigger_logs and "secret trigger marker" in trigger_logs[0].read_text()
    # The secret never reached the orchestrator: not its database, not its logs.
    assert not query(orch.db_url, "select key from variable")
    assert SECRET not in "".join(p.read_text(errors="replace") for p in orch.logs_dir.rglob("*.log"))


def test_a_trigger_that_raises_fails_its_task_with_the_error_in_the_log(stack):
    orch, _, _, worker, *_ = stack
    with orch.client() as client:
        run_id = client.trigger("trig_fail")
        assert client.wait_for_run("trig_fail", run_id, timeout=180) == "failed", orch.logs()
    assert _tries(orch, "trig_fail", run_id) == {"fail[-1]": ("failed", 1)}
    assert "trigger failed on purpose" in _task_log(worker.home, "trig_fail", "fail")


def test_a_deferrable_external_task_sensor_waits_on_the_triggerer_agent(stack):
    """Its trigger asks the orchestrator how the other DAG's task is doing, as a stock triggerer does."""
    orch, *_ = stack
    logical_date = "2025-06-01T00:00:00+00:00"
    with orch.client() as client:
        client.wait_for_dag("trig_upstream", timeout=60)
        waiting = client.request("POST", "/dags/trig_external/dagRuns", json={"logical_date": logical_date})[
            "dag_run_id"
        ]
        wait_until(
            lambda: (
                client.get(f"/dags/trig_external/dagRuns/{waiting}/taskInstances/wait_upstream")["state"]
                == "deferred"
            ),
            120,
            what="the sensor to defer",
        )
        upstream = client.request("POST", "/dags/trig_upstream/dagRuns", json={"logical_date": logical_date})[
            "dag_run_id"
        ]
        assert client.wait_for_run("trig_upstream", upstream, timeout=120) == "success"
        assert client.wait_for_run("trig_external", waiting, timeout=120) == "success", orch.logs()
    assert _tries(orch, "trig_external", waiting) == {"wait_upstream[-1]": ("success", 1)}


def test_an_asset_watcher_on_the_triggerer_agent_starts_a_dag_run(stack):
    orch, *_, watched = stack

    def watcher_assigned() -> bool:
        rows = query(
            orch.db_url, "select triggerer_id from trigger where classpath like '%FileDeleteTrigger'"
        )
        return bool(rows) and rows[0]["triggerer_id"] is not None

    wait_until(watcher_assigned, 120, what="the asset watcher's trigger on the triggerer agent")
    watched.write_text("go")

    def runs() -> list:
        with orch.client() as client:
            return client.get("/dags/trig_watcher/dagRuns")["dag_runs"]

    wait_until(runs, 90, what="a run of trig_watcher started by the watcher")
    assert not watched.exists()  # FileDeleteTrigger removed it where it ran
    with orch.client() as client:
        run_id = runs()[0]["dag_run_id"]
        assert client.wait_for_run("trig_watcher", run_id, timeout=120) == "success"
    time.sleep(3)
    assert len(runs()) == 1  # one event, one run


def test_200_deferred_tasks_on_one_triggerer_all_resume(stack):
    orch, *_ = stack
    with orch.client() as client:
        started = time.monotonic()
        run_id = client.trigger("trig_many")
        peak = 0

        def all_done() -> bool:
            nonlocal peak
            rows = query(orch.db_url, "select count(*) as n from task_instance where state = 'deferred'")
            peak = max(peak, rows[0]["n"])
            return client.dag_run("trig_many", run_id)["state"] in ("success", "failed")

        wait_until(all_done, 600, interval=1, what="all 200 deferred tasks to resume")
        print(
            f"\n{MANY} deferred tasks: run done in {time.monotonic() - started:.0f} s, peak deferred {peak}"
        )
        assert client.dag_run("trig_many", run_id)["state"] == "success"
    tries = _tries(orch, "trig_many", run_id)
    assert len(tries) == MANY and set(tries.values()) == {("success", 1)}
    resumed = query(
        orch.db_url,
        "select count(*) as n from xcom "
        "where dag_id = 'trig_many' and run_id = :run_id and key = 'return_value'",
        run_id=run_id,
    )
    assert resumed[0]["n"] == MANY


def test_a_token_without_the_triggerer_scope_is_refused_at_start(stack):
    orch, home, *_ = stack
    workers_only = create_agent_token(orch, "workers-only", ["default"])
    agent = TriggererAgent(orch.api_url, home / "trig-refused", workers_only, "trig-x")
    with pytest.raises(RuntimeError, match="exited early"):
        agent.start(timeout=60)
    assert "may not run ['triggerer']" in agent.log_tail()


def _triggerer_of(db_url: str, dag_id: str, run_id: str) -> set:
    rows = query(
        db_url,
        "select t.triggerer_id from task_instance ti join trigger t on t.id = ti.trigger_id "
        "where ti.dag_id = :dag_id and ti.run_id = :run_id and ti.state = 'deferred'",
        dag_id=dag_id,
        run_id=run_id,
    )
    return {row["triggerer_id"] for row in rows} if len(rows) == 5 else set()


def _job_of(db_url: str, agent_name: str) -> int | None:
    rows = query(db_url, "select triggerer_job_id from remote_agent where name = :name", name=agent_name)
    return rows[0]["triggerer_job_id"] if rows else None


def test_kill_9_of_a_triggerer_agent_moves_its_triggers_to_another(stack):
    orch, home, token, _, first, common, backend, _ = stack
    with orch.client() as client:
        run_id = client.trigger("trig_failover")
        job_a = _job_of(orch.db_url, first.name)
        wait_until(lambda: _triggerer_of(orch.db_url, "trig_failover", run_id) == {job_a}, 120,
                   what="the five triggers on the first triggerer")  # fmt: skip
        second = TriggererAgent(
            orch.api_url, home / "trig-b", token, "trig-b", extra_env={**common, **backend}
        )
        second.start()
        try:
            first.process.kill(signal.SIGKILL)
            killed = time.monotonic()
            wait_until(lambda: _job_of(orch.db_url, "trig-b") is not None, 30, what="trig-b's triggerer job")
            job_b = _job_of(orch.db_url, "trig-b")
            wait_until(lambda: _triggerer_of(orch.db_url, "trig_failover", run_id) == {job_b}, 120,
                       what="the triggers on the second triggerer")  # fmt: skip
            print(f"\ntriggerer agent killed -> its triggers on another: {time.monotonic() - killed:.1f} s")
            assert client.wait_for_run("trig_failover", run_id, timeout=180) == "success", orch.logs()
            assert set(_tries(orch, "trig_failover", run_id).values()) == {("success", 1)}
        finally:
            second.stop()
