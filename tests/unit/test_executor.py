"""RemoteExecutor against a real (SQLite) metadata DB: rows in, events out."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest
from airflow.utils.state import TaskInstanceState
from sqlalchemy import select

from airflow_remote_exec.executor import RemoteExecutor
from airflow_remote_exec.housekeeping import purge_old_rows
from airflow_remote_exec.models import JobState, RemoteJob, utcnow
from tests.factories import identity_of, make_callback_workload, make_job, make_workload
from tests.versions import needs_connection_tests


@pytest.fixture
def executor():
    executor = RemoteExecutor(parallelism=8)
    executor._last_purge = time.monotonic()  # housekeeping has tests of its own
    return executor


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
    assert workload.ti.key not in executor.running  # a task that runs frees its slot, as in LocalExecutor
    assert (workload.ti.key in executor.own_jobs) == (state == JobState.RUNNING)
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


def test_a_running_task_frees_its_slot_and_is_still_reported_when_it_ends(executor, session):
    """LocalExecutor frees a parallelism slot when a task starts; so does this executor."""
    workload = make_workload("frees-slot")
    _queue(executor, session, workload)
    assert executor.slots_available == 7
    job = _job(session, workload)
    job.state, job.pending_sync, job.agent_name = JobState.RUNNING, True, "agent-1"
    session.commit()
    executor.sync()
    assert executor.get_event_buffer()[workload.ti.key][0] == TaskInstanceState.RUNNING
    assert executor.slots_available == 8

    job = _job(session, workload)
    job.state, job.pending_sync = JobState.SUCCESS, True
    session.commit()
    executor.sync()
    assert executor.get_event_buffer()[workload.ti.key][0] == TaskInstanceState.SUCCESS
    assert executor.own_jobs == set()
    assert executor.slots_available == 8


def test_sync_ignores_jobs_of_other_schedulers(executor, session):
    workload = make_workload("e")
    _queue(RemoteExecutor(parallelism=8), session, workload)  # another scheduler's executor
    job = _job(session, workload)
    job.state, job.pending_sync = JobState.SUCCESS, True
    session.commit()
    executor.sync()
    assert executor.get_event_buffer() == {}
    assert _job(session, workload).pending_sync is True


def test_purge_deletes_old_reported_rows_and_unsynced_rows_no_scheduler_will_adopt(executor, session):
    old, recent, unsynced, orphaned = (make_workload(f"p{n}") for n in range(4))
    for workload in (old, recent, unsynced, orphaned):
        _queue(executor, session, workload)
    long_ago = utcnow() - timedelta(days=1)
    for workload, finished, pending in (
        (old, long_ago, False),
        (recent, utcnow(), False),
        (unsynced, utcnow() - timedelta(minutes=10), True),  # a scheduler may still adopt it
        (orphaned, long_ago, True),  # its scheduler died long ago
    ):
        job = _job(session, workload)
        job.state, job.finished_at, job.pending_sync = JobState.SUCCESS, finished, pending
        session.commit()
    purge_old_rows(session)
    session.commit()
    assert _job(session, old) is None
    assert _job(session, recent) is not None
    assert _job(session, unsynced) is not None
    assert _job(session, orphaned) is None


def test_purge_forgets_week_old_agent_history_and_dead_api_servers(session):
    from airflow_remote_exec.models import AgentState, RemoteAgent, RemoteAgentEvent, RemoteApiServer
    from airflow_remote_exec.tokens import create_token

    token, _ = create_token(session, "t-old", ["default"])
    week_ago = utcnow() - timedelta(days=8)
    session.add_all(
        [
            RemoteAgent(
                name="gone-long-ago",
                session_id="s1",
                token_id=token.id,
                queues="default",
                slots=1,
                state=AgentState.GONE,
                state_changed_at=week_ago,
            ),
            RemoteAgent(
                name="lost-recently",
                session_id="s2",
                token_id=token.id,
                queues="default",
                slots=1,
                state=AgentState.LOST,
                state_changed_at=utcnow(),
            ),
            RemoteAgentEvent(agent_name="gone-long-ago", state=AgentState.GONE, at=week_ago),
            RemoteAgentEvent(agent_name="lost-recently", state=AgentState.LOST, at=utcnow()),
            RemoteApiServer(name="old:1", started_at=week_ago, last_seen_at=week_ago),
            RemoteApiServer(name="new:2", started_at=utcnow(), last_seen_at=utcnow()),
        ]
    )
    session.commit()
    purge_old_rows(session)
    session.commit()
    assert session.scalars(select(RemoteAgent.name)).all() == ["lost-recently"]
    assert session.scalars(select(RemoteAgentEvent.agent_name)).all() == ["lost-recently"]
    assert session.scalars(select(RemoteApiServer.name)).all() == ["new:2"]


def test_sync_releases_jobs_held_by_an_agent_that_is_not_live(executor, session):
    claimed, running = make_workload("orphan-claimed"), make_workload("orphan-running")
    for workload, state in ((claimed, JobState.CLAIMED), (running, JobState.RUNNING)):
        _queue(executor, session, workload)
        job = _job(session, workload)
        job.state, job.agent_name, job.attempt = state, "vanished", 1
        session.commit()
    executor._last_purge = 0.0
    executor.sync()
    assert (_job(session, claimed).state, _job(session, claimed).agent_name) == (JobState.QUEUED, None)
    assert _job(session, running).state == JobState.FAILED
    assert executor.get_event_buffer()[running.ti.key][0] == TaskInstanceState.FAILED
    assert running.ti.key not in executor.running


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
        return SimpleNamespace(key=w.ti.key, **identity_of(w.ti))

    known_ti, unknown_ti = as_ti(known), as_ti(unknown)
    rejected = executor.try_adopt_task_instances([known_ti, unknown_ti])
    assert rejected == [unknown_ti]
    assert known.ti.key in executor.running
    executor.sync()
    assert executor.get_event_buffer()[known.ti.key][0] == TaskInstanceState.SUCCESS


def test_unsupported_workloads_are_ignored_without_raising(executor, session):
    executor.queue_workload(SimpleNamespace(), session=session)  # must not stop the scheduler loop
    assert session.scalars(select(RemoteJob)).all() == []


def _connection_test(session, queue=None):
    """A connection test as Airflow's REST API records it, and the workload its scheduler makes."""
    from airflow.executors.workloads import TestConnection
    from airflow.models.connection_test import ConnectionTestRequest, ConnectionTestState

    conn_id = f"agent_only_{uuid.uuid4().hex[:8]}"  # one active test per connection id
    request = ConnectionTestRequest(connection_id=conn_id, conn_type="postgres", queue=queue)
    request.state = ConnectionTestState.QUEUED
    session.add(request)
    session.commit()
    workload = TestConnection.make(
        connection_test_id=request.id, connection_id=conn_id, timeout=60, queue=queue
    )
    return request, workload


@needs_connection_tests
def test_connection_test_is_a_job_of_its_queue_reported_with_its_key(executor, session):
    from airflow.models.connection_test import ConnectionTestKey, ConnectionTestState

    assert executor.supports_connection_test is True
    _, workload = _connection_test(session, queue="etl")
    _queue(executor, session, workload)
    job = session.scalar(select(RemoteJob).where(RemoteJob.ti_id == str(workload.connection_test_id)))
    assert (job.kind, job.state, job.queue) == ("connection_test", JobState.QUEUED, "etl")
    _reported_success_is_one_event(
        executor, session, job, ConnectionTestKey(id=str(workload.connection_test_id)), ConnectionTestState
    )


@needs_connection_tests
def test_a_reaped_connection_test_is_never_claimed(executor, session):
    from airflow.models.connection_test import ConnectionTestKey

    _, workload = _connection_test(session)
    _queue(executor, session, workload)
    key = ConnectionTestKey(id=str(workload.connection_test_id))
    executor.fail_connection_test(key)
    assert key not in executor.running
    assert session.scalars(select(RemoteJob)).all() == []


@pytest.mark.parametrize("fetched", [False, True])
@needs_connection_tests
def test_a_connection_test_of_a_lost_agent_is_failed_once_its_connection_was_fetched(
    executor, session, fetched
):
    from airflow.models.connection_test import ConnectionTestRequest, ConnectionTestState

    _add_silent_agent(session, "silent", api_last_seen=utcnow())
    request, workload = _connection_test(session)
    _queue(executor, session, workload)
    job = session.scalar(select(RemoteJob).where(RemoteJob.ti_id == str(request.id)))
    job.state, job.agent_name, job.attempt = JobState.CLAIMED, "silent", 1
    if fetched:  # the agent fetched the connection; its "running" report never arrived
        request.state = ConnectionTestState.RUNNING
    session.commit()

    executor.sync()

    session.expire_all()
    job = session.scalar(select(RemoteJob).where(RemoteJob.ti_id == str(request.id)))
    request = session.get(ConnectionTestRequest, request.id)
    if fetched:  # never run twice: Airflow hands a test's connection out once
        assert job.state == JobState.FAILED
        assert request.state == ConnectionTestState.FAILED
        assert "went away" in request.result_message
        assert request.active_connection_id is None  # the connection can be tested again
    else:
        assert (job.state, job.agent_name) == (JobState.QUEUED, None)
        assert request.state == ConnectionTestState.QUEUED


def _reported_success_is_one_event(executor, session, job, key, states) -> None:
    """A job of a workload other than a task holds a slot until its agent reports, then is one event."""
    assert key in executor.running
    job.state, job.pending_sync, job.agent_name = JobState.SUCCESS, True, "agent-1"
    session.commit()
    executor.sync()
    assert executor.get_event_buffer()[key][0] == states.SUCCESS
    assert key not in executor.running


def test_deadline_callback_is_queued_as_a_job_and_reported_with_its_callback_key(executor, session):
    from airflow.utils.state import CallbackState

    workload = make_callback_workload(dag_id="d1", dag_run_id=7)
    _queue(executor, session, workload)
    job = session.scalar(select(RemoteJob).where(RemoteJob.ti_id == str(workload.callback.id)))
    assert (job.kind, job.state, job.queue, job.dag_id) == ("callback", JobState.QUEUED, "default", "d1")
    _reported_success_is_one_event(executor, session, job, workload.callback.key, CallbackState)


def test_not_started_job_leaves_running_without_an_event(executor, session):
    workload = make_workload("refused-start")
    _queue(executor, session, workload)
    job = _job(session, workload)
    job.state, job.pending_sync, job.detail = JobState.NOT_STARTED, True, "ti_run 409"
    session.commit()
    executor.sync()
    assert executor.get_event_buffer() == {}
    assert workload.ti.key not in executor.running
    assert _job(session, workload).pending_sync is False


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


def test_the_scheduler_drains_live_agents_of_another_airflow_minor(executor, session):
    from airflow_remote_exec import compat
    from airflow_remote_exec.models import AgentState, RemoteAgent
    from airflow_remote_exec.tokens import create_token

    token, _ = create_token(session, "t-minors", ["default"])
    versions = {"old": "3.1.8", "same": compat.AIRFLOW_VERSION, "unrecorded": None}
    for name, version in versions.items():
        session.add(
            RemoteAgent(name=name, session_id=f"s-{name}", token_id=token.id, queues="default", slots=1,
                        state=AgentState.ACTIVE, last_heartbeat_at=utcnow(), airflow_version=version)
        )  # fmt: skip
    session.commit()
    executor._last_purge = 0.0  # the check runs with the housekeeping, every 30 s
    executor.sync()
    session.expire_all()
    drained = {a.name: (a.state, a.drain_requested) for a in session.scalars(select(RemoteAgent))}
    assert drained == {
        "old": (AgentState.DRAINING, True),
        "same": (AgentState.ACTIVE, False),
        "unrecorded": (AgentState.ACTIVE, False),
    }


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


def test_a_key_queued_again_by_another_scheduler_leaves_the_first_without_an_event(session):
    """A deferral resume queued by scheduler 2 must not leave scheduler 1 holding the key for ever."""
    first, second = RemoteExecutor(parallelism=8), RemoteExecutor(parallelism=8)
    first.job_id, second.job_id = 1, 2
    for executor in (first, second):
        executor._last_purge = time.monotonic()
    workload = make_workload("resumed")
    _queue(first, session, workload)
    _queue(second, session, workload.model_copy())  # the same try, queued again after the trigger fired
    job = _job(session, workload)
    job.state, job.pending_sync, job.agent_name = JobState.SUCCESS, True, "agent-1"
    session.commit()
    first.sync()
    assert first.get_event_buffer() == {}
    assert workload.ti.key not in first.running
    assert _job(session, workload).pending_sync is True  # left for the scheduler that queued it
    second.sync()
    assert second.get_event_buffer()[workload.ti.key][0] == TaskInstanceState.SUCCESS
    assert workload.ti.key not in second.running


@pytest.fixture
def running_task(executor, session):
    """A task whose agent reported it running (its event already read), and its task instance row,
    RUNNING with no agent recorded: as when the scheduler dropped the event on a locked row."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import delete, insert

    workload = make_workload("dropped-running", run_id="recheck")
    ti = workload.ti
    run = {"dag_id": ti.dag_id, "run_id": ti.run_id, "run_type": "manual", "run_after": utcnow()}
    session.execute(insert(DagRun.__table__).values(**run))
    session.execute(
        insert(TaskInstance.__table__).values(
            id=ti.id, **identity_of(ti), pool="default_pool", state=TaskInstanceState.RUNNING
        )
    )
    _queue(executor, session, workload)
    job = _job(session, workload)
    job.state, job.pending_sync, job.agent_name = JobState.RUNNING, True, "agent-3"
    session.commit()
    executor.sync()
    assert executor.get_event_buffer()[ti.key] == (TaskInstanceState.RUNNING, "agent-3")
    executor._last_running_recheck = 0.0
    yield ti.key
    session.execute(delete(TaskInstance.__table__).where(TaskInstance.id == ti.id))
    session.execute(delete(DagRun.__table__).where(DagRun.run_id == ti.run_id))
    session.commit()


def test_running_is_reported_again_while_the_task_instance_names_no_agent(executor, running_task):
    """The recheck re-sends "running", even though the task freed its slot when it first ran."""
    executor.sync()
    assert executor.get_event_buffer()[running_task] == (TaskInstanceState.RUNNING, "agent-3")
    assert running_task not in executor.running


def test_the_recheck_never_replaces_an_event_the_scheduler_has_not_read(executor, running_task):
    """The scheduler fails a task gone silent through ``change_state``; "running" must not undo it."""
    executor.change_state(running_task, TaskInstanceState.FAILED, "no heartbeat")
    executor.sync()
    assert executor.get_event_buffer()[running_task] == (TaskInstanceState.FAILED, "no heartbeat")


def _two_schedulers():
    first, second = RemoteExecutor(parallelism=8), RemoteExecutor(parallelism=8)
    first.job_id, second.job_id = 1, 2
    for executor in (first, second):
        executor._last_purge = time.monotonic()
    return first, second


def test_a_key_queued_again_and_reported_by_another_scheduler_is_let_go(session):
    """Scheduler 2 queues a deferral resume of scheduler 1's key and reports it first: scheduler 1 never
    sees the row with a report, and must still let go of the key (and its slot)."""
    first, second = _two_schedulers()
    mine, resumed = make_workload("stays-mine"), make_workload("resumed-elsewhere")
    for workload in (mine, resumed):
        _queue(first, session, workload)
    _queue(second, session, resumed.model_copy())
    job = _job(session, resumed)
    job.state, job.pending_sync, job.agent_name = JobState.SUCCESS, True, "agent-1"
    session.commit()
    second.sync()
    assert second.get_event_buffer()[resumed.ti.key][0] == TaskInstanceState.SUCCESS

    first._last_running_recheck = 0.0
    first.sync()
    assert first.get_event_buffer() == {}
    assert first.own_jobs == first.running == {mine.ti.key}


def test_a_key_whose_job_is_gone_is_let_go(session):
    first, _ = _two_schedulers()
    workload = make_workload("revoked-elsewhere")
    _queue(first, session, workload)
    session.delete(_job(session, workload))  # revoked by another scheduler, say
    session.commit()
    first._last_running_recheck = 0.0
    first.sync()
    assert first.own_jobs == first.running == set()


def test_a_reused_key_whose_queueing_was_rolled_back_is_let_go(session):
    """The scheduler rolls back a loop whose queueing met a lock: a resumed try's row stays the
    reported one of its previous run, and the key must not hold a parallelism slot for ever."""
    first, _ = _two_schedulers()
    workload = make_workload("rolled-back")
    _queue(first, session, workload)
    job = _job(session, workload)
    job.state, job.pending_sync = JobState.SUCCESS, True
    session.commit()
    first.sync()
    assert first.get_event_buffer()[workload.ti.key][0] == TaskInstanceState.SUCCESS
    first.queue_workload(workload.model_copy(), session=session)  # the deferral resume...
    session.rollback()  # ...rolled back with the scheduler's loop
    assert workload.ti.key in first.running
    first._last_running_recheck = 0.0
    first.sync()
    assert first.own_jobs == first.running == set()


def test_adoption_of_many_task_instances_queries_in_chunks(executor, session):
    known = [make_workload(f"adopt-{n}") for n in range(200)]
    unknown = [make_workload(f"unknown-{n}") for n in range(200)]
    other = RemoteExecutor(parallelism=1000)
    for workload in known:
        other.queue_workload(workload, session=session)
    session.commit()
    tis = [SimpleNamespace(key=w.ti.key, **identity_of(w.ti)) for w in known + unknown]
    rejected = executor.try_adopt_task_instances(tis)
    assert {ti.task_id for ti in rejected} == {w.ti.task_id for w in unknown}
    assert executor.own_jobs == {w.ti.key for w in known}


@needs_connection_tests
def test_a_connection_test_whose_runner_died_fails_at_once(executor, session):
    from airflow.models.connection_test import ConnectionTestRequest, ConnectionTestState

    request, workload = _connection_test(session)
    _queue(executor, session, workload)
    request.state = ConnectionTestState.RUNNING  # the agent fetched the connection, then its runner died
    job = session.scalar(select(RemoteJob).where(RemoteJob.ti_id == str(request.id)))
    job.state, job.pending_sync, job.detail = JobState.FAILED, True, "runner process died"
    session.commit()
    executor.sync()
    session.expire_all()
    request = session.get(ConnectionTestRequest, request.id)
    assert request.state == ConnectionTestState.FAILED
    assert "runner process died" in request.result_message


@needs_connection_tests
def test_a_connection_test_reaped_by_another_scheduler_frees_this_ones_slot(session):
    from airflow.models.connection_test import ConnectionTestKey

    first, second = RemoteExecutor(parallelism=8), RemoteExecutor(parallelism=8)
    first.job_id, second.job_id = 101, 102
    _, workload = _connection_test(session)
    _queue(first, session, workload)
    key = ConnectionTestKey(id=str(workload.connection_test_id))
    second.fail_connection_test(key)  # the other scheduler's reaper
    first._last_running_recheck = 0.0
    first.sync()
    assert key not in first.running and key not in first.own_jobs


@needs_connection_tests
def test_a_connection_test_is_claimed_before_the_queues_tasks(executor, session):
    _queue(executor, session, make_workload("busy", priority_weight=1000))
    _, workload = _connection_test(session)
    _queue(executor, session, workload)
    weights = dict(session.execute(select(RemoteJob.kind, RemoteJob.priority_weight)).all())
    assert weights["connection_test"] > weights["task"]


def test_a_connection_test_job_on_an_airflow_without_connection_tests_is_failed_not_a_crash(
    session, monkeypatch
):
    """A 3.3 orchestrator rolled back to 3.2 may leave a claimed connection-test job: releasing it (its
    agent lost) must not reach for Airflow 3.3's table, or every scheduler loop would raise."""
    from airflow_remote_exec import reroute
    from airflow_remote_exec.models import JobKind

    monkeypatch.setattr(reroute, "CONNECTION_TESTS", False)
    monkeypatch.setattr(reroute, "connection_tests_model", lambda: pytest.fail("reached Airflow's table"))
    job = make_job("connection-test:x", kind=JobKind.CONNECTION_TEST, state=JobState.CLAIMED, attempt=1)
    session.add(job)
    session.commit()
    reroute.release_jobs(session, [job.id], "agent lost", utcnow())
    session.commit()
    session.expire_all()
    assert session.get(RemoteJob, job.id).state == JobState.FAILED
