"""The agent's HTTP client: heartbeat timing and retries, idempotent claims, registration refusals."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from airflow_remote_exec.agent.client import AgentClient, Conflict, Unauthorized, Unreachable, VersionMismatch
from airflow_remote_exec.api.datamodels import HeartbeatRequest, JobReport, RegisterRequest


def _client(handler) -> AgentClient:
    return AgentClient("http://orchestrator", "token", transport=httpx.MockTransport(handler))


def _heartbeat(client: AgentClient, interval: float = 10):
    return client.heartbeat("s1", HeartbeatRequest(free_slots=1), interval)


def test_heartbeat_retries_once_immediately_after_timeout():
    calls: list[float] = []

    def handler(request):
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(200, json={"state": "active", "stop": [{"job_id": 4, "attempt": 2}]})

    reply = _heartbeat(_client(handler))
    assert [(j.job_id, j.attempt) for j in reply.stop] == [(4, 2)]
    assert len(calls) == 2 and calls[1] - calls[0] < 0.2


@pytest.mark.parametrize("failure", ["timeout", "503"])
def test_heartbeat_gives_up_after_one_retry(failure):
    calls: list[int] = []

    def handler(request):
        calls.append(1)
        if failure == "timeout":
            raise httpx.ConnectTimeout("down", request=request)
        return httpx.Response(503, json={"detail": "restarting"})

    with pytest.raises(Unreachable):
        _heartbeat(_client(handler))
    assert len(calls) == 2


def test_heartbeat_timeout_is_at_most_half_the_interval():
    seen: list[dict] = []

    def handler(request):
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, json={"state": "active"})

    _heartbeat(_client(handler), interval=4)
    assert seen and all(value is not None and value <= 2 for value in seen[0].values())


def test_each_claim_has_a_fresh_request_id_kept_across_its_retries():
    bodies: list[dict] = []

    def handler(request):
        bodies.append(json.loads(request.content))
        if len(bodies) == 1:
            raise httpx.ReadError("connection reset", request=request)
        return httpx.Response(200, json={"jobs": []})

    client = _client(handler)
    client.claim("s1", 2, wait_seconds=0)
    client.claim("s1", 2, wait_seconds=0)
    ids = [b["request_id"] for b in bodies]
    assert len(ids) == 3 and ids[0] == ids[1] != ids[2] and len(ids[0]) == 36


@pytest.mark.parametrize(("status", "error"), [(426, VersionMismatch), (409, Conflict)])
def test_register_refusals_raise_their_own_errors(status, error):
    client = _client(lambda request: httpx.Response(status, json={"detail": "no"}))
    request = RegisterRequest(
        name="a", airflow_version="3.3.2", task_sdk_version="1.3.2", pid=1, queues=["default"], slots=1
    )
    with pytest.raises(error):
        client.register(request)


def test_only_the_agent_apis_own_401_rejects_the_token():
    """A 401 from something in the way (an ingress or SSO proxy) is retried like an outage: stopping
    every task on it would turn a proxy's hiccup into failed tries."""

    def ours(request):
        return httpx.Response(401, json={"detail": "Agent token is unknown, expired or revoked."},
                              headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    def proxy(request):
        return httpx.Response(401, text="<html>401 Authorization Required</html>")

    with pytest.raises(Unauthorized):
        _heartbeat(_client(ours))
    with pytest.raises(Unreachable):
        _heartbeat(_client(proxy))


def test_a_report_in_backoff_goes_at_once_when_another_request_gets_through():
    """After an outage, outcomes (and with them the slots they hold) are delivered as soon as the agent
    API answers anything, not at the end of a backoff that has grown meanwhile."""
    up = threading.Event()
    report_tries: list[float] = []

    def handler(request):
        if request.url.path.endswith("/reports"):
            report_tries.append(time.monotonic())
            if not up.is_set():
                return httpx.Response(503, json={"detail": "restarting"})
            return httpx.Response(200, json={"refused": []})
        return httpx.Response(200, json={"state": "active"})

    client = _client(handler)
    delivered: list[float] = []
    report = JobReport(job_id=1, attempt=1, state="success")
    thread = threading.Thread(
        target=lambda: (
            client.report_many("s1", [report], keep_trying=lambda: True),
            delivered.append(time.monotonic()),
        )
    )
    thread.start()
    deadline = time.monotonic() + 10
    while len(report_tries) < 3 and time.monotonic() < deadline:  # its backoff is now about 2 s, then 4 s
        time.sleep(0.05)
    up.set()
    _heartbeat(client)
    answered = time.monotonic()
    thread.join(15)
    assert len(report_tries) >= 3 and delivered, report_tries
    assert delivered[0] - answered < 1.0, f"the report waited {delivered[0] - answered:.1f} s more"
