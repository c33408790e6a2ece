"""Which agents may run this orchestrator's workloads: the same Airflow and Task SDK minor versions.

Workloads are Airflow's own pydantic models, serialized by the scheduler and parsed by the agent's
Airflow; across minor versions their fields change. An agent that cannot read them is refused at
registration, before it could claim (and fail) a single task.
"""

from __future__ import annotations

import airflow
from airflow.sdk import __version__ as task_sdk_version

ORCHESTRATOR_AIRFLOW = airflow.__version__


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def runs_orchestrator_minor(agent_airflow: str | None) -> bool:
    """Whether an agent session's recorded Airflow is this orchestrator's minor (unrecorded: assumed)."""
    return agent_airflow is None or _minor(agent_airflow) == _minor(ORCHESTRATOR_AIRFLOW)


def version_mismatch(agent_airflow: str, agent_task_sdk: str) -> str | None:
    """Why an agent with these versions cannot serve this orchestrator, or None if it can."""
    pairs = (("Airflow", agent_airflow, ORCHESTRATOR_AIRFLOW), ("Task SDK", agent_task_sdk, task_sdk_version))
    for what, theirs, ours in pairs:
        if _minor(theirs) != _minor(ours):
            return (
                f"Agent runs {what} {theirs or '(unknown)'} but the orchestrator runs {ours}; "
                f"install {what} {'.'.join(_minor(ours))}.x on the agent."
            )
    return None
