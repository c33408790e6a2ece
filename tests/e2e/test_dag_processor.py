"""End to end: DAG files parsed by a dag-processor agent, never seen by the orchestrator, which runs no
dag processor of its own; tasks run on a worker agent with the same bundle."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from dev.stack import Agent, DagProcessorAgent, create_agent_token, local_bundles, wait_until
from tests.conftest import make_orchestrator

pytestmark = pytest.mark.e2e

EXECUTOR = "airflow_remote_exec.executor.RemoteExecutor"
BUNDLE = "agent-dags"
GIT_BUNDLE = "agent-git"
HELLO = """
import datetime
from airflow.sdk import DAG, Variable
from airflow.providers.standard.operators.bash import BashOperator

with DAG("{dag_id}", schedule=None, start_date=datetime.datetime(2024, 1, 1),
         description=Variable.get("greeting", default="no variable"), tags=["agent-parsed"]):
    BashOperator(task_id="hello", bash_command="echo hello from $(hostname)")
"""

CALLBACK = """
import datetime, os
from pathlib import Path
from airflow.sdk import DAG
from airflow.providers.standard.operators.empty import EmptyOperator

def mark(context):
    Path(__file__).with_suffix(".done").write_text(os.environ["AIRFLOW_HOME"])

with DAG("agent_callback", schedule=None, start_date=datetime.datetime(2024, 1, 1), on_success_callback=mark):
    EmptyOperator(task_id="nothing")
"""


VERSIONED = """
import datetime
from airflow.sdk import DAG
from airflow.providers.standard.operators.bash import BashOperator

VERSION = {version}
with DAG("agent_versioned", schedule=None, start_date=datetime.datetime(2024, 1, 1)):
    wait = BashOperator(task_id="wait", bash_command="while [ ! -f {go} ]; do sleep 1; done")
    write = BashOperator(task_id="write", bash_command=f"echo {{VERSION}} > {marker}")
    wait >> write
"""


def _git(repo: Path, *args: str) -> str:
    command = ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout.strip()


def _commit(repo: Path, name: str, text: str) -> str:
    (repo / name).write_text(text)
    _git(repo, "add", name)
    _git(repo, "commit", "-q", "-m", f"change {name}")
    return _git(repo, "rev-parse", "HEAD")


def _bundles(local: Path, repo: Path) -> str:
    git = {
        "name": GIT_BUNDLE,
        "classpath": "airflow.providers.git.bundles.git.GitDagBundle",
        "kwargs": {"repo_url": f"file://{repo}", "tracking_ref": "main", "refresh_interval": 2},
    }
    return json.dumps([*json.loads(local_bundles(**{BUNDLE: local})), git])


@pytest.fixture(scope="module")
def stack(postgres, tmp_path_factory):
    """An orchestrator without dag processor or DAGs, a dag-processor agent and a worker agent sharing
    one LocalDagBundle folder (the same checkout on two machines)."""
    home = tmp_path_factory.mktemp("dag-processor-stack")
    bundle = home / "bundle"
    bundle.mkdir()
    repo = home / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _commit(repo, "README", "DAGs of the git bundle\n")
    empty = home / "orchestrator-dags"
    empty.mkdir()
    db_url = postgres.create_database(f"airflow_{uuid.uuid4().hex[:12]}")
    orch = make_orchestrator(
        home / "orchestrator", db_url, EXECUTOR, empty, components=("api-server", "scheduler")
    )
    started = []
    try:
        token = create_agent_token(orch, "parsing", ["default"], components=["dag-processor", "worker"])
        bundles = {"AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": _bundles(bundle, repo)}
        # A variable only the agent's own secrets backend (its environment) knows.
        agent_only = {"AIRFLOW_VAR_AGENT_ONLY": "from the agent's own secrets"}
        processor = DagProcessorAgent(
            orch.api_url, home / "dp", token, "dp-1", _bundles(bundle, repo), agent_only
        )
        processor.start()
        started.append(processor)
        worker = Agent(orch.api_url, home / "worker", bundle, token, "worker-1", ["default"], 2, bundles)
        worker.start()
        started.append(worker)
        yield orch, bundle, processor, token, home, repo
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
    orch, bundle, processor, *_ = stack
    with orch.client() as client:
        client.request("POST", "/variables", json={"key": "greeting", "value": "hi from the orchestrator"})
    (bundle / "hello.py").write_text(HELLO.format(dag_id="agent_hello"))
    (bundle / "local_secret.py").write_text(
        HELLO.format(dag_id="agent_local_secret").replace(
            'Variable.get("greeting"', 'Variable.get("agent_only"'
        )
    )
    written = time.monotonic()
    wait_until(lambda: _dag(orch, "agent_hello"), 90, what="the agent's DAG in the REST API")
    print(f"\nDAG file written -> in the REST API: {time.monotonic() - written:.1f} s")
    dag = _dag(orch, "agent_hello")
    assert dag["bundle_name"] == BUNDLE and dag["description"] == "hi from the orchestrator"
    wait_until(lambda: _dag(orch, "agent_local_secret"), 60, what="agent_local_secret in the REST API")
    assert _dag(orch, "agent_local_secret")["description"] == "from the agent's own secrets"
    with orch.client() as client:
        source = client.get("/dagSources/agent_hello")["content"]
        assert 'BashOperator(task_id="hello"' in source
        run_id = client.trigger("agent_hello")
        assert client.wait_for_run("agent_hello", run_id, timeout=180) == "success", orch.logs()


def test_a_broken_file_shows_its_import_error_and_a_deleted_dag_is_deactivated(stack):
    orch, bundle, *_ = stack
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
    orch, bundle, *_ = stack
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
    orch, bundle, _, _, home, _ = stack
    workers_only = create_agent_token(orch, "workers-only", ["default"])
    agent = DagProcessorAgent(
        orch.api_url, home / "dp-refused", workers_only, "dp-x", local_bundles(other=bundle)
    )
    with pytest.raises(RuntimeError, match="exited early"):
        agent.start(timeout=60)
    assert agent.process.returncode == 1
    assert "may not run ['dag-processor']" in agent.log_tail(20)


def test_a_dag_callback_runs_on_the_agents_dag_processor(stack):
    orch, bundle, processor, *_ = stack
    (bundle / "callback.py").write_text(CALLBACK)
    wait_until(lambda: _dag(orch, "agent_callback"), 90, what="agent_callback in the REST API")
    with orch.client() as client:
        run_id = client.trigger("agent_callback")
        assert client.wait_for_run("agent_callback", run_id, timeout=180) == "success", orch.logs()
    marker = bundle / "callback.done"
    wait_until(marker.exists, 60, what="the callback's marker")
    assert marker.read_text() == str(processor.home)  # written by the dag-processor agent's process


def test_kill_9_of_one_of_two_dag_processors_loses_nothing(stack):
    orch, bundle, processor, token, home, _ = stack
    second = DagProcessorAgent(orch.api_url, home / "dp-2", token, "dp-2", local_bundles(**{BUNDLE: bundle}))
    second.start()
    try:
        (bundle / "before.py").write_text(HELLO.format(dag_id="agent_before"))
        wait_until(lambda: _dag(orch, "agent_before"), 90, what="agent_before in the REST API")
        processor.process.kill()  # SIGKILL to its whole process tree
        (bundle / "after.py").write_text(HELLO.format(dag_id="agent_after"))
        wait_until(lambda: _dag(orch, "agent_after"), 90, what="agent_after, parsed by the survivor")
        time.sleep(5)  # more parsing rounds of the survivor
        for dag_id in ("agent_before", "agent_after", "agent_hello"):
            assert _dag(orch, dag_id)["is_stale"] is False, dag_id
    finally:
        second.stop()
        processor.start()  # for the tests after this one


def _dag_versions(orch, dag_id: str) -> list[dict]:
    with orch.client() as client:
        return client.get(f"/dags/{dag_id}/dagVersions")["dag_versions"]


def test_a_run_keeps_its_git_version_after_a_newer_commit(stack):
    """Each commit is a bundle version; a run started on version 1 runs version 1's code on the worker
    agent even after version 2 is committed and parsed, and a new run gets version 2."""
    orch, _, _, _, home, repo = stack
    go, marker = home / "versioned.go", home / "versioned.out"
    first = _commit(repo, "versioned.py", VERSIONED.format(version=1, go=go, marker=marker))
    committed = time.monotonic()
    wait_until(lambda: _dag(orch, "agent_versioned"), 90, what="agent_versioned from the git bundle")
    print(f"\ngit commit -> DAG in the REST API: {time.monotonic() - committed:.1f} s")
    assert [v["bundle_version"] for v in _dag_versions(orch, "agent_versioned")] == [first]
    with orch.client() as client:
        old_run = client.trigger("agent_versioned")

        def waiting() -> bool:
            states = {ti["task_id"]: ti["state"] for ti in client.task_instances("agent_versioned", old_run)}
            return states.get("wait") == "running"

        wait_until(waiting, 120, what="the first run's wait task to run")
        second = _commit(repo, "versioned.py", VERSIONED.format(version=2, go=go, marker=marker))
        committed = time.monotonic()
        wait_until(lambda: len(_dag_versions(orch, "agent_versioned")) == 2, 90, what="version 2 parsed")
        print(f"git commit -> new DAG version in the REST API: {time.monotonic() - committed:.1f} s")
        assert _dag_versions(orch, "agent_versioned")[-1]["bundle_version"] == second
        go.write_text("go")
        assert client.wait_for_run("agent_versioned", old_run, timeout=120) == "success", orch.logs()
        assert marker.read_text().strip() == "1"
        new_run = client.trigger("agent_versioned")
        assert client.wait_for_run("agent_versioned", new_run, timeout=120) == "success", orch.logs()
        assert marker.read_text().strip() == "2"
