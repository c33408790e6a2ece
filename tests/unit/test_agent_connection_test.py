"""Which connection an agent tests, by its --connection-tests mode; what its result may say."""

from __future__ import annotations

import os
import uuid
from types import SimpleNamespace

import pytest
from airflow.sdk.api.datamodels._generated import ConnectionTestConnectionResponse

from airflow_remote_exec.agent import connection_test
from airflow_remote_exec.agent.connection_test import Refused, _environment, connection_to_test, redacted

AGENT_HELD = "http://agent_user:agent-only-password@hooks.internal:8443/services/T0/B0/WEBHOOK-TOKEN"


@pytest.fixture(autouse=True)
def agent_held(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", AGENT_HELD)  # the agent's environment backend


def _request(**details) -> ConnectionTestConnectionResponse:
    return ConnectionTestConnectionResponse(conn_id="warehouse", conn_type="http", **details)


@pytest.mark.parametrize("mode", ["held", "any"])
@pytest.mark.parametrize("details", [{}, {"password": "***"}, {"host": "", "login": None}])
def test_a_request_with_no_details_tests_the_agents_own_connection(details, mode):
    connection, held = connection_to_test(_request(**details), mode)
    assert (connection.host, connection.password, held) == ("hooks.internal", "agent-only-password", True)


@pytest.mark.parametrize(
    "details", [{"host": "attacker.example"}, {"port": 15432}, {"extra": '{"auth_type": "kubernetes"}'}]
)
def test_by_default_a_request_with_details_is_refused(details):
    with pytest.raises(Refused, match="only the connections its own backends hold"):
        connection_to_test(_request(**details), "held")


@pytest.mark.parametrize(
    "details", [{"host": "attacker.example"}, {"port": 15432}, {"extra": '{"auth_type": "kubernetes"}'}]
)
def test_when_allowed_a_request_with_details_never_gets_the_agents_credentials(details):
    connection, held = connection_to_test(_request(**details), "any")
    assert connection.password is None and held is False


def test_a_connection_the_agent_lacks_is_refused_by_default_and_tested_as_requested_when_allowed(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_WAREHOUSE")
    with pytest.raises(Refused, match="hold no connection 'warehouse'"):
        connection_to_test(_request(), "held")
    connection, held = connection_to_test(_request(), "any")
    assert (connection.conn_type, connection.host, held) == ("http", None, False)


def test_an_agent_with_tests_off_refuses_every_test():
    with pytest.raises(Refused, match="off"):
        connection_to_test(_request(), "off")


def test_the_result_of_a_held_connection_quotes_none_of_its_values():
    connection, _ = connection_to_test(_request(), "held")
    error = f"Max retries exceeded with url: /services/T0/B0/WEBHOOK-TOKEN ({connection.get_uri()})"
    message = redacted(f"{error} host=hooks.internal user=agent_user", connection)
    for value in ("WEBHOOK-TOKEN", "agent-only-password", "hooks.internal", "agent_user"):
        assert value not in message
    assert "Max retries exceeded" in message


class _Client:
    """The Execution API's connection-test routes, as the agent's runner sees them."""

    def __init__(self, fetch_error=None):
        self.fetch_error = fetch_error
        self.reports = []
        self.connection_tests = self

    def get_connection(self, test_id):
        if self.fetch_error:
            raise self.fetch_error
        return _request()

    def update_state(self, test_id, state, message):
        self.reports.append((state.value, message))


def _run(monkeypatch, client, mode="held"):
    import airflow.sdk.api.client as sdk_client

    monkeypatch.setattr(sdk_client, "Client", lambda **kwargs: client)
    monkeypatch.setenv(connection_test.MODE_ENV, mode)
    workload = SimpleNamespace(token="t", connection_test_id=uuid.uuid4(), timeout=5)
    assert connection_test.run_connection_test(workload, "http://orchestrator/execution/") == 0


def test_a_test_fetched_by_another_runner_is_left_to_it(monkeypatch):
    from airflow.sdk.api.client import ServerResponseError

    conflict = ServerResponseError(
        "already running", request=None, response=SimpleNamespace(status_code=409, json=lambda: {})
    )
    client = _Client(fetch_error=conflict)
    _run(monkeypatch, client)
    assert client.reports == []  # the winner's result is the one that counts


def test_a_refused_test_is_reported_failed_with_the_reason(monkeypatch):
    client = _Client()
    _run(monkeypatch, client, mode="off")
    assert client.reports == [
        ("failed", "Not tested: this agent runs no connection tests (its --connection-tests is off)")
    ]


def test_the_test_environment_is_restored_for_the_runners_next_job(monkeypatch):
    monkeypatch.setenv("KEPT", "before")
    monkeypatch.delenv("ADDED", raising=False)
    with pytest.raises(RuntimeError), _environment(KEPT="during", ADDED="during"):
        assert os.environ["KEPT"] == "during"
        raise RuntimeError
    assert os.environ["KEPT"] == "before"
    assert "ADDED" not in os.environ


def test_quoted_and_nested_forms_of_held_values_are_stripped_too(monkeypatch):
    import json as _json

    extra = {"session_kwargs": {"aws_secret_access_key": "NESTED-SECRET-KEY"}, "timeout": True}
    monkeypatch.setenv(
        "AIRFLOW_CONN_WAREHOUSE",
        _json.dumps(
            {"conn_type": "http", "host": "Hooks.Internal", "password": "p@ss/w0rd!", "extra": extra}
        ),
    )
    connection, _ = connection_to_test(_request(), "held")
    message = redacted(
        "auth p%40ss%2Fw0rd%21 p%40ss/w0rd%21 NESTED-SECRET-KEY at hooks.internal True", connection
    )
    assert message == "auth *** *** *** at *** True"


def test_an_empty_extra_is_no_detail():
    _, held = connection_to_test(_request(extra="{}"), "held")
    assert held is True


def test_an_agent_with_tests_off_never_fetches_the_connection(monkeypatch):
    client = _Client(fetch_error=AssertionError("fetched"))
    _run(monkeypatch, client, mode="off")
    assert client.reports == [("failed", f"Not tested: {connection_test.OFF}")]
