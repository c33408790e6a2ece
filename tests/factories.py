"""Builders for rows and workloads used by unit and API tests."""

from __future__ import annotations

import uuid
from pathlib import Path

from airflow.executors.workloads import BundleInfo, ExecuteCallback, ExecuteTask
from airflow.executors.workloads.callback import CallbackDTO, CallbackFetchMethod
from airflow.executors.workloads.task import TaskInstanceDTO

from airflow_remote_exec.models import JobState, RemoteJob


def make_workload(
    task_id: str = "t1",
    *,
    dag_id: str = "d1",
    run_id: str = "r1",
    try_number: int = 1,
    map_index: int = -1,
    queue: str = "default",
    priority_weight: int = 1,
    pool_slots: int = 1,
) -> ExecuteTask:
    ti = TaskInstanceDTO(
        id=uuid.uuid4(),
        task_id=task_id,
        dag_id=dag_id,
        run_id=run_id,
        try_number=try_number,
        map_index=map_index,
        dag_version_id=uuid.uuid4(),
        queue=queue,
        pool_slots=pool_slots,
        priority_weight=priority_weight,
    )
    return ExecuteTask(
        ti=ti,
        dag_rel_path=Path("dag.py"),
        token="workload-token",
        log_path="log.txt",
        bundle_info=BundleInfo(name="dags-folder", version=None),
    )


def identity_of(ti) -> dict:
    """The fields that name a task try, as row or constructor keywords."""
    return {name: getattr(ti, name) for name in ("dag_id", "task_id", "run_id", "map_index", "try_number")}


def make_callback_workload(
    dag_id: str = "d1", dag_run_id: int = 1, path: str = "tests.callbacks.notify", kwargs: dict | None = None
) -> ExecuteCallback:
    """A deadline-alert callback workload as the scheduler builds it."""
    data = {"path": path, "kwargs": kwargs or {}, "dag_id": dag_id, "dag_run_id": str(dag_run_id)}
    return ExecuteCallback(
        callback=CallbackDTO(id=str(uuid.uuid4()), fetch_method=CallbackFetchMethod.IMPORT_PATH, data=data),
        dag_rel_path=Path("dag.py"),
        token="workload-token",
        log_path="executor_callbacks/cb.log",
        bundle_info=BundleInfo(name="dags-folder", version=None),
    )


def make_job(task_id: str = "t1", *, state: str = JobState.QUEUED, **kwargs) -> RemoteJob:
    workload = make_workload(task_id, **{k: v for k, v in kwargs.items() if k in _WORKLOAD_FIELDS})
    ti = workload.ti
    row = {k: v for k, v in kwargs.items() if k not in _WORKLOAD_FIELDS}
    return RemoteJob(
        ti_id=str(ti.id),
        **identity_of(ti),
        queue=ti.queue,
        priority_weight=ti.priority_weight,
        pool_slots=ti.pool_slots,
        state=state,
        workload=workload.model_dump_json(),
        attempt=row.pop("attempt", 0),
        pending_sync=row.pop("pending_sync", False),
        **row,
    )


_WORKLOAD_FIELDS = {"dag_id", "run_id", "try_number", "map_index", "queue", "priority_weight", "pool_slots"}


def write_marker(marker: str, text: str) -> None:
    """An importable callback: proves it ran, and with what, by writing ``text`` to ``marker``."""
    Path(marker).write_text(text)
