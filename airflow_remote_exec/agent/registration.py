"""What every agent component does to join the orchestrator: describe itself, register (waiting
while another live agent holds its name), and parse DAGs with the orchestrator's executor list."""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import socket
import threading
from importlib.metadata import version

from airflow_remote_exec import __version__
from airflow_remote_exec.agent.client import AgentClient, Conflict, Stopped, VersionMismatch
from airflow_remote_exec.api.datamodels import RegisterRequest, RegisterResponse

log = logging.getLogger(__name__)

EXECUTOR_ENV = "AIRFLOW__CORE__EXECUTOR"
# Executor names, module paths and aliases ("alias:module.Class"), comma-separated.
EXECUTOR_LIST = re.compile(r"[A-Za-z0-9_.:,\-]{1,2000}")


@functools.cache
def installed_versions() -> tuple[str, str]:
    """Airflow core and Task SDK versions: the orchestrator refuses an agent whose major.minor differ,
    since the workloads it serialises must parse and run here exactly as there. Read from package
    metadata: importing Airflow in the agent's own process would cost seconds at every start."""
    return version("apache-airflow-core"), version("apache-airflow-task-sdk")


def register_request(
    name: str, queues: list[str], slots: int, components: list[str], versions: tuple[str, str]
) -> RegisterRequest:
    airflow_version, task_sdk_version = versions
    return RegisterRequest(
        name=name,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        version=__version__,
        airflow_version=airflow_version,
        task_sdk_version=task_sdk_version,
        queues=queues,
        slots=slots,
        components=components,
    )


def register_until_name_free(
    client: AgentClient, request: RegisterRequest, stop: threading.Event, retry_seconds: float
) -> RegisterResponse:
    """Register, retrying every ``retry_seconds`` while another live agent holds our name (usually our
    own killed predecessor). Raises on any other refusal, and ``Stopped`` if ``stop`` is set."""
    while True:
        try:
            return client.register(request)
        except Conflict as err:
            log.warning(
                "Agent name %r is held by another live agent (%s); give each agent its own --name. "
                "Retrying in %.0fs",
                request.name,
                err.detail,
                retry_seconds,
            )
            if stop.wait(retry_seconds * random.uniform(0.8, 1.2)):
                raise Stopped("stopped while waiting for the agent name") from err


def version_mismatch_message(err: VersionMismatch) -> str:
    airflow_version, task_sdk_version = installed_versions()
    return (
        f"Registration refused: this agent has Airflow {airflow_version} / Task SDK {task_sdk_version}, "
        f"which the orchestrator cannot use ({err.detail}); install its Airflow version here."
    )


def use_orchestrator_executors(executors: str | None) -> None:
    """Parse DAG files (in processes started after this) with the orchestrator's executor list: a task
    pinned to an executor by name fails to parse where that name is not configured."""
    if not executors or os.environ.get(EXECUTOR_ENV) == executors:
        return
    if not EXECUTOR_LIST.fullmatch(executors):
        log.error("Ignoring the orchestrator's [core] executor: not a list of executor names: %r", executors)
        return
    os.environ[EXECUTOR_ENV] = executors
    log.info("Parsing DAGs with the orchestrator's executors: %s", executors)
