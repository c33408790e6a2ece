"""The sentinel: its --watch list, its probes of real /healthz servers, and its reports."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from airflow_remote_exec.agent import sentinel as sentinel_module
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


class _Answer(BaseHTTPRequestHandler):
    """A component's /healthz that answers what the test puts in ``body``."""

    body = b""

    def do_GET(self):  # noqa: N802 - http.server naming
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hostile():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 200_000,  # JSON nested deeper than Python's recursion limit
        b'{"fatal": "' + b"x" * 20_000_000 + b'"}',  # 20 MB: the probe reads a bounded part of it
        b"\xff\xfe not json",
    ],
)
def test_a_hostile_answer_is_just_unhealthy(hostile, body):
    _Answer.body = body
    with httpx.Client() as http:
        health = probe(http, f"http://127.0.0.1:{hostile.server_address[1]}/healthz")
    assert not health.healthy and health.detail.startswith("HTTP 503") and len(health.detail) <= 500


def test_probes_go_straight_to_the_component_whatever_proxy_the_environment_names(components, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{_closed_port()}")
    agent = SentinelAgent(dataclasses.replace(SETTINGS, watch={"worker-etl": components[0]}))
    assert agent.check()["worker-etl"].healthy


def test_a_bad_url_is_refused_by_the_watch_list():
    with pytest.raises(ValueError, match="http://\\[x"):
        parse_watch(["a=http://[x/healthz"])


class _Trickle(BaseHTTPRequestHandler):
    """An answer that never ends: a byte a second of a promised hundred."""

    def do_GET(self):  # noqa: N802 - http.server naming
        self.send_response(503)
        self.send_header("Content-Length", "100")
        self.end_headers()
        for _ in range(100):
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:
                return
            time.sleep(1)

    def log_message(self, *args):
        pass


def test_a_component_that_answers_too_slowly_is_unhealthy_within_the_probe_timeout(monkeypatch):
    monkeypatch.setattr(sentinel_module, "PROBE_TIMEOUT_SECONDS", 2.0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    server.handle_error = lambda *args: None  # the probe hangs up mid-answer, as it should
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with httpx.Client() as http:
            health = probe(http, f"http://127.0.0.1:{server.server_address[1]}/healthz")
        assert time.monotonic() - started < 4  # one slow component must not hold up every report
        assert not health.healthy and "too slow" in health.detail
    finally:
        server.shutdown()
        server.server_close()
