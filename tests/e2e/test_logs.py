"""End to end: task logs written on an agent are served by the orchestrator's REST API while the task
runs, after it ends, and after the agent and its disk are gone, by every api-server; through an
api-server outage no line is lost. Two ways to keep them: shipped to the orchestrator
(``remote-exec://``), or the user's object storage (S3 on moto), written by the agent."""

from __future__ import annotations

import re
import shutil
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dev.services import Moto
from dev.stack import Agent, AirflowClient, Orchestrator, create_agent_token, remote_jobs, wait_until
from tests.conftest import make_orchestrator

pytestmark = pytest.mark.e2e

EXECUTOR = "airflow_remote_exec.executor.RemoteExecutor"
DAG_FILE = Path(__file__).parent / "dags" / "log_dags.py"
DAG_ID, TASK_ID = "log_markers", "print_markers"
MARKER = re.compile(r"log-marker (\d+) printed-at (\d+\.\d+)")
SHIPPED = {"AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS": "airflow_remote_exec.logging_config.LOGGING_CONFIG"}


def _markers(events: list[str]) -> list[int]:
    return [int(m.group(1)) for event in events for m in MARKER.finditer(event)]


class LogStack:
    def __init__(self, orch: Orchestrator, token: str, home: Path, agent_env: dict[str, str]):
        self.orch, self.token, self.home, self.agent_env = orch, token, home, agent_env
        self.dags = orch.dags_folder

    def agent(self, name: str) -> Agent:
        agent = Agent(
            self.orch.api_url,
            self.home / name,
            self.dags,
            self.token,
            name,
            ["logs"],
            extra_env=self.agent_env,
        )
        agent.start()
        return agent

    def second_api_server(self) -> AirflowClient:
        if not self.orch.processes.get("api-server-2") or not self.orch.processes["api-server-2"].alive:
            self.orch.start_process("api-server-2")
        return AirflowClient(self.orch.extra_api_urls["api-server-2"])


def _stack(postgres, root: Path, orchestrator_env: dict[str, str], agent_env: dict[str, str]) -> Iterator:
    dags = root / "dags"
    dags.mkdir()
    shutil.copy(DAG_FILE, dags / DAG_FILE.name)
    database = postgres.create_database(f"airflow_{uuid.uuid4().hex[:12]}")
    orch = make_orchestrator(root / "orchestrator", database, EXECUTOR, dags, extra_env=orchestrator_env)
    try:
        token = create_agent_token(orch, "logs", ["logs"])
        with orch.client() as client:
            client.wait_for_dag(DAG_ID, timeout=120)
        yield LogStack(orch, token, root, agent_env)
    finally:
        orch.stop()


@pytest.fixture(scope="module")
def shipped(postgres, tmp_path_factory):
    yield from _stack(postgres, tmp_path_factory.mktemp("shipped-logs"), SHIPPED, {})


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    service = Moto(tmp_path_factory.mktemp("moto-logs"))
    service.start()
    try:
        service.create_bucket("task-logs")
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def in_s3(postgres, moto, tmp_path_factory):
    env = moto.remote_logging_env("task-logs", "logs_s3")
    yield from _stack(postgres, tmp_path_factory.mktemp("s3-logs"), env, env)


def _watch_live(client: AirflowClient, run_id: str, until_marker: int, timeout: float = 120) -> list[float]:
    """Poll the log while the task runs, until ``until_marker`` is served; the delay of each marker from
    its print on the agent to its first sight here. Every sighting is while the task is running."""
    delays: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = client.task_log(DAG_ID, run_id, TASK_ID, missing_ok=True)  # none until the try is queued
        seen_at = time.time()
        state = client.task_instances(DAG_ID, run_id)[0]["state"]
        for event in events:
            for m in MARKER.finditer(event):
                delays.setdefault(int(m.group(1)), seen_at - float(m.group(2)))
        if delays:
            assert state == "running", f"markers were first served with the task {state}"
        if until_marker in delays:
            return [delays[n] for n in sorted(delays)]
        time.sleep(0.2)
    raise AssertionError(f"marker {until_marker} not served within {timeout}s; saw {sorted(delays)}")


def _wait_reported(stack: LogStack, run_id: str) -> None:
    """The agent reported the job finished: it has shipped the log's end before that."""
    wait_until(
        lambda: [j["state"] for j in remote_jobs(stack.orch.db_url, DAG_ID, run_id)] == ["success"],
        60,
        what="the job reported finished",
    )


def _assert_full_log(client: AirflowClient, run_id: str, count: int, source: str) -> None:
    """Every marker once, in order, and the log names where it came from."""
    events = client.task_log(DAG_ID, run_id, TASK_ID)
    assert _markers(events) == list(range(1, count + 1)), events
    assert any(event.startswith(source) for event in events), events


def _run_then_lose_the_agent(stack: LogStack, name: str, count: int, source: str) -> tuple[str, list[float]]:
    """Run the task, watch its log live, then SIGKILL its agent and delete the agent's logs: the full
    log is still served, from ``source``, by this api-server and by a second one."""
    agent = stack.agent(name)
    try:
        with stack.orch.client() as client:
            run_id = client.trigger(DAG_ID, conf={"count": count})
            delays = _watch_live(client, run_id, until_marker=3)
            assert client.wait_for_run(DAG_ID, run_id, timeout=180) == "success"
            _wait_reported(stack, run_id)
            agent.process.kill()  # SIGKILL, the whole tree
            shutil.rmtree(agent.home / "logs")
            _assert_full_log(client, run_id, count, source)
        with stack.second_api_server() as second:
            _assert_full_log(second, run_id, count, source)
    finally:
        agent.process.stop()
    return run_id, delays


def test_shipped_logs_are_served_live_then_after_the_agent_and_its_disk_are_gone(shipped):
    _, delays = _run_then_lose_the_agent(shipped, "shipper", count=12, source="remote-exec: agent shipper")
    print(
        f"print-to-served delay (shipped): median {statistics.median(delays):.2f}s, max {max(delays):.2f}s "
        f"over {len(delays)} markers"
    )
    assert delays and max(delays) < 10, delays


def test_an_api_server_outage_loses_no_line(shipped):
    agent = shipped.agent("outage")
    try:
        with shipped.orch.client() as client:
            run_id = client.trigger(DAG_ID, conf={"count": 25})
            _watch_live(client, run_id, until_marker=2)
            shipped.orch.kill("api-server")  # SIGKILL: the agent and the task's supervisor lose it at once
            time.sleep(2)  # and a cold start of about 15 s: shorter than the agent's 25 s self-fence
            shipped.orch.start_process("api-server")
            assert client.wait_for_run(DAG_ID, run_id, timeout=180) == "success"
            _wait_reported(shipped, run_id)
            _assert_full_log(client, run_id, 25, source="remote-exec: agent outage")
        assert "Cannot ship task logs" in agent.process.log_tail(400)  # the outage was seen, and ridden out
    finally:
        agent.process.stop()


def test_object_storage_logs_are_served_live_then_from_the_bucket(in_s3, moto):
    run_id, delays = _run_then_lose_the_agent(in_s3, "s3-writer", count=8, source="s3://task-logs/logs/")
    print(f"print-to-served delay (S3 mode): median {statistics.median(delays):.2f}s, max {max(delays):.2f}s")
    objects = moto.list_objects("task-logs")
    assert any(run_id in key and TASK_ID in key for key in objects), objects
