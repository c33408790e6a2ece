"""Deployments beyond one scheduler and one executor, with real processes on Postgres.

One stack: an api-server, two schedulers (Airflow HA: both run all the time), a dag-processor and
two agents on queue ``default``, with ``executor = LocalExecutor,...RemoteExecutor`` (LocalExecutor
the default, as when RemoteExecutor is added beside an existing executor). The agent API's settings
are the defaults users get. It proves that the two schedulers queue and sync their own jobs at
once, that a surviving scheduler adopts a killed one's running jobs, that a dead agent is declared
lost once, that an agent restarted under its name gets a clean session, that tasks pinned to
either executor run there, that a token expiring or revoked while its agent works stops the agent,
and that Postgres LISTEN/NOTIFY (not the safety re-check) wakes waiting claims.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from airflow_remote_exec.api.wakeup import SAFETY_RECHECK_SECONDS
from dev.stack import Agent, Orchestrator, create_agent_token, query, remote_jobs, wait_until
from tests.conftest import make_orchestrator

pytestmark = pytest.mark.e2e

DAGS = Path(__file__).parent / "dags"
EXECUTORS = "LocalExecutor,airflow_remote_exec.executor.RemoteExecutor"
COMPONENTS = ("api-server", "scheduler", "scheduler-2", "dag-processor")
SCHEDULERS = ("scheduler", "scheduler-2")
AGENTS = ("ha-1", "ha-2")
HEARTBEAT = 10  # the [remote_exec] defaults: the stack does not override them
LOST_AFTER = 30
HEALTH_THRESHOLD = 20
SCHEDULER_HEARTBEAT = 5  # Airflow's [scheduler] scheduler_heartbeat_sec
ORCHESTRATOR_ENV = {
    "AIRFLOW__CORE__PARALLELISM": "32",
    # A scheduler adopts the tasks of another whose heartbeat is older than this (Airflow's default 30 s),
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": str(HEALTH_THRESHOLD),
    # ... when it next looks for orphans (Airflow's default every 300 s).
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
    # Without LISTEN, claims would re-check only this often: the NOTIFY test must not pass that way.
    "AIRFLOW__REMOTE_EXEC__WAKEUP_POLL_INTERVAL": "30",
    "DEPLOYMENT_RUNNER": "orchestrator",
}


IN_TRANSACTION = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND application_name = :component AND xact_start IS NOT NULL
"""


class Deployment:
    def __init__(self, orch: Orchestrator, home: Path, markers: Path) -> None:
        self.orch, self.home, self.markers = orch, home, markers
        self.token = create_agent_token(orch, "ha", ["default"])
        self.agents: dict[str, Agent] = {}

    def start_agent(self, name: str) -> Agent:
        if name in self.agents:
            self.agents[name].stop()
        env = {"DEPLOYMENT_RUNNER": name, "DEPLOYMENT_MARKER_DIR": str(self.markers)}
        agent = Agent(self.orch.api_url, self.home / name, DAGS, self.token, name, ["default"], 4, env)
        self.agents[name] = agent
        agent.start(timeout=90)
        return agent

    def ensure_ready(self) -> None:
        """Whatever an earlier test stopped or killed runs again, and every agent is healthy."""
        for name, process in self.orch.processes.items():
            if not process.alive:
                self.orch.start_process(name)
        for name in AGENTS:
            agent = self.agents.get(name)
            if agent is None or not (agent.healthz() or {}).get("healthy"):
                self.start_agent(name)

    def query(self, sql: str, **params) -> list[dict]:
        return query(self.orch.db_url, sql, **params)

    def jobs(self, dag_id: str, run_id: str) -> list[dict]:
        return remote_jobs(self.orch.db_url, dag_id, run_id)

    def trigger(self, dag_id: str, **conf) -> str:
        with self.orch.client() as client:
            client.wait_for_dag(dag_id)
            return client.trigger(dag_id, conf)

    def finish(self, dag_id: str, run_id: str, expected: str = "success", timeout: float = 240) -> list[dict]:
        with self.orch.client() as client:
            state = client.wait_for_run(dag_id, run_id, timeout=timeout)
            tis = client.task_instances(dag_id, run_id)
        assert state == expected, f"{dag_id} ended {state}: {[(t['task_id'], t['state']) for t in tis]}"
        return tis

    def synced_jobs(self, dag_id: str, run_id: str, timeout: float = 60) -> list[dict]:
        """The run's jobs once every one is final and its outcome passed to a scheduler."""

        def synced() -> bool:
            jobs = self.jobs(dag_id, run_id)
            return all(j["state"] in ("success", "failed") and not j["pending_sync"] for j in jobs)

        with contextlib.suppress(TimeoutError):  # the caller's assertions then show what is left
            wait_until(synced, timeout, interval=0.5, what=f"{dag_id} outcomes to be synced")
        return self.jobs(dag_id, run_id)

    def start_long_task(self) -> tuple[str, dict]:
        """Trigger deploy_retry_once (a long first try, a short retry); return its run and its running job."""
        run_id = self.trigger("deploy_retry_once", seconds=300, retry_seconds=1)
        wait_until(
            lambda: [j["state"] for j in self.jobs("deploy_retry_once", run_id)] == ["running"],
            90,
            what="the task to run",
        )
        [job] = self.jobs("deploy_retry_once", run_id)
        return run_id, job

    def scheduler_job_ids(self) -> set[int]:
        rows = self.query("SELECT id FROM job WHERE job_type = 'SchedulerJob' AND state = 'running'")
        return {row["id"] for row in rows}

    def agent_events(self, name: str, since: float) -> list[str]:
        rows = self.query(
            "SELECT state FROM remote_agent_event WHERE agent_name = :n AND at >= :t ORDER BY at, id",
            n=name,
            t=datetime.fromtimestamp(since, timezone.utc),
        )
        return [row["state"] for row in rows]

    def pause(self, scheduler: str) -> None:
        """SIGSTOP a scheduler, but never inside a transaction: frozen there, it would hold the pool
        locks the other scheduler needs to queue anything."""
        for _ in range(20):
            self.orch.kill(scheduler, signal.SIGSTOP)
            time.sleep(0.05)  # stopped by now
            if not self.query(IN_TRANSACTION, component=scheduler):
                return
            self.resume(scheduler)
            time.sleep(0.3)
        raise AssertionError(f"{scheduler} was inside a transaction at every try to pause it")

    def resume(self, scheduler: str) -> None:
        self.orch.kill(scheduler, signal.SIGCONT)


@pytest.fixture(scope="module")
def deployment(postgres, tmp_path_factory) -> Iterator[Deployment]:
    home = tmp_path_factory.mktemp("deployment")
    markers = home / "markers"
    markers.mkdir()
    dags = home / "dags"
    shutil.copytree(DAGS, dags, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**ORCHESTRATOR_ENV, "DEPLOYMENT_MARKER_DIR": str(markers)}
    db_url = postgres.create_database(f"airflow_{uuid.uuid4().hex[:12]}")
    orch = make_orchestrator(home / "orchestrator", db_url, EXECUTORS, dags, env, COMPONENTS)
    stack = None
    try:
        stack = Deployment(orch, home, markers)
        for name in AGENTS:
            stack.start_agent(name)
        yield stack
    finally:
        try:
            for agent in stack.agents.values() if stack else ():
                agent.stop()
        finally:
            orch.stop()


@pytest.fixture(autouse=True)
def ready(deployment):
    for scheduler in SCHEDULERS:  # a test that failed half-way may have left one paused
        if deployment.orch.processes[scheduler].alive:
            deployment.resume(scheduler)
    deployment.ensure_ready()


def _queued_by(deployment: Deployment, dag_id: str, run_id: str) -> set[int]:
    return {job["queued_by_job_id"] for job in deployment.jobs(dag_id, run_id)}


def _queue_with_only(deployment: Deployment, scheduler: str, dag_id: str, count: int, **conf) -> str:
    """Trigger a run while every other scheduler is paused, so ``scheduler`` queues all its tasks."""
    others = [s for s in SCHEDULERS if s != scheduler]
    with deployment.orch.client() as client:
        client.wait_for_dag(dag_id)
    for other in others:
        deployment.pause(other)
    try:
        run_id = deployment.trigger(dag_id, **conf)
        # Paused for less than the health threshold (its last heartbeat may be one interval old), so
        # nobody takes the paused scheduler for dead.
        wait_until(
            lambda: len(deployment.jobs(dag_id, run_id)) == count,
            HEALTH_THRESHOLD - 2 * SCHEDULER_HEARTBEAT,
            what=f"{scheduler} to queue {count} jobs of {dag_id}",
        )
    finally:
        for other in others:
            deployment.resume(other)
    return run_id


# ------------------------------------------------------------------------------ two schedulers


def test_two_schedulers_each_sync_the_jobs_they_queued_and_each_task_runs_once(deployment):
    first = _queue_with_only(deployment, "scheduler", "deploy_many", 12)
    second = _queue_with_only(deployment, "scheduler-2", "deploy_many", 12)
    # Both schedulers' jobs now run, finish and are synced side by side.
    (first_by,), (second_by,) = (
        _queued_by(deployment, "deploy_many", first),
        _queued_by(deployment, "deploy_many", second),
    )
    assert first_by != second_by and {first_by, second_by} <= deployment.scheduler_job_ids()
    for run_id in (first, second):
        tis = deployment.finish("deploy_many", run_id)
        assert [(ti["state"], ti["try_number"]) for ti in tis] == [("success", 1)] * 12
        jobs = deployment.synced_jobs("deploy_many", run_id)
        assert [(j["state"], j["attempt"], j["pending_sync"]) for j in jobs] == [("success", 1, False)] * 12
    assert _queued_by(deployment, "deploy_many", first) == {first_by}
    assert _queued_by(deployment, "deploy_many", second) == {second_by}

    # Each scheduler got the executor events of its own jobs, and none of the other's (it logs them
    # a moment after the sync that cleared pending_sync).
    def events_seen(scheduler: str) -> list[str]:
        log = (deployment.orch.logs_dir / f"{scheduler}.log").read_text()
        return re.findall(
            r"Received executor event with state success for task instance .*?run_id='([^']+)'", log
        )

    for scheduler, own in (("scheduler", first), ("scheduler-2", second)):
        with contextlib.suppress(TimeoutError):
            wait_until(
                lambda s=scheduler, o=own: events_seen(s).count(o) == 12, 30, what=f"{scheduler}'s events"
            )
    for scheduler, own, other in (("scheduler", first, second), ("scheduler-2", second, first)):
        events = events_seen(scheduler)
        assert events.count(own) == 12 and other not in events, (scheduler, own, events)


def test_surviving_scheduler_adopts_the_running_jobs_of_a_killed_one(deployment):
    release = f"release-{uuid.uuid4().hex}"
    run_id = _queue_with_only(deployment, "scheduler", "deploy_hold", 8, release=release)
    [dead] = _queued_by(deployment, "deploy_hold", run_id)
    try:
        wait_until(
            lambda: [j["state"] for j in deployment.jobs("deploy_hold", run_id)] == ["running"] * 8,
            120,
            what="all eight tasks to run",
        )
        killed_at = time.monotonic()
        deployment.orch.kill("scheduler", signal.SIGKILL)
        wait_until(
            lambda: dead not in _queued_by(deployment, "deploy_hold", run_id),
            HEALTH_THRESHOLD + 60,
            interval=1,
            what="scheduler-2 to adopt the killed scheduler's jobs",
        )
        print(f"\nadopted {time.monotonic() - killed_at:.0f} s after the kill")
        # The adopting scheduler reports the running jobs again: each task instance names its agent.
        with deployment.orch.client() as client:
            client.wait_for_executor_ids("deploy_hold", run_id, AGENTS, timeout=30)
    finally:
        (deployment.markers / release).touch()
    [survivor] = _queued_by(deployment, "deploy_hold", run_id)
    assert survivor in deployment.scheduler_job_ids() and survivor != dead
    tis = deployment.finish("deploy_hold", run_id)
    assert [(ti["state"], ti["try_number"]) for ti in tis] == [("success", 1)] * 8
    jobs = deployment.synced_jobs("deploy_hold", run_id)
    assert [(j["state"], j["attempt"], j["pending_sync"]) for j in jobs] == [("success", 1, False)] * 8
    assert {ti["task_id"]: ti["external_executor_id"] for ti in tis} == {
        j["task_id"]: j["agent_name"] for j in jobs
    }


def test_dead_agent_is_declared_lost_once_by_two_schedulers_and_its_task_retried_once(deployment):
    run_id, job = deployment.start_long_task()
    victim = job["agent_name"]
    killed_at = time.time()
    agent = deployment.agents[victim].process
    agent.kill(signal.SIGKILL, tree=False)  # the agent only: its task must die with it
    wait_until(lambda: not agent.tree_pids(), 10, what="the task to die with its agent")
    tis = deployment.finish("deploy_retry_once", run_id, timeout=LOST_AFTER + 120)
    assert [(ti["state"], ti["try_number"]) for ti in tis] == [("success", 2)]
    # The retry waited reroute_fence_seconds (10) after the agent was declared lost; both schedulers
    # check liveness every second, so each has looked at the silent agent many times since.
    assert deployment.agent_events(victim, killed_at) == ["lost"]
    first, retry = deployment.synced_jobs("deploy_retry_once", run_id)
    assert (first["state"], first["agent_name"], first["attempt"]) == ("failed", victim, 1), first
    assert "lost" in first["detail"]
    assert (retry["state"], retry["agent_name"], retry["attempt"]) == (
        "success",
        AGENTS[AGENTS.index(victim) - 1],
        1,
    )


def test_agent_restarted_under_its_name_while_its_job_runs_starts_a_clean_session(deployment):
    run_id, job = deployment.start_long_task()
    name = job["agent_name"]
    [old] = deployment.query("SELECT session_id FROM remote_agent WHERE name = :n", n=name)
    deployment.agents[name].process.kill(signal.SIGKILL, tree=False)
    restarted_at = time.time()
    agent = deployment.start_agent(name)  # at once, as a container restart does
    print(f"\n{name} registered again {time.time() - restarted_at:.0f} s after its restart", end=" ")
    [new] = deployment.query("SELECT session_id FROM remote_agent WHERE name = :n", n=name)
    assert new["session_id"] != old["session_id"]
    refused = "is held by another live agent" in agent.log_tail(200)
    print("(first refused: the old session still looked alive)" if refused else "(at the first try)")
    tis = deployment.finish("deploy_retry_once", run_id, timeout=LOST_AFTER + 120)
    assert [(ti["state"], ti["try_number"]) for ti in tis] == [("success", 2)]
    first, retry = deployment.synced_jobs("deploy_retry_once", run_id)
    assert (first["state"], first["agent_name"], first["attempt"]) == ("failed", name, 1), first
    events = deployment.agent_events(name, restarted_at)
    if events[0] == "registered":  # back before the lost threshold: registering released the old job
        assert f"agent {name} restarted" in first["detail"], (events, first)
    else:  # a machine slow enough to take longer: the lost sweep did
        assert events[:2] == ["lost", "registered"] and "lost" in first["detail"], (events, first)
    assert (retry["state"], retry["attempt"]) == ("success", 1), retry


# ------------------------------------------------------------------------------ executors, wake-up


def test_tasks_pinned_to_each_executor_run_there(deployment):
    run_id = deployment.trigger("deploy_mixed")
    deployment.finish("deploy_mixed", run_id)
    with deployment.orch.client() as client:
        ran_on = {
            task: client.get(
                f"/dags/deploy_mixed/dagRuns/{run_id}/taskInstances/{task}/xcomEntries/return_value"
            )["value"]
            for task in ("on_local", "on_remote")
        }
    assert ran_on["on_local"] == "orchestrator", ran_on
    assert ran_on["on_remote"] in AGENTS, ran_on
    jobs = deployment.synced_jobs("deploy_mixed", run_id)
    assert [(j["task_id"], j["state"], j["agent_name"]) for j in jobs] == [
        ("on_remote", "success", ran_on["on_remote"])
    ]


def test_notify_wakes_a_waiting_claim_at_once(deployment):
    """Each step is queued while both agents wait in a claim. Without the NOTIFY each waiting claim
    finds it only at its next re-check: every 5 s with a LISTEN connection, every 30 s (this stack's
    poll interval) without one."""
    run_id = deployment.trigger("deploy_chain")
    deployment.finish("deploy_chain", run_id)
    jobs = deployment.synced_jobs("deploy_chain", run_id)
    delays = sorted((j["claimed_at"] - j["queued_at"]).total_seconds() for j in jobs)
    print(f"\nqueued-to-claimed: {[round(d, 2) for d in delays]} s")
    fast = [d for d in delays if d < SAFETY_RECHECK_SECONDS * 0.15]
    # Re-checks alone (two agents, each every 5 s) would put 7 of 8 under 0.75 s with a probability
    # under 1e-3.
    assert len(fast) >= 7, delays


# ------------------------------------------------------------------------------ tokens


def test_token_expiring_or_revoked_while_tasks_run_stops_the_agent_and_fails_its_task(deployment):
    """Each agent's token ends while its task runs: the agent stops at its next request (401) and its
    task with it, anything it might still send is refused 401, and the try fails once the agent is
    declared lost."""
    tokens: dict[str, str] = {}
    agents: dict[str, Agent] = {}
    runs: dict[str, str] = {}

    def start(name: str, expires: str | None = None) -> None:
        tokens[name] = create_agent_token(deployment.orch, name, [name], expires=expires)
        home, env = deployment.home / name, {"DEPLOYMENT_RUNNER": name}
        agents[name] = Agent(deployment.orch.api_url, home, DAGS, tokens[name], name, [name], 1, env)
        agents[name].start(timeout=90)
        runs[name] = deployment.trigger(f"deploy_on_{name}")

    def job(name: str) -> dict:
        rows = deployment.jobs(f"deploy_on_{name}", runs[name])
        return rows[0] if rows else {"state": "not queued yet"}

    try:
        start("revoked")
        start("expiring", expires="1d")
        wait_until(
            lambda: all(job(name)["state"] == "running" for name in tokens), 60, what="both tasks to run"
        )
        # Expire one token in a few seconds, and revoke the other, while their tasks run.
        deployment.query(
            "UPDATE remote_token SET expires_at = now() + interval '5 seconds' WHERE name = 'expiring' "
            "RETURNING id"
        )
        sessions = {
            name: deployment.query("SELECT session_id FROM remote_agent WHERE name = :n", n=name)[0][
                "session_id"
            ]
            for name in tokens
        }
        deployment.orch.airflow("remote-exec", "tokens", "revoke", "revoked")
        for name, agent in agents.items():
            # At its next request (a heartbeat, within an interval), plus the 5 s a task gets to stop.
            wait_until(lambda a=agent: not a.process.alive, 60 + 2 * HEARTBEAT, what=f"agent {name} to stop")
            assert agent.process.returncode == 1, agent.log_tail()
            log = agent.log_tail(100)
            assert "token rejected" in log and "stopped by the agent: no heartbeat" not in log, log
            wait_until(lambda a=agent: not a.process.tree_pids(), 10, what=f"{name}'s task to die with it")
            late_report = httpx.post(
                f"{deployment.orch.api_url}/remote/v1/agents/{sessions[name]}/jobs/{job(name)['id']}/state",
                json={"attempt": job(name)["attempt"], "state": "success"},
                headers={"Authorization": f"Bearer {tokens[name]}", "Remote-Exec-Api-Version": "1"},
                timeout=30,
            )
            assert late_report.status_code == 401, late_report.text
        for name in tokens:
            tis = deployment.finish(f"deploy_on_{name}", runs[name], "failed", timeout=LOST_AFTER + 90)
            assert [(ti["state"], ti["try_number"]) for ti in tis] == [("failed", 1)]
            [final] = deployment.synced_jobs(f"deploy_on_{name}", runs[name])
            assert (final["state"], final["agent_name"], final["attempt"]) == ("failed", name, 1), final
            assert "lost" in final["detail"], final
    finally:
        for agent in agents.values():
            agent.stop()
