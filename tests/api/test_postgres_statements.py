"""The job path's PostgreSQL-only statements, run against a real PostgreSQL: the batched heartbeat, and
a claim that takes row-locked candidates by id. The rest of tests/api runs on SQLite."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from airflow_remote_exec.api.beats import write_beats
from airflow_remote_exec.api.datamodels import JobReport
from airflow_remote_exec.api.jobs import claim_jobs
from airflow_remote_exec.models import AgentState, JobState, RemoteAgent, RemoteJob, metadata
from airflow_remote_exec.tokens import create_token, hash_token
from tests.factories import make_job

LONG_AGO = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def pg(postgres, monkeypatch) -> Iterator[Session]:
    """A session on a fresh PostgreSQL database with the remote_* tables, which the API uses too."""
    from airflow import settings

    url = postgres.create_database(f"api_{uuid.uuid4().hex[:12]}")
    # A statement that waits for a row lock fails in 2 s instead of hanging the test.
    engine = sa.create_engine(url, connect_args={"options": "-c lock_timeout=2000"})
    metadata.create_all(engine)
    monkeypatch.setattr(settings, "NonScopedSession", sessionmaker(bind=engine, expire_on_commit=False))
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()


def _agent(session: Session, name: str, token_id: int, state: str = AgentState.ACTIVE, **kw) -> str:
    session_id = str(uuid.uuid4())
    session.add(RemoteAgent(name=name, session_id=session_id, token_id=token_id, queues="default", slots=8,
                            state=state, last_heartbeat_at=LONG_AGO, **kw))  # fmt: skip
    return session_id


def test_one_statement_writes_exactly_the_plain_heartbeats_of_a_batch(pg):
    mine, my_secret = create_token(pg, "mine", ["default"])
    theirs, their_secret = create_token(pg, "theirs", ["default"])
    mine_hash, their_hash = hash_token(my_secret), hash_token(their_secret)
    active = _agent(pg, "active", mine.id)
    other = _agent(pg, "other", theirs.id)
    drained = _agent(pg, "drained", mine.id, drain_requested=True)
    registered = _agent(pg, "registered", mine.id, state=AgentState.REGISTERED)
    locked = _agent(pg, "locked", mine.id)
    held = [make_job("h1", state=JobState.CLAIMED), make_job("h2", state=JobState.RUNNING)]
    done = make_job("done", state=JobState.SUCCESS)
    for job in (*held, done):
        job.agent_name, job.attempt, job.claimed_at = "active", 1, LONG_AGO
    pg.add_all([*held, done])
    pg.commit()

    with pg.get_bind().connect() as blocker:  # another transaction holds the "locked" agent's row
        blocker.execute(sa.select(RemoteAgent.name).where(RemoteAgent.name == "locked").with_for_update())
        batch = [(sid, mine_hash) for sid in (active, other, drained, registered, locked, "nope", active)]
        batch.append((other, their_hash))
        written = write_beats(batch)
        blocker.rollback()

    assert set(written) == {(active, mine_hash), (other, their_hash)}
    assert {job.id for job in written[active, mine_hash].held_jobs} == {job.id for job in held}
    assert written[other, their_hash].held_jobs == []
    pg.expire_all()
    beaten = {a.name for a in pg.scalars(sa.select(RemoteAgent)) if a.last_heartbeat_at > LONG_AGO}
    assert beaten == {"active", "other"}


def test_a_claim_takes_unlocked_candidates_in_priority_order_and_applies_its_reports(pg):
    token, secret = create_token(pg, "tok", ["default"])
    session_id = _agent(pg, "agent", token.id)
    running = make_job("running", state=JobState.RUNNING)
    running.agent_name, running.attempt = "agent", 1
    low, high = make_job("low", priority_weight=1), make_job("high", priority_weight=5)
    locked, newer_high = make_job("locked", priority_weight=9), make_job("newer", priority_weight=5)
    pg.add_all([running, low, high, locked, newer_high])
    pg.commit()

    with pg.get_bind().connect() as blocker:  # another claimer is taking "locked" right now
        blocker.execute(sa.select(RemoteJob.id).where(RemoteJob.id == locked.id).with_for_update())
        final = JobReport(job_id=running.id, attempt=1, state=JobState.SUCCESS, exit_code=0)
        result = claim_jobs(secret, session_id, free_slots=2, request_id=str(uuid.uuid4()), reports=[final])
        blocker.rollback()

    assert result.refused == []
    assert [(job.job_id, job.attempt) for job in result.jobs] == [(high.id, 1), (newer_high.id, 1)]
    pg.expire_all()
    states = {job.task_id: (job.state, job.agent_name) for job in pg.scalars(sa.select(RemoteJob))}
    assert states == {
        "running": (JobState.SUCCESS, "agent"),
        "high": (JobState.CLAIMED, "agent"),
        "newer": (JobState.CLAIMED, "agent"),
        "low": (JobState.QUEUED, None),
        "locked": (JobState.QUEUED, None),
    }
    assert pg.get(RemoteJob, running.id).finished_at > datetime.now(timezone.utc) - timedelta(minutes=5)
