"""Three chained TaskFlow tasks passing values through XCom: the smallest DAG that exercises a worker."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import dag, task


@dag(dag_id="stack_smoke", schedule=None, start_date=datetime(2024, 1, 1), catchup=False, tags=["e2e"])
def stack_smoke():
    @task
    def extract() -> list[int]:
        return [1, 2, 3]

    @task
    def transform(values: list[int]) -> list[int]:
        return [v * 10 for v in values]

    @task
    def load(values: list[int]) -> int:
        if values != [10, 20, 30]:
            raise ValueError(f"unexpected XCom value {values!r}")
        return sum(values)

    load(transform(extract()))


stack_smoke()
