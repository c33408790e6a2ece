"""The agents' Prometheus ``/metrics``, scraped over HTTP beside ``/healthz``: gauges read at scrape time,
claims counted, every agent-API try timed and counted by route template, never by raw id."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from airflow_remote_exec.agent import worker as worker_module
from airflow_remote_exec.agent.client import AgentClient, Unreachable
from airflow_remote_exec.agent.health import serve_health
from airflow_remote_exec.agent.metrics import AgentMetrics, route_template
from airflow_remote_exec.agent.session import AgentSession, ComponentSettings
from airflow_remote_exec.agent.worker import Worker, WorkerSettings
from airflow_remote_exec.api.datamodels import ClaimedJob, HeartbeatRequest, RegisterResponse
from tests.unit.test_worker import FakeClient, FakePool

SETTINGS = WorkerSettings(api_url="http://orchestrator", token="t", queues=["default"], slots=4, name="w1")


@pytest.fixture(autouse=True)
def _versions(monkeypatch):
    monkeypatch.setattr(worker_module, "installed_versions", lambda: ("3.3.2", "1.3.2"))


@pytest.fixture
def served() -> Iterator[list]:
    """Servers a test starts, shut down after it."""
    servers: list = []
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def _get(server, path: str) -> httpx.Response:
    host, port = server.server_address[:2]
    return httpx.get(f"http://{host}:{port}{path}", trust_env=False)  # no proxy from the environment


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(text: str, name: str, **labels: str) -> float | None:
    return _samples(text).get((name, frozenset(labels.items())))


def _job(job_id: int) -> ClaimedJob:
    return ClaimedJob(job_id=job_id, attempt=1, kind="task", pool_slots=1, workload="{}")


def test_a_worker_serves_its_gauges_and_claim_counts_beside_healthz(served):
    client = FakeClient()
    client.claims = [[_job(11), _job(12)], []]
    worker = Worker(SETTINGS, client=client, pool=FakePool(4))
    try:
        worker._register()
        worker._claim_once()
        worker._claim_once()
        server = serve_health("127.0.0.1", 0, worker.health, worker.metrics.render)
        served.append(server)

        scrape = _get(server, "/metrics")
        assert scrape.status_code == 200 and scrape.headers["content-type"] == CONTENT_TYPE_LATEST
        ours = {"agent": "w1", "component": "worker"}
        assert _value(scrape.text, "airflow_remote_agent_slots", **ours) == 4
        assert _value(scrape.text, "airflow_remote_agent_running_jobs", **ours) == 2
        assert _value(scrape.text, "airflow_remote_agent_free_slots", **ours) == 2
        assert _value(scrape.text, "airflow_remote_agent_claims_total", **ours) == 2
        assert _value(scrape.text, "airflow_remote_agent_jobs_claimed_total", **ours) == 2
        assert 0 <= _value(scrape.text, "airflow_remote_agent_heartbeat_age_seconds", **ours) < 5

        health = _get(server, "/healthz")
        assert health.status_code == 200 and health.headers["content-type"] == "application/json"
        assert health.json()["running_jobs"] == 2 and health.json()["agent"] == "w1"
        assert _get(server, "/other").status_code == 404
    finally:
        worker._done.set()
        worker._stop.set()


def test_livez_follows_the_process_not_the_orchestrator(served):
    """Kubernetes restarts an agent whose liveness fails, killing its tasks: an orchestrator outage
    fails /healthz (readiness) only; a loop of the agent that died fails /livez too."""
    worker = Worker(SETTINGS, client=FakeClient(), pool=FakePool(4))
    try:
        worker._register()
        worker._last_contact = time.monotonic() - 3600  # not heard from the orchestrator in an hour
        server = serve_health("127.0.0.1", 0, worker.health, worker.metrics.render, worker.live)
        served.append(server)
        assert _get(server, "/healthz").status_code == 503
        assert _get(server, "/livez").status_code == 200
        worker.threads.start("doomed", lambda: (_ for _ in ()).throw(SystemExit()))
        wait = time.monotonic() + 5
        while not worker.threads.dead() and time.monotonic() < wait:
            time.sleep(0.05)
        answer = _get(server, "/livez")
        assert answer.status_code == 503 and answer.json()["dead_threads"] == ["doomed"]
    finally:
        worker._done.set()
        worker._stop.set()


def test_a_worker_answers_its_probes_while_it_waits_to_register(monkeypatch):
    """An orchestrator down when a pod starts must not fail the pod's startup and liveness probes."""
    port = _free_port()
    registering, release = threading.Event(), threading.Event()
    client = FakeClient()

    def register(request):
        registering.set()
        release.wait(10)
        raise worker_module.AgentApiError(403, "not today")

    client.register = register
    monkeypatch.setattr(worker_module.signal, "signal", lambda *args: None)  # not the main thread
    worker = Worker(
        WorkerSettings(**{**SETTINGS.__dict__, "health_host": "127.0.0.1", "health_port": port}),
        client=client,
        pool=FakePool(4),
    )
    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(worker.run()))
    thread.start()
    try:
        assert registering.wait(10)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/livez", trust_env=False).status_code == 200
        assert httpx.get(f"{base}/healthz", trust_env=False).status_code == 503
    finally:
        release.set()
        thread.join(10)
    assert outcome == [1]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_server_without_a_liveness_check_is_live_while_it_answers(served):
    server = serve_health("127.0.0.1", 0, lambda: (False, {"healthy": False}))
    served.append(server)
    assert _get(server, "/livez").status_code == 200 and _get(server, "/healthz").status_code == 503


def test_gauges_are_read_at_each_scrape_and_no_heartbeat_age_before_any_contact():
    worker = Worker(SETTINGS, client=FakeClient(), pool=FakePool(4))
    before = worker.metrics.render().decode()
    assert "airflow_remote_agent_heartbeat_age_seconds{" not in before
    assert _value(before, "airflow_remote_agent_free_slots", agent="w1", component="worker") == 4
    worker.contact()
    worker._start_job(_job(5), "s1")
    after = worker.metrics.render().decode()
    assert _value(after, "airflow_remote_agent_free_slots", agent="w1", component="worker") == 3
    assert _value(after, "airflow_remote_agent_heartbeat_age_seconds", agent="w1", component="worker") < 5


def test_without_a_metrics_renderer_only_healthz_is_served(served):
    server = serve_health("127.0.0.1", 0, lambda: (False, {"healthy": False}))
    served.append(server)
    assert _get(server, "/metrics").status_code == 404
    health = _get(server, "/healthz/")
    assert (health.status_code, health.json()) == (503, {"healthy": False})


def test_each_client_try_is_timed_and_counted_by_route_template_with_its_status():
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        time.sleep(0.02)
        if request.url.path.endswith("/heartbeat"):
            return httpx.Response(200, json={"state": "active"})
        if len(calls) == 2:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(503, json={"detail": "restarting"})

    metrics = AgentMetrics("w1", "worker")
    client = AgentClient(
        "http://orchestrator", "token", transport=httpx.MockTransport(handler), metrics=metrics
    )
    client.heartbeat("sess-8f3a", HeartbeatRequest(free_slots=1), 10)
    for _ in range(2):
        with pytest.raises(Unreachable):
            client.append_log("sess-8f3a", 4711, 1, 0, b"line\n")
    text = metrics.render().decode()

    ours = {"agent": "w1", "component": "worker"}
    heartbeat = {**ours, "route": "/agents/{session}/heartbeat", "method": "POST"}
    log_route = {**ours, "route": "/agents/{session}/jobs/{job_id}/log", "method": "PUT"}
    assert _value(text, "airflow_remote_agent_api_requests_total", **heartbeat, status="200") == 1
    assert _value(text, "airflow_remote_agent_api_requests_total", **log_route, status="error") == 1
    assert _value(text, "airflow_remote_agent_api_requests_total", **log_route, status="503") == 1
    assert _value(text, "airflow_remote_agent_api_request_seconds_count", **log_route) == 2
    assert _value(text, "airflow_remote_agent_api_request_seconds_sum", **heartbeat) >= 0.02
    assert "sess-8f3a" not in text and "4711" not in text
    assert client.answers == 1  # timing changes nothing about what counts as an answer


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/agents", "/agents"),
        ("/agents/0b7e8a52-3f41-4c33-9a57-8d7c1f0e2a11", "/agents/{session}"),
        ("/agents/s1/jobs/claim", "/agents/{session}/jobs/claim"),
        ("/agents/s1/jobs/reports", "/agents/{session}/jobs/reports"),
        ("/agents/s1/jobs/42/log?attempt=1&offset=0", "/agents/{session}/jobs/{job_id}/log"),
        ("/agents/s1/triggerer/events", "/agents/{session}/triggerer/events"),
        ("/dag-processor/variables/my_key", "/dag-processor/variables/{key}"),
    ],
)
def test_a_route_names_its_template_not_its_ids(path, route):
    assert route_template(path) == route


def test_a_bundle_named_like_a_route_segment_is_still_an_id():
    route = route_template("/agents/s1/dag-processor/bundles/agents/state")
    assert route == "/agents/{session}/dag-processor/bundles/{bundle_name}/state"


class SessionClient:
    """Answers a component's registration and heartbeats."""

    def register(self, request):
        return RegisterResponse(
            session_id="c1", heartbeat_interval=1, lost_after_missed_heartbeats=3, claim_wait_seconds=20
        )

    def heartbeat(self, session_id, request, interval):
        return None


def test_a_component_serves_healthz_and_its_heartbeat_age_when_given_a_port(served):
    settings = ComponentSettings(
        "http://127.0.0.1:9", "t", "trig", "triggerer", health_host="127.0.0.1", health_port=0
    )
    session = AgentSession(settings, threading.Event(), SessionClient())
    assert not session.health()[0]  # not registered yet
    session.register()
    server = session.serve_probes()
    served.append(server)

    health = _get(server, "/healthz")
    assert health.status_code == 200
    assert health.json()["component"] == "triggerer" and health.json()["seconds_since_heartbeat"] < 3
    text = _get(server, "/metrics").text
    assert _value(text, "airflow_remote_agent_heartbeat_age_seconds", agent="trig", component="triggerer") < 3
    assert "airflow_remote_agent_slots{" not in text  # a worker's gauge only

    session._last_beat = time.monotonic() - 3.5  # past 3 missed heartbeats of 1 s
    assert _get(server, "/healthz").status_code == 503


def test_a_component_heartbeat_resets_its_age_and_no_port_serves_nothing():
    stop = threading.Event()
    session = AgentSession(
        ComponentSettings("http://127.0.0.1:9", "t", "dp", "dag-processor"), stop, SessionClient()
    )
    assert session.serve_probes() is None
    session.register()
    session.heartbeat_interval = 0.01
    session._last_beat = time.monotonic() - 100
    beating = threading.Thread(target=session.beat_forever)
    beating.start()
    time.sleep(0.1)
    stop.set()
    beating.join(timeout=5)
    session.heartbeat_interval = 1.0
    assert session.health()[0] and session.health()[1]["seconds_since_heartbeat"] < 1


def _session_beating(served, failure: BaseException) -> tuple[AgentSession, list, threading.Event]:
    """A registered component with a port, whose heartbeats raise ``failure``."""
    calls, stop = [], threading.Event()

    class Failing(SessionClient):
        def heartbeat(self, session_id, request, interval):
            calls.append(1)
            raise failure

    settings = ComponentSettings(
        "http://127.0.0.1:9", "t", "trig", "triggerer", health_host="127.0.0.1", health_port=0
    )
    session = AgentSession(settings, stop, Failing())
    session.register()
    session.heartbeat_interval = 0.02
    served.append(session.serve_probes())
    session.start_heartbeats()
    return session, calls, stop


def test_a_component_heartbeat_that_gets_an_unreadable_answer_carries_on(served):
    session, calls, stop = _session_beating(served, ValueError("a 200 that is not JSON"))
    try:
        deadline = time.monotonic() + 5
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(calls) >= 3  # the thread did not die at the first bad answer
        assert _get(served[-1], "/livez").status_code == 200
    finally:
        stop.set()


def test_a_component_whose_heartbeat_thread_died_fails_livez(served):
    """Liveness must catch it: without heartbeats the orchestrator declares the agent lost, and only a
    restart brings it back."""
    session, calls, stop = _session_beating(served, KeyboardInterrupt())
    try:
        deadline = time.monotonic() + 5
        while _get(served[-1], "/livez").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        answer = _get(served[-1], "/livez")
        assert answer.status_code == 503 and answer.json()["dead_threads"] == ["heartbeat"]
    finally:
        stop.set()


def test_a_component_refused_for_its_airflow_version_when_registering_again_stops(monkeypatch, caplog):
    """Declared lost while the orchestrator moved to another Airflow minor: the new registration is
    refused (426), and the component stops with that one line instead of retrying for ever."""
    from airflow_remote_exec.agent import session as session_module
    from airflow_remote_exec.agent.client import SessionGone, VersionMismatch

    signals: list[int] = []
    monkeypatch.setattr(session_module.os, "kill", lambda pid, sig: signals.append(sig))

    class Upgraded(SessionClient):
        registrations = 0

        def register(self, request):
            self.registrations += 1
            if self.registrations > 1:
                raise VersionMismatch(426, "Agent runs Airflow 3.2.2 but the orchestrator runs 3.3.2")
            return super().register(request)

        def heartbeat(self, session_id, request, interval):
            raise SessionGone(410, "declared lost")

    stop = threading.Event()
    session = AgentSession(ComponentSettings("http://127.0.0.1:9", "t", "s", "sentinel"), stop, Upgraded())
    session.register()
    session.heartbeat_interval = 0.01
    beating = threading.Thread(target=session.beat_forever)
    beating.start()
    beating.join(timeout=5)
    stop.set()
    assert not beating.is_alive() and signals == [session_module.signal.SIGTERM]
    refusals = [r.getMessage() for r in caplog.records if "Registration refused" in r.getMessage()]
    assert len(refusals) == 1 and "orchestrator runs 3.3.2" in refusals[0]
