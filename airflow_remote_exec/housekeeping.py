"""Keep the ``remote_*`` tables bounded: the executor deletes what no one will read again."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, delete, exists, or_
from sqlalchemy.orm import Session

from airflow_remote_exec import config
from airflow_remote_exec.clock import db_now
from airflow_remote_exec.models import (
    AgentState,
    JobState,
    RemoteAgent,
    RemoteAgentEvent,
    RemoteApiServer,
    RemoteJob,
)
from airflow_remote_exec.task_logs import another_remote_log_store, purge_streams

# A finished job whose outcome no scheduler has taken belongs to a scheduler that died: any
# scheduler adopts its task instances within [scheduler] scheduler_health_check_threshold (30 s)
# and the orphan check (300 s), and adoption flags the row again. An hour is far past both.
UNSYNCED_JOB_RETENTION = timedelta(hours=1)
# `airflow remote-exec agents history` covers a week; agents gone or lost for that long are forgotten.
AGENT_HISTORY_RETENTION = timedelta(days=7)
# A presence row not refreshed for an hour belongs to an api-server process that is gone.
API_SERVER_RETENTION = timedelta(hours=1)
# With object-storage remote logging the shipped copy of a log only serves the task while it runs.
LIVE_LOG_RETENTION = timedelta(days=1)


def purge_old_rows(session: Session) -> None:
    now = db_now(session)
    finished_before = now - timedelta(seconds=config.finished_job_retention())
    session.execute(
        delete(RemoteJob).where(
            RemoteJob.state.in_(JobState.FINISHED),
            or_(
                and_(RemoteJob.pending_sync.is_(False), RemoteJob.finished_at < finished_before),
                RemoteJob.finished_at < now - UNSYNCED_JOB_RETENTION,
            ),
        )
    )
    forgotten = now - AGENT_HISTORY_RETENTION
    session.execute(delete(RemoteAgentEvent).where(RemoteAgentEvent.at < forgotten))
    holds_jobs = exists().where(RemoteJob.agent_name == RemoteAgent.name)
    session.execute(
        delete(RemoteAgent).where(
            RemoteAgent.state.not_in(AgentState.LIVE),
            RemoteAgent.state_changed_at < forgotten,
            ~holds_jobs,
        )
    )
    session.execute(delete(RemoteApiServer).where(RemoteApiServer.last_seen_at < now - API_SERVER_RETENTION))
    _purge_task_logs(session, now)


def _purge_task_logs(session: Session, now: datetime) -> None:
    if another_remote_log_store():
        purge_streams(session, now - LIVE_LOG_RETENTION)
    elif days := config.task_log_retention_days():
        purge_streams(session, now - timedelta(days=days))
