"""The stack harness itself works: stock LocalExecutor runs a small DAG end to end on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from dev.stack import queued_to_start_latencies

pytestmark = pytest.mark.e2e

DAGS = Path(__file__).parent / "dags"


def test_local_executor_runs_dag(orchestrator_factory):
    orch = orchestrator_factory("LocalExecutor", DAGS, {"AIRFLOW__CORE__PARALLELISM": "4"})
    with orch.client() as client:
        client.wait_for_dag("stack_smoke", timeout=90)
        run_id = client.trigger("stack_smoke")
        state = client.wait_for_run("stack_smoke", run_id, timeout=120)
        assert state == "success", orch.logs()

        tis = client.task_instances("stack_smoke", run_id)
        assert {t["task_id"]: t["state"] for t in tis} == {
            "extract": "success",
            "transform": "success",
            "load": "success",
        }
        assert all(t["hostname"] and t["try_number"] == 1 for t in tis), tis
        assert [t["try_number"] for t in client.task_tries("stack_smoke", run_id, "load")] == [1]

        xcom = client.get(f"/dags/stack_smoke/dagRuns/{run_id}/taskInstances/load/xcomEntries/return_value")
        assert xcom["value"] == 60

    latencies = queued_to_start_latencies(orch.db_url, "stack_smoke", run_id)
    assert len(latencies) == 3 and all(0 <= s < 60 for s in latencies), latencies

    # Stopping is idempotent with the fixture's teardown; check here that nothing is left running.
    orch.stop()
    assert not any(p.tree_pids() for p in orch.processes.values())
