"""Example DAG run by ``./dev/demo``: fan-out, XCom between tasks, a task that fails once, and a
deferrable sensor whose trigger runs on the triggerer agent."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor
from airflow.sdk import dag, get_current_context, task


@dag(
    dag_id="example_remote",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["remote-exec", "example"],
)
def example_remote():
    @task
    def extract() -> list[int]:
        return [1, 2, 3, 4]

    @task
    def square(value: int) -> int:
        return value * value

    @task(retries=1, retry_delay=timedelta(seconds=1))
    def flaky_total(values: list[int]) -> int:
        """Fails on its first try to show a retry running through the agent."""
        if get_current_context()["ti"].try_number == 1:
            raise RuntimeError("failing the first try on purpose")
        return sum(values)

    @task
    def report(total: int) -> str:
        message = f"sum of squares = {total}"
        print(message)
        return message

    # Hands its wait to the triggerer agent, freeing its worker slot, then resumes in the same try.
    wait = TimeDeltaSensor(task_id="deferred_wait", delta=timedelta(seconds=3), deferrable=True)
    wait >> report(flaky_total(square.expand(value=extract())))


example_remote()
