"""Every way an agent can be refused: 400, 401, 403, 410."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from airflow_remote_exec.models import AgentState, RemoteAgent, RemoteJob, RemoteToken, utcnow
from tests.api.conftest import AGENT_VERSIONS, headers
from tests.factories import make_job

REGISTER = {"name": "agent-1", "queues": ["default"], "slots": 2, **AGENT_VERSIONS}


def test_missing_token_is_401(client):
    reply = client.post("/agents", json=REGISTER, headers={"Remote-Exec-Api-Version": "1"})
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"] == "Bearer"


def test_wrong_token_is_401(client, make_token):
    make_token()
    assert client.post("/agents", json=REGISTER, headers=headers("rex_wrong")).status_code == 401


def test_expired_token_is_401(client, make_token, session):
    token = make_token(expires_in=timedelta(seconds=60))
    session.execute(update(RemoteToken).values(expires_at=utcnow() - timedelta(seconds=1)))
    session.commit()
    assert client.post("/agents", json=REGISTER, headers=headers(token)).status_code == 401


def test_revoked_token_is_401_on_next_request(client, make_token, register, session):
    token = make_token()
    session_id = register(token)
    session.execute(update(RemoteToken).values(revoked_at=utcnow()))
    session.commit()
    reply = client.post(f"/agents/{session_id}/heartbeat", json={"free_slots": 1}, headers=headers(token))
    assert reply.status_code == 401


def test_missing_or_unknown_api_version_is_400(client, make_token):
    token = make_token()
    bare = {"Authorization": f"Bearer {token}"}
    assert client.post("/agents", json=REGISTER, headers=bare).status_code == 400
    reply = client.post("/agents", json=REGISTER, headers={**bare, "Remote-Exec-Api-Version": "99"})
    assert reply.status_code == 400
    assert "Remote-Exec-Api-Version" in reply.json()["detail"]


def test_queue_outside_token_scope_is_403(client, make_token):
    token = make_token(queues=("default",))
    reply = client.post("/agents", json={**REGISTER, "queues": ["default", "gpu"]}, headers=headers(token))
    assert reply.status_code == 403
    assert "gpu" in reply.json()["detail"]


def test_component_outside_token_scope_is_403(client, make_token):
    token = make_token()  # worker only, the default
    reply = client.post(
        "/agents", json={**REGISTER, "components": ["worker", "sentinel"]}, headers=headers(token)
    )
    assert reply.status_code == 403
    assert "sentinel" in reply.json()["detail"]
    assert "--components" in reply.json()["detail"]


def test_unknown_component_is_422(client, make_token):
    token = make_token(components=["worker", "dag-processor"])
    for components in (["scheduler"], [], ["worker"] * 5):
        reply = client.post("/agents", json={**REGISTER, "components": components}, headers=headers(token))
        assert reply.status_code == 422, components


def test_an_agent_that_did_not_register_as_a_worker_cannot_claim_or_report(client, make_token, session):
    token = make_token(components=["sentinel"])  # a component every Airflow minor runs
    reply = client.post("/agents", json=REGISTER, headers=headers(token))  # a worker, by default
    assert reply.status_code == 403
    reply = client.post("/agents", json={**REGISTER, "components": ["sentinel"]}, headers=headers(token))
    assert reply.status_code == 200, reply.text
    session_id = reply.json()["session_id"]
    job = make_job()
    session.add(job)
    session.commit()
    claim = client.post(
        f"/agents/{session_id}/jobs/claim", json={"free_slots": 1, "wait_seconds": 0}, headers=headers(token)
    )
    assert claim.status_code == 403
    assert "not as a worker" in claim.json()["detail"]
    report = {"reports": [{"job_id": job.id, "attempt": 1, "state": "running"}]}
    assert (
        client.post(f"/agents/{session_id}/jobs/reports", json=report, headers=headers(token)).status_code
        == 403
    )
    session.refresh(job)
    assert job.state == "queued"
    beat = client.post(f"/agents/{session_id}/heartbeat", json={"free_slots": 1}, headers=headers(token))
    assert beat.status_code == 200, beat.text
    agent = session.get(RemoteAgent, REGISTER["name"])
    assert agent.components == "sentinel"


def test_session_of_another_token_is_403(client, make_token, register):
    mine, theirs = make_token("mine"), make_token("theirs")
    session_id = register(mine)
    reply = client.post(f"/agents/{session_id}/heartbeat", json={"free_slots": 1}, headers=headers(theirs))
    assert reply.status_code == 403


def test_name_of_another_tokens_agent_is_403_alive_or_not_until_that_token_is_revoked(
    client, make_token, register, session
):
    first, second = make_token("first"), make_token("second")
    session_id = register(first, name="shared")

    def take():
        return client.post("/agents", json={**REGISTER, "name": "shared"}, headers=headers(second))

    alive = take()
    assert alive.status_code == 403 and "belongs to another token" in alive.json()["detail"]
    assert client.delete(f"/agents/{session_id}", headers=headers(first)).status_code == 204
    gone = take()
    assert (gone.status_code, gone.json()) == (alive.status_code, alive.json())  # nothing to probe
    session.execute(update(RemoteToken).where(RemoteToken.name == "first").values(revoked_at=utcnow()))
    session.commit()
    assert take().status_code == 200


def test_unknown_or_lost_session_is_410(client, make_token, register, session):
    token = make_token()
    assert (
        client.post("/agents/nope/heartbeat", json={"free_slots": 1}, headers=headers(token)).status_code
        == 410
    )
    session_id = register(token)
    session.execute(update(RemoteAgent).values(state=AgentState.LOST))
    session.commit()
    reply = client.post(f"/agents/{session_id}/jobs/claim", json={"free_slots": 1}, headers=headers(token))
    assert reply.status_code == 410


def test_invalid_payloads_are_422(client, make_token):
    token = make_token()
    for body in ({**REGISTER, "slots": 0}, {**REGISTER, "queues": []}, {**REGISTER, "name": "bad name"}, {}):
        assert client.post("/agents", json=body, headers=headers(token)).status_code == 422
    # Strict types: a JSON false is not 0, and 0 is not false.
    assert client.post("/agents", json={**REGISTER, "pid": False}, headers=headers(token)).status_code == 422
    heartbeat = {"free_slots": 1, "draining": 0}
    assert client.post("/agents/s/heartbeat", json=heartbeat, headers=headers(token)).status_code == 422
    # What Postgres could not store never reaches it: a NUL or newline in a session id or request id.
    for session_id in ("a%00b", "a%0Ab"):
        reply = client.post(f"/agents/{session_id}/heartbeat", json={"free_slots": 1}, headers=headers(token))
        assert reply.status_code == 422, reply.text
    claim = {"free_slots": 1, "request_id": "a\u0000b"}
    assert client.post("/agents/s/jobs/claim", json=claim, headers=headers(token)).status_code == 422


def test_a_nul_byte_in_a_reports_detail_is_dropped_not_refused(client, session, make_token, register):
    token = make_token()
    session_id = register(token)
    (job_id,) = _claimed_job(client, session, token, session_id)
    report = {"attempt": 1, "state": "failed", "detail": "exit\u0000code 1"}
    reply = client.post(f"/agents/{session_id}/jobs/{job_id}/state", json=report, headers=headers(token))
    assert reply.status_code == 204, reply.text
    session.expire_all()
    assert session.get(RemoteJob, job_id).detail == "exitcode 1"


def _claimed_job(client, session, token, session_id) -> list[int]:
    job = make_job("nul")
    session.add(job)
    session.commit()
    reply = client.post(f"/agents/{session_id}/jobs/claim", json={"free_slots": 1}, headers=headers(token))
    return [j["job_id"] for j in reply.json()["jobs"]]


def test_openapi_schema_lists_the_agent_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/agents",
        "/agents/{session_id}/heartbeat",
        "/agents/{session_id}/jobs/claim",
        "/agents/{session_id}/jobs/{job_id}/state",
    } <= set(paths)


@pytest.mark.parametrize("change", ["revoked", "expired"])
def test_an_active_agents_heartbeat_is_401_once_its_token_is_revoked_or_expired(
    client, make_token, register, session, change
):
    """The one-statement heartbeat of an active agent checks the token as closely as the full path."""
    token = make_token()
    session_id = register(token)
    beat = {"free_slots": 1}
    assert (
        client.post(f"/agents/{session_id}/heartbeat", json=beat, headers=headers(token)).status_code == 200
    )
    past = utcnow() - timedelta(seconds=1)
    values = {"revoked_at": past} if change == "revoked" else {"expires_at": past}
    session.execute(update(RemoteToken).values(**values))
    session.commit()
    reply = client.post(f"/agents/{session_id}/heartbeat", json=beat, headers=headers(token))
    assert reply.status_code == 401
