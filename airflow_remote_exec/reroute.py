"""Liveness and rerouting: what happens to the jobs of an agent that goes away.

Used by the api-server (an agent re-registers or deregisters) and by the executor's ``sync``
(an agent stops heartbeating and is declared lost).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from airflow_remote_exec import config
from airflow_remote_exec.models import AgentState, JobState, RemoteAgent, RemoteJob, utcnow
from airflow_remote_exec.notify import notify_jobs_queued


def release_agent_jobs(session: Session, agent_name: str, reason: str) -> None:
    """Hand back what an agent held: unstarted jobs to the queue, running ones to Airflow's retry path.

    A running job is failed rather than requeued because its task may have had side effects; the
    scheduler then applies the task's own retry policy and a retry runs on a healthy agent.
    """
    requeued = session.execute(
        update(RemoteJob)
        .where(RemoteJob.agent_name == agent_name, RemoteJob.state == JobState.CLAIMED)
        .values(state=JobState.QUEUED, agent_name=None, claimed_at=None)
    ).rowcount
    session.execute(
        update(RemoteJob)
        .where(RemoteJob.agent_name == agent_name, RemoteJob.state == JobState.RUNNING)
        .values(state=JobState.FAILED, detail=reason[:1000], finished_at=utcnow(), pending_sync=True)
    )
    if requeued:
        notify_jobs_queued(session)


def mark_lost_agents(session: Session, now: datetime | None = None) -> list[str]:
    """Declare agents lost that missed ``lost_after_missed_heartbeats`` heartbeats; reroute their jobs."""
    now = now or utcnow()
    silence = timedelta(seconds=config.heartbeat_interval() * config.lost_after_missed_heartbeats())
    agents = session.scalars(
        select(RemoteAgent)
        .where(
            RemoteAgent.state.in_((AgentState.ACTIVE, AgentState.DRAINING)),
            RemoteAgent.last_heartbeat_at < now - silence,
        )
        .with_for_update(skip_locked=True)
    ).all()
    for agent in agents:
        agent.set_state(AgentState.LOST)
        quiet_for = int((now - agent.last_heartbeat_at).total_seconds())
        release_agent_jobs(
            session, agent.name, reason=f"agent {agent.name} lost: no heartbeat for {quiet_for}s"
        )
    return [agent.name for agent in agents]
