"""``[logging] logging_config_class = airflow_remote_exec.logging_config.LOGGING_CONFIG``: Airflow's
own logging, with task logs read from what agents shipped to the orchestrator, in every task state.

Airflow looks for ``REMOTE_TASK_LOG`` in the module of its logging config. Airflow imports this
module while it sets up logging, so it imports nothing of this package at module level.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from airflow.config_templates.airflow_local_settings import DEFAULT_LOGGING_CONFIG

LOGGING_CONFIG = DEFAULT_LOGGING_CONFIG


class ShippedLogIO:
    """Airflow's remote-log handler interface, reading the logs agents shipped.

    Agents ship while tasks run, so there is nothing to upload here: a task of another executor keeps
    its local log, which Airflow reads as usual.
    """

    processors: tuple = ()

    def upload(self, path: Any, ti: Any = None) -> None:
        return None

    def read(self, relative_path: str, ti: Any) -> tuple[list[str], list[str]]:
        from airflow_remote_exec.task_logs import read_task_log

        return read_task_log(ti, ti.try_number)

    def stream(self, relative_path: str, ti: Any) -> tuple[list[str], list[Iterator[str]]]:
        """What Airflow's reader uses when it is there: the log a batch of chunks at a time."""
        from airflow_remote_exec.task_logs import stream_task_log

        return stream_task_log(ti, ti.try_number)


REMOTE_TASK_LOG = ShippedLogIO()
