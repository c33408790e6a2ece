"""Liveness and rerouting: what happens to the jobs of an agent that goes away.

Used by the api-server (an agent re-registers or deregisters) and by the executor's ``sync``
(an agent stops heartbeating and is declared lost).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from airflow_remote_exec import config
from airflow_remote_exec.models import AgentState, JobState, RemoteAgent, RemoteApiServer, RemoteJob, utcnow
from airflow_remote_exec.notify import notify_jobs_queued

# An api-server whose presence row is older than this is considered down. It must stay well
# below the silence window (heartbeat_interval x lost_after_missed_heartbeats): a killed api-server
# has to look down before its agents' silence could be mistaken for their death.
API_PRESENCE_STALE_SECONDS = 2.5


def release_agent_jobs(session: Session, agent_name: str, reason: str) -> None:
    """Hand back what an agent held: unstarted jobs to the queue, running ones to Airflow's retry path.

    A running job is failed rather than requeued because its task may have had side effects; the
    scheduler then applies the task's own retry policy and a retry runs on a healthy agent, but not
    before ``reroute_fence_seconds`` (see ``RemoteJob.fenced_until``).
    """
    now = utcnow()
    requeued = session.execute(
        update(RemoteJob)
        .where(RemoteJob.agent_name == agent_name, RemoteJob.state == JobState.CLAIMED)
        .values(state=JobState.QUEUED, agent_name=None, claimed_at=None)
    ).rowcount
    session.execute(
        update(RemoteJob)
        .where(RemoteJob.agent_name == agent_name, RemoteJob.state == JobState.RUNNING)
        .values(
            state=JobState.FAILED,
            detail=reason[:1000],
            finished_at=now,
            pending_sync=True,
            fenced_until=now + timedelta(seconds=config.reroute_fence_seconds()),
        )
    )
    if requeued:
        notify_jobs_queued(session)


def agent_api_up_since(session: Session, now: datetime) -> datetime | None:
    """Since when the agent API has been served without a gap, or None if no api-server is up."""
    return session.scalar(
        select(func.min(RemoteApiServer.started_at)).where(
            RemoteApiServer.last_seen_at > now - timedelta(seconds=API_PRESENCE_STALE_SECONDS)
        )
    )


def mark_lost_agents(session: Session, now: datetime | None = None) -> list[str]:
    """Declare agents lost that missed ``lost_after_missed_heartbeats`` heartbeats; reroute their jobs.

    Only while the agent API has been up for the whole window: when the api-server itself is down,
    silence says nothing about the agents, and their running tasks must not be failed.
    """
    now = now or utcnow()
    silence = timedelta(seconds=config.heartbeat_interval() * config.lost_after_missed_heartbeats())
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
        agent.set_state(session, AgentState.LOST, reason)
        release_agent_jobs(session, agent.name, reason=reason)
    return [agent.name for agent in agents]


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
