"""A task that prints a numbered marker line, with the time it printed it, every second."""

from __future__ import annotations

import time
from datetime import datetime

from airflow.sdk import dag, get_current_context, task


@dag(dag_id="log_markers", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def log_markers():
    @task(queue="logs", retries=0)
    def print_markers() -> None:
        count = int(get_current_context()["dag_run"].conf.get("count", 10))
        for number in range(1, count + 1):
            print(f"log-marker {number} printed-at {time.time():.3f}", flush=True)
            time.sleep(1)

    print_markers()


log_markers()
