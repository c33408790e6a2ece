"""The agent API under the faults a fleet meets: lost responses, restarts, shared names, version skew."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from airflow_remote_exec import compat, reroute
from airflow_remote_exec.api.datamodels import DETAIL_MAX_CHARS
from airflow_remote_exec.api.presence import record_presence
from airflow_remote_exec.models import (
    JobState,
    RemoteAgent,
    RemoteAgentEvent,
    RemoteApiServer,
    RemoteJob,
    utcnow,
)
from tests.api.conftest import AGENT_VERSIONS, headers
from tests.api.test_jobs import _add, _claim, _job, _report
from tests.factories import make_job


def _register(client, token, name="agent-1", hostname="host-a", pid=100, slots=4, **versions):
    body = {"name": name, "queues": ["default"], "slots": slots, "hostname": hostname, "pid": pid}
    return client.post("/agents", json={**body, **AGENT_VERSIONS, **versions}, headers=headers(token))


def test_agent_on_another_airflow_minor_is_refused_426_naming_the_versions(client, make_token):
    reply = _register(client, make_token(), airflow_version="2.10.5")
    assert reply.status_code == 426
    assert "2.10.5" in reply.json()["detail"] and "install Airflow" in reply.json()["detail"]


def test_an_agent_on_another_minor_than_the_scheduler_is_drained_and_its_running_job_goes_on(
    client, session, make_token, register
):
    """An orchestrator upgraded under live agents: the scheduler drains each agent whose session was
    opened on the old minor. It claims nothing more, its running task is neither stopped nor failed,
    its reports still land, and registering again is refused (426) until it is upgraded."""
    token = make_token()
    session_id = register(token)
    running, waiting = _add(session, make_job("running"), make_job("waiting"))
    session.execute(update(RemoteJob).where(RemoteJob.id == waiting).values(queue="other"))
    session.commit()
    (claimed,) = _claim(client, token, session_id)
    beat = {"free_slots": 3, "running": [{"job_id": running, "attempt": claimed["attempt"]}]}
    assert (
        client.post(f"/agents/{session_id}/heartbeat", json=beat, headers=headers(token)).status_code == 200
    )
    assert reroute.drain_agents_on_another_minor(session) == []  # same minor: left alone
    older = "3.1.8"  # what the agent registered with, before the orchestrator moved on
    session.execute(update(RemoteAgent).values(airflow_version=older))
    session.execute(update(RemoteJob).where(RemoteJob.id == waiting).values(queue="default"))
    session.commit()

    assert reroute.drain_agents_on_another_minor(session) == ["agent-1"]
    session.commit()
    reply = client.post(f"/agents/{session_id}/heartbeat", json=beat, headers=headers(token))
    assert reply.status_code == 200
    assert (reply.json()["state"], reply.json()["stop"]) == ("draining", [])
    assert _claim(client, token, session_id) == []
    assert _job(session, waiting).state == JobState.QUEUED
    _report(client, token, session_id, running, claimed["attempt"], "success")
    assert _job(session, running).state == JobState.SUCCESS
    (event,) = session.scalars(
        select(RemoteAgentEvent.reason).where(RemoteAgentEvent.state == "draining")
    ).all()
    assert older in event
    assert _register(client, token, airflow_version=older).status_code == 426


@pytest.mark.parametrize("component", ["dag-processor", "triggerer"])
def test_an_orchestrator_on_airflow_3_2_refuses_agent_components_that_need_3_3(
    client, make_token, monkeypatch, component
):
    monkeypatch.setattr(compat, "AIRFLOW_MINOR", (3, 2))
    monkeypatch.setattr(compat, "AIRFLOW_VERSION", "3.2.2")
    token = make_token()
    refused = _register(client, token, components=[component])
    assert refused.status_code == 426
    assert f"agent {component} need Airflow 3.3, and the orchestrator runs 3.2.2" in refused.json()["detail"]
    assert _register(client, token, name="worker-1", components=["worker"]).status_code == 200


def test_registration_records_the_agents_airflow_version(client, session, make_token, register):
    register(make_token())
    assert session.scalar(select(RemoteAgent.airflow_version)) == AGENT_VERSIONS["airflow_version"]


def test_registration_tells_the_agent_the_orchestrator_executors(client, make_token):
    reply = _register(client, make_token())
    assert reply.status_code == 200
    assert reply.json()["executors"] == "airflow_remote_exec.executor.RemoteExecutor"


def test_registration_never_names_teams_executors(client, make_token, monkeypatch):
    teams = "LocalExecutor,\n  airflow_remote_exec.executor.RemoteExecutor;team_a=CeleryExecutor;team_b=x.Y"
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", teams)
    reply = _register(client, make_token())
    assert reply.json()["executors"] == "LocalExecutor,airflow_remote_exec.executor.RemoteExecutor"


@pytest.mark.parametrize(
    "field,value",
    [
        ("hostname", "[blink]host[/blink]"),
        ("hostname", "host\x1b[2J"),
        ("version", "1.0 [red]x"),
        ("airflow_version", "3.1\n"),
    ],
)
def test_agent_text_that_operators_see_is_charset_checked(client, make_token, field, value):
    reply = _register(client, make_token(), **{field: value})
    assert reply.status_code == 422 and field in reply.text


def test_agents_list_shows_agent_text_literally_in_a_table(session, capsys):
    from airflow_remote_exec.cli_commands import _print_rows

    _print_rows([{"name": "a1", "reason": "session s from [bold]host[/bold]"}], "table")
    assert "[bold]host[/bold]" in capsys.readouterr().out


def test_live_name_is_not_taken_by_another_process_but_is_by_its_own_restart(client, session, make_token):
    token = make_token()
    assert _register(client, token, hostname="host-a", pid=100).status_code == 200
    taken = _register(client, token, hostname="host-b", pid=200)
    assert taken.status_code == 409
    assert "host-a" in taken.json()["detail"] and "--name" in taken.json()["detail"]
    # The same container restarted (same hostname and pid) takes its name back at once.
    assert _register(client, token, hostname="host-a", pid=100).status_code == 200
    # Once the holder has been silent for two heartbeat intervals, anyone of the token may take it.
    session.execute(update(RemoteAgent).values(last_heartbeat_at=utcnow() - timedelta(seconds=21)))
    session.commit()
    assert _register(client, token, hostname="host-b", pid=200).status_code == 200


def test_re_sent_claim_gets_the_same_jobs_back(client, session, make_token, register):
    token = make_token()
    session_id = register(token)
    job_ids = _add(session, make_job("c1"), make_job("c2"))
    body = {"free_slots": 4, "wait_seconds": 0, "request_id": str(uuid.uuid4())}
    url = f"/agents/{session_id}/jobs/claim"
    first = client.post(url, json=body, headers=headers(token)).json()["jobs"]  # response lost
    again = client.post(url, json=body, headers=headers(token)).json()["jobs"]
    assert sorted(j["job_id"] for j in first) == sorted(job_ids)
    assert again == first
    assert all(_job(session, i).attempt == 1 for i in job_ids)


def test_job_wider_than_the_agent_takes_the_whole_agent(client, session, make_token, register):
    token = make_token()
    session_id = register(token, slots=4)
    (wide,) = _add(session, make_job("wide", pool_slots=6))
    assert _claim(client, token, session_id, free_slots=3) == []  # needs the whole agent
    (claimed,) = _claim(client, token, session_id, free_slots=4)
    assert (claimed["job_id"], claimed["pool_slots"]) == (wide, 4)


def test_heartbeat_releases_a_claimed_job_the_agent_never_received(client, session, make_token, register):
    token = make_token()
    session_id = register(token)
    (job_id,) = _add(session, make_job("lost-response"))
    _claim(client, token, session_id)
    beat = {"free_slots": 4, "running": []}
    client.post(f"/agents/{session_id}/heartbeat", json=beat, headers=headers(token))
    assert _job(session, job_id).state == JobState.CLAIMED  # a fresh claim may still be in flight
    session.execute(update(RemoteJob).values(claimed_at=utcnow() - timedelta(seconds=60)))
    session.commit()
    client.post(f"/agents/{session_id}/heartbeat", json=beat, headers=headers(token))
    job = _job(session, job_id)
    assert (job.state, job.agent_name) == (JobState.QUEUED, None)


def test_releasing_a_claimed_job_whose_task_already_started_fails_it_with_a_fence(
    client, session, make_token, register, monkeypatch
):
    token = make_token()
    session_id = register(token)
    (job_id,) = _add(session, make_job("started"))
    _claim(client, token, session_id)
    ti_id = _job(session, job_id).ti_id
    monkeypatch.setattr(reroute, "_started_task_ids", lambda _session, ids: {ti_id} & set(ids))
    assert client.delete(f"/agents/{session_id}", headers=headers(token)).status_code == 204
    job = _job(session, job_id)
    assert (job.state, job.pending_sync) == (JobState.FAILED, True)
    assert job.fenced_until is not None and job.fenced_until > utcnow()


def test_not_started_report_finishes_the_job_and_returned_requeues_it(client, session, make_token, register):
    token = make_token()
    session_id = register(token)
    refused, unreadable = _add(session, make_job("refused"), make_job("unreadable"))
    attempts = {j["job_id"]: j["attempt"] for j in _claim(client, token, session_id)}
    _report(client, token, session_id, refused, attempts[refused], "not_started", detail="ti_run 409")
    _report(client, token, session_id, unreadable, attempts[unreadable], "returned", detail="bad json")
    assert (_job(session, refused).state, _job(session, refused).pending_sync) == (JobState.NOT_STARTED, True)
    job = _job(session, unreadable)
    assert (job.state, job.agent_name, job.attempt) == (JobState.QUEUED, None, attempts[unreadable])


def test_long_error_detail_is_cut_not_refused(client, session, make_token, register):
    token = make_token()
    session_id = register(token)
    (job_id,) = _add(session, make_job("verbose"))
    (claimed,) = _claim(client, token, session_id)
    reply = _report(client, token, session_id, job_id, claimed["attempt"], "failed", detail="x" * 5000)
    assert reply.status_code == 204
    assert len(_job(session, job_id).detail) == DETAIL_MAX_CHARS


def test_out_of_range_integers_are_422_not_500(client, make_token, register):
    token = make_token()
    session_id = register(token)
    reply = _report(client, token, session_id, 1, 2**40, "running")
    assert reply.status_code == 422
    reply = client.post(
        "/agents/x/heartbeat",
        json={"free_slots": 1, "running": [{"job_id": 2**70, "attempt": 1}]},
        headers=headers(token),
    )
    assert reply.status_code == 422


def test_presence_starts_a_new_stretch_on_restart_and_after_a_gap(session):
    def started_at():
        session.expire_all()
        return session.scalar(select(RemoteApiServer.started_at).where(RemoteApiServer.name == "api:1"))

    record_presence("api:1", first=True)
    opened = started_at()
    record_presence("api:1", first=False)
    assert started_at() == opened  # unbroken
    session.execute(update(RemoteApiServer).values(last_seen_at=utcnow() - timedelta(seconds=60)))
    session.commit()
    record_presence("api:1", first=False)  # a database outage left a gap
    after_gap = started_at()
    assert after_gap > opened
    record_presence("api:1", first=True)  # a new process under the same name (container restart)
    assert started_at() > after_gap


def test_re_sent_claim_restarts_the_in_flight_grace(client, session, make_token, register):
    token = make_token()
    session_id = register(token)
    (job_id,) = _add(session, make_job("late-retry"))
    body = {"free_slots": 4, "wait_seconds": 0, "request_id": str(uuid.uuid4())}
    client.post(f"/agents/{session_id}/jobs/claim", json=body, headers=headers(token))  # response lost
    session.execute(update(RemoteJob).values(claimed_at=utcnow() - timedelta(seconds=60)))
    session.commit()
    client.post(f"/agents/{session_id}/jobs/claim", json=body, headers=headers(token))  # the retry lands late
    beat = {"free_slots": 4, "running": []}  # built before the agent took the job in
    client.post(f"/agents/{session_id}/heartbeat", json=beat, headers=headers(token))
    assert _job(session, job_id).state == JobState.CLAIMED


def test_report_on_another_agents_job_reveals_no_attempt(client, session, make_token, register):
    token = make_token()
    holder, prober = register(token, name="holder"), register(token, name="prober")
    (job_id,) = _add(session, make_job("probed"))
    _claim(client, token, holder)
    statuses = {
        _report(client, token, prober, job_id, attempt, "running").status_code for attempt in (0, 1, 2)
    }
    assert statuses == {403}
    assert _report(client, token, prober, 2**70, 1, "running").status_code == 422
