"""Which connection an agent tests: its own copy only when the request carries nothing but the type."""

from __future__ import annotations

import os

import pytest
from airflow.sdk.api.datamodels._generated import ConnectionTestConnectionResponse

from airflow_remote_exec.agent.connection_test import _environment, connection_to_test

AGENT_HELD = "postgres://agent_user:agent-only-password@db.internal:5432/warehouse"


@pytest.fixture(autouse=True)
def agent_held(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", AGENT_HELD)  # the agent's environment backend


def _request(**details) -> ConnectionTestConnectionResponse:
    return ConnectionTestConnectionResponse(conn_id="warehouse", conn_type="postgres", **details)


@pytest.mark.parametrize("details", [{}, {"password": "***"}, {"host": "", "login": None}])
def test_a_request_with_no_details_tests_the_agents_own_connection(details):
    connection, source = connection_to_test(_request(**details))
    assert (connection.host, connection.password) == ("db.internal", "agent-only-password")
    assert "agent" in source


@pytest.mark.parametrize(
    "details", [{"host": "attacker.example"}, {"port": 15432}, {"extra": '{"sslmode": "disable"}'}]
)
def test_a_request_with_details_never_lends_it_the_agents_credentials(details):
    connection, source = connection_to_test(_request(**details))
    assert connection.password is None
    assert "request" in source


def test_a_connection_the_agent_lacks_is_tested_as_requested(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_WAREHOUSE")
    connection, _ = connection_to_test(_request())
    assert (connection.conn_type, connection.host) == ("postgres", None)


def test_the_test_environment_is_restored_for_the_runners_next_job(monkeypatch):
    monkeypatch.setenv("KEPT", "before")
    monkeypatch.delenv("ADDED", raising=False)
    with pytest.raises(RuntimeError), _environment(KEPT="during", ADDED="during"):
        assert os.environ["KEPT"] == "during"
        raise RuntimeError
    assert os.environ["KEPT"] == "before"
    assert "ADDED" not in os.environ
