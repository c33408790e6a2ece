"""End to end: DAG files parsed by a dag-processor agent, never seen by the orchestrator, which runs no
dag processor of its own; tasks run on a worker agent with the same bundle."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from dev.stack import Agent, DagProcessorAgent, create_agent_token, local_bundles, wait_until
from tests.conftest import make_orchestrator

pytestmark = pytest.mark.e2e

EXECUTOR = "airflow_remote_exec.executor.RemoteExecutor"
BUNDLE = "agent-dags"
HELLO = """
import datetime
from airflow.sdk import DAG, Variable
from airflow.providers.standard.operators.bash import BashOperator

with DAG("{dag_id}", schedule=None, start_date=datetime.datetime(2024, 1, 1),
         description=Variable.get("greeting", default="no variable"), tags=["agent-parsed"]):
    BashOperator(task_id="hello", bash_command="echo hello from $(hostname)")
"""


@pytest.fixture(scope="module")
def stack(postgres, tmp_path_factory):
    """An orchestrator without dag processor or DAGs, a dag-processor agent and a worker agent sharing
    one LocalDagBundle folder (the same checkout on two machines)."""
    home = tmp_path_factory.mktemp("dag-processor-stack")
    bundle = home / "bundle"
    bundle.mkdir()
    empty = home / "orchestrator-dags"
    empty.mkdir()
    db_url = postgres.create_database(f"airflow_{uuid.uuid4().hex[:12]}")
    orch = make_orchestrator(
        home / "orchestrator", db_url, EXECUTOR, empty, components=("api-server", "scheduler")
    )
    started = []
    try:
        token = create_agent_token(orch, "parsing", ["default"], components=["dag-processor", "worker"])
        bundles = {"AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": local_bundles(**{BUNDLE: bundle})}
        processor = DagProcessorAgent(
            orch.api_url, home / "dp", token, "dp-1", local_bundles(**{BUNDLE: bundle})
        )
        processor.start()
        started.append(processor)
        worker = Agent(orch.api_url, home / "worker", bundle, token, "worker-1", ["default"], 2, bundles)
        worker.start()
        started.append(worker)
        yield orch, bundle, processor, token, home
    finally:
        for process in started:
            process.stop()
        orch.stop()


def _dag(orch, dag_id: str) -> dict | None:
    with orch.client() as client:
        try:
            return client.get(f"/dags/{dag_id}")
        except httpx.HTTPStatusError as err:
            if err.response.status_code == 404:
                return None
            raise


def test_a_dag_file_on_the_agent_appears_and_runs_on_a_worker_agent(stack):
    orch, bundle, processor, _, _ = stack
    with orch.client() as client:
        client.request("POST", "/variables", json={"key": "greeting", "value": "hi from the orchestrator"})
    (bundle / "hello.py").write_text(HELLO.format(dag_id="agent_hello"))
    written = time.monotonic()
    wait_until(lambda: _dag(orch, "agent_hello"), 90, what="the agent's DAG in the REST API")
    print(f"\nDAG file written -> in the REST API: {time.monotonic() - written:.1f} s")
    dag = _dag(orch, "agent_hello")
    assert dag["bundle_name"] == BUNDLE and dag["description"] == "hi from the orchestrator"
    with orch.client() as client:
        source = client.get("/dagSources/agent_hello")["content"]
        assert 'BashOperator(task_id="hello"' in source
        run_id = client.trigger("agent_hello")
        assert client.wait_for_run("agent_hello", run_id, timeout=180) == "success", orch.logs()


def test_a_broken_file_shows_its_import_error_and_a_deleted_dag_is_deactivated(stack):
    orch, bundle, _, _, _ = stack
    (bundle / "gone.py").write_text(HELLO.format(dag_id="agent_gone"))
    (bundle / "broken.py").write_text(
        "from airflow.sdk import DAG\nraise RuntimeError('broken on purpose')\n"
    )
    wait_until(lambda: _dag(orch, "agent_gone"), 90, what="agent_gone in the REST API")

    def import_error() -> list:
        with orch.client() as client:
            errors = client.get("/importErrors")["import_errors"]
        return [e for e in errors if e["filename"] == "broken.py" and "broken on purpose" in e["stack_trace"]]

    wait_until(import_error, 60, what="the import error of broken.py")
    assert import_error()[0]["bundle_name"] == BUNDLE

    (bundle / "gone.py").unlink()
    wait_until(
        lambda: (_dag(orch, "agent_gone") or {}).get("is_stale") is True, 60, what="agent_gone deactivated"
    )


def test_a_dag_that_would_run_code_on_the_orchestrator_becomes_an_import_error(stack):
    orch, bundle, _, _, _ = stack
    (bundle / "pinned.py").write_text(
        HELLO.format(dag_id="agent_pinned").replace(
            'bash_command="echo', 'executor="LocalExecutor", bash_command="echo'
        )
    )

    def refused() -> list:
        with orch.client() as client:
            errors = client.get("/importErrors")["import_errors"]
        return [e for e in errors if e["filename"] == "pinned.py"]

    wait_until(refused, 90, what="the refusal of pinned.py as an import error")
    assert "LocalExecutor" in refused()[0]["stack_trace"]
    assert _dag(orch, "agent_pinned") is None


def test_a_token_without_the_dag_processor_scope_is_refused_at_start(stack):
    orch, bundle, _, _, home = stack
    workers_only = create_agent_token(orch, "workers-only", ["default"])
    agent = DagProcessorAgent(
        orch.api_url, home / "dp-refused", workers_only, "dp-x", local_bundles(other=bundle)
    )
    with pytest.raises(RuntimeError, match="exited early"):
        agent.start(timeout=60)
    assert agent.process.returncode == 1
    assert "may not run ['dag-processor']" in agent.log_tail(20)
