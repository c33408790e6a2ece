"""Sentinel health reports: who may send them, what is kept, and how ``agents list`` shows them."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from airflow_remote_exec.cli_commands import sentinel_health
from airflow_remote_exec.models import RemoteAgent, utcnow
from tests.api.conftest import AGENT_VERSIONS, headers

HEALTHY = {"worker-etl": {"healthy": True}, "triggerer": {"healthy": True, "detail": ""}}


def _register(client, token: str, name: str, components: list[str], queues: list[str]) -> str:
    body = {"name": name, "queues": queues, "slots": 1, "components": components, **AGENT_VERSIONS}
    reply = client.post("/agents", json=body, headers=headers(token))
    assert reply.status_code == 200, reply.text
    return reply.json()["session_id"]


@pytest.fixture
def sentinel(client, make_token):
    token = make_token(name="ops", components=["worker", "sentinel"])
    return token, _register(client, token, "site-a-sentinel", ["sentinel"], [])


def _report(client, token: str, session_id: str, components: dict):
    return client.post(
        f"/agents/{session_id}/sentinel/health", json={"components": components}, headers=headers(token)
    )


def test_a_report_is_kept_on_the_sentinel_row_and_answered_with_the_cadence(client, session, sentinel):
    token, session_id = sentinel
    assert session.get(RemoteAgent, "site-a-sentinel").health is None
    assert sentinel_health(session.get(RemoteAgent, "site-a-sentinel"), utcnow()) == "no report yet"
    reply = _report(client, token, session_id, HEALTHY)
    assert reply.status_code == 200 and reply.json() == {"report_every_seconds": 30}
    session.expire_all()
    row = session.get(RemoteAgent, "site-a-sentinel")
    assert row.health_reported_at is not None
    assert sentinel_health(row, utcnow()) == "healthy (2 components)"
    sick = {
        **HEALTHY,
        "worker-etl": {"healthy": False, "detail": "HTTP 503: no orchestrator contact for 41 s"},
    }
    assert _report(client, token, session_id, sick).status_code == 200
    session.expire_all()
    assert sentinel_health(session.get(RemoteAgent, "site-a-sentinel"), utcnow()) == (
        "unhealthy: worker-etl (HTTP 503: no orchestrator contact for 41 s)"
    )


def test_a_report_three_intervals_old_is_stale(client, session, sentinel):
    token, session_id = sentinel
    assert _report(client, token, session_id, HEALTHY).status_code == 200
    session.execute(update(RemoteAgent).values(health_reported_at=utcnow() - timedelta(seconds=91)))
    session.commit()
    assert sentinel_health(session.get(RemoteAgent, "site-a-sentinel"), utcnow()).startswith(
        "stale, 91 s old: healthy"
    )


def test_agents_that_are_not_sentinels_show_no_health(client, session, make_token):
    token = make_token(name="plain")
    session_id = _register(client, token, "worker-1", ["worker"], ["default"])
    assert sentinel_health(session.get(RemoteAgent, "worker-1"), utcnow()) == ""
    reply = _report(client, token, session_id, HEALTHY)
    assert reply.status_code == 403 and "sentinel" in reply.json()["detail"]


def test_another_token_cannot_report_for_the_sentinel(client, make_token, sentinel):
    _, session_id = sentinel
    other = make_token(name="other", components=["sentinel"])
    assert _report(client, other, session_id, HEALTHY).status_code == 403


@pytest.mark.parametrize(
    "components",
    [
        {},
        {"bad name!": {"healthy": True}},
        {"worker": {"healthy": "yes"}},
        {"worker": {"healthy": False, "detail": "x" * 501}},
        {f"c{i}": {"healthy": True} for i in range(101)},
        {"worker": {"healthy": False, "detail": "\x1b[2J\x1b]0;owned\x07"}},  # terminal control codes
        {"worker": {"healthy": False, "detail": "two\nlines"}},
    ],
)
def test_a_malformed_report_is_422(client, sentinel, components):
    token, session_id = sentinel
    assert _report(client, token, session_id, components).status_code == 422


def test_a_new_session_of_the_name_starts_with_no_report(client, session, sentinel):
    """A report belongs to the session that sent it: a restarted sentinel (or a worker taking the name
    over) does not show the health its predecessor saw."""
    token, session_id = sentinel
    assert _report(client, token, session_id, HEALTHY).status_code == 200
    _register(client, token, "site-a-sentinel", ["sentinel"], [])
    session.expire_all()
    assert sentinel_health(session.get(RemoteAgent, "site-a-sentinel"), utcnow()) == "no report yet"
