"""Connection tests on the agent: Airflow's own ``test_connection``, run inside the agents' network.

A test from the UI or REST API names a connection, and may carry details the user typed. What a
worker agent does with it is its owner's choice (``--connection-tests``):

- ``held`` (the default): it tests only connections its own backends hold, as they hold them, when
  the request carries nothing but the id and type. That is how a connection that exists only in the
  agents' network is tested; the result message is stripped of the connection's values.
- ``any``: also tests the details a request carries, exactly as given (never mixed with the agent's
  copy). A hook may then pick up the agent's ambient credentials (its environment, files it can
  read) and send them to the requester's host: enable it only where testing users are trusted so.
- ``off``: fails every test, saying so.

The result goes back through Airflow's Execution API, as Airflow's own connection-test supervisor does.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote, quote_plus

import structlog

if TYPE_CHECKING:
    from airflow.executors.workloads import TestConnection
    from airflow.sdk.api.datamodels._generated import ConnectionTestConnectionResponse
    from airflow.sdk.definitions.connection import Connection

log = structlog.get_logger(logger_name="airflow_remote_exec.connection_test")

MODE_ENV = "AIRFLOW_REMOTE_AGENT_CONNECTION_TESTS"
Mode = Literal["held", "any", "off"]
MODES: tuple[Mode, ...] = ("held", "any", "off")
MASKED = "***"  # what the UI sends for a secret it did not change
_BLANK = (None, "", MASKED, "{}")  # what the UI sends for a field left alone
_DETAILS = ("host", "login", "password", "schema_", "port", "extra")
_SHORTEST_REDACTED = 4  # shorter values (a port, "db") would blank out ordinary words


OFF = "this agent runs no connection tests (its --connection-tests is off)"


class Refused(Exception):
    """This agent does not run this test; the message says why."""


def mode() -> Mode:
    value = os.environ.get(MODE_ENV, "held")
    return value if value in MODES else "held"  # type: ignore[return-value]


def _carries_details(request: ConnectionTestConnectionResponse) -> bool:
    return any(getattr(request, name) not in _BLANK for name in _DETAILS)


def agent_connection(conn_id: str) -> Connection | None:
    """The connection as this agent's own backends hold it (environment, then the configured secrets
    backend), never asking the orchestrator."""
    from airflow.sdk.execution_time.supervisor import ensure_secrets_backend_loaded

    for backend in ensure_secrets_backend_loaded():
        connection = backend.get_connection(conn_id)
        if connection is not None:
            return connection
    return None


def connection_to_test(request: ConnectionTestConnectionResponse, allowed: Mode) -> tuple[Connection, bool]:
    """The connection to test, and whether it is the agent's own copy; ``Refused`` if the mode forbids."""
    from airflow.sdk.definitions.connection import Connection

    if allowed == "off":
        raise Refused(OFF)
    if not _carries_details(request):
        held = agent_connection(request.conn_id)
        if held is not None:
            return held, True
        if allowed == "held":
            raise Refused(f"the agent's secrets backends hold no connection {request.conn_id!r}")
    if allowed == "held":
        raise Refused(
            "this agent tests only the connections its own backends hold: send the connection id and "
            "type alone (or start the agent with --connection-tests any)"
        )
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
    return typed, False


def _leaves(value: object) -> Iterator[str]:
    """Every string or number inside a (nested) extra."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, str | int | float) and not isinstance(value, bool):
        yield str(value)


def redacted(message: str, connection: Connection) -> str:
    """The message without any of the agent-held connection's values, as written or as a URL or JSON
    would quote them: a hook's error may quote its URL, and the message is stored on the orchestrator."""
    values = {connection.host, connection.login, connection.password, connection.schema, connection.extra}
    with contextlib.suppress(Exception):
        values.add(connection.get_uri())
        values.update(_leaves(connection.extra_dejson))
    forms = set()
    for value in (str(v) for v in values if v):
        forms.update(
            {
                value,
                quote(value, safe=""),
                quote(value),
                quote_plus(value),
                json.dumps(value)[1:-1],
                value.lower(),
            }
        )
    for form in sorted((f for f in forms if len(f) >= _SHORTEST_REDACTED), key=len, reverse=True):
        message = message.replace(form, MASKED)
    return message


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


def _test(request: ConnectionTestConnectionResponse, timeout: int) -> tuple[bool, str]:
    """Look the connection up and test it, all within the test's timeout."""
    from airflow.sdk.exceptions import AirflowTaskTimeout
    from airflow.sdk.execution_time.timeout import TimeoutPosix

    try:
        with TimeoutPosix(seconds=timeout, error_message="timed out"):
            connection, held = connection_to_test(request, mode())
        # Hooks look their connection up by id: the environment makes it this one. The client context
        # makes Airflow build SDK connections, as its own connection-test supervisor does. It is set
        # outside the timer, so an alarm can never leave it behind for the runner's next job.
        with (
            _environment(
                **{f"AIRFLOW_CONN_{connection.conn_id.upper()}": connection.get_uri()},
                _AIRFLOW_PROCESS_CONTEXT="client",
            ),
            TimeoutPosix(seconds=timeout, error_message="timed out"),
        ):
            success, message = connection.test_connection()
        message = f"{message} (the agent tested its own copy of the connection)" if held else message
        return success, redacted(message, connection) if held else message
    except Refused as err:
        return False, f"Not tested: {err}"
    except AirflowTaskTimeout:
        return False, f"Connection test timed out after {timeout}s"
    except BaseException as err:  # noqa: BLE001 - any failure is the test's result, never the runner's
        # Only the type: an exception's text may quote the connection, and the result is stored.
        return False, f"Connection test failed unexpectedly: {type(err).__name__}"


def run_connection_test(workload: TestConnection, server: str) -> int:
    """Fetch the test's connection, test it, and report the result. Always 0: the outcome is the
    test's state in Airflow, like Airflow's own supervisor."""
    from airflow.sdk.api.client import Client, ServerResponseError

    # Airflow hands a test's connection out once: a request retried after a timeout gets a 409, so the
    # fetch waits as long as the test may take rather than Airflow's usual few seconds.
    client = Client(base_url=server, token=workload.token, timeout=max(30, workload.timeout))
    test_id = workload.connection_test_id
    if mode() == "off":  # refused without fetching: the connection is never handed to this agent
        _report(client, test_id, False, f"Not tested: {OFF}")
        return 0
    try:
        request = client.connection_tests.get_connection(test_id)
    except ServerResponseError as err:
        # Another runner fetched it (this one's claim was rerouted), or it ended or is gone: the test's
        # state belongs to whoever has it, and is not this runner's to change.
        log.warning("Connection test not started", connection_test_id=str(test_id), error=str(err))
        return 0
    log.info("Starting connection test", connection_id=request.conn_id, timeout=workload.timeout)
    success, message = _test(request, workload.timeout)
    _report(client, test_id, success, message)
    log.info("Connection test finished", connection_id=request.conn_id, success=success)
    return 0


def _report(client, test_id, success: bool, message: str) -> None:
    from airflow.sdk.api.client import ServerResponseError
    from airflow.sdk.api.datamodels._generated import ConnectionTestState

    state = ConnectionTestState.SUCCESS if success else ConnectionTestState.FAILED
    try:
        client.connection_tests.update_state(test_id, state, message[:2000])
    except ServerResponseError as err:  # a test already ended (reaped, say) keeps its result
        log.warning("Could not report the connection test's result", error=str(err))
