"""Connection tests on the agent: Airflow's own ``test_connection``, run inside the agents' network.

A test from the UI or REST API names a connection and carries the details the user typed. When it
carries no details beyond the type (no host, login, password, schema, port or extra), the agent tests
the connection as its own secrets backends hold it: that is how a connection that exists only in the
agents' network is tested, and its secrets never reach the orchestrator. When it carries details, the
agent tests exactly those, so a request can never point the agent's stored credentials at another host.
The result goes back through Airflow's Execution API, as Airflow's own connection-test supervisor does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from airflow.executors.workloads import TestConnection
    from airflow.sdk.api.datamodels._generated import ConnectionTestConnectionResponse
    from airflow.sdk.definitions.connection import Connection

log = structlog.get_logger(logger_name="airflow_remote_exec.connection_test")

MASKED = "***"  # what the UI sends for a secret it did not change
_DETAILS = ("host", "login", "password", "schema_", "port", "extra")


def _carries_details(request: ConnectionTestConnectionResponse) -> bool:
    return any(getattr(request, name) not in (None, "", MASKED) for name in _DETAILS)


def agent_connection(conn_id: str) -> Connection | None:
    """The connection as this agent's own backends hold it (environment, then the configured secrets
    backend), never asking the orchestrator."""
    from airflow.sdk.execution_time.supervisor import ensure_secrets_backend_loaded

    for backend in ensure_secrets_backend_loaded():
        connection = backend.get_connection(conn_id)
        if connection is not None:
            return connection
    return None


def connection_to_test(request: ConnectionTestConnectionResponse) -> tuple[Connection, str]:
    """The connection to test, and where it came from (said in the result)."""
    from airflow.sdk.definitions.connection import Connection

    if not _carries_details(request):
        held = agent_connection(request.conn_id)
        if held is not None:
            return held, "as held by the agent's secrets backends"
    typed = Connection(
        conn_id=request.conn_id,
        conn_type=request.conn_type,
        host=request.host,
        login=request.login,
        password=request.password,
        schema=request.schema_,
        port=request.port,
        extra=request.extra,
    )
    return typed, "with the details of the request"


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set these variables for the test only: the runner process goes on to run other jobs."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_connection_test(workload: TestConnection, server: str) -> int:
    """Fetch the test's connection, test it with a timeout, and report the result. Always 0: the
    outcome is the test's state in Airflow, like Airflow's own supervisor."""
    from airflow.sdk.api.client import Client
    from airflow.sdk.api.datamodels._generated import ConnectionTestState
    from airflow.sdk.exceptions import AirflowTaskTimeout
    from airflow.sdk.execution_time.timeout import TimeoutPosix

    # Airflow hands a test's connection out once: a request retried after a timeout gets a 409, so the
    # fetch waits as long as the test may take rather than Airflow's usual few seconds.
    client = Client(base_url=server, token=workload.token, timeout=max(30, workload.timeout))
    test_id = workload.connection_test_id

    def report(state: ConnectionTestState, message: str) -> None:
        try:
            client.connection_tests.update_state(test_id, state, message[:2000])
        except Exception as err:  # noqa: BLE001 - a test already ended (reaped, say) keeps its result
            log.warning("Could not report the connection test's result", error=str(err))

    try:
        request = client.connection_tests.get_connection(test_id)
    except Exception as err:  # noqa: BLE001 - it was fetched once already, or is gone
        report(ConnectionTestState.FAILED, f"The agent could not start the test: {err}")
        return 0
    log.info("Starting connection test", connection_id=request.conn_id, timeout=workload.timeout)
    try:
        connection, source = connection_to_test(request)
        # Hooks look their connection up by id: the environment makes it this one. The client context
        # makes Airflow build SDK connections, as its own connection-test supervisor does.
        with (
            _environment(
                **{f"AIRFLOW_CONN_{connection.conn_id.upper()}": connection.get_uri()},
                _AIRFLOW_PROCESS_CONTEXT="client",
            ),
            TimeoutPosix(seconds=workload.timeout, error_message="timed out"),
        ):
            success, message = connection.test_connection()
        state = ConnectionTestState.SUCCESS if success else ConnectionTestState.FAILED
        report(state, f"{message} (tested on an agent, {source})")
    except AirflowTaskTimeout:
        report(ConnectionTestState.FAILED, f"Connection test timed out after {workload.timeout}s")
    except Exception as err:  # noqa: BLE001 - any failure is the test's result
        # Only the type: an exception's text may quote the connection, and the result is stored.
        report(ConnectionTestState.FAILED, f"Connection test failed unexpectedly: {type(err).__name__}")
    log.info("Connection test finished", connection_id=request.conn_id)
    return 0
