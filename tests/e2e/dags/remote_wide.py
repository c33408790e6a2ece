"""Twelve tasks over two queues, joined by XCom: the main end-to-end DAG for the RemoteExecutor."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import dag, task


@dag(dag_id="remote_wide", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def remote_wide():
    @task(queue="default")
    def make(n: int) -> int:
        return n

    @task(queue="etl")
    def double(value: int) -> int:
        return value * 2

    @task(queue="default")
    def total(values: list[int]) -> int:
        return sum(values)

    @task(queue="etl")
    def check(value: int) -> None:
        if value != sum(2 * n for n in range(5)):
            raise ValueError(f"wrong total {value}")

    doubled = [
        double.override(task_id=f"double_{n}")(make.override(task_id=f"make_{n}")(n)) for n in range(5)
    ]
    check(total(doubled))


remote_wide()
