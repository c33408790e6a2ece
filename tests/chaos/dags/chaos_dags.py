"""DAGs for the chaos suite. Every execution of a task records itself in ``$CHAOS_MARKER_DIR``:
a file per execution with a ``start`` line, a ``tick`` line every 0.25 s while it runs and an
``end`` line when its work is done, so the suite can prove no task instance ran twice at once."""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import dag, get_current_context, task

TICK_SECONDS = 0.25


def run_with_markers(seconds: float) -> str:
    ti = get_current_context()["ti"]
    marker_dir = Path(os.environ.get("CHAOS_MARKER_DIR", "/tmp/chaos-markers"))
    marker_dir.mkdir(parents=True, exist_ok=True)
    name = f"{ti.dag_id}__{ti.run_id}__{ti.task_id}__{ti.map_index}__{ti.try_number}__{os.getpid()}"
    path = marker_dir / name.replace(":", "_").replace("+", "_")
    with path.open("a", buffering=1) as marker:
        marker.write(f"start {time.time()} {socket.gethostname()} {os.environ.get('CHAOS_AGENT', '?')}\n")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(TICK_SECONDS)
            marker.write(f"tick {time.time()}\n")
        marker.write(f"end {time.time()}\n")
    return name


RETRIES = {"retries": 3, "retry_delay": timedelta(seconds=1)}


@dag(dag_id="chaos_long", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, default_args=RETRIES)
def chaos_long():
    @task(queue="chaos")
    def long_task() -> str:
        return run_with_markers(30)  # long enough to be fenced mid-work, never to finish first

    long_task()


@dag(dag_id="chaos_many", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, default_args=RETRIES)
def chaos_many():
    @task(queue="chaos")
    def work(n: int) -> str:
        return run_with_markers(4)

    for n in range(20):
        work.override(task_id=f"work_{n:02d}")(n)


chaos_long()
chaos_many()
