"""One DAG whose tasks name their executor: stock LocalExecutor beside RemoteExecutor."""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import dag, task


@dag(dag_id="deploy_mixed", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def deploy_mixed():
    @task(executor="LocalExecutor", retries=0)
    def on_local() -> str:
        return os.environ.get("DEPLOYMENT_RUNNER", "?")

    @task(executor="RemoteExecutor", retries=0)
    def on_remote() -> str:
        return os.environ.get("DEPLOYMENT_RUNNER", "?")

    on_local() >> on_remote()


deploy_mixed()
