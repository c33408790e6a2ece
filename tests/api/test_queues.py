"""Queue depth for autoscalers: the numbers, and who may read them."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from airflow_remote_exec.models import JobState, RemoteToken, utcnow
from tests.api.conftest import headers
from tests.factories import make_job


@pytest.fixture
def jobs(session):
    session.add_all(
        [
            make_job("q1", queue="etl"),
            make_job("q2", queue="etl"),
            make_job("c1", queue="etl", state=JobState.CLAIMED, agent_name="a1", attempt=1),
            make_job("r1", queue="etl", state=JobState.RUNNING, agent_name="a1", attempt=1),
            make_job("done", queue="etl", state=JobState.SUCCESS, agent_name="a1", attempt=1),
            make_job("failed", queue="etl", state=JobState.FAILED, agent_name="a1", attempt=1),
            make_job("g1", queue="gpu", state=JobState.RUNNING, agent_name="a2", attempt=1),
            make_job("secret", queue="finance"),
        ]
    )
    session.commit()


def test_depth_counts_queued_and_held_jobs_per_queue_and_in_total(client, make_token, jobs):
    token = make_token(queues=("etl", "gpu", "idle"))
    reply = client.get("/queues/depth", params={"queues": "etl,gpu,idle"}, headers=headers(token))
    assert reply.status_code == 200, reply.text
    assert reply.json() == {
        "queued": 2,
        "running": 3,
        "depth": 5,
        "slots": 5,
        "queues": {
            "etl": {"queued": 2, "running": 2, "slots": 4},
            "gpu": {"queued": 0, "running": 1, "slots": 1},
            "idle": {"queued": 0, "running": 0, "slots": 0},
        },
    }
    one = client.get("/queues/depth", params={"queues": "gpu"}, headers=headers(token)).json()
    assert (one["queued"], one["running"], one["depth"]) == (0, 1, 1)


def test_a_queue_outside_the_token_scope_is_403_naming_it(client, make_token, jobs):
    token = make_token(queues=("etl",))
    reply = client.get("/queues/depth", params={"queues": "etl,finance"}, headers=headers(token))
    assert reply.status_code == 403 and "finance" in reply.json()["detail"]


def test_an_autoscaler_needs_only_the_bearer_token(client, make_token, jobs):
    token = make_token(queues=("etl",))
    reply = client.get(
        "/queues/depth", params={"queues": "etl"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert reply.status_code == 200 and reply.json()["depth"] == 4


@pytest.mark.parametrize("auth", [None, "Bearer not-a-token", "Basic dXNlcjpwYXNz"])
def test_without_a_live_token_it_is_401(client, jobs, auth):
    reply = client.get(
        "/queues/depth", params={"queues": "etl"}, headers={"Authorization": auth} if auth else {}
    )
    assert reply.status_code == 401


def test_a_revoked_token_is_401(client, make_token, session, jobs):
    token = make_token(name="scaler", queues=("etl",))
    session.execute(update(RemoteToken).where(RemoteToken.name == "scaler").values(revoked_at=utcnow()))
    session.commit()
    assert client.get("/queues/depth", params={"queues": "etl"}, headers=headers(token)).status_code == 401


@pytest.mark.parametrize("queues", ["", "etl,,gpu", "etl;drop", "x" * 300])
def test_a_malformed_queue_list_is_422(client, make_token, queues):
    token = make_token(queues=("etl", "gpu"))
    assert client.get("/queues/depth", params={"queues": queues}, headers=headers(token)).status_code == 422


def test_too_many_queues_is_422(client, make_token):
    token = make_token(queues=("etl",))
    many = ",".join(f"q{i}" for i in range(101))
    reply = client.get("/queues/depth", params={"queues": many}, headers=headers(token))
    assert reply.status_code == 422 and "At most 100" in reply.json()["detail"]


def test_slots_weigh_each_job_by_its_pool_slots(client, make_token, session):
    """Workers count pool_slots: two 4-slot jobs need two 4-slot agents, not one."""
    session.add_all(
        [make_job("wide1", queue="ml", pool_slots=4), make_job("wide2", queue="ml", pool_slots=4)]
    )
    session.commit()
    token = make_token(queues=("ml",))
    body = client.get("/queues/depth", params={"queues": "ml"}, headers=headers(token)).json()
    assert (body["depth"], body["slots"]) == (2, 8)
