"""Chaos suite: real api-server, scheduler, dag-processor, two agents and Postgres, broken on purpose.

Every scenario asserts the final task states and that no task instance had two overlapping
executions (see ``dags/chaos_dags.py`` for the markers each execution writes).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from dev.stack import Agent, Orchestrator, create_agent_token, wait_until
from tests.conftest import make_orchestrator

pytestmark = pytest.mark.e2e

DAGS = Path(__file__).parent / "dags"
EXECUTOR = "airflow_remote_exec.executor.RemoteExecutor"
HEARTBEAT = 2
MISSED = 3
FENCE = 5
ORCHESTRATOR_ENV = {
    "AIRFLOW__CORE__PARALLELISM": "32",
    "AIRFLOW__REMOTE_EXEC__HEARTBEAT_INTERVAL": str(HEARTBEAT),
    "AIRFLOW__REMOTE_EXEC__LOST_AFTER_MISSED_HEARTBEATS": str(MISSED),
    "AIRFLOW__REMOTE_EXEC__REROUTE_FENCE_SECONDS": str(FENCE),
    "AIRFLOW__REMOTE_EXEC__CLAIM_WAIT_SECONDS": "5",
}


class Chaos:
    """The stack under test plus helpers to read its state."""

    def __init__(self, orch: Orchestrator, home: Path, markers: Path, token: str):
        self.orch, self.home, self.markers, self.token = orch, home, markers, token
        self.agents: dict[str, Agent] = {}
        self.engine = sa.create_engine(orch.db_url, poolclass=sa.NullPool)

    def start_agent(self, name: str) -> Agent:
        env = {
            "CHAOS_MARKER_DIR": str(self.markers),
            "CHAOS_AGENT": name,
            # The Task SDK supervisor heartbeats every 2 s, inside the reroute fence.
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "2",
        }
        agent = Agent(
            self.orch.api_url, self.home / name, DAGS, self.token, name, ["chaos"], 4, extra_env=env
        )
        agent.start()
        self.agents[name] = agent
        return agent

    def query(self, sql: str, **params) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text(sql), params)]

    def jobs(self, dag_id: str, run_id: str) -> list[dict]:
        return self.query(
            "SELECT * FROM remote_job WHERE dag_id=:d AND run_id=:r ORDER BY id", d=dag_id, r=run_id
        )

    def trigger(self, dag_id: str) -> str:
        with self.orch.client() as client:
            client.wait_for_dag(dag_id)
            return client.trigger(dag_id)

    def finish(self, dag_id: str, run_id: str, timeout: float = 240) -> list[dict]:
        with self.orch.client() as client:
            state = client.wait_for_run(dag_id, run_id, timeout=timeout)
            tis = client.task_instances(dag_id, run_id)
        assert state == "success", f"{dag_id} ended {state}: {[(t['task_id'], t['state']) for t in tis]}"
        assert {ti["state"] for ti in tis} == {"success"}
        return tis

    def executions(self, dag_id: str, run_id: str) -> dict[str, list[dict]]:
        """Executions per task instance, from the marker files."""
        prefix = f"{dag_id}__{run_id}__".replace(":", "_").replace("+", "_")
        found: dict[str, list[dict]] = defaultdict(list)
        for path in self.markers.glob(prefix + "*"):
            task_id, map_index, try_number, _pid = path.name[len(prefix) :].split("__")
            lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
            times = [float(parts[1]) for parts in lines]
            found[f"{task_id}[{map_index}]"].append(
                {
                    "try": int(try_number),
                    "agent": lines[0][3],
                    "start": times[0],
                    "last": times[-1],
                    "ended": lines[-1][0] == "end",
                }
            )
        return found

    def assert_no_doubled_execution(self, dag_id: str, run_id: str, tasks: int) -> dict[str, list[dict]]:
        found = self.executions(dag_id, run_id)
        assert len(found) == tasks, f"expected {tasks} task instances with markers, got {sorted(found)}"
        for ti, runs in found.items():
            assert sum(r["ended"] for r in runs) == 1, (
                f"{ti} finished its work {sum(r['ended'] for r in runs)}x"
            )
            ordered = sorted(runs, key=lambda r: r["start"])
            for before, after in zip(ordered, ordered[1:], strict=False):
                assert before["last"] < after["start"], f"{ti} ran twice at once: {before} overlaps {after}"
        return found


@pytest.fixture(scope="module")
def chaos(postgres, tmp_path_factory):
    home = tmp_path_factory.mktemp("chaos")
    markers = home / "markers"
    markers.mkdir()
    db_url = postgres.create_database(f"airflow_{uuid.uuid4().hex[:12]}")
    orch = make_orchestrator(home / "orchestrator", db_url, EXECUTOR, DAGS, ORCHESTRATOR_ENV)
    stack = Chaos(orch, home, markers, create_agent_token(orch, "chaos", ["chaos"]))
    try:
        stack.start_agent("agent-1")
        stack.start_agent("agent-2")
        yield stack
    finally:
        for agent in stack.agents.values():
            agent.stop()
        orch.stop()
        stack.engine.dispose()


def _wait_running_on_one_agent(chaos: Chaos, dag_id: str, run_id: str) -> dict:
    def running() -> bool:
        jobs = chaos.jobs(dag_id, run_id)
        return bool(jobs) and jobs[-1]["state"] == "running"

    wait_until(running, 90, what=f"{dag_id} to run on an agent")
    time.sleep(1)  # into the task's work
    return chaos.jobs(dag_id, run_id)[-1]


def _ti_start_dates(chaos: Chaos, dag_id: str, run_id: str) -> list[datetime]:
    rows = chaos.query(
        "SELECT start_date FROM task_instance WHERE dag_id=:d AND run_id=:r "
        "UNION ALL SELECT start_date FROM task_instance_history WHERE dag_id=:d AND run_id=:r",
        d=dag_id,
        r=run_id,
    )
    return sorted(r["start_date"] for r in rows if r["start_date"])


def test_kill_9_agent_mid_task_retries_on_the_other_agent(chaos):
    run_id = chaos.trigger("chaos_long")
    job = _wait_running_on_one_agent(chaos, "chaos_long", run_id)
    victim, survivor = job["agent_name"], ({"agent-1", "agent-2"} - {job["agent_name"]}).pop()
    killed_at = datetime.now(timezone.utc)
    chaos.agents[victim].process.kill(signal.SIGKILL)  # the whole tree, as when a pod dies

    tis = chaos.finish("chaos_long", run_id)
    restarted_at = _ti_start_dates(chaos, "chaos_long", run_id)[-1]
    seconds = (restarted_at - killed_at).total_seconds()
    print(
        f"\nkill -9 of {victim} -> task running again on {survivor}: {seconds:.1f} s "
        f"(target {MISSED * HEARTBEAT + 10} s = 3 heartbeat intervals + 10 s)"
    )
    assert tis[0]["try_number"] >= 2
    runs = chaos.assert_no_doubled_execution("chaos_long", run_id, tasks=1)
    assert [r["agent"] for r in runs["long_task[-1]"] if r["ended"]] == [survivor]
    jobs = chaos.jobs("chaos_long", run_id)
    assert "lost" in jobs[0]["detail"]
    assert seconds <= MISSED * HEARTBEAT + 10 + FENCE, f"rerouting took {seconds:.1f} s"
    chaos.start_agent(victim)


def test_sigstop_agent_past_lost_threshold_then_sigcont(chaos):
    run_id = chaos.trigger("chaos_long")
    job = _wait_running_on_one_agent(chaos, "chaos_long", run_id)
    frozen = chaos.agents[job["agent_name"]]
    os.kill(frozen.process.pid, signal.SIGSTOP)  # the agent's control loop hangs; its task runs on
    try:
        wait_until(
            lambda: chaos.jobs("chaos_long", run_id)[0]["state"] == "failed",
            MISSED * HEARTBEAT + 30,
            what="the frozen agent to be declared lost and its job rerouted",
        )
        chaos.finish("chaos_long", run_id)
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)
    chaos.assert_no_doubled_execution("chaos_long", run_id, tasks=1)
    # Back from the dead: its session is over, it registers anew and its stale reports are refused.
    wait_until(lambda: (frozen.healthz() or {}).get("healthy"), 60, what="the agent to re-register")
    history = chaos.orch.airflow("remote-exec", "agents", "history", frozen.name, "-o", "json").stdout
    assert '"state": "lost"' in history and history.rindex('"registered"') > history.index('"lost"')
    assert "session" in frozen.log_tail(200) and "over" in frozen.log_tail(200)
    first = chaos.jobs("chaos_long", run_id)[0]
    assert (first["state"], first["agent_name"]) == ("failed", frozen.name)


def _kill_and_restart_component(chaos: Chaos, component: str, downtime: float) -> None:
    run_id = chaos.trigger("chaos_many")
    wait_until(
        lambda: sum(j["state"] == "running" for j in chaos.jobs("chaos_many", run_id)) >= 4,
        90,
        what="tasks to be running",
    )
    chaos.orch.kill(component, signal.SIGKILL)
    time.sleep(downtime)
    chaos.orch.start_process(component)
    chaos.finish("chaos_many", run_id, timeout=300)
    chaos.assert_no_doubled_execution("chaos_many", run_id, tasks=20)


def test_kill_9_api_server_and_restart_while_20_tasks_run(chaos):
    _kill_and_restart_component(chaos, "api-server", downtime=5)


def test_kill_9_scheduler_and_restart_adopts_jobs(chaos):
    _kill_and_restart_component(chaos, "scheduler", downtime=3)


def test_restart_postgres_while_tasks_run(chaos, postgres):
    run_id = chaos.trigger("chaos_many")
    wait_until(
        lambda: sum(j["state"] == "running" for j in chaos.jobs("chaos_many", run_id)) >= 4,
        90,
        what="tasks to be running",
    )
    postgres.restart()

    # Airflow's own processes may exit on a lost DB connection, some seconds later; like a process
    # supervisor (Kubernetes), restart whichever died until the run is over.
    def finished_restarting_the_dead() -> bool:
        for name, process in chaos.orch.processes.items():
            if not process.alive:
                chaos.orch.start_process(name)
        try:
            with chaos.orch.client() as client:
                return client.dag_run("chaos_many", run_id)["state"] in ("success", "failed")
        except httpx.HTTPError:  # the api-server is still reconnecting to the database
            return False

    wait_until(finished_restarting_the_dead, 300, interval=2, what="chaos_many to finish after the restart")
    chaos.finish("chaos_many", run_id, timeout=30)
    chaos.assert_no_doubled_execution("chaos_many", run_id, tasks=20)


def test_revoked_token_gets_401_and_stops_claiming(chaos):
    token = create_agent_token(chaos.orch, "chaos-revoked", ["chaos"])
    agent = Agent(chaos.orch.api_url, chaos.home / "revoked", DAGS, token, "revoked", ["chaos"], 1)
    agent.start()
    try:
        chaos.orch.airflow("remote-exec", "tokens", "revoke", "chaos-revoked")
        wait_until(lambda: not agent.process.alive, 60, what="the agent to stop")
        assert agent.process.returncode == 1
        assert "401" in agent.log_tail(50) and "token rejected" in agent.log_tail(50)
        assert not chaos.query("SELECT id FROM remote_job WHERE agent_name = 'revoked'")
    finally:
        agent.stop()
