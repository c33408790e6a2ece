"""What differs between the Airflow minors this package supports, in one place.

The rest of the package imports these names instead of testing Airflow's version itself. Each shim
says which minor needs it, so dropping a minor is deleting its branch here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import airflow
from packaging.version import Version

if TYPE_CHECKING:
    from airflow.executors import workloads

# The minors tested against (see the README's compatibility table); pyproject.toml declares the same.
OLDEST_MINOR = (3, 2)
NEWEST_MINOR = (3, 3)
AIRFLOW_VERSION = Version(airflow.__version__).base_version
AIRFLOW_MINOR: tuple[int, int] = tuple(Version(AIRFLOW_VERSION).release[:2])  # type: ignore[assignment]
# The agent dag processor and triggerer drive Airflow's own DagFileProcessorManager and
# TriggerRunnerSupervisor through overridable seams that arrived in 3.3; on 3.2 those classes read and
# write the metadata database themselves.
AGENT_COMPONENTS_MINOR = (3, 3)

# Connection tests on executors (``TestConnection`` workloads) arrived in Airflow 3.3. On 3.2 the
# scheduler never sends one, so no job of that kind exists and these names are never used.
CONNECTION_TESTS = AIRFLOW_MINOR >= (3, 3)
NO_CONNECTION_TESTS = f"Connection tests need Airflow 3.3 on the agent, which runs Airflow {AIRFLOW_VERSION}"
if CONNECTION_TESTS:
    from airflow.executors.workloads import TestConnection
    from airflow.models.callback import CallbackKey
    from airflow.models.connection_test import ConnectionTestKey
else:
    TestConnection = None

    class ConnectionTestKey(NamedTuple):  # type: ignore[no-redef]
        id: str

    CallbackKey = str  # type: ignore[misc]  # 3.2 keys callbacks by their id


def minor_of(version: str) -> tuple[str, ...]:
    """``("3", "3")`` of ``3.3.2`` (or ``3.3.0rc1``): agents and orchestrator must share it."""
    return tuple(version.split(".")[:2])


def connection_tests_model():
    """Airflow's connection-test ORM module (3.3 on), reached only for jobs of that kind."""
    from airflow.models import connection_test

    return connection_test


def minor_text(minor: tuple[int, int]) -> str:
    return f"{minor[0]}.{minor[1]}"


def callback_key(callback_id: str) -> CallbackKey:
    """The key the scheduler knows a callback by: a ``CallbackKey`` from 3.3, the bare id on 3.2."""
    return CallbackKey(id=callback_id) if AIRFLOW_MINOR >= (3, 3) else callback_id  # type: ignore[call-arg]


def require_airflow(component: str, minimum: tuple[int, int]) -> None:
    """Stop a component that needs seams of a newer Airflow with one line saying which."""
    if minimum > AIRFLOW_MINOR:
        raise SystemExit(
            f"The {component} needs Airflow {minor_text(minimum)} or newer, and this is Airflow "
            f"{AIRFLOW_VERSION}: upgrade Airflow here and on the orchestrator, or run Airflow's own "
            f"{component.removeprefix('agent ')} beside the orchestrator."
        )


def display_name(workload: workloads.ExecuteTask | workloads.ExecuteCallback) -> str:
    """What a process title calls a workload (3.2's workloads have no ``display_name``)."""
    if AIRFLOW_MINOR >= (3, 3):
        return workload.display_name
    return str(workload.ti.id if hasattr(workload, "ti") else workload.callback.id)


def run_workload(
    workload: workloads.ExecuteTask | workloads.ExecuteCallback, server: str, proctitle: str
) -> int:
    """Run a task or callback the way the orchestrator's Airflow would in LocalExecutor's worker."""
    if AIRFLOW_MINOR >= (3, 3):
        from airflow.executors.base_executor import BaseExecutor

        return BaseExecutor.run_workload(workload, server=server, proctitle=proctitle)
    return _run_workload_3_2(workload, server, proctitle)


def _run_workload_3_2(workload, server: str, proctitle: str) -> int:
    """Airflow 3.2's LocalExecutor: ``supervise`` for a task; a callback runs in the worker itself."""
    from airflow.executors import workloads
    from airflow.executors.workloads.callback import execute_callback_workload
    from airflow.sdk.execution_time.supervisor import supervise
    from setproctitle import setproctitle

    setproctitle(proctitle)
    if isinstance(workload, workloads.ExecuteCallback):
        import structlog

        success, error = execute_callback_workload(workload.callback, structlog.get_logger(proctitle))
        if not success:
            raise RuntimeError(error or "the callback failed")
        return 0
    return supervise(
        ti=workload.ti,
        dag_rel_path=workload.dag_rel_path,
        bundle_info=workload.bundle_info,
        token=workload.token,
        server=server,
        log_path=workload.log_path,
    )
