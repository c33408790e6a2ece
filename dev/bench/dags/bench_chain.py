"""20 trivial tasks in sequence: each task is queued only after the previous one finished, so the wall
time is dominated by per-task dispatch latency and per-task overhead, not by throughput."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import chain, dag, task

LENGTH = 20


@dag(dag_id="bench_chain", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def bench_chain():
    @task
    def noop(i: int) -> int:
        return i

    chain(*(noop.override(task_id=f"step_{i:02d}")(i) for i in range(LENGTH)))


bench_chain()
