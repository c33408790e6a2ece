"""DAGs for the chaos suite. Every execution of a task records itself in ``$CHAOS_MARKER_DIR``:
a file per execution with a ``start`` line, a ``tick`` line every 0.25 s while it runs and an
``end`` line when its work is done, so the suite can prove no task instance ran twice at once.

A run's conf sets how long each task works: ``seconds`` for the first try, ``retry_seconds`` for
later tries (default: ``seconds``), so a scenario can keep a first try busy long enough to be cut
off mid-work while its retry stays short. With ``release`` (a file name), a task also ends its
work as soon as that file exists in the marker directory, so a scenario can keep its tasks running
until the outage it causes is over, however long the machine takes to recover.

Retries are 0 everywhere a spurious reroute must show as a failed run; only ``chaos_long``, whose
scenarios need exactly one retry, has ``retries=1``.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import dag, get_current_context, task

TICK_SECONDS = 0.25


def run_with_markers(default_seconds: float) -> str:
    context = get_current_context()
    ti = context["ti"]
    conf = context["dag_run"].conf or {}
    seconds = float(conf.get("seconds", default_seconds))
    if ti.try_number > 1:
        seconds = float(conf.get("retry_seconds", seconds))
    marker_dir = Path(os.environ.get("CHAOS_MARKER_DIR", "/tmp/chaos-markers"))
    marker_dir.mkdir(parents=True, exist_ok=True)
    release = marker_dir / conf["release"] if conf.get("release") else None
    name = f"{ti.dag_id}__{ti.run_id}__{ti.task_id}__{ti.map_index}__{ti.try_number}__{os.getpid()}"
    path = marker_dir / name.replace(":", "_").replace("+", "_")
    with path.open("a", buffering=1) as marker:
        marker.write(f"start {time.time()} {socket.gethostname()} {os.environ.get('CHAOS_AGENT', '?')}\n")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (release and release.exists()):
            time.sleep(TICK_SECONDS)
            marker.write(f"tick {time.time()}\n")
        marker.write(f"end {time.time()}\n")
    return name


NO_RETRIES = {"retries": 0}
ONE_RETRY = {"retries": 1, "retry_delay": timedelta(seconds=1)}
START = datetime(2026, 1, 1)


@dag(dag_id="chaos_long", schedule=None, start_date=START, catchup=False, default_args=ONE_RETRY)
def chaos_long():
    @task(queue="chaos")
    def long_task() -> str:
        return run_with_markers(90)

    long_task()


@dag(dag_id="chaos_single", schedule=None, start_date=START, catchup=False, default_args=NO_RETRIES)
def chaos_single():
    @task(queue="chaos")
    def steady_task() -> str:
        return run_with_markers(45)

    steady_task()


@dag(dag_id="chaos_wide", schedule=None, start_date=START, catchup=False, default_args=NO_RETRIES)
def chaos_wide():
    """As many tasks as the suite's two agents have slots (2 x 4): all run at once."""

    @task(queue="chaos")
    def wide(n: int) -> str:
        return run_with_markers(60)

    for n in range(8):
        wide.override(task_id=f"wide_{n}")(n)


@dag(dag_id="chaos_many", schedule=None, start_date=START, catchup=False, default_args=NO_RETRIES)
def chaos_many():
    @task(queue="chaos")
    def work(n: int) -> str:
        return run_with_markers(4)

    for n in range(20):
        work.override(task_id=f"work_{n:02d}")(n)


@dag(dag_id="chaos_revoked", schedule=None, start_date=START, catchup=False, default_args=NO_RETRIES)
def chaos_revoked():
    """On a queue that only the agent whose token gets revoked serves."""

    @task(queue="chaos-revoked")
    def revoked_queue_task() -> str:
        return run_with_markers(1)

    revoked_queue_task()


chaos_long()
chaos_single()
chaos_wide()
chaos_many()
chaos_revoked()
