"""Liveness and rerouting: what happens to the jobs of an agent that goes away.

Used by the api-server (an agent re-registers, deregisters, or stops listing a job in its
heartbeat) and by the executor's ``sync`` (an agent stops heartbeating and is declared lost, or a
job is held by an agent that is not live). Every time here comes from the database's clock.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from airflow.jobs.job import Job
from airflow.jobs.job import JobState as AirflowJobState
from airflow.models.taskinstance import TaskInstance
from airflow.utils.state import TaskInstanceState
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from airflow_remote_exec import config
from airflow_remote_exec.clock import db_now
from airflow_remote_exec.compat import AIRFLOW_VERSION, CONNECTION_TESTS, connection_tests_model, minor_of
from airflow_remote_exec.models import (
    AgentState,
    JobKind,
    JobState,
    RemoteAgent,
    RemoteApiServer,
    RemoteJob,
)
from airflow_remote_exec.notify import notify_jobs_queued

# An api-server whose presence row is older than this is considered down. It must stay well
# below the silence window (heartbeat_interval x lost_after_missed_heartbeats): a killed api-server
# has to look down before its agents' silence could be mistaken for their death.
API_PRESENCE_STALE_SECONDS = 2.5


def silence_window() -> timedelta:
    """How long an agent may stay silent before it counts as lost."""
    return timedelta(seconds=config.heartbeat_interval() * config.lost_after_missed_heartbeats())


def _started_task_ids(session: Session, ti_ids: list[str]) -> set[str]:
    """Of these task instance ids, those Airflow has already started (no longer QUEUED)."""
    if not ti_ids:
        return set()
    states = session.execute(
        select(TaskInstance.id, TaskInstance.state).where(TaskInstance.id.in_([uuid.UUID(i) for i in ti_ids]))
    ).all()
    return {str(ti_id) for ti_id, state in states if state != TaskInstanceState.QUEUED}


def _started_connection_tests(session: Session, test_ids: list[str]) -> set[str]:
    """Of these connection test ids, those whose connection an agent has already fetched."""
    if not test_ids:
        return set()
    if not CONNECTION_TESTS:  # rows left by a 3.3 orchestrator rolled back to 3.2: only failed
        return set(test_ids)
    model = connection_tests_model()
    states = session.execute(
        select(model.ConnectionTestRequest.id, model.ConnectionTestRequest.state).where(
            model.ConnectionTestRequest.id.in_([uuid.UUID(i) for i in test_ids])
        )
    ).all()
    return {str(test_id) for test_id, state in states if state != model.ConnectionTestState.QUEUED}


def release_jobs(session: Session, job_ids: list[int], reason: str, now: datetime) -> None:
    """Take jobs back from the agent holding them: unstarted ones to the queue, started ones to a retry.

    A job counts as started when its agent reported it running, or when Airflow already runs its
    task instance (the agent's "running" report may have been lost). A started job is failed rather
    than requeued, because its task may have had side effects: the scheduler applies the task's own
    retry policy, and the retry may not be claimed before ``reroute_fence_seconds`` (see
    ``RemoteJob.fenced_until``), by which time a still-running old try has been told to stop.
    """
    if not job_ids:
        return
    rows = session.execute(
        select(RemoteJob.id, RemoteJob.state, RemoteJob.kind, RemoteJob.ti_id)
        .where(RemoteJob.id.in_(job_ids), RemoteJob.state.in_(JobState.HELD))
        .order_by(RemoteJob.id)  # job rows are locked in id order everywhere: no lock cycles
        .with_for_update()
    ).all()
    claimed = [r for r in rows if r.state == JobState.CLAIMED]
    started_tis = _started_task_ids(
        session, [r.ti_id for r in claimed if r.kind == JobKind.TASK]
    ) | _started_connection_tests(session, [r.ti_id for r in claimed if r.kind == JobKind.CONNECTION_TEST])
    started = [r.id for r in rows if r.state == JobState.RUNNING or r.ti_id in started_tis]
    unstarted = [r.id for r in rows if r.id not in started]
    if unstarted:
        session.execute(
            update(RemoteJob)
            .where(RemoteJob.id.in_(unstarted))
            .values(state=JobState.QUEUED, agent_name=None, claimed_at=None, claim_request_id=None)
        )
        notify_jobs_queued(session)
    if started:
        fail_connection_tests(
            session,
            [r.ti_id for r in rows if r.id in started and r.kind == JobKind.CONNECTION_TEST],
            f"The agent running this test went away: {reason}",
        )
        session.execute(
            update(RemoteJob)
            .where(RemoteJob.id.in_(started))
            .values(
                state=JobState.FAILED,
                detail=reason[:1000],
                finished_at=now,
                pending_sync=True,
                fenced_until=now + timedelta(seconds=config.reroute_fence_seconds()),
            )
        )


def fail_connection_tests(session: Session, test_ids: list[str], reason: str) -> None:
    """A connection test whose agent went away (or whose runner died) mid-test will never report:
    fail it now, with the reason, rather than at the scheduler's reaper a timeout later. A test is
    never re-run, because Airflow hands its connection to one agent only once. A test locked by
    someone else (the reaper) is being ended already: skipped, never waited for."""
    if not test_ids or not CONNECTION_TESTS:  # 3.2 has no connection tests to fail
        return
    model = connection_tests_model()
    for test_id in test_ids:
        test_uuid = uuid.UUID(test_id)
        test = session.get(model.ConnectionTestRequest, test_uuid, with_for_update={"skip_locked": True})
        if test is not None and test.state in model.ACTIVE_STATES:
            test.state = model.ConnectionTestState.FAILED  # through the ORM: it also frees the connection id
            test.result_message = reason[:2000]


def release_agent_jobs(
    session: Session, agent_name: str, reason: str, now: datetime | None = None, lost: bool = False
) -> None:
    """Hand back everything an agent holds: its jobs (see ``release_jobs``) and its triggers."""
    held = session.scalars(
        select(RemoteJob.id).where(RemoteJob.agent_name == agent_name, RemoteJob.state.in_(JobState.HELD))
    ).all()
    release_jobs(session, list(held), reason, now or db_now(session))
    end_triggerer_job(session, agent_name, AirflowJobState.FAILED if lost else AirflowJobState.SUCCESS)


def end_triggerer_job(session: Session, agent_name: str, state: str) -> None:
    """End the Airflow triggerer job of an agent's session that is over: other triggerers take its
    triggers at their next sync instead of after ``[triggerer] triggerer_health_check_threshold``."""
    job_id = session.scalar(select(RemoteAgent.triggerer_job_id).where(RemoteAgent.name == agent_name))
    if job_id is None:
        return
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.end_date.is_(None))
        .values(state=state, end_date=datetime.now(UTC))
    )
    session.execute(update(RemoteAgent).where(RemoteAgent.name == agent_name).values(triggerer_job_id=None))


def agent_api_up_since(session: Session, now: datetime) -> datetime | None:
    """Since when the agent API has been served without a gap, or None if no api-server is up."""
    return session.scalar(
        select(func.min(RemoteApiServer.started_at)).where(
            RemoteApiServer.last_seen_at > now - timedelta(seconds=API_PRESENCE_STALE_SECONDS)
        )
    )


def mark_lost_agents(session: Session) -> list[str]:
    """Declare agents lost that missed ``lost_after_missed_heartbeats`` heartbeats; reroute their jobs.

    Only while the agent API has been up for the whole window: when the api-server itself is down,
    silence says nothing about the agents, and their running tasks must not be failed.
    """
    now = db_now(session)
    silence = silence_window()
    up_since = agent_api_up_since(session, now)
    if up_since is None or up_since > now - silence:
        return []
    agents = session.scalars(
        select(RemoteAgent)
        .where(RemoteAgent.state.in_(AgentState.LIVE), RemoteAgent.last_heartbeat_at < now - silence)
        .with_for_update(skip_locked=True)
    ).all()
    for agent in agents:
        quiet_for = int((now - agent.last_heartbeat_at).total_seconds())
        reason = f"agent {agent.name} lost: no heartbeat for {quiet_for}s"
        agent.set_state(session, AgentState.LOST, reason, now=now)
        release_agent_jobs(session, agent.name, reason, now, lost=True)
    return [agent.name for agent in agents]


def drain_agents_on_another_minor(session: Session) -> list[str]:
    """Drain the live agents whose session was opened on another Airflow minor than this scheduler's,
    which writes the workloads they would claim: the orchestrator was upgraded (or rolled back) under
    them. They claim nothing more and their running tasks finish; registering again is refused (426)
    until they run this minor. Returns their names."""
    ours = ".".join(minor_of(AIRFLOW_VERSION)) + "."
    candidates = session.scalars(
        select(RemoteAgent)
        .where(
            RemoteAgent.state.in_(AgentState.LIVE),
            RemoteAgent.drain_requested.is_(False),
            RemoteAgent.airflow_version.is_not(None),
            ~RemoteAgent.airflow_version.startswith(ours, autoescape=True),  # locks only those to drain
        )
        .with_for_update(skip_locked=True)
    ).all()
    now = db_now(session)
    drained = []
    for agent in candidates:
        agent.drain_requested = True
        reason = f"runs Airflow {agent.airflow_version}, the orchestrator {AIRFLOW_VERSION}: upgrade it"
        agent.set_state(session, AgentState.DRAINING, reason, now=now)
        drained.append(agent.name)
    return drained


def release_jobs_of_agents_not_live(session: Session) -> list[str]:
    """Release jobs still held in the name of an agent that is lost, gone or unknown.

    Nothing should leave such a row, but a leak would hold a task (and a parallelism slot of the
    executor) for ever, so the executor sweeps now and then.
    """
    live = select(RemoteAgent.name).where(RemoteAgent.state.in_(AgentState.LIVE))
    names = session.scalars(
        select(RemoteJob.agent_name)
        .where(RemoteJob.state.in_(JobState.HELD), RemoteJob.agent_name.not_in(live))
        .distinct()
    ).all()
    now = db_now(session)
    for name in names:
        release_agent_jobs(session, name, f"agent {name} is not live", now)
    return list(names)


def fence_of_previous_try(
    session: Session, dag_id: str, task_id: str, run_id: str, map_index: int, try_number: int
):
    """``fenced_until`` of the previous try of a task instance, if it was taken from a lost agent."""
    if try_number <= 1:
        return None
    return session.scalar(
        select(RemoteJob.fenced_until).where(
            RemoteJob.dag_id == dag_id,
            RemoteJob.task_id == task_id,
            RemoteJob.run_id == run_id,
            RemoteJob.map_index == map_index,
            RemoteJob.try_number == try_number - 1,
        )
    )
