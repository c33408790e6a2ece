"""DAGs for the RemoteExecutor's edge cases: a failing task, an unserved queue, a long task."""

from __future__ import annotations

import time
from datetime import datetime

from airflow.sdk import dag, task


@dag(dag_id="remote_fails", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def remote_fails():
    @task(retries=0)
    def boom() -> None:
        raise RuntimeError("this task always fails")

    boom()


@dag(dag_id="remote_unserved", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def remote_unserved():
    @task(queue="nobody-serves-this")
    def orphan() -> None:
        pass

    orphan()


@dag(dag_id="remote_sleeps", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def remote_sleeps():
    @task(retries=0)
    def nap(seconds: int = 60) -> int:  # killed by the test long before it ends
        time.sleep(seconds)
        return seconds

    nap()


remote_fails()
remote_unserved()
remote_sleeps()


@dag(dag_id="remote_drain", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def remote_drain():
    @task(queue="drain", retries=0)
    def finish_me() -> str:
        time.sleep(6)
        return "finished after SIGTERM"

    finish_me()


remote_drain()


@dag(dag_id="remote_drain_timeout", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def remote_drain_timeout():
    @task(queue="drain-timeout", retries=0)
    def outlives_the_drain() -> None:
        time.sleep(300)

    outlives_the_drain()


@dag(dag_id="remote_twin", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def remote_twin():
    @task(queue="twin", retries=0)
    def held_by_the_first() -> int:
        time.sleep(10)
        return 10

    held_by_the_first()


remote_drain_timeout()
remote_twin()


@dag(dag_id="remote_token_probe", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def remote_token_probe():
    @task(queue="probe", retries=0)
    def look_for_the_token() -> list[str]:
        """The environment variables a task sees that hold an agent token (prefix ``rex_``)."""
        import os

        return sorted(name for name, value in os.environ.items() if value.startswith("rex_"))

    look_for_the_token()


remote_token_probe()


@dag(dag_id="remote_token_file_probe", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def remote_token_file_probe():
    @task(queue="probe-file", retries=0, run_as_user="nobody")
    def read_the_token_file(**context) -> dict:
        """Try to read the agent's token file (path from the run's conf) as the task's own user."""
        import os

        try:
            with open(context["dag_run"].conf["token_file"]) as token_file:
                outcome = "read" if token_file.read().startswith("rex_") else "read, not a token"
        except PermissionError:
            outcome = "denied"
        return {"uid": os.getuid(), "token_file": outcome}

    read_the_token_file()


remote_token_file_probe()


@dag(dag_id="remote_hostile", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def remote_hostile():
    @task(queue="hostile", retries=0)
    def one_slot_each(n: int) -> int:
        return n

    one_slot_each.expand(n=[1, 2, 3])


remote_hostile()


@dag(dag_id="remote_depth", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def remote_depth():
    @task(queue="etl", retries=0)
    def hold_a_slot(n: int) -> int:  # long enough to be counted running, short enough to wait out
        time.sleep(15)
        return n

    hold_a_slot.expand(n=[1, 2, 3])


remote_depth()
