"""The deferral benchmark's DAG: tasks that defer to a trigger firing at a known moment, and on resume
return how long after that moment they resumed on the worker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk import DAG, BaseOperator

TASKS = 20
WAIT_SECONDS = 8


class DeferUntil(BaseOperator):
    def __init__(self, *, index: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.index = index

    def execute(self, context):
        moment = datetime.now(UTC) + timedelta(seconds=WAIT_SECONDS)
        self.defer(
            trigger=DateTimeTrigger(moment=moment),
            method_name="resume",
            kwargs={"moment": moment.isoformat()},
        )

    def resume(self, context, event=None, moment: str = "") -> float:
        return (datetime.now(UTC) - datetime.fromisoformat(moment)).total_seconds()


with DAG("bench_deferral", schedule=None, start_date=datetime(2024, 1, 1), max_active_tasks=64):
    DeferUntil.partial(task_id="defer").expand(index=list(range(TASKS)))
