"""Dispatch speed and scale: RemoteExecutor side by side with stock LocalExecutor and EdgeExecutor.

    python -m dev.bench.compare [--repeats 3] [--slots 8] [--only remote,local,edge]

One PostgreSQL server, one fresh database per stack, and the stacks run one after the other (never side
by side: they would steal each other's CPU).  Every stack gets the same number of task slots: one agent
with ``--slots N``, ``parallelism = N`` for LocalExecutor, one edge worker with ``--concurrency N``.
Stock settings otherwise (EdgeExecutor keeps its default 5 s ``job_poll_interval``), because the stock
configuration is what a user compares against.

Every stack gets ``parallelism = N`` by default, what most users set.  LocalExecutor frees a task's
executor slot when it hands the task to its worker processes, RemoteExecutor when the agent reports
the task running: both keep the next tasks queued while their N slots are busy.  EdgeExecutor keeps a
slot until the task ends; ``--parallelism-factor 2`` gives remote and edge ``2N``, N more queued ahead.

Each DAG runs once untimed first (first-run costs such as DAG-file imports in fresh processes are not
what we compare), then ``--repeats`` times.  Times come from the metadata DB, not from our polling, so
the 0.5 s REST polling between runs does not blur them.  Process logs are kept in the printed directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import sqlalchemy as sa

from dev.stack import (
    AIRFLOW_BIN,
    Agent,
    AirflowClient,
    ManagedProcess,
    Orchestrator,
    Postgres,
    create_agent_token,
    free_port,
    wait_until,
)

DAGS = Path(__file__).resolve().parent / "dags"
FANOUT, CHAIN = "bench_fanout", "bench_chain"
EXECUTORS = {
    "remote": "airflow_remote_exec.executor.RemoteExecutor",
    "local": "LocalExecutor",
    "edge": "airflow.providers.edge3.executors.EdgeExecutor",
}
EDGE_WORKER_NAME = "bench-edge"
PARSE_TIMEOUT = 240.0
RUN_TIMEOUT = 900.0  # a 100-task fan-out on a loaded 2-core machine can take minutes


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------ measuring


@dataclass
class RunStats:
    """One DAG run, all in seconds, as recorded by Airflow in the metadata DB."""

    wall: float  # dag_run end_date - start_date
    latencies: list[float]  # per task: start_date - queued_dttm (executor pickup)
    durations: list[float]  # per task: end_date - start_date


@dataclass
class StackResult:
    kind: str
    runs: dict[str, list[RunStats]] = field(default_factory=dict)
    agent_rss_kb: int | None = None  # remote only: idle agent process tree
    agent_pss_kb: int | None = None

    def walls(self, dag_id: str) -> list[float]:
        return [r.wall for r in self.runs.get(dag_id, [])]

    def latencies(self, dag_id: str) -> list[float]:
        return [x for r in self.runs.get(dag_id, []) for x in r.latencies]

    def durations(self, dag_id: str) -> list[float]:
        return [x for r in self.runs.get(dag_id, []) for x in r.durations]


def run_stats(db_url: str, dag_id: str, run_id: str) -> RunStats:
    params = {"dag_id": dag_id, "run_id": run_id}
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            start, end = conn.execute(
                sa.text(
                    "SELECT start_date, end_date FROM dag_run WHERE dag_id = :dag_id AND run_id = :run_id"
                ),
                params,
            ).one()
            tis = conn.execute(
                sa.text(
                    "SELECT queued_dttm, start_date, end_date FROM task_instance"
                    " WHERE dag_id = :dag_id AND run_id = :run_id"
                ),
                params,
            ).all()
    finally:
        engine.dispose()
    return RunStats(
        wall=(end - start).total_seconds(),
        latencies=[(t.start_date - t.queued_dttm).total_seconds() for t in tis if t.queued_dttm],
        durations=[(t.end_date - t.start_date).total_seconds() for t in tis if t.start_date and t.end_date],
    )


def run_dag(orch: Orchestrator, client: AirflowClient, dag_id: str) -> RunStats:
    run_id = client.trigger(dag_id)
    state = client.wait_for_run(dag_id, run_id, timeout=RUN_TIMEOUT)
    if state != "success":
        raise RuntimeError(f"{dag_id} run {run_id} ended {state}\n{orch.logs(30)}")
    return run_stats(orch.db_url, dag_id, run_id)


def tree_memory_kb(pids: Sequence[int]) -> tuple[int, int]:
    """(sum of VmRSS, sum of Pss) over ``pids`` in kB.

    The RSS sum counts the pages the forkserver's children share with it once per process, so it
    overstates what the tree really costs; the PSS sum splits shared pages between their users.
    """
    rss = pss = 0
    for pid in pids:
        with contextlib.suppress(OSError):  # exited or zombie
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return rss, pss


def median_ms(values: Sequence[float]) -> float:
    return statistics.median(values) * 1000 if values else float("nan")


def p95_ms(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile: an actual observed latency, no interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, -(-95 * len(ordered) // 100) - 1)] * 1000


# ------------------------------------------------------------------------------------------- stacks


@dataclass
class Stack:
    kind: str
    orch: Orchestrator
    agent: Agent | None = None


def edge_worker(orch: Orchestrator, home: Path, slots: int) -> ManagedProcess:
    """``airflow edge worker`` with its own AIRFLOW_HOME and no DB URL, like on a separate machine.

    It keeps the orchestrator's JWT secret: that is how edge workers authenticate to the edge API.
    """
    env = {k: v for k, v in orch.env.items() if k != "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"}
    env["AIRFLOW_HOME"] = str(home)
    argv = [AIRFLOW_BIN, "edge", "worker", "--concurrency", str(slots), "--queues", "default",
            "--edge-hostname", EDGE_WORKER_NAME]  # fmt: skip
    return ManagedProcess("edge-worker", argv, env, home / "edge-worker.log", cwd=home)


def edge_worker_state(db_url: str) -> str | None:
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return conn.scalar(
                sa.text("SELECT state FROM edge_worker WHERE worker_name = :n"), {"n": EDGE_WORKER_NAME}
            )
    except sa.exc.ProgrammingError:  # table not created yet
        return None
    finally:
        engine.dispose()


@contextlib.contextmanager
def running_stack(
    kind: str, pg: Postgres, workdir: Path, slots: int, parallelism_factor: int = 1
) -> Iterator[Stack]:
    """Start one executor's stack on a fresh database and its worker; stop everything on exit."""
    home = workdir / kind
    port = free_port()
    parallelism = slots if kind == "local" else parallelism_factor * slots
    extra_env = {
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "1024",  # the default 16 must never be the cap
    }
    if kind == "edge":
        extra_env["AIRFLOW__EDGE__API_ENABLED"] = "True"
        extra_env["AIRFLOW__EDGE__API_URL"] = f"http://127.0.0.1:{port}/edge_worker/v1/rpcapi"
    db_url = pg.create_database(f"bench_{kind}_{uuid.uuid4().hex[:8]}")
    orch = Orchestrator(home / "orchestrator", db_url, DAGS, EXECUTORS[kind], port=port, extra_env=extra_env)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(orch.stop)
        say(f"[{kind}] parallelism {parallelism}; airflow db migrate, api-server, scheduler, dag-processor")
        orch.migrate()
        orch.start(timeout=180)
        stack = Stack(kind, orch)
        if kind == "remote":
            token = create_agent_token(orch, "bench-agent", ["default"])
            stack.agent = Agent(orch.api_url, home / "agent", DAGS, token, "bench-agent", ["default"], slots)
            cleanup.callback(stack.agent.stop)
            say(f"[{kind}] agent with {slots} slots (log: {stack.agent.process.log_path})")
            stack.agent.start(timeout=120)
        elif kind == "edge":
            worker = edge_worker(orch, home / "edge-worker", slots)
            cleanup.callback(worker.stop)
            say(f"[{kind}] edge worker with concurrency {slots} (log: {worker.log_path})")
            worker.start()

            def registered() -> bool:
                if worker.returncode is not None:
                    raise RuntimeError(f"edge worker exited {worker.returncode}:\n{worker.log_tail(30)}")
                return edge_worker_state(db_url) in ("idle", "running")

            wait_until(registered, 120, interval=0.5, what="edge worker to register")
        yield stack
        say(f"[{kind}] stopping")


def bench_stack(stack: Stack, repeats: int) -> StackResult:
    result = StackResult(stack.kind)
    with stack.orch.client() as client:
        for dag_id in (FANOUT, CHAIN):
            client.wait_for_dag(dag_id, timeout=PARSE_TIMEOUT)
        for dag_id in (FANOUT, CHAIN):
            warm = run_dag(stack.orch, client, dag_id)
            say(f"[{stack.kind}] {dag_id} warm-up (untimed): {warm.wall:.1f} s")
        if stack.agent is not None:
            agent = stack.agent
            wait_until(lambda: (agent.healthz() or {}).get("running_jobs") == 0, 60, what="agent idle")
            time.sleep(2)  # let the last reports and the runner replacements settle
            result.agent_rss_kb, result.agent_pss_kb = tree_memory_kb(agent.process.tree_pids())
            say(f"[{stack.kind}] agent idle: RSS {result.agent_rss_kb / 1024:.0f} MiB over its process tree")
        for dag_id in (FANOUT, CHAIN):
            for i in range(repeats):
                stats = run_dag(stack.orch, client, dag_id)
                result.runs.setdefault(dag_id, []).append(stats)
                say(
                    f"[{stack.kind}] {dag_id} run {i + 1}/{repeats}: {stats.wall:.1f} s, queued->start"
                    f" p50 {median_ms(stats.latencies):.0f} ms, p95 {p95_ms(stats.latencies):.0f} ms,"
                    f" task p50 {median_ms(stats.durations):.0f} ms (load {os.getloadavg()[0]:.1f})"
                )
    return result


# ------------------------------------------------------------------------------------------ report


def machine() -> str:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {os.cpu_count()} CPUs, {model}; load average {load}\n"
        f"python {platform.python_version()}, apache-airflow {version('apache-airflow')}, "
        f"apache-airflow-providers-edge3 {version('apache-airflow-providers-edge3')}"
    )


def report(results: dict[str, StackResult], repeats: int) -> None:
    print()
    print(machine())
    print("lat = queued->start per task, task = start->end per task, pooled over the timed runs")
    print()
    runs_width = max(len("runs (s)"), 6 * repeats)
    print(f"{'executor':8}  {'dag':12}  {'runs (s)':{runs_width}}  {'median s':>8}  {'lat p50 ms':>10}  "
          f"{'lat p95 ms':>10}  {'task p50 ms':>11}")  # fmt: skip
    for kind, res in results.items():
        for dag_id in (FANOUT, CHAIN):
            walls = res.walls(dag_id)
            if not walls:
                continue
            runs = " ".join(f"{w:5.1f}" for w in walls)
            lats = res.latencies(dag_id)
            print(
                f"{kind:8}  {dag_id:12}  {runs:{runs_width}}  {statistics.median(walls):8.1f}  "
                f"{median_ms(lats):10.0f}  {p95_ms(lats):10.0f}  {median_ms(res.durations(dag_id)):11.0f}"
            )
    remote = results.get("remote")
    if remote is None or not remote.runs:
        return
    print()
    for other_kind in ("local", "edge"):
        other = results.get(other_kind)
        if other is None or not other.runs:
            continue
        fan = statistics.median(remote.walls(FANOUT)) / statistics.median(other.walls(FANOUT))
        chain = statistics.median(remote.walls(CHAIN)) / statistics.median(other.walls(CHAIN))
        lat = median_ms(remote.latencies(CHAIN)) / median_ms(other.latencies(CHAIN))
        print(
            f"Remote/{other_kind.capitalize()}: fan-out wall {fan:.2f}x, chain wall {chain:.2f}x, "
            f"chain latency p50 {lat:.2f}x"
        )
    print()
    if remote.agent_rss_kb is not None:
        print(
            f"agent idle footprint: RSS {remote.agent_rss_kb / 1024:.0f} MiB summed over its process tree "
            f"(PSS {remote.agent_pss_kb / 1024:.0f} MiB, shared pages counted once)"
        )
    local = results.get("local")
    if local is not None and local.runs:
        for what, r, o in (
            ("queued->start", remote.latencies(CHAIN), local.latencies(CHAIN)),
            ("task duration", remote.durations(CHAIN), local.durations(CHAIN)),
        ):
            print(
                f"per-task overhead over LocalExecutor ({CHAIN}, median {what}): remote {median_ms(r):.0f} ms"
                f" vs local {median_ms(o):.0f} ms ({median_ms(r) - median_ms(o):+.0f} ms)"
            )
        print()
        fan = statistics.median(remote.walls(FANOUT)) / statistics.median(local.walls(FANOUT))
        chain = statistics.median(remote.walls(CHAIN)) / statistics.median(local.walls(CHAIN))
        lat = median_ms(remote.latencies(CHAIN))
        for ok, what in (
            (fan <= 1.1, f"remote fan-out wall <= 1.1x local: {fan:.2f}x"),
            (chain <= 1.1, f"remote chain wall <= 1.1x local: {chain:.2f}x"),
            (lat < 100, f"remote chain queued->start median < 100 ms: {lat:.0f} ms"),
        ):
            print(f"target {'met ' if ok else 'MISSED'}  {what}")


# -------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dev/bench/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per DAG and executor (default 3)")
    parser.add_argument("--slots", type=int, default=8, help="task slots of every executor (default 8)")
    parser.add_argument(
        "--parallelism-factor",
        type=int,
        default=1,
        choices=(1, 2),
        help="remote and edge get [core] parallelism = this x slots (default 1, what most users set)",
    )
    parser.add_argument("--only", default="remote,local,edge", help="comma-separated subset, in run order")
    args = parser.parse_args(argv)
    args.only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = set(args.only) - set(EXECUTORS)
    if unknown or not args.only:
        parser.error(f"--only takes some of {','.join(EXECUTORS)}; got {sorted(unknown) or 'nothing'}")
    if args.repeats < 1 or args.slots < 1:
        parser.error("--repeats and --slots must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM must unwind through the finally blocks below like Ctrl-C does, or processes would be left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="airflow-bench-"))
    workdir.chmod(0o755)  # the server runs as user postgres when we are root: it must get in
    say(f"work dir (logs are kept): {workdir}")
    say(machine().replace("\n", "; "))
    pg = Postgres(workdir / "postgres")
    results: dict[str, StackResult] = {}
    try:
        pg.start()
        for kind in args.only:
            with running_stack(kind, pg, workdir, args.slots, args.parallelism_factor) as stack:
                results[kind] = bench_stack(stack, args.repeats)
    except KeyboardInterrupt:  # the stacks have been stopped on the way out; no traceback needed
        say("interrupted")
        return 130
    finally:
        with contextlib.suppress(Exception):
            pg.stop()
        shutil.rmtree(pg.datadir, ignore_errors=True)  # tens of MB per database; the logs stay
        if results:
            report(results, args.repeats)
        print(f"\ntotal time {time.monotonic() - started:.0f} s; logs in {workdir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
