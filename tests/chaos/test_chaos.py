"""Chaos suite: real api-server, scheduler, dag-processor, two agents and Postgres, broken on purpose.

The stack runs the ``[remote_exec]`` settings users get (heartbeat every 10 s, lost after 3 missed
heartbeats, 10 s reroute fence, 20 s claim wait) and the agents' own defaults; nothing is sped up.
Each agent reaches the orchestrator through its own fault proxy (``dev/faultproxy.py``), so a
scenario can cut one agent off, tasks included: the Task SDK calls ``<agent --api-url>/execution/``.

Every scenario asserts the final task states, the exact try numbers, each ``remote_job`` row's
outcome (state, agent, attempt) and, from the markers each execution writes (see
``dags/chaos_dags.py``), that no task instance had two overlapping executions.
"""

from __future__ import annotations

import contextlib
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

from dev.faultproxy import FaultProxy
from dev.stack import Agent, Orchestrator, create_agent_token, wait_until
from tests.conftest import make_orchestrator

pytestmark = pytest.mark.e2e

DAGS = Path(__file__).parent / "dags"
EXECUTOR = "airflow_remote_exec.executor.RemoteExecutor"
# The [remote_exec] defaults, which the stack does not override: the suite runs what users get.
HEARTBEAT = 10
MISSED = 3
FENCE = 10
LOST_AFTER = HEARTBEAT * MISSED
# Slack on top of the settings for the kill-to-rerun bound: lost check (1 s), executor event,
# scheduler retry (retry_delay 1 s), claim, supervisor and task start on a busy 2-core machine.
RESCHEDULE_SLACK = 30
# A task bound to a dead agent must stop within this (PR_SET_PDEATHSIG: at once; ticks are 0.25 s).
PROMPT_SECONDS = 5
AGENTS = ("agent-1", "agent-2")
ORCHESTRATOR_ENV = {
    "AIRFLOW__CORE__PARALLELISM": "32",
    # A restarted scheduler adopts the tasks of one whose heartbeat is older than this (default 30 s).
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "10",
}
AGENT_HEARTBEAT_PATH = r"^/remote/v1/agents/[^/]+/heartbeat$"


class Chaos:
    """The stack under test plus helpers to read its state."""

    def __init__(self, orch: Orchestrator, home: Path, markers: Path, token: str):
        self.orch, self.home, self.markers, self.token = orch, home, markers, token
        self.agents: dict[str, Agent] = {}
        self.proxies: dict[str, FaultProxy] = {}
        self.engine = sa.create_engine(orch.db_url, poolclass=sa.NullPool)

    # -- processes

    def start_agent(self, name: str) -> Agent:
        """(Re)start agent ``name`` behind its own fault proxy (started once, kept across restarts)."""
        proxy = self.proxies.get(name)
        if proxy is None:
            proxy = FaultProxy(self.orch.api_url, self.home / name / "faultproxy.log", f"faultproxy-{name}")
            proxy.start()
            self.proxies[name] = proxy
        if name in self.agents:
            self.agents[name].stop()  # reaps an earlier incarnation and anything it left behind
        env = {"CHAOS_MARKER_DIR": str(self.markers), "CHAOS_AGENT": name}
        agent = Agent(proxy.url, self.home / name, DAGS, self.token, name, ["chaos"], 4, extra_env=env)
        self.agents[name] = agent
        agent.start(timeout=90)
        return agent

    def ensure_ready(self) -> None:
        """Undo whatever an earlier scenario left broken: every component up, every agent healthy."""
        for name, process in self.orch.processes.items():
            if not process.alive:
                self.orch.start_process(name)
        for name in AGENTS:
            if name in self.proxies:
                self.proxies[name].reset()
            agent = self.agents.get(name)
            if agent is None or not agent.process.alive:
                self.start_agent(name)
                continue
            with contextlib.suppress(TimeoutError):
                wait_until(lambda a=agent: (a.healthz() or {}).get("healthy"), 90, what=f"{name} healthy")
            if not (agent.healthz() or {}).get("healthy"):
                self.start_agent(name)

    def other_agent(self, name: str) -> str:
        return next(a for a in AGENTS if a != name)

    # -- database

    def query(self, sql: str, **params) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text(sql), params)]

    def jobs(self, dag_id: str, run_id: str) -> list[dict]:
        return self.query(
            "SELECT * FROM remote_job WHERE dag_id=:d AND run_id=:r ORDER BY task_id, map_index, try_number",
            d=dag_id,
            r=run_id,
        )

    def job_outcomes(self, dag_id: str, run_id: str, timeout: float = 60) -> list[tuple]:
        """(task_id, try_number, state, agent_name, attempt) of every remote_job row of a run.

        Waits (bounded) until every row is final: an agent's report can land after the task
        instance's own state, which the task sets itself through the execution API.
        """
        with contextlib.suppress(TimeoutError):  # the assertion on the result then shows the rest
            wait_until(
                lambda: all(j["state"] in ("success", "failed") for j in self.jobs(dag_id, run_id)),
                timeout,
                interval=0.5,
                what=f"the agents' reports on {dag_id}",
            )
        return [
            (j["task_id"], j["try_number"], j["state"], j["agent_name"], j["attempt"])
            for j in self.jobs(dag_id, run_id)
        ]

    def agent_session(self, name: str) -> str:
        return self.query("SELECT session_id FROM remote_agent WHERE name=:n", n=name)[0]["session_id"]

    def agent_events(self, name: str, since: float) -> list[dict]:
        """State transitions of one agent recorded at or after ``since`` (a ``time.time()``)."""
        return self.query(
            "SELECT state, at, reason FROM remote_agent_event WHERE agent_name=:n AND at >= :since "
            "ORDER BY at, id",
            n=name,
            since=datetime.fromtimestamp(since, timezone.utc),
        )

    def lost_events(self, since: float) -> list[dict]:
        return [
            {"agent": name, **event}
            for name in AGENTS
            for event in self.agent_events(name, since)
            if event["state"] == "lost"
        ]

    # -- runs

    def trigger(self, dag_id: str, **conf) -> str:
        with self.orch.client() as client:
            client.wait_for_dag(dag_id)
            return client.trigger(dag_id, conf)

    def finish(self, dag_id: str, run_id: str, timeout: float = 240) -> list[dict]:
        with self.orch.client() as client:
            state = client.wait_for_run(dag_id, run_id, timeout=timeout)
            tis = client.task_instances(dag_id, run_id)
        assert state == "success", f"{dag_id} ended {state}: {[(t['task_id'], t['state']) for t in tis]}"
        assert {ti["state"] for ti in tis} == {"success"}
        return tis

    def report_as_agent(self, session_id: str, job_id: int, attempt: int, state: str = "success") -> int:
        """Send a state report the way an agent does (its token, straight to the api-server)."""
        response = httpx.post(
            f"{self.orch.api_url}/remote/v1/agents/{session_id}/jobs/{job_id}/state",
            json={"attempt": attempt, "state": state},
            headers={"Authorization": f"Bearer {self.token}", "Remote-Exec-Api-Version": "1"},
            timeout=30,
        )
        return response.status_code

    # -- markers

    def executions(self, dag_id: str, run_id: str) -> dict[str, list[dict]]:
        """Executions per task instance, from the marker files (a line being written is skipped)."""
        prefix = f"{dag_id}__{run_id}__".replace(":", "_").replace("+", "_")
        found: dict[str, list[dict]] = defaultdict(list)
        for path in self.markers.glob(prefix + "*"):
            task_id, map_index, try_number, _pid = path.name[len(prefix) :].split("__")
            lines = []
            for line in path.read_text().splitlines():
                parts = line.split()
                with contextlib.suppress(IndexError, ValueError):
                    lines.append((parts[0], float(parts[1]), parts))
            if not lines or lines[0][0] != "start" or len(lines[0][2]) < 4:
                continue
            found[f"{task_id}[{map_index}]"].append(
                {
                    "try": int(try_number),
                    "agent": lines[0][2][3],
                    "start": lines[0][1],
                    "last": lines[-1][1],
                    "ticks": sum(kind == "tick" for kind, _, _ in lines),
                    "ended": lines[-1][0] == "end",
                }
            )
        return found

    def wait_working(self, dag_id: str, run_id: str, count: int = 1, timeout: float = 150) -> dict:
        """Wait until ``count`` task instances are into their work (their marker ticks); return them."""
        working: dict[str, dict] = {}

        def enough() -> bool:
            working.clear()
            # The scenario's fault has not happened yet: a failed or retried try here is a failure.
            jobs = self.jobs(dag_id, run_id)
            if any(j["state"] == "failed" or j["try_number"] > 1 for j in jobs):
                outcomes = [
                    (j["task_id"], j["try_number"], j["state"], j["agent_name"], j["detail"]) for j in jobs
                ]
                raise AssertionError(f"{dag_id} lost a try before the scenario broke anything: {outcomes}")
            for ti, runs in self.executions(dag_id, run_id).items():
                live = [r for r in runs if r["ticks"] and not r["ended"]]
                if live:
                    working[ti] = live[-1]
            return len(working) >= count

        wait_until(enough, timeout, interval=0.25, what=f"{count} task(s) of {dag_id} to be working")
        return dict(working)

    def assert_no_doubled_execution(self, dag_id: str, run_id: str, tasks: int) -> dict[str, list[dict]]:
        found = self.executions(dag_id, run_id)
        assert len(found) == tasks, f"expected {tasks} task instances with markers, got {sorted(found)}"
        for ti, runs in found.items():
            assert sum(r["ended"] for r in runs) == 1, (
                f"{ti} finished its work {sum(r['ended'] for r in runs)}x"
            )
            ordered = sorted(runs, key=lambda r: r["start"])
            for before, after in zip(ordered, ordered[1:], strict=False):
                assert before["last"] < after["start"], (
                    f"{ti} ran twice at once: try {before['try']} on {before['agent']} ticked "
                    f"{before['last'] - after['start']:.1f} s into try {after['try']} on {after['agent']}: "
                    f"{before} overlaps {after}"
                )
        return found


@pytest.fixture(scope="module")
def chaos(postgres, tmp_path_factory):
    began = time.monotonic()
    home = tmp_path_factory.mktemp("chaos")
    markers = home / "markers"
    markers.mkdir()
    db_url = postgres.create_database(f"airflow_{uuid.uuid4().hex[:12]}")
    orch = make_orchestrator(home / "orchestrator", db_url, EXECUTOR, DAGS, ORCHESTRATOR_ENV)
    stack = Chaos(orch, home, markers, create_agent_token(orch, "chaos", ["chaos"]))
    try:
        for name in AGENTS:
            stack.start_agent(name)
        print(f"\nchaos stack up in {time.monotonic() - began:.0f} s")
        yield stack
    finally:
        for agent in stack.agents.values():
            agent.stop()
        for proxy in stack.proxies.values():
            proxy.stop()
        orch.stop()
        stack.engine.dispose()
        print(f"\nchaos module wall time: {time.monotonic() - began:.0f} s")


@pytest.fixture(autouse=True)
def ready(chaos):
    chaos.ensure_ready()
    began = time.monotonic()
    yield
    print(f"\nscenario took {time.monotonic() - began:.0f} s")


def _describe(pids: list[int]) -> list[str]:
    """``pid (parent pid): command line`` of each live process, for assertion messages."""
    described = []
    for pid in pids:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text()
            described.append(f"{pid} (ppid {stat[stat.rindex(')') + 2 :].split()[1]}): {cmdline[:150]}")
    return described


def _refused(proxy: FaultProxy, session_id: str, since: float) -> list[dict]:
    """Responses 409/410 the proxy saw for requests of session ``session_id`` at or after ``since``."""
    return [
        e
        for e in proxy.status()["events"]
        if e["event"] == "response"
        and e["status"] in (409, 410)
        and session_id in e["path"]
        and e["at"] >= since
    ]


def _assert_registered_again(chaos: Chaos, name: str, old_session: str, since: float) -> None:
    """Declared lost at or after ``since``, then registered anew with a new session, and healthy."""

    def back() -> bool:
        return (
            bool((chaos.agents[name].healthz() or {}).get("healthy"))
            and chaos.agent_session(name) != old_session
        )

    wait_until(back, 120, what=f"{name} to register a new session and be healthy")
    states = [e["state"] for e in chaos.agent_events(name, since)]
    assert "lost" in states, f"{name} was never declared lost: {states}"
    assert "registered" in states[states.index("lost") :], f"{name} did not register after lost: {states}"


def _assert_wide_run_spent_no_try(chaos: Chaos, run_id: str, since: float, timeout: float) -> None:
    """chaos_wide succeeded with each task run once, at try 1 and attempt 1 on one of the suite's
    agents, and no agent was declared lost at or after ``since``."""
    tis = chaos.finish("chaos_wide", run_id, timeout=timeout)
    chaos.assert_no_doubled_execution("chaos_wide", run_id, tasks=8)
    assert not chaos.lost_events(since), chaos.lost_events(since)
    assert [ti["try_number"] for ti in tis] == [1] * 8
    outcomes = chaos.job_outcomes("chaos_wide", run_id)
    assert [(t, n, s, a) for t, n, s, _, a in outcomes] == [(f"wide_{n}", 1, "success", 1) for n in range(8)]
    assert {agent for _, _, _, agent, _ in outcomes} <= set(AGENTS)


# ------------------------------------------------------------------------------------------- agents


def test_kill_9_of_agent_process_kills_its_task_and_the_retry_runs_on_the_other_agent(chaos):
    run_id = chaos.trigger("chaos_long", seconds=90, retry_seconds=5)
    first = chaos.wait_working("chaos_long", run_id)["long_task[-1]"]
    victim, survivor = first["agent"], chaos.other_agent(first["agent"])
    agent = chaos.agents[victim]
    killed_at = time.time()
    agent.process.kill(signal.SIGKILL, tree=False)  # the agent process only: its tasks must die with it
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not agent.process.tree_pids(), 15, what=f"{victim}'s processes to die with it")
    tree_gone_after = time.time() - killed_at
    survivors = _describe(agent.process.tree_pids())

    tis = chaos.finish("chaos_long", run_id, timeout=LOST_AFTER + FENCE + RESCHEDULE_SLACK + 120)
    runs = {r["try"]: r for r in chaos.executions("chaos_long", run_id)["long_task[-1]"]}
    assert sorted(runs) == [1, 2], f"expected exactly tries 1 and 2, got {runs}"
    killed, retry = runs[1], runs[2]
    stopped_after = killed["last"] - killed_at
    rerun_after = retry["start"] - killed_at
    bound = LOST_AFTER + FENCE + RESCHEDULE_SLACK
    print(
        f"\nkill -9 of {victim}'s agent process: its process tree gone after {tree_gone_after:.1f} s, "
        f"its task's last tick {stopped_after:+.1f} s; task running again on {survivor} after "
        f"{rerun_after:.1f} s (bound {bound} s = lost after {LOST_AFTER} s + fence {FENCE} s + "
        f"{RESCHEDULE_SLACK} s slack)"
    )
    chaos.assert_no_doubled_execution("chaos_long", run_id, tasks=1)
    assert (killed["agent"], killed["ended"]) == (victim, False)
    assert (retry["agent"], retry["ended"]) == (survivor, True)
    assert rerun_after <= bound, f"rerouting took {rerun_after:.1f} s"
    assert tis[0]["try_number"] == 2
    jobs = chaos.jobs("chaos_long", run_id)
    assert chaos.job_outcomes("chaos_long", run_id) == [
        ("long_task", 1, "failed", victim, 1),
        ("long_task", 2, "success", survivor, 1),
    ]
    assert "lost" in jobs[0]["detail"], jobs[0]["detail"]
    # The fence: the retry was not handed out before the lost try's fence ran out.
    assert retry["start"] >= jobs[0]["fenced_until"].timestamp(), (retry, jobs[0]["fenced_until"])
    # PR_SET_PDEATHSIG: the agent's runners and task processes died with it, at once.
    assert not survivors, (
        f"{tree_gone_after:.0f} s after kill -9 of {victim}, its processes lived on: {survivors}"
    )
    assert stopped_after <= PROMPT_SECONDS, f"the killed agent's task ticked on for {stopped_after:.1f} s"


def test_sigstop_agent_past_lost_threshold_is_fenced_and_its_stale_reports_are_refused(chaos):
    run_id = chaos.trigger("chaos_long", seconds=90, retry_seconds=5)
    first = chaos.wait_working("chaos_long", run_id)["long_task[-1]"]
    frozen, other = chaos.agents[first["agent"]], chaos.other_agent(first["agent"])
    old_session = chaos.agent_session(frozen.name)
    stopped_at = time.time()
    os.kill(frozen.process.pid, signal.SIGSTOP)  # the agent's control loop hangs; its task runs on
    try:
        wait_until(
            lambda: chaos.jobs("chaos_long", run_id)[0]["state"] == "failed",
            LOST_AFTER + 30,
            what="the frozen agent to be declared lost and its job failed",
        )
        tis = chaos.finish("chaos_long", run_id, timeout=FENCE + RESCHEDULE_SLACK + 120)
    finally:
        continued_at = time.time()
        os.kill(frozen.process.pid, signal.SIGCONT)
    runs = {
        r["try"]: r for r in chaos.assert_no_doubled_execution("chaos_long", run_id, tasks=1)["long_task[-1]"]
    }
    assert sorted(runs) == [1, 2], runs
    assert (runs[1]["agent"], runs[1]["ended"]) == (frozen.name, False)
    assert (runs[2]["agent"], runs[2]["ended"]) == (other, True)
    print(
        f"\nfrozen try stopped ticking {runs[1]['last'] - stopped_at:.1f} s after SIGSTOP; "
        f"retry started {runs[2]['start'] - stopped_at:.1f} s after SIGSTOP; SIGCONT after "
        f"{continued_at - stopped_at:.1f} s"
    )
    assert tis[0]["try_number"] == 2
    assert chaos.job_outcomes("chaos_long", run_id) == [
        ("long_task", 1, "failed", frozen.name, 1),
        ("long_task", 2, "success", other, 1),
    ]

    # Back from the dead: its session is over, it registers anew, and what it says of the old
    # session is refused (410) by the orchestrator.
    _assert_registered_again(chaos, frozen.name, old_session, stopped_at)
    refused = _refused(chaos.proxies[frozen.name], old_session, continued_at)
    print(f"refused after SIGCONT: {[(e['method'], e['path'], e['status']) for e in refused]}")
    assert refused, "no request of the frozen agent's old session was refused after SIGCONT"
    job = chaos.jobs("chaos_long", run_id)[0]
    assert chaos.report_as_agent(old_session, job["id"], 1) == 410  # the old session is over
    assert chaos.report_as_agent(chaos.agent_session(frozen.name), job["id"], 1) == 409  # try is over
    assert chaos.jobs("chaos_long", run_id)[0]["state"] == "failed"


def test_partitioned_agent_stops_its_task_before_the_retry_starts_elsewhere(chaos):
    partition_seconds = 60
    run_id = chaos.trigger("chaos_long", seconds=120, retry_seconds=5)
    first = chaos.wait_working("chaos_long", run_id)["long_task[-1]"]
    victim, survivor = first["agent"], chaos.other_agent(first["agent"])
    proxy = chaos.proxies[victim]
    old_session = chaos.agent_session(victim)
    blocked_at = time.time()
    proxy.block()  # the agent and its tasks' execution API calls: every request hangs
    try:
        wait_until(
            lambda: chaos.jobs("chaos_long", run_id)[0]["state"] == "failed",
            LOST_AFTER + 30,
            what="the partitioned agent to be declared lost and its job failed",
        )
        with chaos.orch.client() as client:
            state = client.wait_for_run("chaos_long", run_id, timeout=FENCE + RESCHEDULE_SLACK + 120)
        time.sleep(max(0.0, partition_seconds - (time.time() - blocked_at)))  # the partition's full length
    finally:
        unblocked_at = time.time()
        proxy.unblock()
    # The partition was real: requests of the agent and of its task were held, none got through.
    held = [e for e in proxy.status()["events"] if e["event"] == "blocked" and e["at"] >= blocked_at]
    print(f"\nheld by the partition: {sorted({(e['method'], e['path'], e['outcome']) for e in held})}")
    assert any(e["path"].startswith("/remote/v1/") for e in held), "the agent's own requests were not held"
    assert any(e["path"].startswith("/execution/") for e in held), "its task's requests were not held"
    assert state == "success", state

    tis = chaos.finish("chaos_long", run_id, timeout=30)
    runs = {r["try"]: r for r in chaos.executions("chaos_long", run_id)["long_task[-1]"]}
    assert sorted(runs) == [1, 2], runs
    cut_off, retry = runs[1], runs[2]
    print(
        f"\npartition of {victim} for {unblocked_at - blocked_at:.0f} s: its try's last tick "
        f"{cut_off['last'] - blocked_at:+.1f} s, retry on {survivor} started "
        f"{retry['start'] - blocked_at:+.1f} s after the block"
    )
    assert (cut_off["agent"], cut_off["ended"]) == (victim, False)
    assert (retry["agent"], retry["ended"]) == (survivor, True)
    assert cut_off["last"] < retry["start"], (
        f"the partitioned try ran {cut_off['last'] - retry['start']:.1f} s into its retry on {survivor}"
    )
    chaos.assert_no_doubled_execution("chaos_long", run_id, tasks=1)
    assert tis[0]["try_number"] == 2
    jobs = chaos.jobs("chaos_long", run_id)
    assert chaos.job_outcomes("chaos_long", run_id) == [
        ("long_task", 1, "failed", victim, 1),
        ("long_task", 2, "success", survivor, 1),
    ]
    assert "lost" in jobs[0]["detail"], jobs[0]["detail"]

    # Healed: the agent registers anew; what it sends for its old session is refused.
    _assert_registered_again(chaos, victim, old_session, blocked_at)
    refused = _refused(proxy, old_session, unblocked_at)
    print(f"refused after the partition: {[(e['method'], e['path'], e['status']) for e in refused]}")
    assert refused, "no request of the partitioned agent's old session was refused after it healed"
    assert chaos.report_as_agent(old_session, jobs[0]["id"], 1) == 410
    assert chaos.jobs("chaos_long", run_id)[0]["state"] == "failed"


def test_one_agent_heartbeat_delayed_15s_does_not_get_the_agent_declared_lost(chaos):
    began = time.time()
    run_id = chaos.trigger("chaos_single", seconds=50)
    first = chaos.wait_working("chaos_single", run_id)["steady_task[-1]"]
    name = first["agent"]
    proxy = chaos.proxies[name]
    proxy.delay(15, count=1, path_regex=AGENT_HEARTBEAT_PATH)

    def delayed() -> list[dict]:
        return [e for e in proxy.status()["events"] if e["event"] == "delayed" and e["at"] >= began]

    wait_until(delayed, HEARTBEAT + 15 + 15, what="the proxy to delay one heartbeat")
    tis = chaos.finish("chaos_single", run_id, timeout=120)
    # A heartbeat lost to the delay shows as "lost" up to LOST_AFTER after the heartbeat before it.
    delayed_from = delayed()[0]["at"] - 15
    time.sleep(max(0.0, delayed_from + LOST_AFTER + 5 - time.time()))
    events = delayed()
    print(f"\ndelayed on {name}: {events}")
    assert len(events) == 1 and events[0]["seconds"] == 15 and "heartbeat" in events[0]["path"], events
    assert not chaos.lost_events(began), chaos.lost_events(began)
    assert tis[0]["try_number"] == 1
    assert chaos.job_outcomes("chaos_single", run_id) == [("steady_task", 1, "success", name, 1)]
    chaos.assert_no_doubled_execution("chaos_single", run_id, tasks=1)


def test_revoked_token_gets_401_and_its_agent_claims_nothing_more(chaos):
    token = create_agent_token(chaos.orch, "chaos-revoked", ["chaos-revoked"])
    env = {"CHAOS_MARKER_DIR": str(chaos.markers), "CHAOS_AGENT": "revoked"}
    agent = Agent(
        chaos.orch.api_url,
        chaos.home / "revoked",
        DAGS,
        token,
        "revoked",
        ["chaos-revoked"],
        1,
        extra_env=env,
    )
    agent.start(timeout=90)
    waiting = None
    try:
        # It serves the queue (nobody else does) ...
        served = chaos.trigger("chaos_revoked", seconds=1)
        chaos.finish("chaos_revoked", served, timeout=120)
        assert chaos.job_outcomes("chaos_revoked", served) == [
            ("revoked_queue_task", 1, "success", "revoked", 1)
        ]
        # ... until its token is revoked while a job waits for it: drained, a job queued, revoked,
        # resumed, so only the revocation stands between the agent and the job.
        chaos.orch.airflow("remote-exec", "agents", "drain", "revoked")
        waiting = chaos.trigger("chaos_revoked", seconds=1)
        wait_until(
            lambda: [j["state"] for j in chaos.jobs("chaos_revoked", waiting)] == ["queued"],
            90,
            what="a job queued for the drained agent's queue",
        )
        assert agent.process.alive
        chaos.orch.airflow("remote-exec", "tokens", "revoke", "chaos-revoked")
        chaos.orch.airflow("remote-exec", "agents", "resume", "revoked")
        try:
            wait_until(lambda: not agent.process.alive, 60, what="the agent to stop")
        except TimeoutError as err:
            raise AssertionError(f"{err}; the agent's log ends:\n{agent.log_tail(30)}") from err
        assert agent.process.returncode == 1
        assert "401" in agent.log_tail(50) and "token rejected" in agent.log_tail(50)
        [job] = chaos.jobs("chaos_revoked", waiting)
        assert (job["state"], job["agent_name"], job["attempt"]) == ("queued", None, 0), job
    finally:
        agent.stop()
        with contextlib.suppress(Exception), chaos.orch.client() as client:
            if waiting:
                client.request("PATCH", f"/dags/chaos_revoked/dagRuns/{waiting}", json={"state": "failed"})


# ------------------------------------------------------------------------------------ control plane


def test_api_server_frozen_longer_than_lost_threshold_loses_no_agent_and_spends_no_try(chaos):
    """The agent API stalls for longer than the lost threshold (the process frozen, so it comes back
    under the same presence name, as a restarted container does) while the scheduler queues work,
    and the agents' next heartbeats come a few seconds after it is back: every agent must get a
    whole window to heartbeat again, so none is declared lost and the queued tasks run on try 1.
    (Tasks running through an outage this long are stopped by their agents, as the README says.)"""
    agents_late_seconds = 5  # an agent's next heartbeat is up to an interval after the API is back
    began = time.time()
    api_server = chaos.orch.processes["api-server"]
    with chaos.orch.client() as client:
        client.wait_for_dag("chaos_wide")
        client.request("PATCH", "/dags/chaos_wide", json={"is_paused": False})
    run_id = f"frozen-api-{uuid.uuid4().hex[:8]}"
    for proxy in chaos.proxies.values():  # no agent request waits in the frozen server's backlog
        proxy.block()
    try:
        api_server.kill(signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            # The scheduler works on without the api-server: it queues the run's jobs meanwhile.
            conf = '{"seconds": 15}'
            chaos.orch.airflow("dags", "trigger", "chaos_wide", "--run-id", run_id, "--conf", conf)
            wait_until(
                lambda: len([j for j in chaos.jobs("chaos_wide", run_id) if j["state"] == "queued"]) == 8,
                LOST_AFTER,
                what="the scheduler to queue the jobs while the api-server is frozen",
            )
            time.sleep(max(0.0, LOST_AFTER + 10 - (time.monotonic() - frozen_at)))
        finally:
            api_server.kill(signal.SIGCONT)
        print(f"\napi-server frozen for {time.monotonic() - frozen_at:.1f} s; lost threshold {LOST_AFTER} s")
        time.sleep(agents_late_seconds)
    finally:
        for proxy in chaos.proxies.values():
            proxy.unblock()

    _assert_wide_run_spent_no_try(chaos, run_id, began, timeout=240)


def test_outcomes_of_tasks_ending_while_the_agent_api_is_unreachable_arrive_after_it(chaos):
    """The agents lose the agent API for 15 s (less than the 25 s after which they stop their own
    tasks) just as their tasks end. The tasks finish through the execution API, and each agent keeps
    its outcome until it can report it; nothing is lost, retried or declared lost."""
    outage_seconds = 15
    began = time.time()
    release = f"release-{uuid.uuid4().hex}"
    run_id = chaos.trigger("chaos_wide", seconds=400, release=release)
    chaos.wait_working("chaos_wide", run_id, count=8)
    for proxy in chaos.proxies.values():
        proxy.block(path_contains="/remote/v1/")
    try:
        blocked_at = time.monotonic()
        (chaos.markers / release).touch()  # every task ends its work now, during the outage
        with chaos.orch.client() as client:
            wait_until(
                lambda: (
                    [ti["state"] for ti in client.task_instances("chaos_wide", run_id)] == ["success"] * 8
                ),
                outage_seconds - 2,
                what="all eight tasks to succeed while the agent API is unreachable",
            )
        held = [j["state"] for j in chaos.jobs("chaos_wide", run_id)]
        assert held == ["running"] * 8, f"an outcome got through the outage: {held}"
        time.sleep(max(0.0, outage_seconds - (time.monotonic() - blocked_at)))
    finally:
        for proxy in chaos.proxies.values():
            proxy.unblock()

    _assert_wide_run_spent_no_try(chaos, run_id, began, timeout=120)


def test_scheduler_down_past_its_health_threshold_adopts_running_jobs(chaos):
    release = f"release-{uuid.uuid4().hex}"
    run_id = chaos.trigger("chaos_wide", seconds=400, release=release)
    chaos.wait_working("chaos_wide", run_id, count=8)
    [old] = chaos.query("SELECT max(id) AS id FROM job WHERE job_type='SchedulerJob' AND state='running'")
    killed_at = time.time()
    try:
        chaos.orch.kill("scheduler", signal.SIGKILL)
        time.sleep(15)  # past AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD (10 s)
        chaos.orch.start_process("scheduler")
    except BaseException:
        (chaos.markers / release).touch()
        raise

    def queued_by() -> set:
        rows = chaos.query(
            "SELECT queued_by_job_id FROM task_instance WHERE dag_id='chaos_wide' AND run_id=:r", r=run_id
        )
        return {row["queued_by_job_id"] for row in rows}

    # Adopted by the new scheduler, not reset: every task instance is queued-by it now.
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: old["id"] not in queued_by(), 150, interval=1, what="the new scheduler to adopt")
    # ... and reported running again by it, so each task instance names its agent before it ends.
    with contextlib.suppress(TimeoutError), chaos.orch.client() as client:
        client.wait_for_executor_ids("chaos_wide", run_id, AGENTS, timeout=30)
    adopted_at = time.time()
    (chaos.markers / release).touch()
    [new] = chaos.query("SELECT max(id) AS id FROM job WHERE job_type='SchedulerJob'")
    print(
        f"\nscheduler killed; tasks adopted by scheduler job {new['id']} {adopted_at - killed_at:.1f} s later"
    )
    assert new["id"] > old["id"]
    assert queued_by() == {new["id"]}, (old, new, queued_by())

    tis = chaos.finish("chaos_wide", run_id, timeout=240)
    runs = chaos.assert_no_doubled_execution("chaos_wide", run_id, tasks=8)
    spanning = [r for rs in runs.values() for r in rs if r["start"] < killed_at and r["last"] >= adopted_at]
    assert len(spanning) == 8, f"not every task ran through the scheduler's downtime: {runs}"
    assert [ti["try_number"] for ti in tis] == [1] * 8
    # The agents' outcomes reached the new scheduler as executor events.
    wait_until(
        lambda: not any(j["pending_sync"] for j in chaos.jobs("chaos_wide", run_id)),
        30,
        what="every job's outcome to be synced to the scheduler",
    )
    outcomes = chaos.job_outcomes("chaos_wide", run_id)
    assert [(t, n, s, a) for t, n, s, _, a in outcomes] == [(f"wide_{n}", 1, "success", 1) for n in range(8)]
    agents = {t: agent for t, _, _, agent, _ in outcomes}
    assert {ti["task_id"]: ti["external_executor_id"] for ti in tis} == agents
    assert set(agents.values()) <= set(AGENTS)


def test_postgres_restart_while_20_tasks_run_spends_no_try(chaos, postgres):
    run_id = chaos.trigger("chaos_many")
    chaos.wait_working("chaos_many", run_id, count=4)
    restart_began = time.time()
    postgres.restart()
    print(f"\npostgres restart took {time.time() - restart_began:.1f} s")

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
    tis = chaos.finish("chaos_many", run_id, timeout=30)
    chaos.assert_no_doubled_execution("chaos_many", run_id, tasks=20)
    assert [ti["try_number"] for ti in tis] == [1] * 20
    outcomes = chaos.job_outcomes("chaos_many", run_id)
    assert [(t, n, s, a) for t, n, s, _, a in outcomes] == [
        (f"work_{n:02d}", 1, "success", 1) for n in range(20)
    ]
    assert {agent for _, _, _, agent, _ in outcomes} <= set(AGENTS)
