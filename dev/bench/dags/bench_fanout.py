"""100 independent trivial tasks: measures how fast an executor drains a wide DAG through its slots.

The tasks are explicit rather than ``.expand``-ed so that no executor pays for task mapping expansion.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import dag, task

WIDTH = 100


@dag(dag_id="bench_fanout", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def bench_fanout():
    @task
    def noop(i: int) -> int:
        return i

    for i in range(WIDTH):
        noop.override(task_id=f"noop_{i:03d}")(i)


bench_fanout()
