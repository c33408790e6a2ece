"""A task that prints a numbered marker line, with the time it printed it, ``rate`` times a second."""

from __future__ import annotations

import time
from datetime import datetime

from airflow.sdk import dag, get_current_context, task


@dag(dag_id="bench_logs", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def bench_logs():
    @task(retries=0)
    def print_markers() -> None:
        conf = get_current_context()["dag_run"].conf
        count, rate = int(conf.get("count", 60)), float(conf.get("rate", 1))
        for number in range(1, count + 1):
            print(f"bench-marker {number} printed-at {time.time():.3f}", flush=True)
            time.sleep(1 / rate)

    print_markers()


bench_logs()
