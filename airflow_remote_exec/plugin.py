"""Airflow plugin: mounts the agent API into ``airflow api-server``."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_remote_exec.api.app import URL_PREFIX, create_app


class RemoteExecPlugin(AirflowPlugin):
    name = "remote_exec"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Remote Execution agent API"}]
