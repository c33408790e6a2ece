"""Imported once by the runners' forkserver so each runner starts with Airflow already loaded."""

from airflow.executors.base_executor import BaseExecutor  # noqa: F401
from airflow.executors.workloads import ExecuteTask  # noqa: F401
from airflow.sdk.execution_time import supervisor, task_runner  # noqa: F401
