"""DAGs that tests/e2e/test_conformance.py runs under LocalExecutor and RemoteExecutor alike.

Tasks leave evidence in JSON-lines marker files under ``$CONFORMANCE_MARKER_DIR`` (one file per run
and event), recording the try number, the time and ``$CONFORMANCE_RUNNER``, which names the process
tree (orchestrator or agent) that ran them.  Nothing here runs at parse time.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.standard.sensors.python import PythonSensor
from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor
from airflow.sdk import DeadlineAlert, DeadlineReference, SyncCallback, dag, get_current_context, task

START = datetime(2026, 1, 1)
CLEARED_TASK_SLEEP = 60  # long enough for the test to clear it while it runs
# From the run's creation: the sensor surely starts and defers before, and its deferring try's executor
# event reaches the scheduler before the resumed try is queued. Stock LocalExecutor reports that event
# only when the try's supervisor ends; on a loaded machine a resume queued sooner is failed by the
# scheduler ("finished with state success, but the task instance's state attribute is queued").
DEFERRAL_SECONDS = 30
POKES_TO_SUCCEED = 3
# Longer than Airflow's default [workers] min_heartbeat_interval (5 s): a task supervisor notices that
# its task ended up to that late, and under stock LocalExecutor a poke rescheduled sooner races the late
# "success" event of the previous poke, which then fails the running next poke.
POKE_INTERVAL = 10
DEADLINE_SECONDS = 8  # after the run is queued
DEADLINE_TASK_SECONDS = 25  # the task outlives the deadline
WIDE_POOL_SLOTS = 6


def marker_name(dag_id: str, run_id: str, event: str) -> str:
    """File (in the marker directory) where tasks of ``run_id`` record ``event``; the test reads it."""
    safe_run_id = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
    return f"{dag_id}__{safe_run_id}__{event}.jsonl"


def record(dag_id: str, run_id: str, event: str, **fields: object) -> int:
    """Append one line to the event's marker file; return how many lines it holds now."""
    path = Path(os.environ["CONFORMANCE_MARKER_DIR"]) / marker_name(dag_id, run_id, event)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {
        "time": time.time(),
        "pid": os.getpid(),
        "runner": os.environ.get("CONFORMANCE_RUNNER"),
        **fields,
    }
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
    return len(path.read_text().splitlines())


def _record_try(event: str) -> int:
    """Record that the current task started; return its try number."""
    context = get_current_context()
    ti = context["ti"]
    record(ti.dag_id, ti.run_id, event, try_number=ti.try_number, map_index=ti.map_index)
    return ti.try_number


# 1. A long task the test clears while it runs: it must restart at once, without spending its retry.
@dag(dag_id="conformance_clear_running", schedule=None, start_date=START, catchup=False)
def conformance_clear_running():
    @task(retries=1, retry_delay=timedelta(minutes=5))
    def sleeper() -> None:
        if _record_try("started") == 1:
            time.sleep(CLEARED_TASK_SLEEP)

    sleeper()


# 2. Retries: fails on try 1 and succeeds on try 2, plain and mapped (only map index 1 fails).
@dag(dag_id="conformance_retry", schedule=None, start_date=START, catchup=False)
def conformance_retry():
    @task(retries=1, retry_delay=timedelta(seconds=3))
    def flaky() -> None:
        if _record_try("flaky") == 1:
            raise RuntimeError("fails on its first try")

    @task(retries=1, retry_delay=timedelta(seconds=3))
    def flaky_mapped(n: int) -> int:
        if _record_try("flaky_mapped") == 1 and n == 1:
            raise RuntimeError("map index 1 fails on its first try")
        return n

    flaky()
    flaky_mapped.expand(n=[0, 1, 2])


# 3. Deferral: the sensor hands its wait to the triggerer, then resumes on a worker.
@dag(dag_id="conformance_deferral", schedule=None, start_date=START, catchup=False)
def conformance_deferral():
    @task
    def after_wait() -> None:
        _record_try("after_wait")

    (
        TimeDeltaSensor(
            task_id="wait", delta=timedelta(seconds=DEFERRAL_SECONDS), deferrable=True, timeout=300
        )
        >> after_wait()
    )


def _third_poke(**context) -> bool:
    ti = context["ti"]
    return record(ti.dag_id, ti.run_id, "poke", try_number=ti.try_number) >= POKES_TO_SUCCEED


# 4. Reschedule: the sensor gives its slot back between pokes and succeeds on its third poke.
@dag(dag_id="conformance_reschedule", schedule=None, start_date=START, catchup=False)
def conformance_reschedule():
    PythonSensor(
        task_id="poke_three_times",
        python_callable=_third_poke,
        mode="reschedule",
        poke_interval=POKE_INTERVAL,
        timeout=300,
    )


def record_deadline_miss(context=None, **kwargs) -> None:
    """SyncCallback of the deadline alert: record where (in which process tree) it ran."""
    dag_run = (context or {}).get("dag_run") or {}
    record(dag_run.get("dag_id", "?"), dag_run.get("dag_run_id", "?"), "deadline_missed", **kwargs)


# 5. A deadline alert whose run outlives it: the executor runs the SyncCallback.
@dag(
    dag_id="conformance_deadline",
    schedule=None,
    start_date=START,
    catchup=False,
    deadline=DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=timedelta(seconds=DEADLINE_SECONDS),
        callback=SyncCallback(record_deadline_miss, kwargs={"alert": "too slow"}),
    ),
)
def conformance_deadline():
    @task
    def too_slow() -> None:
        _record_try("too_slow")
        time.sleep(DEADLINE_TASK_SECONDS)

    too_slow()


# 6. A task wider than one slot: pool_slots=6 (default_pool has 128).
@dag(dag_id="conformance_wide_pool_slots", schedule=None, start_date=START, catchup=False)
def conformance_wide_pool_slots():
    @task(pool_slots=WIDE_POOL_SLOTS)
    def wide() -> None:
        _record_try("wide")
        time.sleep(2)

    wide()


conformance_clear_running()
conformance_retry()
conformance_deferral()
conformance_reschedule()
conformance_deadline()
conformance_wide_pool_slots()
