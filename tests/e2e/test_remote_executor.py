"""End to end: real api-server, scheduler, dag-processor and agent processes on Postgres."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from airflow_remote_exec import compat
from dev.stack import (
    VENV_BIN,
    Agent,
    Orchestrator,
    SentinelAgent,
    create_agent_token,
    query,
    queued_to_start_latencies,
    wait_until,
)
from tests.api.conftest import AGENT_VERSIONS
from tests.conftest import make_orchestrator

pytestmark = pytest.mark.e2e

DAGS = Path(__file__).parent / "dags"
EXECUTOR = "airflow_remote_exec.executor.RemoteExecutor"
API_HEADERS = {"Remote-Exec-Api-Version": "1"}


@pytest.fixture(scope="module")
def stack(postgres, tmp_path_factory):
    """One orchestrator and two agents with different tokens: agent-a serves default, agent-b etl."""
    home = tmp_path_factory.mktemp("remote-stack")
    db_url = postgres.create_database(f"airflow_{uuid.uuid4().hex[:12]}")
    orch = make_orchestrator(
        home / "orchestrator", db_url, EXECUTOR, DAGS, {"AIRFLOW__CORE__PARALLELISM": "16"}
    )
    agents = {}
    try:
        tokens = {
            "a": create_agent_token(orch, "tok-a", ["default"]),
            "b": create_agent_token(orch, "tok-b", ["etl"]),
        }
        for name, queue in (("a", "default"), ("b", "etl")):
            agents[name] = Agent(
                orch.api_url, home / f"agent-{name}", DAGS, tokens[name], f"agent-{name}", [queue], 4
            )
            agents[name].start()
        yield orch, agents, tokens
    finally:
        for agent in agents.values():
            agent.stop()
        orch.stop()


def _jobs(orch: Orchestrator, dag_id: str) -> list[dict]:
    engine = sa.create_engine(orch.db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT * FROM remote_job WHERE dag_id = :d ORDER BY id"), {"d": dag_id}
            )
            return [dict(row._mapping) for row in rows]
    finally:
        engine.dispose()


def _run(orch: Orchestrator, dag_id: str, timeout: float = 240) -> tuple[str, str, list[dict]]:
    with orch.client() as client:
        client.wait_for_dag(dag_id)
        run_id = client.trigger(dag_id)
        state = client.wait_for_run(dag_id, run_id, timeout=timeout)
        return run_id, state, client.task_instances(dag_id, run_id)


def test_wide_dag_runs_across_two_queues_and_two_agents(stack):
    orch, agents, _ = stack
    run_id, state, tis = _run(orch, "remote_wide")
    assert state == "success", orch.logs()
    assert len(tis) == 12
    assert {ti["state"] for ti in tis} == {"success"}
    # The agent reports a job finished when Airflow's supervisor returns, a moment after the task did.
    wait_until(
        lambda: all(j["state"] == "success" for j in _jobs(orch, "remote_wide")), 30, what="job reports"
    )
    jobs = _jobs(orch, "remote_wide")
    assert {(j["state"], j["attempt"]) for j in jobs} == {("success", 1)}
    for job in jobs:
        expected = "agent-b" if job["task_id"].startswith(("double", "check")) else "agent-a"
        assert job["agent_name"] == expected, f"{job['task_id']} ran on {job['agent_name']}"
    latencies = [s * 1000 for s in queued_to_start_latencies(orch.db_url, "remote_wide", run_id)]
    median, worst = statistics.median(latencies), max(latencies)
    print(f"\nqueued->start over {len(latencies)} tasks: median {median:.0f} ms, max {worst:.0f} ms")
    # Dispatch is a wake-up, not a poll: far below edge3's 5 s poll even on a loaded 2-core machine.
    assert len(latencies) == 12 and median < 5000, latencies


def test_failing_task_ends_failed(stack):
    orch, _, _ = stack
    _, state, tis = _run(orch, "remote_fails")
    assert state == "failed"
    assert [(ti["task_id"], ti["state"]) for ti in tis] == [("boom", "failed")]
    # As under LocalExecutor, the job succeeded (its supervisor returned); the task instance failed.
    (job,) = _jobs(orch, "remote_fails")
    assert (job["state"], job["agent_name"], job["attempt"]) == ("success", "agent-a", 1)


def test_task_on_a_queue_no_agent_serves_stays_queued(stack):
    orch, _, _ = stack
    with orch.client() as client:
        client.wait_for_dag("remote_unserved")
        run_id = client.trigger("remote_unserved")
        wait_until(lambda: _jobs(orch, "remote_unserved"), 60, what="the job row")
        time.sleep(5)  # several claim rounds of both agents
        (ti,) = client.task_instances("remote_unserved", run_id)
    assert ti["state"] == "queued"
    (job,) = _jobs(orch, "remote_unserved")
    assert (job["state"], job["agent_name"], job["attempt"]) == ("queued", None, 0)


def _task_pids(agent: Agent) -> list[int]:
    """Task processes: children of the runner processes that are supervising a task."""
    pids = []
    for pid in agent.process.tree_pids():
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        if b"airflow-remote-agent task" in title:
            pids += [int(child) for child in children]
    return pids


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead orphan waits for the test process, a subreaper, to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_crashed_task_process_is_failed(stack):
    orch, agents, _ = stack
    with orch.client() as client:
        client.wait_for_dag("remote_sleeps")
        run_id = client.trigger("remote_sleeps")
        wait_until(lambda: _task_pids(agents["a"]), 60, what="the task process to start")
        # The agent's running report has reached the orchestrator before the task is killed. (Not the
        # task instance's external_executor_id: the scheduler drops a running event whose task
        # instance row is locked at that moment, as it is while the task starts.)
        wait_until(
            lambda: (
                [(j["state"], j["agent_name"]) for j in _jobs(orch, "remote_sleeps")]
                == [("running", "agent-a")]
            ),
            60,
            what="agent-a's running report",
        )
        for pid in _task_pids(agents["a"]):
            os.kill(pid, signal.SIGKILL)
        assert client.wait_for_run("remote_sleeps", run_id, timeout=120) == "failed"
        (ti,) = client.task_instances("remote_sleeps", run_id)
    assert ti["state"] == "failed"
    # The supervisor outlived its task and returned, so the job itself succeeded, with the exit code.
    wait_until(lambda: _jobs(orch, "remote_sleeps")[0]["state"] == "success", 30, what="the job's report")
    (job,) = _jobs(orch, "remote_sleeps")
    assert job["exit_code"] != 0, job


def test_task_instance_whose_running_event_was_dropped_is_told_its_agent_again(stack):
    """The scheduler drops a running event when the task instance row is locked at that moment.

    The state such a drop leaves (a running task instance naming no agent) is made here directly.
    """
    orch, agents, _ = stack
    with orch.client() as client:
        client.wait_for_dag("remote_sleeps")
        run_id = client.trigger("remote_sleeps")

        def external_executor_id():
            (ti,) = client.task_instances("remote_sleeps", run_id)
            return ti["state"], ti["external_executor_id"]

        wait_until(lambda: external_executor_id() == ("running", "agent-a"), 60, what="the first report")
        cleared = query(
            orch.db_url,
            "UPDATE task_instance SET external_executor_id = NULL"
            " WHERE dag_id = :d AND run_id = :r RETURNING id",
            d="remote_sleeps",
            r=run_id,
        )
        assert len(cleared) == 1
        assert external_executor_id() == ("running", None)
        wait_until(lambda: external_executor_id() == ("running", "agent-a"), 40, what="the report again")
        for pid in _task_pids(agents["a"]):
            os.kill(pid, signal.SIGKILL)
        assert client.wait_for_run("remote_sleeps", run_id, timeout=120) == "failed"


def test_sigterm_drains_the_running_task(stack, tmp_path):
    orch, _, _ = stack
    token = create_agent_token(orch, "tok-drain", ["drain"])
    agent = Agent(orch.api_url, tmp_path / "drainer", DAGS, token, "drainer", ["drain"], 2)
    agent.start()
    try:
        with orch.client() as client:
            client.wait_for_dag("remote_drain")
            run_id = client.trigger("remote_drain")
            wait_until(
                lambda: _jobs(orch, "remote_drain") and _jobs(orch, "remote_drain")[0]["state"] == "running",
                60,
                what="the task to run",
            )
            agent.process.terminate()  # SIGTERM
            wait_until(lambda: not agent.process.alive, 60, what="the agent to drain and exit")
            assert agent.process.returncode == 0, agent.log_tail()
            assert client.wait_for_run("remote_drain", run_id, timeout=60) == "success"
    finally:
        agent.stop()
    (job,) = _jobs(orch, "remote_drain")
    assert job["state"] == "success"
    agents = orch.airflow("remote-exec", "agents", "list", "-o", "json").stdout
    assert '"name": "drainer", "state": "gone"' in agents


def test_auth_failures_against_the_real_api_server(stack):
    orch, _, tokens = stack
    api = f"{orch.api_url}/remote/v1"
    register = {"name": "intruder", "queues": ["default"], "slots": 1, **AGENT_VERSIONS}

    def post(path, token=None, json=None):
        headers = {**API_HEADERS, **({"Authorization": f"Bearer {token}"} if token else {})}
        return httpx.post(f"{api}{path}", json=json, headers=headers, timeout=30)

    assert post("/agents", json=register).status_code == 401
    assert post("/agents", "rex_not-a-real-token", register).status_code == 401
    expiring = create_agent_token(orch, "tok-expiring", ["default"], expires="1s")
    time.sleep(1.5)
    assert post("/agents", expiring, register).status_code == 401
    assert post("/agents", tokens["a"], {**register, "queues": ["etl"]}).status_code == 403

    session_id = post("/agents", tokens["a"], register).json()["session_id"]
    if not _jobs(orch, "remote_fails"):  # run alone, this test makes its own job of agent-a's
        _run(orch, "remote_fails")
    (held_by_agent_a,) = _jobs(orch, "remote_fails")
    report = {"attempt": held_by_agent_a["attempt"], "state": "success"}
    reply = post(f"/agents/{session_id}/jobs/{held_by_agent_a['id']}/state", tokens["a"], report)
    assert reply.status_code == 403, reply.text
    assert post(f"/agents/{session_id}/heartbeat", tokens["b"], {"free_slots": 1}).status_code == 403


def test_a_token_can_neither_take_nor_probe_another_tokens_names_nor_claim_beyond_its_slots(stack, tmp_path):
    orch, _, tokens = stack
    api = f"{orch.api_url}/remote/v1"
    hostile = create_agent_token(orch, "tok-hostile", ["hostile"])

    def call(method, path, token, json=None):
        headers = {**API_HEADERS, "Authorization": f"Bearer {token}"}
        return httpx.request(method, f"{api}{path}", json=json, headers=headers, timeout=30)

    def register(token, name, slots=1, queue="hostile"):
        body = {"name": name, "queues": [queue], "slots": slots, **AGENT_VERSIONS}
        return call("POST", "/agents", token, body)

    # agent-a is alive; a deregistered agent of the same token is not: the answer is the same.
    taken = create_agent_token(orch, "tok-taken", ["hostile"])
    gone = register(taken, "was-here").json()["session_id"]
    assert call("DELETE", f"/agents/{gone}", taken).status_code == 204
    alive, dead = register(hostile, "agent-a"), register(hostile, "was-here")
    assert (alive.status_code, dead.status_code) == (403, 403), (alive.text, dead.text)
    assert alive.json()["detail"].replace("agent-a", "X") == dead.json()["detail"].replace("was-here", "X")
    assert "another token" in alive.json()["detail"]
    other = register(tokens["b"], "agent-a", queue="etl")  # within tok-b's scope: refused for the name
    assert other.status_code == 403 and "another token" in other.json()["detail"]

    session_id = register(hostile, "greedy", slots=1).json()["session_id"]
    with orch.client() as client:
        client.wait_for_dag("remote_hostile")
        run_id = client.trigger("remote_hostile")
        wait_until(lambda: len(_jobs(orch, "remote_hostile")) == 3, 90, what="three queued jobs")

        def claim():
            reply = call("POST", f"/agents/{session_id}/jobs/claim", hostile, {"free_slots": 3})
            assert reply.status_code == 200, reply.text
            return reply.json()["jobs"]

        assert len(claim()) == 1
        assert claim() == []  # it still holds one job in its only slot, whatever it says
        # Hand the job back by deregistering; a real agent of the token runs all three.
        assert call("DELETE", f"/agents/{session_id}", hostile).status_code == 204
        agent = Agent(orch.api_url, tmp_path / "honest", DAGS, hostile, "honest", ["hostile"], 1)
        try:
            agent.start()
            assert client.wait_for_run("remote_hostile", run_id, timeout=120) == "success"
        finally:
            agent.stop()
    assert {(j["state"], j["agent_name"]) for j in _jobs(orch, "remote_hostile")} == {("success", "honest")}


def test_task_processes_do_not_inherit_the_agent_token(stack, tmp_path):
    orch, _, _ = stack
    token = create_agent_token(orch, "tok-probe", ["probe"])
    assert token.startswith("rex_")
    env = {"AIRFLOW_REMOTE_AGENT_TOKEN": token}  # as a Kubernetes secret in the environment would be
    agent = Agent(orch.api_url, tmp_path / "prober", DAGS, token, "prober", ["probe"], 1, env)
    try:
        agent.start()
        run_id, state, _ = _run(orch, "remote_token_probe")
        assert state == "success"
        with orch.client() as client:
            path = f"/dags/remote_token_probe/dagRuns/{run_id}/taskInstances/look_for_the_token"
            seen = client.get(f"{path}/xcomEntries/return_value")["value"]
        assert seen == [], f"the task saw the agent token in {seen}"
    finally:
        agent.stop()


TASK_USER = "nobody"


def _python_for(user: str, workdir: Path) -> Path:
    """A Python that ``user`` can run, with this venv's packages.

    Airflow re-executes a ``run_as_user`` task as ``sudo -u USER <the agent's interpreter>``, and this
    venv's interpreter may live where that user cannot reach (under root's 0700 home, for one)."""
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    system_python = Path(f"/usr/bin/python{minor}")
    if not system_python.exists():
        pytest.skip(f"no {system_python} that user {user} could run")
    venv = workdir / "venv"
    subprocess.run([str(system_python), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    packages = sysconfig.get_paths()["purelib"]
    link = venv / "lib" / f"python{minor}" / "site-packages" / "agent_venv.pth"
    link.write_text(f"import site; site.addsitedir({packages!r})\n")
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import airflow.sdk, airflow_remote_exec"]
    check = subprocess.run(["sudo", "-u", user, *probe], capture_output=True, text=True, timeout=120)
    if check.returncode != 0:
        pytest.skip(f"user {user} cannot import this venv's packages from {packages}: {check.stderr[-300:]}")
    return python


def test_a_task_run_as_another_user_cannot_read_the_0400_token_file(stack):
    """The README's advice: the token file 0400 for the agent's user, tasks run as another user."""
    if os.geteuid() != 0 or shutil.which("sudo") is None:
        pytest.skip("running a task as another user needs root and sudo (./dev/test installs sudo as root)")
    orch, _, _ = stack
    shared = Path(tempfile.mkdtemp(prefix="airflow-remote-exec-run-as-"))
    shared.chmod(0o755)  # the task's user reads the interpreter, the DAG files and the agent's config here
    try:
        python = _python_for(TASK_USER, shared)
        dags = shared / "dags"
        shutil.copytree(DAGS, dags)
        token = create_agent_token(orch, "tok-probe-file", ["probe-file"])
        agent = Agent(
            orch.api_url, shared / "agent", dags, token, "file-prober", ["probe-file"], 1, python=python
        )
        agent.token_file.chmod(0o400)
        try:
            agent.start()
            with orch.client() as client:
                client.wait_for_dag("remote_token_file_probe")
                conf = {"token_file": str(agent.token_file)}
                run_id = client.trigger("remote_token_file_probe", conf=conf)
                state = client.wait_for_run("remote_token_file_probe", run_id, timeout=240)
                assert state == "success", agent.process.log_tail(40)
                path = f"/dags/remote_token_file_probe/dagRuns/{run_id}/taskInstances/read_the_token_file"
                seen = client.get(f"{path}/xcomEntries/return_value")["value"]
        finally:
            agent.stop()
        assert seen == {"uid": pwd.getpwnam(TASK_USER).pw_uid, "token_file": "denied"}
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_drain_timeout_terminates_the_task_and_reports_it_failed(stack, tmp_path):
    orch, _, _ = stack
    token = create_agent_token(orch, "tok-drain-timeout", ["drain-timeout"])
    env = {"AIRFLOW_REMOTE_AGENT_DRAIN_TIMEOUT": "3"}
    agent = Agent(orch.api_url, tmp_path / "impatient", DAGS, token, "impatient", ["drain-timeout"], 1, env)
    agent.start()
    try:
        with orch.client() as client:
            client.wait_for_dag("remote_drain_timeout")
            run_id = client.trigger("remote_drain_timeout")
            wait_until(lambda: _task_pids(agent), 90, what="the task process to start")
            task_pids = _task_pids(agent)
            agent.process.terminate()  # SIGTERM: drain for 3 s, then terminate the task
            wait_until(lambda: not agent.process.alive, 60, what="the agent to give up draining and exit")
            assert agent.process.returncode == 0, agent.log_tail()
            assert not [pid for pid in task_pids if _running(pid)], "the task survived its agent"
            assert client.wait_for_run("remote_drain_timeout", run_id, timeout=90) == "failed"
    finally:
        agent.stop()
    (job,) = _jobs(orch, "remote_drain_timeout")
    assert (job["state"], job["agent_name"], job["attempt"]) == ("failed", "impatient", 1)
    assert "drain timeout" in job["detail"]


def test_second_process_under_a_live_name_is_refused_and_the_first_keeps_its_task(stack, tmp_path):
    orch, _, _ = stack
    token = create_agent_token(orch, "tok-twin", ["twin"])
    first = Agent(orch.api_url, tmp_path / "twin-1", DAGS, token, "twin", ["twin"], 1)
    second = Agent(orch.api_url, tmp_path / "twin-2", DAGS, token, "twin", ["twin"], 1)
    first.start()
    try:
        with orch.client() as client:
            client.wait_for_dag("remote_twin")
            run_id = client.trigger("remote_twin")
            wait_until(lambda: _task_pids(first), 90, what="the task to start on the first agent")
            second.process.start()
            wait_until(lambda: "in use by a live agent" in second.log_tail(50), 60, what="the refusal")
            assert second.process.alive and not (second.healthz() or {}).get("healthy")
            assert client.wait_for_run("remote_twin", run_id, timeout=90) == "success"
    finally:
        second.stop()
        first.stop()
    (job,) = _jobs(orch, "remote_twin")
    assert (job["state"], job["agent_name"], job["attempt"]) == ("success", "twin", 1)


def test_fuzzing_the_agent_api_gets_no_server_error_and_no_answer_outside_its_schema(stack, tmp_path):
    """schemathesis against the real api-server's /remote/v1 OpenAPI, with a valid and a bogus token:
    every check but "a schema-valid request is accepted" (an unknown session is rightly refused)."""
    orch, _, _ = stack
    # A queue nothing is ever queued on; the dag-processor and triggerer routes and look-ups too.
    token = create_agent_token(
        orch, "tok-fuzz", ["fuzz"], components=["worker", "dag-processor", "triggerer"]
    )
    api = f"{orch.api_url}/remote/v1"
    for name, secret in (("valid", token), ("bogus", "rex_not-a-real-token")):
        command = [
            str(VENV_BIN / "schemathesis"), "run", f"{api}/openapi.json", "--url", api,
            "-H", f"Authorization: Bearer {secret}", "-H", "Remote-Exec-Api-Version: 1",
            "--checks", "all", "--exclude-checks", "positive_data_acceptance",
            "--max-examples", "40", "--seed", "20261127", "--request-timeout", "90",
            "--report-dir", str(tmp_path / name),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=400)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{name} token:\n{output[-6000:]}"
        generated = re.search(r"(\d+) generated", output)
        assert generated and int(generated.group(1)) >= 100, output[-2000:]


def _depth(orch: Orchestrator, token: str, queues: str) -> httpx.Response:
    """What KEDA's metrics-api scaler reads: a bearer token and nothing else."""
    return httpx.get(
        f"{orch.api_url}/remote/v1/queues/depth",
        params={"queues": queues},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def _counts(orch: Orchestrator, token: str, queues: str) -> tuple[int, int, int]:
    reply = _depth(orch, token, queues)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    return body["queued"], body["running"], body["depth"]


def _scrape(agent: Agent) -> list:
    """The samples of the agent's Prometheus /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    reply = httpx.get(f"http://127.0.0.1:{agent.health_port}/metrics", timeout=5)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain"), reply.text
    return [sample for family in text_string_to_metric_families(reply.text) for sample in family.samples]


def _metric(samples: list, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert found, f"no sample {name} {labels}"
    return sum(found)


def test_queue_depth_and_agent_metrics_count_what_waits_and_runs(stack):
    """Three 15 s tasks on ``etl``: queued while agent-b is drained, then running on it, then done. The
    depth endpoint and agent-b's /metrics say so at each step."""
    orch, agents, tokens = stack
    agent_b = agents["b"]
    claimed_before = _metric(_scrape(agent_b), "airflow_remote_agent_jobs_claimed_total")
    orch.airflow("remote-exec", "agents", "drain", "agent-b")
    try:
        with orch.client() as client:
            client.wait_for_dag("remote_depth")
            run_id = client.trigger("remote_depth")
            wait_until(lambda: _counts(orch, tokens["b"], "etl") == (3, 0, 3), 120, what="3 queued on etl")
            orch.airflow("remote-exec", "agents", "resume", "agent-b")
            wait_until(lambda: _counts(orch, tokens["b"], "etl") == (0, 3, 3), 60, what="3 running on etl")
            assert _depth(orch, tokens["b"], "etl").json()["slots"] == 3  # one pool slot each
            samples = _scrape(agent_b)
            labels = {"agent": "agent-b", "component": "worker"}
            assert _metric(samples, "airflow_remote_agent_slots", **labels) == 4
            assert _metric(samples, "airflow_remote_agent_running_jobs", **labels) == 3
            assert _metric(samples, "airflow_remote_agent_free_slots", **labels) == 1
            assert _metric(samples, "airflow_remote_agent_jobs_claimed_total") == claimed_before + 3
            assert _metric(samples, "airflow_remote_agent_claims_total") >= 1
            assert 0 <= _metric(samples, "airflow_remote_agent_heartbeat_age_seconds") <= 12  # 10 s beats
            claim_route = {"route": "/agents/{session}/jobs/claim", "method": "POST"}
            assert _metric(samples, "airflow_remote_agent_api_request_seconds_count", **claim_route) >= 1
            assert not [
                s for s in samples if "route" in s.labels and re.search(r"\d{3,}|-", s.labels["route"])
            ]
            # A queue outside the token's scope is not shown; two queues add up.
            assert _depth(orch, tokens["a"], "etl").status_code == 403
            assert _counts(orch, tokens["a"], "default") == (0, 0, 0)
            assert client.wait_for_run("remote_depth", run_id, timeout=120) == "success"
        wait_until(lambda: _counts(orch, tokens["b"], "etl") == (0, 0, 0), 60, what="etl to be empty")
        wait_until(
            lambda: _metric(_scrape(agent_b), "airflow_remote_agent_running_jobs") == 0,
            30,
            what="slots freed",
        )
        assert _metric(_scrape(agent_b), "airflow_remote_agent_free_slots") == 4
    finally:
        orch.airflow("remote-exec", "agents", "resume", "agent-b")


def test_a_sentinel_reports_its_components_health_to_agents_list(stack, tmp_path):
    orch, agents, _ = stack
    token = create_agent_token(orch, "tok-sentinel", ["default"], components=["sentinel"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    watch = {
        "worker-a": f"http://127.0.0.1:{agents['a'].health_port}/healthz",
        "worker-gone": f"http://127.0.0.1:{closed}/healthz",
    }
    sentinel = SentinelAgent(orch.api_url, tmp_path / "sentinel", token, "site-sentinel", watch)
    sentinel.start()
    try:

        def health() -> str:
            rows = json.loads(orch.airflow("remote-exec", "agents", "list", "-o", "json").stdout)
            return {row["name"]: row["health"] for row in rows}

        wait_until(lambda: health().get("site-sentinel", "").startswith("unhealthy"), 90, what="a report")
        shown = health()
        assert shown["site-sentinel"].startswith("unhealthy: worker-gone (unreachable: ConnectError"), shown
        assert "worker-a" not in shown["site-sentinel"] and shown["agent-a"] == ""
    finally:
        sentinel.stop()
    assert sentinel.process.returncode == 0, sentinel.log_tail()


def _other_minor_python() -> Path | None:
    """The interpreter of the venv ``./dev/test`` builds for the other supported Airflow minor (``.venv``
    for the newest, ``.venv-X.Y`` for the others), if it has been built."""
    other = compat.OLDEST_MINOR if compat.AIRFLOW_MINOR == compat.NEWEST_MINOR else compat.NEWEST_MINOR
    venv = ".venv" if other == compat.NEWEST_MINOR else f".venv-{compat.minor_text(other)}"
    python = Path(__file__).resolve().parents[2] / venv / "bin" / "python"
    return python if python.exists() else None


def test_an_agent_on_the_other_airflow_minor_is_refused_at_registration(stack, tmp_path):
    """The README's compatibility table: an agent one minor older or newer than the orchestrator is
    refused with one line naming both versions, and exits 1 rather than claim work it cannot run."""
    python = _other_minor_python()
    if python is None:
        pytest.skip("the other Airflow minor's venv is not built (./dev/test --airflow X.Y builds it)")
    probe = "import importlib.metadata as m; print(m.version('apache-airflow-core'))"
    agent_airflow = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    agent_airflow = agent_airflow.stdout.strip()
    assert agent_airflow.split(".")[:2] != compat.AIRFLOW_VERSION.split(".")[:2]
    orch, _, _ = stack
    token = create_agent_token(orch, "tok-other-minor", ["other-minor"])
    agent = Agent(
        orch.api_url, tmp_path / "other", DAGS, token, "other-minor", ["other-minor"], 1, python=python
    )
    agent.process.start()
    try:
        wait_until(lambda: agent.process.returncode is not None, 120, what="the agent to exit")
    finally:
        agent.stop()
    refusals = [line for line in agent.log_tail(40).splitlines() if "Registration refused" in line]
    assert agent.process.returncode == 1 and len(refusals) == 1, agent.log_tail(40)
    assert (
        f"Agent runs Airflow {agent_airflow} but the orchestrator runs {compat.AIRFLOW_VERSION}"
        in refusals[0]
    )
    assert query(orch.db_url, "SELECT name FROM remote_agent WHERE name = 'other-minor'") == []
