"""Trigger firing to task resuming: a triggerer agent against a stock ``airflow triggerer``.

    python -m dev.bench.triggers [--repeats 3]

Two stacks on one PostgreSQL server, one after the other, that differ only in the triggerer: both run
RemoteExecutor with one worker agent (8 slots) and the orchestrator's own dag processor; one runs a
stock ``airflow triggerer`` on the orchestrator, the other a triggerer agent. Each run of
``bench_deferral`` defers 20 mapped tasks to a trigger firing 8 s later; each task, resumed on the
worker agent, returns how long after that moment it resumed (its XCom). The first run is untimed.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from dev.bench.compare import DAGS, say
from dev.stack import Agent, Orchestrator, Postgres, TriggererAgent, create_agent_token, query

EXECUTOR = "airflow_remote_exec.executor.RemoteExecutor"
DAG_ID = "bench_deferral"
SLOTS = 8


def resume_delays(db_url: str, run_id: str) -> list[float]:
    rows = query(
        db_url,
        "SELECT value FROM xcom WHERE dag_id = :dag_id AND run_id = :run_id AND key = 'return_value'",
        dag_id=DAG_ID,
        run_id=run_id,
    )
    return [float(row["value"]) for row in rows]


def bench(kind: str, pg: Postgres, workdir: Path, repeats: int) -> list[float]:
    home = workdir / kind
    components = ("api-server", "scheduler", "dag-processor") + (("triggerer",) if kind == "stock" else ())
    db_url = pg.create_database(f"bench_triggers_{kind}_{uuid.uuid4().hex[:6]}")
    orch = Orchestrator(home / "orchestrator", db_url, DAGS, EXECUTOR, components=components)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(orch.stop)
        say(f"[{kind}] airflow db migrate, {', '.join(components)}")
        orch.migrate()
        orch.start(timeout=180)
        token = create_agent_token(orch, "bench", ["default"], components=["worker", "triggerer"])
        worker = Agent(orch.api_url, home / "worker", DAGS, token, "bench-worker", ["default"], SLOTS)
        cleanup.callback(worker.stop)
        worker.start(timeout=120)
        if kind == "agent":
            triggerer = TriggererAgent(orch.api_url, home / "triggerer", token, "bench-triggerer")
            cleanup.callback(triggerer.stop)
            triggerer.start(timeout=120)
        delays: list[float] = []
        with orch.client() as client:
            client.wait_for_dag(DAG_ID, timeout=240)
            for repeat in range(repeats + 1):
                run_id = client.trigger(DAG_ID)
                state = client.wait_for_run(DAG_ID, run_id, timeout=600)
                if state != "success":
                    raise RuntimeError(f"{DAG_ID} run {run_id} ended {state}\n{orch.logs(30)}")
                if repeat:  # the first run warms imports in fresh processes
                    delays += resume_delays(db_url, run_id)
        say(f"[{kind}] stopping")
        return delays


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev/bench/triggers", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-triggers-"))
    workdir.chmod(0o755)
    pg = Postgres(workdir / "pg")
    pg.start()
    try:
        results = {kind: bench(kind, pg, workdir, args.repeats) for kind in ("stock", "agent")}
    finally:
        pg.stop()
    print(f"\nTrigger firing -> task resumed on the worker agent ({args.repeats} runs of 20 tasks each)")
    print(f"{'triggerer':<26}{'median':>8}{'p95':>8}{'max':>8}")
    for kind, delays in results.items():
        ordered = sorted(delays)
        p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
        name = "stock airflow triggerer" if kind == "stock" else "airflow-remote-agent"
        print(f"{name:<26}{statistics.median(ordered):>7.2f}s{p95:>7.2f}s{ordered[-1]:>7.2f}s")
    print(f"(logs in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
