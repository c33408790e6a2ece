"""Which agents may run this orchestrator's workloads: the same Airflow and Task SDK minor versions.

Workloads are Airflow's own pydantic models, serialized by the scheduler and parsed by the agent's
Airflow; across minor versions their fields change. An agent that cannot read them is refused at
registration, before it could claim (and fail) a single task.
"""

from __future__ import annotations

import airflow
from airflow.sdk import __version__ as task_sdk_version

from airflow_remote_exec import compat
from airflow_remote_exec.models import Component


def version_mismatch(agent_airflow: str, agent_task_sdk: str, components: list[str]) -> str | None:
    """Why an agent with these versions and components cannot serve this orchestrator, or None."""
    pairs = (("Airflow", agent_airflow, airflow.__version__), ("Task SDK", agent_task_sdk, task_sdk_version))
    for what, theirs, ours in pairs:
        if compat.minor_of(theirs) != compat.minor_of(ours):
            return (
                f"Agent runs {what} {theirs or '(unknown)'} but the orchestrator runs {ours}; "
                f"install {what} {'.'.join(compat.minor_of(ours))}.x on the agent."
            )
    return _needs_newer_airflow(components)


def _needs_newer_airflow(components: list[str]) -> str | None:
    """The agent dag processor and triggerer need the orchestrator on Airflow 3.3 too: on 3.2 their
    routes would drive seams Airflow does not have."""
    newer = sorted(set(components) & {Component.DAG_PROCESSOR, Component.TRIGGERER})
    if not newer or compat.AIRFLOW_MINOR >= compat.AGENT_COMPONENTS_MINOR:
        return None
    return (
        f"The agent {' and '.join(newer)} need Airflow {compat.minor_text(compat.AGENT_COMPONENTS_MINOR)}, "
        f"and the orchestrator runs {compat.AIRFLOW_VERSION}: run Airflow's own beside it."
    )
