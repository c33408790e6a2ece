"""DAG parsing on an agent against a stock ``airflow dag-processor``, on the same machine and folder.

    python -m dev.bench.parse [--dags 200] [--tasks 10]

Two stacks on one PostgreSQL server, one after the other (never side by side): a stock orchestrator
whose own dag processor parses the folder, and one with no dag processor and no DAG files whose
``airflow-remote-agent dag-processor`` parses the same folder as a LocalDagBundle and publishes each
file over the agent API. For each it prints:

* the time from the dag processor's start until every DAG of the folder is in the metadata DB
  (``dag`` rows with a serialized DAG), and the files per second that makes;
* the time from writing one new DAG file until its DAG is in the metadata DB, five times.

Stock settings otherwise (``[dag_processor] parsing_processes`` = 2, the default). Times come from
polling the metadata DB every 0.1 s. Every process started is stopped by PID, every wait is bounded.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from dev.stack import DagProcessorAgent, Orchestrator, Postgres, create_agent_token, local_bundles, wait_until

EXECUTOR = "airflow_remote_exec.executor.RemoteExecutor"
DAG_FILE = """
import datetime
from airflow.sdk import DAG
from airflow.providers.standard.operators.empty import EmptyOperator

with DAG("{dag_id}", schedule=None, start_date=datetime.datetime(2024, 1, 1), tags=["parse-bench"]):
    previous = None
    for i in range({tasks}):
        task = EmptyOperator(task_id=f"t{{i}}")
        if previous is not None:
            previous >> task
        previous = task
"""
NEW_FILES = 5


def _write_dags(folder: Path, count: int, tasks: int, prefix: str = "bench_parse") -> None:
    for i in range(count):
        (folder / f"{prefix}_{i:04d}.py").write_text(DAG_FILE.format(dag_id=f"{prefix}_{i:04d}", tasks=tasks))


def _parsed(db_url: str, prefix: str) -> int:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT count(*) FROM dag JOIN serialized_dag USING (dag_id) "
                    "WHERE dag.dag_id LIKE :p AND NOT dag.is_stale"
                ),
                {"p": f"{prefix}%"},
            ).scalar_one()
    finally:
        engine.dispose()


def _measure(db_url: str, folder: Path, count: int, tasks: int, started: float) -> tuple[float, list[float]]:
    wait_until(lambda: _parsed(db_url, "bench_parse_") >= count, 900, 0.1, what=f"{count} DAGs parsed")
    full = time.monotonic() - started
    latencies = []
    for i in range(NEW_FILES):
        prefix = f"bench_new_{i}"
        written = time.monotonic()
        _write_dags(folder, 1, tasks, prefix)
        wait_until(lambda p=prefix: _parsed(db_url, p) >= 1, 300, 0.1, what=f"{prefix} parsed")
        latencies.append(time.monotonic() - written)
    return full, latencies


def _stack(pg: Postgres, work: Path, name: str, folder: Path, components: tuple[str, ...]) -> Orchestrator:
    db_url = pg.create_database(f"parse_{name}_{uuid.uuid4().hex[:8]}")
    orch = Orchestrator(work / name, db_url, folder, EXECUTOR, components=components)
    orch.migrate()
    return orch


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m dev.bench.parse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dags", type=int, default=200, help="DAG files in the folder (one DAG each)")
    parser.add_argument("--tasks", type=int, default=10, help="tasks per DAG")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="parse-bench-"))
    work.chmod(0o755)
    pg = Postgres(work / "pg")
    results: dict[str, tuple[float, list[float]]] = {}
    pg.start()
    try:
        for name in ("stock", "agent"):
            folder = work / f"dags-{name}"
            folder.mkdir()
            _write_dags(folder, args.dags, args.tasks)
            if name == "stock":
                orch = _stack(pg, work, name, folder, ("api-server", "scheduler"))
                orch.start()
                started = time.monotonic()
                orch.start_process("dag-processor")
                processor = None
            else:
                empty = work / "orchestrator-dags"
                empty.mkdir()
                orch = _stack(pg, work, name, empty, ("api-server", "scheduler"))
                orch.start()
                token = create_agent_token(orch, "parser", ["default"], components=["dag-processor"])
                processor = DagProcessorAgent(
                    orch.api_url, work / "agent", token, "parser", local_bundles(bench=folder)
                )
                started = time.monotonic()
                processor.start()
            try:
                results[name] = _measure(orch.db_url, folder, args.dags, args.tasks, started)
                print(f"[{name}] {args.dags} DAGs in {results[name][0]:.1f} s", flush=True)
            finally:
                if processor is not None:
                    processor.stop()
                orch.stop()
    finally:
        pg.stop()
    print(f"\n{args.dags} DAG files of {args.tasks} tasks, {NEW_FILES} new files each; logs under {work}")
    print(f"{'dag processor':<28}{'all parsed':>12}{'files/s':>10}{'new file p50':>15}{'max':>8}")
    for name, label in (("stock", "stock airflow dag-processor"), ("agent", "agent dag-processor")):
        full, latencies = results[name]
        print(
            f"{label:<28}{full:>11.1f}s{args.dags / full:>10.1f}"
            f"{statistics.median(latencies):>14.1f}s{max(latencies):>7.1f}s"
        )


if __name__ == "__main__":
    main()
