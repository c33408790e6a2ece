"""Scale benchmark: thousands of simulated agents against ONE api-server (one worker) on PostgreSQL.

Why: the agent API inside ``airflow api-server`` is the one place every agent talks to, so it must
carry thousands of mostly idle agents heartbeating while a few busy ones churn through jobs, and
the executor's ``sync()`` must not slow down as finished rows pile up.  Measured against targets:

* heartbeat latency p50/p95/p99 of N agents heartbeating every 10 s (spread evenly, jittered);
* jobs per second claimed and completed by a few busy agents, as the worker agent does it: a claim
  carries the final reports of the agent's last jobs, and the "running" reports of a claimed batch
  go in one request
  while queued jobs are inserted into ``remote_job`` at a steady rate, each batch with the same
  ``NOTIFY`` the executor sends, so long-polling claims wake as in production;
* ``RemoteExecutor.sync()`` time with 1k..100k finished rows; EXPLAIN ANALYZE per query shows
  which one grows.

Agents are simulated (asyncio + aiohttp, no task runs) and jobs are written straight into the table
(no scheduler, no task instances: ``_true_outcome`` finds none and keeps "success").  One client
process on a small machine can itself be the bottleneck, so the load generator runs as ``--procs``
processes, each reporting its event-loop lag and CPU use; CPU per process group and the api-server's
CPU per request show who is in the way, and ``--profile`` adds a py-spy profile of the api-server.

Run through ``./dev/bench/scale``.  Every process started is stopped by PID, every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing as mp
import os
import queue
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import sqlalchemy as sa

from dev.stack import REPO_ROOT, VENV_BIN, Orchestrator, Postgres, create_agent_token

EXECUTOR = "airflow_remote_exec.executor.RemoteExecutor"
NOTIFY_CHANNEL = "remote_exec_jobs"  # airflow_remote_exec.notify.CHANNEL
SLOTS = 8
LANE_CONNECTIONS = 20  # connections per HTTP client of the load generator (see Lane)
HEARTBEAT_P99_TARGET_MS = 100.0
CYCLES_TARGET_PER_S = 500.0
SYNC_RUN_ID = "scale_sync"
_T0 = time.monotonic()


def _say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", flush=True)


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values (printed as "-")."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# ------------------------------------------------------------------------------ load generator (child)


@dataclass
class Plan:
    """What one load-generator process simulates; built by the parent and pickled to the child."""

    index: int
    api_url: str
    token: str
    agents: list[tuple[int, str]]  # (global index, name): the index places its heartbeat in the interval
    busy: set[str]
    total_agents: int
    duration: float
    heartbeat_interval: float
    free_slots: int
    claim_wait: float
    max_connections: int
    versions: dict[str, str]  # airflow_version and task_sdk_version: registration refuses others


@dataclass
class Stats:
    """Raw measurements of one load-generator process; the parent merges them."""

    heartbeat_ms: list[float] = field(default_factory=list)
    loop_lag_ms: list[float] = field(default_factory=list)  # event loop late: this client is saturated
    heartbeats_late: int = 0  # the previous heartbeat had not returned when the next one was due
    claim_ms: list[float] = field(default_factory=list)
    report_ms: list[float] = field(default_factory=list)
    claims: int = 0
    claimed: int = 0
    refused: int = 0
    cycles: int = 0
    registered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    cpu_seconds: float = 0.0

    def error(self, what: str, detail: str) -> None:
        self.errors[what] += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{what}: {detail[:300]}")

    def merge(self, other: Stats) -> None:
        for name in ("heartbeat_ms", "loop_lag_ms", "claim_ms", "report_ms", "error_samples"):
            getattr(self, name).extend(getattr(other, name))
        for name in (
            "claims",
            "claimed",
            "refused",
            "cycles",
            "registered",
            "cpu_seconds",
            "heartbeats_late",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.update(other.errors)


@dataclass
class Reply:
    status_code: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class Lane:
    """A small aiohttp client whose in-flight requests are capped at its number of connections.

    The load generator shares the machine with the server it measures, so its CPU per request must
    stay small: aiohttp spends a fraction of what httpx does, and many small lanes keep any pool's
    bookkeeping per request flat however far the server falls behind.
    """

    def __init__(self, base_url: str, headers: dict[str, str], connections: int) -> None:
        self.base_url = base_url
        self.http = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=30.0),
        )

    async def post(self, path: str, body: dict[str, Any]) -> Reply:
        async with self.http.post(self.base_url + path, json=body) as resp:
            return Reply(resp.status, await resp.text())


async def _post(
    client: Lane, stats: Stats, what: str, path: str, body: dict[str, Any], expect: int
) -> tuple[Reply | None, float]:
    """POST and time it; anything but the ``expect``ed status is counted as an error (response None)."""
    started = time.perf_counter()
    try:
        resp = await client.post(path, body)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        stats.error(f"{what}: {type(e).__name__}", str(e))
        return None, (time.perf_counter() - started) * 1000
    elapsed_ms = (time.perf_counter() - started) * 1000
    if resp.status_code != expect:
        stats.error(f"{what}: HTTP {resp.status_code}", resp.text)
        return None, elapsed_ms
    return resp, elapsed_ms


async def _heartbeats(
    client: Lane, stats: Stats, plan: Plan, index: int, sid: str, held: dict[int, int], finishing: set[int],
    t0: float, end: float,
) -> None:  # fmt: skip
    """Heartbeat every interval at this agent's slot of the interval, +-10 % jitter, until ``end``."""
    interval = plan.heartbeat_interval
    due = t0 + interval * index / plan.total_agents
    while True:
        fire = max(t0, due + random.uniform(-0.1, 0.1) * interval)
        if fire >= end:
            return
        if fire < time.monotonic() - 1.0:
            stats.heartbeats_late += 1
        await asyncio.sleep(max(0.0, fire - time.monotonic()))
        body = {
            "running": [{"job_id": job, "attempt": attempt} for job, attempt in held.items()],
            "free_slots": max(0, SLOTS - len(held)),
        }
        resp, ms = await _post(client, stats, "heartbeat", f"/agents/{sid}/heartbeat", body, 200)
        if resp is not None:
            stats.heartbeat_ms.append(ms)
            # A job whose success report overtook this heartbeat is rightly "stopped": not an error.
            stop = resp.json().get("stop", [])
            # Nor is one whose final report is on its way in a claim (the server may have applied it).
            still_ours = [
                j for j in stop if held.get(j["job_id"]) == j["attempt"] and j["job_id"] not in finishing
            ]
            if still_ours:
                stats.error("heartbeat: told to stop held jobs", resp.text)
        due += interval


async def _churn(
    client: Lane, stats: Stats, plan: Plan, sid: str, held: dict[int, int], finishing: set[int], end: float
) -> None:
    """A busy agent, as the worker agent does it: a claim carries the final reports of the jobs it ran
    last (freeing their slots for itself), and the "running" reports of a claimed batch go in one
    request. A cycle counts once its final report is delivered, before ``end``."""
    finals: list[dict[str, Any]] = []
    while time.monotonic() < end:
        body = {"free_slots": plan.free_slots, "wait_seconds": plan.claim_wait, "reports": finals,
                "request_id": str(uuid.uuid4())}  # fmt: skip
        finishing.update(report["job_id"] for report in finals)
        resp, ms = await _post(client, stats, "claim", f"/agents/{sid}/jobs/claim", body, 200)
        if resp is None:
            await asyncio.sleep(0.5)  # do not spin on a failing server
            continue
        stats.claim_ms.append(ms)
        stats.claims += 1
        if time.monotonic() <= end:
            stats.cycles += len(finals)
        for report in finals:
            held.pop(report["job_id"], None)
        finishing.clear()
        stats.refused += len(resp.json()["refused"])
        jobs = resp.json()["jobs"]
        stats.claimed += len(jobs)
        held.update((job["job_id"], job["attempt"]) for job in jobs)
        finals = []
        if not jobs:
            continue
        running = [{"job_id": j["job_id"], "attempt": j["attempt"], "state": "running"} for j in jobs]
        resp, ms = await _post(
            client, stats, "reports", f"/agents/{sid}/jobs/reports", {"reports": running}, 200
        )
        if resp is not None:
            stats.report_ms.append(ms)
            stats.refused += len(resp.json()["refused"])
        finals = [{**report, "state": "success", "exit_code": 0} for report in running]


async def _simulate(plan: Plan, start_at: Any, ready: Any) -> Stats:
    stats = Stats()
    headers = {"Authorization": f"Bearer {plan.token}", "Remote-Exec-Api-Version": "2"}
    base_url = f"{plan.api_url}/remote/v1"
    lanes = [
        Lane(base_url, headers, LANE_CONNECTIONS)
        for _ in range(max(1, plan.max_connections // LANE_CONNECTIONS))
    ]
    try:
        gate = asyncio.Semaphore(32)  # registrations before the window: do not storm the server

        async def register(local: int, name: str) -> str | None:
            body = {"name": name, "hostname": "scale", "version": "0", "queues": ["default"], "slots": SLOTS,
                    **plan.versions}  # fmt: skip
            lane = lanes[local % len(lanes)]
            async with gate:
                resp, _ = await _post(lane, stats, "register", "/agents", body, 200)
                if resp is None:
                    return None
                sid = resp.json()["session_id"]
                # The first heartbeat makes a registered agent active; a fleet is measured in its
                # steady state, so that happens before the window.
                beat = {"running": [], "free_slots": SLOTS}
                await _post(lane, stats, "heartbeat", f"/agents/{sid}/heartbeat", beat, 200)
            return sid

        sessions = await asyncio.gather(*(register(j, name) for j, (_, name) in enumerate(plan.agents)))
        stats.registered = sum(sid is not None for sid in sessions)
        ready.put(plan.index)
        deadline = time.monotonic() + 600
        while start_at.value == 0.0:
            if time.monotonic() > deadline:
                raise TimeoutError("no start signal from the parent within 600 s")
            await asyncio.sleep(0.05)
        t0 = time.monotonic() + (start_at.value - time.time())  # the parent's wall clock -> ours
        end = t0 + plan.duration
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        cpu_start = time.process_time()
        tasks = []
        for j, ((index, name), sid) in enumerate(zip(plan.agents, sessions, strict=True)):
            if sid is None:
                continue
            lane = lanes[j % len(lanes)]
            held: dict[int, int] = {}  # job id -> attempt, sent in heartbeats like a real agent
            finishing: set[int] = set()  # jobs whose final report a claim in flight carries
            tasks.append(_heartbeats(lane, stats, plan, index, sid, held, finishing, t0, end))
            if name in plan.busy:
                tasks.append(_churn(lane, stats, plan, sid, held, finishing, end))
        await asyncio.gather(*tasks, _ticker(stats, end))
        stats.cpu_seconds = time.process_time() - cpu_start
    finally:
        await asyncio.gather(*(lane.http.close() for lane in lanes))
    return stats


async def _ticker(stats: Stats, end: float, period: float = 0.05) -> None:
    """Measure this event loop's lag: how late a short sleep wakes up tells if the client keeps up."""
    while time.monotonic() < end:
        due = time.monotonic() + period
        await asyncio.sleep(period)
        stats.loop_lag_ms.append((time.monotonic() - due) * 1000)


def _loadgen_process(plan: Plan, start_at: Any, ready: Any, results: Any) -> None:
    """Entry point of a load-generator process (spawned, so it never imports Airflow)."""
    try:
        results.put((plan.index, asyncio.run(_simulate(plan, start_at, ready)), None))
    except BaseException:
        results.put((plan.index, None, traceback.format_exc()))


# ------------------------------------------------------------------------------------ database side

_INSERT_JOBS = sa.text(
    "INSERT INTO remote_job (kind, ti_id, dag_id, task_id, run_id, map_index, try_number, queue,"
    " priority_weight, pool_slots, state, workload, attempt, pending_sync, queued_at, finished_at)"
    " SELECT 'task', gen_random_uuid()::text, 'scale_dag', :prefix || g, :run_id, -1, 1, 'default', 1, 1,"
    " :state, :workload, 0, :pending_sync, now(), CASE WHEN :finished THEN now() END"
    " FROM generate_series(:first, :last) AS g"
)


def _insert_jobs(
    conn: sa.Connection,
    workload: str,
    run_id: str,
    prefix: str,
    first: int,
    count: int,
    state: str = "queued",
) -> None:
    """``count`` rows with unique keys (task ids ``prefix<n>``), all carrying the same workload JSON."""
    finished = state in ("success", "failed")
    conn.execute(
        _INSERT_JOBS,
        {"prefix": prefix, "run_id": run_id, "state": state, "workload": workload, "pending_sync": False,
         "finished": finished, "first": first, "last": first + count - 1},
    )  # fmt: skip


def _workload_json() -> str:
    """One valid ``ExecuteTask`` as the executor would store it, with a JWT-sized token."""
    from airflow.executors.workloads import BundleInfo, ExecuteTask
    from airflow.executors.workloads.task import TaskInstanceDTO

    ti = TaskInstanceDTO(
        id=uuid.uuid4(), task_id="scale_task", dag_id="scale_dag", run_id="scale_run", try_number=1,
        map_index=-1, dag_version_id=uuid.uuid4(), queue="default", pool_slots=1, priority_weight=1,
    )  # fmt: skip
    token = ".".join(base64.urlsafe_b64encode(os.urandom(n)).decode().rstrip("=") for n in (27, 240, 64))
    return ExecuteTask(
        ti=ti,
        dag_rel_path=Path("scale_dag.py"),
        token=token,
        log_path="dag_id=scale_dag/run_id=scale_run/task_id=scale_task/attempt=1.log",
        bundle_info=BundleInfo(name="dags-folder", version=None),
    ).model_dump_json()


class JobFeeder(threading.Thread):
    """Insert queued jobs at a steady rate in batches; each transaction ends with the executor's NOTIFY.

    While more than ``max_backlog`` jobs wait it skips batches, so a server that cannot keep up is not
    also measured against an ever-growing queue (the claim query sorts all queued rows).
    """

    def __init__(self, engine: sa.Engine, workload: str, rate: float, max_backlog: int) -> None:
        super().__init__(name="job-feeder", daemon=True)
        self.engine, self.workload, self.rate, self.max_backlog = engine, workload, rate, max_backlog
        self.inserted = self.skipped = self.backlog = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    def run(self) -> None:
        batch_seconds, credit = 0.1, 0.0
        run_id = f"scale_{uuid.uuid4().hex[:8]}"
        try:
            with self.engine.connect() as conn:
                next_at = time.monotonic()
                batches = 0
                while not self._stop_event.is_set():
                    credit += self.rate * batch_seconds
                    count, credit = int(credit), credit - int(credit)
                    if batches % 10 == 0:  # counting costs the database more than the inserts
                        self.backlog = conn.scalar(
                            sa.text("SELECT count(*) FROM remote_job WHERE state = 'queued'")
                        )
                    batches += 1
                    if count and self.backlog < self.max_backlog:
                        _insert_jobs(conn, self.workload, run_id, "job-", self.inserted, count)
                        conn.execute(sa.text(f"NOTIFY {NOTIFY_CHANNEL}"))
                        self.inserted += count
                        self.backlog += count  # an upper bound until the next count
                    else:
                        self.skipped += count
                    conn.commit()
                    next_at += batch_seconds
                    self._stop_event.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as e:  # reported by the parent
            self.error = e


class CpuMeter:
    """CPU seconds used per process group over a window, and how busy the whole machine was."""

    def __init__(self, groups: dict[str, list[int]], postmaster: int | None) -> None:
        self.groups, self.postmaster = groups, postmaster
        self._start: dict[str, float] = {}
        self._started_at = 0.0

    def _sample(self) -> dict[str, float]:
        sample = {name: sum(self._cpu(pid) for pid in pids) for name, pids in self.groups.items()}
        if self.postmaster:
            with contextlib.suppress(psutil.Error):
                pm = psutil.Process(self.postmaster)
                times = pm.cpu_times()  # children_*: backends that exited (Airflow's pool overflow churns)
                sample["postgres"] = times.user + times.system + times.children_user + times.children_system
                sample["postgres"] += sum(self._cpu(child.pid) for child in pm.children())
        machine = psutil.cpu_times()
        sample["machine"] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        return sample

    @staticmethod
    def _cpu(pid: int) -> float:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            return times.user + times.system
        return 0.0

    def start(self) -> None:
        self._start, self._started_at = self._sample(), time.monotonic()

    def stop(self) -> dict[str, float]:
        """Percent of one core per group over the window (the machine has ``os.cpu_count()`` cores)."""
        wall, end = time.monotonic() - self._started_at, self._sample()
        return {name: 100 * (end[name] - self._start.get(name, 0.0)) / wall for name in end}


# ------------------------------------------------------------------------------------- load phase


@dataclass
class LoadResult:
    stats: Stats
    inserted: int
    skipped: int
    backlog: int
    cpu: dict[str, float]
    profile: Path | None
    db_statements: list[Any]  # pg_stat_statements rows of the window, most total time first


def run_load(args: argparse.Namespace, orch: Orchestrator, server: str, api_url: str, pg: Postgres,
             token: str, engine: sa.Engine, workload: str) -> LoadResult:  # fmt: skip
    """Register the agents, then run heartbeats, churn and the job feeder for ``--duration`` seconds."""
    names = [f"scale-{i:05d}" for i in range(args.agents)]
    busy = set(names[: args.busy])  # agent i goes to process i % procs: busy agents spread evenly
    ctx = mp.get_context("spawn")
    start_at, ready, results = ctx.Value("d", 0.0), ctx.Queue(), ctx.Queue()
    procs = []
    feeder: JobFeeder | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        for k in range(args.procs):
            plan = Plan(
                index=k, api_url=api_url, token=token, total_agents=args.agents,
                agents=[(i, n) for i, n in enumerate(names) if i % args.procs == k],
                busy=busy, duration=args.duration, heartbeat_interval=args.heartbeat_interval,
                free_slots=args.free_slots, claim_wait=args.claim_wait, max_connections=args.max_connections,
                versions=_versions(),
            )  # fmt: skip
            proc = ctx.Process(target=_loadgen_process, args=(plan, start_at, ready, results), daemon=True)
            proc.start()
            procs.append(proc)
        _say(f"registering {args.agents} agents from {args.procs} load-generator process(es)")
        for _ in procs:
            _get(ready, procs, timeout=600)
        api_pid = orch.processes[server].pid
        meter = CpuMeter(
            {"api-server": orch.processes[server].tree_pids(), "load generator": [p.pid for p in procs],
             "bench main (feeder)": [os.getpid()]},
            _postmaster_pid(pg),
        )  # fmt: skip
        feeder = JobFeeder(engine, workload, args.job_rate, args.max_backlog)
        feeder.start()
        t0 = time.time() + 1.0  # the feeder gets a head start of about one batch
        start_at.value = t0
        time.sleep(max(0.0, t0 - time.time()))
        _reset_statement_stats(engine)
        meter.start()
        _say(
            f"load window started: {args.duration:.0f} s, {args.busy} busy agents, jobs at {args.job_rate}/s"
        )
        if args.profile:
            spy = _start_profile(api_pid, args.duration, orch.home / "api-server.pyspy.txt")
        _progress(engine, feeder, t0 + args.duration)
        cpu = meter.stop()
        db_statements = _statement_stats(engine)
        stats = Stats()
        for _ in procs:  # in-flight requests finish within their 30 s timeout
            index, part, failure = _get(results, procs, timeout=120)
            if failure:
                raise RuntimeError(f"load generator {index} failed:\n{failure}")
            stats.merge(part)
        feeder.stop()
        if feeder.error:
            raise RuntimeError(f"job feeder failed: {feeder.error!r}") from feeder.error
        profile = _finish_profile(spy, orch.home / "api-server.pyspy.txt") if spy else None
        return LoadResult(stats, feeder.inserted, feeder.skipped, feeder.backlog, cpu, profile, db_statements)
    finally:
        if feeder is not None and feeder.is_alive():
            feeder.stop()
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait(timeout=10)
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()  # by its PID
                proc.join(timeout=10)


def _reset_statement_stats(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
        conn.execute(sa.text("SELECT pg_stat_statements_reset()"))


def _statement_stats(engine: sa.Engine, top: int = 10) -> list[Any]:
    """The statements the database spent the most time on during the window."""
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT calls, total_exec_time, mean_exec_time, query FROM pg_stat_statements"
                " ORDER BY total_exec_time DESC LIMIT :top"
            ),
            {"top": top},
        ).all()


def _versions() -> dict[str, str]:
    import airflow
    from airflow.sdk import __version__ as task_sdk_version

    return {"airflow_version": airflow.__version__, "task_sdk_version": task_sdk_version}


def _get(channel: Any, procs: list[Any], timeout: float) -> Any:
    """One message from the load generators, failing early if one of them died."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(queue.Empty):
            return channel.get(timeout=1)
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"load generators died or hung: {dead or procs}")


def _progress(engine: sa.Engine, feeder: JobFeeder, end_wall: float) -> None:
    """Print a line every 10 s during the window: jobs inserted, backlog, and cycles done (from the DB)."""
    done_sql = sa.text("SELECT count(*) FROM remote_job WHERE state IN ('success', 'failed')")
    last_done, last_at = 0, time.monotonic()
    while (left := end_wall - time.time()) > 0:
        time.sleep(min(10.0, left))
        with engine.connect() as conn:
            done = conn.scalar(done_sql)
        now = time.monotonic()
        _say(
            f"  inserted {feeder.inserted}, skipped {feeder.skipped} (backlog cap), queued {feeder.backlog},"
            f" finished {done} ({(done - last_done) / (now - last_at):.0f}/s)"
        )
        last_done, last_at = done, now


def _postmaster_pid(pg: Postgres) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((pg.datadir / "postmaster.pid").read_text().splitlines()[0])
    return None


def _start_profile(pid: int, duration: float, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy the api-server over the middle of the load window, sampling the thread holding the GIL.

    One api-server process runs Python on one core at a time, so where the GIL goes is where its
    capacity goes; threads waiting for Postgres or for a pooled connection do not show.
    """
    py_spy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if py_spy is None:
        _say("py-spy not found: uv pip install -p .venv/bin/python py-spy; profiling skipped")
        return None
    seconds = max(5, int(duration) - 10)
    argv = [py_spy, "record", "--pid", str(pid), "--subprocesses", "--duration", str(seconds),
            "--rate", "100", "--gil", "--format", "raw", "--output", str(out), "--nonblocking"]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _finish_profile(spy: subprocess.Popen[bytes], out: Path) -> Path | None:
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(timeout=10)
    return out if out.exists() else None


def summarize_profile(path: Path, top: int = 25) -> str:
    """Inclusive and self sample shares per function from py-spy's raw (collapsed) output.

    Frames that only wrap everything (thread and event-loop bootstrap, the CLI) are left out.
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_frame(f) for f in stack.split(";")[1:]]  # [0] is the process / thread
        total += int(count)
        for frame in set(frames):
            if not any(w in frame for w in _WRAPPER_FILES):
                inclusive[frame] += int(count)
        if frames:
            own[frames[-1]] += int(count)
            layers[_layer(frames)] += int(count)
    lines = [f"py-spy: {total} samples of the api-server's GIL holder ({path})", "  by layer:"]
    lines += [f"    {100 * n / total:5.1f}%  {layer}" for layer, n in layers.most_common()]
    lines.append("  inclusive:")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    lines.append("  agent API code (airflow_remote_exec), inclusive:")
    ours = [(f, n) for f, n in inclusive.most_common() if "(airflow_remote_exec/" in f]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in ours[:top]]
    lines.append("  self:")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


# Frames that wrap every sample (thread and event-loop bootstrap, the CLI): not worth listing.
_WRAPPER_FILES = (
    *("(threading.py)", "(asyncio/", "(uvicorn/main.py)", "(uvicorn/server.py)", "(uvicorn/_compat"),
    *("(airflow/cli/", "(airflow/utils/cli.py)", "(airflow/__main__.py)", "(airflow)", "WorkerThread.run ("),
    *("(airflow/utils/providers_configuration_loader.py)", "(airflow/utils/memray_utils.py)"),
)


# Each sample goes to the first layer matching its frames, walking from the innermost frame outwards.
_LAYERS = (
    ("SQLAlchemy + psycopg2 (sessions, ORM, DB round trips)", ("(sqlalchemy/", "(psycopg2/", "(sqlalchemy")),
    ("pydantic (request/response models)", ("(pydantic",)),
    ("logging", ("(structlog/", "(logging/")),
    ("thread-pool hand-offs (sync dependencies and endpoints)", ("(anyio/", "(queue.py)", "(threading.py)")),
    ("agent API code (airflow_remote_exec)", ("(airflow_remote_exec/",)),
    ("uvicorn + event loop (HTTP parsing, transport, epoll)", ("(uvicorn/",)),
    ("FastAPI/Starlette + Airflow middleware", ("(fastapi/", "(starlette/", "(airflow/api_fastapi/")),
)


def _layer(frames: list[str]) -> str:
    for frame in reversed(frames):
        for layer, needles in _LAYERS:
            if any(needle in frame for needle in needles):
                return layer
    return "other"


def _frame(frame: str) -> str:
    """``func (path/to/site-packages/pkg/mod.py:123)`` -> ``func (pkg/mod.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", f"{REPO_ROOT}/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


# ------------------------------------------------------------------------------------- sync phase


@dataclass
class SyncResult:
    rows: int
    times_ms: list[float]
    with_purge_ms: list[float]  # liveness check and purge forced: what every 30th second costs
    query_ms: dict[str, float]  # EXPLAIN ANALYZE execution time of each statement sync issues
    plans: dict[str, str]


_QUERY_LABELS = (
    ("FROM remote_api_server", "agent_api_up_since SELECT"),
    ("FROM remote_agent ", "mark_lost_agents SELECT"),
    ("pending_sync IS true", "_report_changed_jobs SELECT"),
    ("UPDATE remote_job SET pending_sync", "_report_changed_jobs UPDATE/row"),
    ("DELETE FROM remote_job", "_purge_finished_jobs DELETE"),
)


def _label(statement: str) -> str:
    flat = " ".join(statement.split())
    return next((label for needle, label in _QUERY_LABELS if needle in flat), flat[:50])


def run_sync(
    engine: sa.Engine, workload: str, sizes: list[int], calls: int, pending: int
) -> list[SyncResult]:
    """Time ``RemoteExecutor.sync()`` in this process against tables of ``sizes`` finished rows."""
    from airflow.models.taskinstancekey import TaskInstanceKey

    from airflow_remote_exec.executor import RemoteExecutor

    keys = [TaskInstanceKey("scale_dag", f"pending-{i}", SYNC_RUN_ID, 1, -1) for i in range(pending)]
    results = []
    for rows in sizes:
        _say(f"sync: filling remote_job with {rows} finished rows + {pending} pending_sync rows")
        with engine.begin() as conn:
            conn.execute(sa.text("TRUNCATE remote_job"))
            _insert_jobs(conn, workload, SYNC_RUN_ID, "done-", 0, rows, state="success")
            _insert_jobs(conn, workload, SYNC_RUN_ID, "pending-", 0, pending, state="success")
            conn.execute(sa.text("UPDATE remote_agent SET last_heartbeat_at = now()"))  # all agents alive
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE remote_job"))  # what autovacuum would have done by now
        executor = RemoteExecutor(parallelism=32)
        _timed_sync(engine, executor, keys, forced=True)  # warm-up: connections, caches, lazy imports
        times = [_timed_sync(engine, executor, keys) for _ in range(calls)]
        with_purge = [_timed_sync(engine, executor, keys, forced=True) for _ in range(5)]
        query_ms, plans = _explain_sync(engine, executor, keys)
        results.append(SyncResult(rows, times, with_purge, query_ms, plans))
        p50, purge = statistics.median(times), statistics.median(with_purge)
        _say(f"  sync p50 {p50:.2f} ms, with purge+liveness {purge:.2f} ms")
    return results


def _timed_sync(engine: sa.Engine, executor: Any, keys: list[Any], forced: bool = False) -> float:
    """One ``sync()`` with ``keys`` pending; checks they all came out as events.  Returns ms."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE remote_job SET pending_sync = true WHERE run_id = :run AND task_id LIKE 'pending-%'"
            ),
            {"run": SYNC_RUN_ID},
        )
    executor.running.update(keys)
    if forced:
        executor._last_purge = executor._last_liveness_check = 0.0
    started = time.perf_counter()
    executor.sync()
    elapsed = (time.perf_counter() - started) * 1000
    events = executor.get_event_buffer()
    if len(events) != len(keys):
        raise RuntimeError(f"sync reported {len(events)} of {len(keys)} pending jobs")
    return elapsed


def _explain_sync(
    engine: sa.Engine, executor: Any, keys: list[Any]
) -> tuple[dict[str, float], dict[str, str]]:
    """Capture the statements of one forced sync, then EXPLAIN ANALYZE each (rolled back)."""
    from airflow import settings

    captured: dict[str, tuple[str, Any]] = {}

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        captured.setdefault(_label(statement), (statement, parameters))

    sa.event.listen(settings.engine, "before_cursor_execute", capture)
    try:
        _timed_sync(engine, executor, keys, forced=True)
    finally:
        sa.event.remove(settings.engine, "before_cursor_execute", capture)
    query_ms, plans = {}, {}
    raw = engine.raw_connection()
    try:
        for label, (statement, parameters) in captured.items():
            best = float("inf")
            for _ in range(3):
                cursor = raw.cursor()
                cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", parameters)
                plan = [row[0] for row in cursor.fetchall()]
                raw.rollback()
                best = min(best, float(plan[-1].split()[2]))  # "Execution Time: 1.234 ms"
            query_ms[label], plans[label] = best, "\n".join(plan)
    finally:
        raw.close()
    return query_ms, plans


# ------------------------------------------------------------------------------------------ report


def _ms(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f} ms"  # NaN -> "-"


def report(args: argparse.Namespace, load: LoadResult | None, syncs: list[SyncResult]) -> bool:
    """Print the measurements and the targets table; return whether every target passed."""
    rows: list[tuple[str, str, bool]] = []
    print(f"\n{'=' * 100}\nscale benchmark: {args.agents} agents, {args.duration:.0f} s window,"
          f" {args.server} agent API ({args.api_workers if args.server == 'standalone' else 1} process(es))"
          f" on PostgreSQL, {args.procs} load-generator process(es),"
          f" {os.cpu_count()} cores")  # fmt: skip
    if load is not None:
        s = load.stats
        hb = s.heartbeat_ms
        cycles_per_s = s.cycles / args.duration
        print(
            f"heartbeats      {len(hb):7d} ok   p50 {_ms(_pct(hb, 50))}  p95 {_ms(_pct(hb, 95))}"
            f"  p99 {_ms(_pct(hb, 99))}  max {_ms(max(hb, default=float('nan')))}"
            f"   ({len(hb) / args.duration:.0f}/s expected {args.agents / args.heartbeat_interval:.0f}/s)"
        )
        print(
            f"claims          {s.claims:7d}      p50 {_ms(_pct(s.claim_ms, 50))}"
            f"  p99 {_ms(_pct(s.claim_ms, 99))}"
            f"   {s.claimed / max(1, s.claims):.1f} jobs per claim"
        )
        print(
            f"report batches  {len(s.report_ms):7d}      p50 {_ms(_pct(s.report_ms, 50))}"
            f"  p99 {_ms(_pct(s.report_ms, 99))}   {s.refused} reports refused"
        )
        job_requests = s.claims + len(s.report_ms)
        print(
            f"cycles          {s.cycles:7d}      {cycles_per_s:.0f}/s by {args.busy} busy agents"
            f" (claimed, reported running, final report delivered);"
            f" {job_requests / max(1, s.cycles):.2f} requests per task"
        )
        print(
            f"jobs inserted   {load.inserted:7d}      at {args.job_rate:.0f}/s requested; {load.skipped}"
            f" skipped at the backlog cap of {args.max_backlog}; {load.backlog} queued at the end"
        )
        print(f"registered      {s.registered:7d} agents")
        print(f"errors          {sum(s.errors.values()):7d}      {dict(s.errors) or ''}")
        for sample in s.error_samples:
            print(f"                  e.g. {sample}")
        lag = s.loop_lag_ms
        print(
            f"client          event-loop lag p50 {_ms(_pct(lag, 50))} p99 {_ms(_pct(lag, 99))} (high = the"
            f" client is the bottleneck); {s.heartbeats_late} heartbeats due while the previous one was"
            f" still waiting; CPU {100 * s.cpu_seconds / args.duration / args.procs:.0f}% of a core"
            " per process"
        )
        cpu = dict(load.cpu)
        other = cpu.pop("machine") - sum(cpu.values())
        print(
            "CPU             % of one core over the window: "
            + ", ".join(f"{name} {value:.0f}%" for name, value in cpu.items())
            + f", everything else on the machine {other:.0f}% (of {100 * (os.cpu_count() or 1)}%)"
        )
        # Capacity: api-server CPU per request answered, against the request rate the targets imply.
        served = len(s.heartbeat_ms) + s.claims + len(s.report_ms)
        per_request_ms = cpu["api-server"] / 100 * args.duration * 1000 / max(1, served)
        needed = args.agents / args.heartbeat_interval + CYCLES_TARGET_PER_S * 2 / args.free_slots
        cores = needed * per_request_ms / 1000
        print(
            f"capacity        api-server CPU {per_request_ms:.2f} ms per request answered"
            f" ({served / args.duration:.0f} req/s answered); the targets need {needed:.0f} req/s ="
            f" {cores:.1f} cores of api-server at that cost (one process runs Python on at most one core)"
        )
        rows.append(
            (
                f"heartbeat p99 < {HEARTBEAT_P99_TARGET_MS:.0f} ms",
                _ms(_pct(hb, 99)),
                bool(hb) and _pct(hb, 99) < HEARTBEAT_P99_TARGET_MS,
            )
        )
        rows.append(
            (
                f"claim+report cycles >= {CYCLES_TARGET_PER_S:.0f}/s",
                f"{cycles_per_s:.0f}/s",
                cycles_per_s >= CYCLES_TARGET_PER_S,
            )
        )
        n_errors = sum(s.errors.values())
        rows.append(("no errors", f"{n_errors} errors", n_errors == 0))  # fmt: skip
    if syncs:
        print(
            f"\nRemoteExecutor.sync() with {args.sync_pending} pending_sync rows,"
            " in-process against the bench DB:"
        )
        print(
            f"  {'finished rows':>13}  {'p50 of ' + str(args.sync_calls):>10}  {'p95':>9}"
            f"  {'with purge+liveness':>20}"
        )
        for r in syncs:
            print(
                f"  {r.rows:13d}  {_ms(statistics.median(r.times_ms)):>10}  {_ms(_pct(r.times_ms, 95)):>9}"
                f"  {_ms(statistics.median(r.with_purge_ms)):>20}"
            )
        labels = list(dict.fromkeys(label for r in syncs for label in r.query_ms))
        print("  EXPLAIN ANALYZE execution time of each statement sync issues:")
        print(f"  {'statement':34}" + "".join(f"{r.rows:>12d}" for r in syncs))
        for label in labels:
            print(
                f"  {label:34}" + "".join(f"{_ms(r.query_ms.get(label, float('nan')), 2):>12}" for r in syncs)
            )
        first, last = syncs[0], syncs[-1]
        for name, get in (
            ("sync", lambda r: statistics.median(r.times_ms)),
            ("sync incl. purge+liveness", lambda r: statistics.median(r.with_purge_ms)),
        ):
            a, b = get(first), get(last)
            rows.append((f"{name} flat {first.rows}..{last.rows} rows", f"{a:.1f} -> {b:.1f} ms",
                         b <= max(2 * a, a + 2.0)))  # fmt: skip
        for label in labels:
            a, b = first.query_ms.get(label, 0.0), last.query_ms.get(label, 0.0)
            if b > max(2 * a, a + 1.0):
                print(f"\n  grows with the table: {label} ({a:.2f} -> {b:.2f} ms); plan at {last.rows} rows:")
                print("    " + last.plans[label].replace("\n", "\n    "))
    if load is not None and load.db_statements:
        print("\npostgres, by total execution time over the window (pg_stat_statements):")
        for calls, total_ms, mean_ms, query in load.db_statements:
            statement = " ".join(query.split())[:100]
            print(f"  {total_ms / 1000:6.1f} s {calls:7d} calls {mean_ms:7.3f} ms  {statement}")
    if load is not None and load.profile is not None:
        print("\n" + summarize_profile(load.profile))
    print(f"\n  {'target':40} {'measured':>22}  result")
    for name, measured, ok in rows:
        print(f"  {name:40} {measured:>22}  {'PASS' if ok else 'MISS'}")
    return all(ok for _, _, ok in rows)


# -------------------------------------------------------------------------------------------- main


def _point_airflow_at(orch: Orchestrator) -> None:
    """Give this process the orchestrator's Airflow settings; must run before anything imports airflow."""
    for name in [n for n in os.environ if n.startswith("AIRFLOW")]:
        del os.environ[name]
    os.environ.update({k: v for k, v in orch.env.items() if k.startswith("AIRFLOW")})


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=2000, help="simulated agents, all heartbeating")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of the load window")
    p.add_argument("--busy", type=int, default=50, help="agents that also claim and report jobs")
    p.add_argument("--job-rate", type=float, default=600.0, help="jobs inserted per second")
    p.add_argument("--max-backlog", type=int, default=5000, help="pause inserting above this many queued")
    p.add_argument("--free-slots", type=int, default=SLOTS, help="free_slots of each claim")
    p.add_argument("--claim-wait", type=float, default=1.0, help="wait_seconds of each claim (long-poll)")
    p.add_argument("--heartbeat-interval", type=float, default=10.0)
    p.add_argument(
        "--server",
        choices=("standalone", "airflow"),
        default="standalone",
        help="standalone: airflow remote-exec api-server; airflow: the one in airflow api-server",
    )
    p.add_argument("--api-workers", type=int, default=1, help="processes of the standalone agent API")
    p.add_argument("--procs", type=int, default=2, help="load-generator processes")
    p.add_argument("--max-connections", type=int, default=500, help="connections per load process")
    p.add_argument("--sync-sizes", default="1000,10000,100000", help="finished rows for the sync timing")
    p.add_argument("--sync-calls", type=int, default=20)
    p.add_argument("--sync-pending", type=int, default=10, help="pending_sync rows in every sync call")
    p.add_argument("--skip-load", action="store_true", help="only the sync timing")
    p.add_argument("--skip-sync", action="store_true", help="only the load window")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of the api-server (Airflow settings)",
    )
    p.add_argument("--profile", action="store_true", help="py-spy the api-server during the window")
    p.add_argument("--keep-workdir", action="store_true", help="keep logs, DB and profile under /tmp")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    workdir = Path(tempfile.mkdtemp(prefix="scale-bench-", dir="/tmp"))
    workdir.chmod(0o755)  # the postgres user (when we are root) must reach its data directory
    # pg_stat_statements: where the database's time goes, printed with the results.
    pg = Postgres(workdir / "pg", settings={"shared_preload_libraries": "pg_stat_statements"})
    orch: Orchestrator | None = None
    engine: sa.Engine | None = None
    try:
        _say(f"postgres in {pg.workdir}")
        pg.start()
        server = "api-server" if args.server == "airflow" else "agent-api"
        orch = Orchestrator(home=workdir / "airflow", db_url=pg.url, dags_folder=REPO_ROOT / "dev" / "dags",
                            executor=EXECUTOR, components=(server,),
                            agent_api_workers=args.api_workers,
                            extra_env=dict(kv.split("=", 1) for kv in args.env))  # fmt: skip
        _say("airflow db migrate")
        orch.migrate()
        token = create_agent_token(orch, "scale-bench", ["default"])
        orch.start()
        api_url = orch.api_url if args.server == "airflow" else orch.agent_api_url
        _say(f"{' '.join(orch.processes[server].argv[1:])} on {api_url},"
             f" pids {orch.processes[server].tree_pids()}")  # fmt: skip
        _point_airflow_at(orch)
        engine = sa.create_engine(pg.url, poolclass=sa.NullPool)
        workload = _workload_json()
        _say(f"workload JSON is {len(workload)} bytes")
        load = None if args.skip_load else run_load(args, orch, server, api_url, pg, token, engine, workload)
        sizes = [int(n) for n in args.sync_sizes.split(",") if n]
        syncs = (
            [] if args.skip_sync else run_sync(engine, workload, sizes, args.sync_calls, args.sync_pending)
        )
        return 0 if report(args, load, syncs) else 1
    finally:
        _say("stopping")
        if engine is not None:
            engine.dispose()
        try:
            if orch is not None:
                orch.stop()
        finally:
            pg.stop()
            if args.keep_workdir:
                _say(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
