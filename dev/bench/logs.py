"""Print-to-served delay of task logs: from a line printed by a task on an agent to the line served by
the orchestrator's REST log endpoint (what the UI polls), with logs shipped to the orchestrator.

    python -m dev.bench.logs [--markers 60] [--rate 1]

One stack (api-server, scheduler, dag processor on PostgreSQL, ``logging_config_class`` of this
package) and one worker agent. ``bench_logs`` prints ``--markers`` lines at ``--rate`` a second; the
benchmark polls the log endpoint every 0.1 s while the task runs and takes, for each line, the time
from its print (the time it carries) to its first sight. Both run on this machine: one clock.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from dev.bench.compare import DAGS, say
from dev.stack import Agent, Orchestrator, Postgres, create_agent_token

EXECUTOR = "airflow_remote_exec.executor.RemoteExecutor"
DAG_ID, TASK_ID = "bench_logs", "print_markers"
MARKER = re.compile(r"bench-marker (\d+) printed-at (\d+\.\d+)")
SHIPPED_LOGS = {"AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS": "airflow_remote_exec.logging_config.LOGGING_CONFIG"}


def watch(client, run_id: str, markers: int, timeout: float) -> dict[int, float]:
    """First sight minus print time of each marker, polling until the last is served."""
    delays: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(delays) < markers and time.monotonic() < deadline:
        events = client.task_log(DAG_ID, run_id, TASK_ID, missing_ok=True)  # none until the try is queued
        seen = time.time()
        for event in events:
            for m in MARKER.finditer(event):
                delays.setdefault(int(m.group(1)), seen - float(m.group(2)))
        time.sleep(0.1)
    return delays


def bench(workdir: Path, markers: int, rate: float) -> dict[int, float]:
    pg = Postgres(workdir / "pg")
    pg.start()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(pg.stop)
        db_url = pg.create_database(f"bench_logs_{uuid.uuid4().hex[:6]}")
        orch = Orchestrator(workdir / "orchestrator", db_url, DAGS, EXECUTOR, extra_env=SHIPPED_LOGS)
        cleanup.callback(orch.stop)
        say("airflow db migrate, api-server, scheduler, dag-processor")
        orch.migrate()
        orch.start(timeout=180)
        token = create_agent_token(orch, "bench", ["default"])
        agent = Agent(orch.api_url, workdir / "agent", DAGS, token, "bench-agent", ["default"], 2)
        cleanup.callback(agent.stop)
        agent.start(timeout=120)
        with orch.client() as client:
            client.wait_for_dag(DAG_ID, timeout=240)
            run_id = client.trigger(DAG_ID, conf={"count": markers, "rate": rate})
            say(f"{DAG_ID}: {markers} lines at {rate}/s; polling the REST log endpoint every 0.1 s")
            delays = watch(client, run_id, markers, timeout=120 + markers / rate)
            state = client.wait_for_run(DAG_ID, run_id, timeout=300)
            if state != "success" or len(delays) < markers:
                raise RuntimeError(f"run {state}, {len(delays)}/{markers} lines seen\n{orch.logs(30)}")
        say("stopping")
        return delays


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev/bench/logs", description=__doc__)
    parser.add_argument("--markers", type=int, default=60)
    parser.add_argument("--rate", type=float, default=1.0, help="lines a second")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    workdir.chmod(0o755)
    ordered = sorted(bench(workdir, args.markers, args.rate).values())
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    print(f"\nPrint on the agent -> served by GET .../logs/{{try}} ({len(ordered)} lines, {args.rate}/s)")
    print(f"{'median':>8}{'p95':>8}{'max':>8}{'min':>8}")
    print(f"{statistics.median(ordered):>7.2f}s{p95:>7.2f}s{ordered[-1]:>7.2f}s{ordered[0]:>7.2f}s")
    print(f"(logs in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
