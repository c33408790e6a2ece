"""The demo's database: SQLite, with the api-server, the scheduler and the dag-processor writing to it
while two agents race for the same jobs. Every task must run once, claimed once."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from dev.stack import Agent, create_agent_token, remote_jobs, wait_until
from tests.conftest import make_orchestrator

pytestmark = pytest.mark.e2e

DAG_FILE = Path(__file__).parent / "dags" / "deployment_dags.py"
EXECUTOR = "airflow_remote_exec.executor.RemoteExecutor"
AGENTS = ("lite-1", "lite-2")
RUNS = 2


def test_two_agents_racing_on_sqlite_claim_each_job_once(tmp_path):
    dags = tmp_path / "dags"
    dags.mkdir()
    shutil.copy(DAG_FILE, dags / DAG_FILE.name)
    db_url = f"sqlite:///{tmp_path / 'airflow.db'}"
    orch = make_orchestrator(tmp_path / "orchestrator", db_url, EXECUTOR, dags, {"DEPLOYMENT_RUNNER": "?"})
    agents = []
    try:
        token = create_agent_token(orch, "lite", ["default"])
        for name in AGENTS:
            env = {"DEPLOYMENT_RUNNER": name}
            agents.append(Agent(orch.api_url, tmp_path / name, dags, token, name, ["default"], 4, env))
            agents[-1].start(timeout=90)
        with orch.client() as client:
            client.wait_for_dag("deploy_many")
            run_ids = [client.trigger("deploy_many", {"seconds": 1}) for _ in range(RUNS)]
            for run_id in run_ids:
                assert client.wait_for_run("deploy_many", run_id, timeout=240) == "success"
                tis = client.task_instances("deploy_many", run_id)
                assert [(ti["state"], ti["try_number"]) for ti in tis] == [("success", 1)] * 12

        def synced() -> bool:  # an agent's report may land after the task instance's own state
            jobs = remote_jobs(db_url, "deploy_many")
            return all(j["state"] == "success" and not j["pending_sync"] for j in jobs)

        with contextlib.suppress(TimeoutError):  # the assertions below then show what is left
            wait_until(synced, 60, what="every agent's report to arrive and be synced")
        jobs = remote_jobs(db_url, "deploy_many")
        assert len(jobs) == 12 * RUNS
        assert {(j["state"], j["attempt"]) for j in jobs} == {("success", 1)}, jobs
        per_agent = {name: sum(j["agent_name"] == name for j in jobs) for name in AGENTS}
        print(f"\njobs per agent: {per_agent}")
        assert sum(per_agent.values()) == 12 * RUNS and min(per_agent.values()) > 0, per_agent
    finally:
        try:
            for agent in agents:
                agent.stop()
        finally:
            orch.stop()
