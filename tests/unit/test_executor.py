"""RemoteExecutor against a real (SQLite) metadata DB: rows in, events out."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest
from airflow.utils.state import TaskInstanceState
from sqlalchemy import select

from airflow_remote_exec.executor import RemoteExecutor
from airflow_remote_exec.models import JobState, RemoteJob, utcnow
from tests.factories import make_workload


@pytest.fixture
def executor():
    return RemoteExecutor(parallelism=8)


def _queue(executor, session, workload):
    executor.queue_workload(workload, session=session)
    session.commit()


def _job(session, workload) -> RemoteJob:
    session.expire_all()
    return session.scalar(select(RemoteJob).where(RemoteJob.ti_id == str(workload.ti.id)))


def test_queue_workload_writes_a_queued_row(executor, session):
    workload = make_workload("a", queue="gpu", priority_weight=7, pool_slots=2)
    _queue(executor, session, workload)
    job = _job(session, workload)
    assert (job.state, job.queue, job.priority_weight, job.pool_slots) == (JobState.QUEUED, "gpu", 7, 2)
    assert workload.ti.key in executor.running
    assert executor.slots_available == 7


def test_requeue_of_same_try_resets_the_row(executor, session):
    first = make_workload("b")
    _queue(executor, session, first)
    job = _job(session, first)
    job.state, job.agent_name, job.attempt = JobState.SUCCESS, "agent-x", 3
    session.commit()
    again = first.model_copy()
    _queue(executor, session, again)
    job = _job(session, again)
    assert (job.state, job.agent_name, job.attempt) == (JobState.QUEUED, None, 3)
    assert len(session.scalars(select(RemoteJob).where(RemoteJob.task_id == "b")).all()) == 1


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (JobState.RUNNING, TaskInstanceState.RUNNING),
        (JobState.SUCCESS, TaskInstanceState.SUCCESS),
        (JobState.FAILED, TaskInstanceState.FAILED),
    ],
)
def test_sync_reports_each_change_once(executor, session, state, expected):
    workload = make_workload(f"c-{state}")
    _queue(executor, session, workload)
    job = _job(session, workload)
    job.state, job.pending_sync, job.agent_name = state, True, "agent-1"
    session.commit()

    executor.sync()
    events = executor.get_event_buffer()
    assert events[workload.ti.key][0] == expected
    assert (workload.ti.key in executor.running) == (state == JobState.RUNNING)
    assert _job(session, workload).pending_sync is False

    executor.sync()
    assert executor.get_event_buffer() == {}


def test_running_event_carries_agent_name(executor, session):
    workload = make_workload("d")
    _queue(executor, session, workload)
    job = _job(session, workload)
    job.state, job.pending_sync, job.agent_name = JobState.RUNNING, True, "agent-7"
    session.commit()
    executor.sync()
    assert executor.get_event_buffer()[workload.ti.key] == (TaskInstanceState.RUNNING, "agent-7")


def test_sync_ignores_jobs_of_other_schedulers(executor, session):
    workload = make_workload("e")
    _queue(RemoteExecutor(parallelism=8), session, workload)  # another scheduler's executor
    job = _job(session, workload)
    job.state, job.pending_sync = JobState.SUCCESS, True
    session.commit()
    executor.sync()
    assert executor.get_event_buffer() == {}
    assert _job(session, workload).pending_sync is True


def test_purge_deletes_only_old_reported_finished_rows(executor, session):
    old, recent, unsynced = make_workload("p1"), make_workload("p2"), make_workload("p3")
    for workload in (old, recent, unsynced):
        _queue(executor, session, workload)
    long_ago = utcnow() - timedelta(days=1)
    for workload, finished, pending in (
        (old, long_ago, False),
        (recent, utcnow(), False),
        (unsynced, long_ago, True),
    ):
        job = _job(session, workload)
        job.state, job.finished_at, job.pending_sync = JobState.SUCCESS, finished, pending
        session.commit()
    executor._purge_finished_jobs(session)
    session.commit()
    assert _job(session, old) is None
    assert _job(session, recent) is not None
    assert _job(session, unsynced) is not None


def test_revoke_deletes_the_job(executor, session):
    workload = make_workload("r")
    _queue(executor, session, workload)
    executor.revoke_task(ti=SimpleNamespace(key=workload.ti.key))
    assert _job(session, workload) is None
    assert workload.ti.key not in executor.running


def test_adopt_keeps_known_jobs_and_rejects_unknown(executor, session):
    known, unknown = make_workload("k1"), make_workload("k2")
    _queue(RemoteExecutor(parallelism=8), session, known)
    job = _job(session, known)
    job.state = JobState.SUCCESS  # finished while no scheduler listened
    session.commit()

    def as_ti(w):
        ti = w.ti
        return SimpleNamespace(
            key=ti.key,
            dag_id=ti.dag_id,
            task_id=ti.task_id,
            run_id=ti.run_id,
            map_index=ti.map_index,
            try_number=ti.try_number,
        )

    known_ti, unknown_ti = as_ti(known), as_ti(unknown)
    rejected = executor.try_adopt_task_instances([known_ti, unknown_ti])
    assert rejected == [unknown_ti]
    assert known.ti.key in executor.running
    executor.sync()
    assert executor.get_event_buffer()[known.ti.key][0] == TaskInstanceState.SUCCESS


def test_non_task_workloads_are_refused(executor, session):
    with pytest.raises(TypeError, match="cannot run"):
        executor.queue_workload(SimpleNamespace(), session=session)


def _add_silent_agent(session, name: str, api_last_seen):
    """An agent silent for an hour, and an api-server up since then until ``api_last_seen``."""
    from airflow_remote_exec.models import AgentState, RemoteAgent, RemoteApiServer
    from airflow_remote_exec.tokens import create_token

    token, _ = create_token(session, f"t-{name}", ["default"])
    long_ago = utcnow() - timedelta(seconds=3600)
    session.add(RemoteApiServer(name="api-1", started_at=long_ago, last_seen_at=api_last_seen or long_ago))
    session.add(
        RemoteAgent(
            name=name,
            session_id=f"s-{name}",
            token_id=token.id,
            queues="default",
            slots=2,
            state=AgentState.ACTIVE,
            last_heartbeat_at=long_ago,
        )
    )
    session.commit()


def test_silent_agent_is_declared_lost_and_its_jobs_rerouted(executor, session):
    from airflow_remote_exec.models import AgentState, RemoteAgent

    _add_silent_agent(session, "silent", api_last_seen=utcnow())
    claimed, running = make_workload("claimed"), make_workload("running")
    for workload in (claimed, running):
        _queue(executor, session, workload)
    for workload, state in ((claimed, JobState.CLAIMED), (running, JobState.RUNNING)):
        job = _job(session, workload)
        job.state, job.agent_name, job.attempt = state, "silent", 1
        session.commit()

    executor.sync()

    agent = session.get(RemoteAgent, "silent")
    session.refresh(agent)
    assert agent.state == AgentState.LOST
    assert (_job(session, claimed).state, _job(session, claimed).agent_name) == (JobState.QUEUED, None)
    assert _job(session, running).state == JobState.FAILED
    assert "lost" in _job(session, running).detail
    assert executor.get_event_buffer()[running.ti.key][0] == TaskInstanceState.FAILED

    # The next try of the rerouted task is fenced: no agent may claim it before fenced_until.
    fenced_until = _job(session, running).fenced_until
    assert fenced_until > utcnow()
    retry = make_workload("running", try_number=2)
    _queue(executor, session, retry)
    assert _job(session, retry).not_before == fenced_until


def test_no_agent_is_declared_lost_while_the_agent_api_is_down(executor, session):
    from airflow_remote_exec.models import AgentState, RemoteAgent

    # The only api-server stopped reporting presence an hour ago: silence proves nothing.
    _add_silent_agent(session, "quiet", api_last_seen=None)
    executor.sync()
    agent = session.get(RemoteAgent, "quiet")
    session.refresh(agent)
    assert agent.state == AgentState.ACTIVE
