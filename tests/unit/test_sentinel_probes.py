"""The sentinel: its --watch list, its probes of real /healthz servers, and its reports."""

from __future__ import annotations

import dataclasses
import socket

import httpx
import pytest

from airflow_remote_exec.agent.client import Unauthorized, Unreachable
from airflow_remote_exec.agent.health import serve_health
from airflow_remote_exec.agent.sentinel import SentinelAgent, parse_watch, probe
from airflow_remote_exec.agent.session import ComponentSettings

SETTINGS = ComponentSettings(api_url="http://127.0.0.1:1", token="t", name="s1", component="sentinel")


def test_watch_pairs_are_parsed_from_flags_and_comma_lists():
    assert parse_watch(["a=http://h:1/healthz,b=https://h:2/healthz", "c=http://h:3/healthz"]) == {
        "a": "http://h:1/healthz",
        "b": "https://h:2/healthz",
        "c": "http://h:3/healthz",
    }


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], "at least one"),
        (["worker"], "'worker'"),
        (["worker=ftp://h/healthz"], "ftp://"),
        (["bad name=http://h/healthz"], "bad name"),
        (["a=http://h:1/healthz", "a=http://h:2/healthz"], "twice"),
    ],
)
def test_a_bad_watch_entry_is_named(items, message):
    with pytest.raises(ValueError, match=message):
        parse_watch(items)


@pytest.fixture
def components():
    servers = [
        serve_health("127.0.0.1", 0, lambda: (True, {"healthy": True})),
        serve_health(
            "127.0.0.1", 0, lambda: (False, {"healthy": False, "seconds_since_orchestrator_contact": 41.0})
        ),
        serve_health("127.0.0.1", 0, lambda: (False, {"healthy": False, "fatal": "Agent token rejected"})),
    ]
    yield [f"http://127.0.0.1:{s.server_address[1]}/healthz" for s in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_probes_say_healthy_or_why_not(components):
    with httpx.Client() as http:
        assert probe(http, components[0]).healthy
        sick = probe(http, components[1])
        assert not sick.healthy and sick.detail == "HTTP 503: no orchestrator contact for 41.0 s"
        assert probe(http, components[2]).detail == "HTTP 503: Agent token rejected"
        gone = probe(http, f"http://127.0.0.1:{_closed_port()}/healthz")
        assert not gone.healthy and gone.detail.startswith("unreachable: ConnectError")


class FakeSession:
    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def call(self, method, path, body=None, **options):
        self.calls.append((method, path, body))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def _sentinel(components, answer) -> tuple[SentinelAgent, FakeSession]:
    watch = {"worker-etl": components[0], "triggerer": components[1]}
    agent = SentinelAgent(dataclasses.replace(SETTINGS, watch=watch))
    agent.session = FakeSession(answer)
    return agent, agent.session


def test_a_report_carries_every_component_and_takes_the_cadence_from_the_answer(components):
    agent, session = _sentinel(components, {"report_every_seconds": 7})
    assert agent.report_once() and agent.report_every == 7
    [(method, path, report)] = session.calls
    assert (method, path) == ("POST", "/health")
    body = report.model_dump(mode="json")
    assert body["components"]["worker-etl"] == {"healthy": True, "detail": ""}
    assert body["components"]["triggerer"]["healthy"] is False


def test_an_unreachable_orchestrator_keeps_the_sentinel_going_and_a_rejected_token_stops_it(components):
    agent, _ = _sentinel(components, Unreachable("connection refused"))
    assert agent.report_once() and agent.report_every == 30
    agent, _ = _sentinel(components, Unauthorized(401, "Agent token is unknown, expired or revoked."))
    assert not agent.report_once()


def test_a_change_of_health_is_logged_once(components, caplog):
    agent, _ = _sentinel(components, {"report_every_seconds": 7})
    with caplog.at_level("INFO"):
        agent.report_once()
        agent.report_once()
    assert (
        caplog.text.count("triggerer is unhealthy") == 1 and caplog.text.count("worker-etl is healthy") == 1
    )
