"""Jobs: claim (a long-poll that returns up to the agent's free slots) and state reports."""

from __future__ import annotations

import time
import uuid

from airflow.models.taskinstance import TaskInstance
from airflow.models.taskinstancehistory import TaskInstanceHistory
from airflow.utils.session import create_session
from airflow.utils.state import TaskInstanceState
from fastapi import APIRouter, HTTPException, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from airflow_remote_exec import config
from airflow_remote_exec.api.auth import SecretDep, authorize_agent
from airflow_remote_exec.api.datamodels import ClaimedJob, ClaimRequest, ClaimResponse, StateReport
from airflow_remote_exec.api.wakeup import job_wakeup
from airflow_remote_exec.models import AgentState, JobState, RemoteJob, utcnow

router = APIRouter(prefix="/agents/{session_id}/jobs", tags=["jobs"])

# Read a few more rows than slots so a job needing many pool slots does not block smaller ones.
_EXTRA_CANDIDATES = 8


def claim_jobs(secret: str, session_id: str, free_slots: int) -> list[ClaimedJob]:
    """Take queued jobs of the agent's queues, highest priority first, up to ``free_slots``."""
    with create_session(scoped=False) as session:
        agent = authorize_agent(session, secret, session_id)
        if agent.state not in (AgentState.REGISTERED, AgentState.ACTIVE):
            return []  # draining: no new work
        free_slots = min(free_slots, agent.slots)
        now = utcnow()
        candidates = session.execute(
            select(RemoteJob.id, RemoteJob.pool_slots, RemoteJob.attempt, RemoteJob.workload)
            .where(
                RemoteJob.state == JobState.QUEUED,
                RemoteJob.queue.in_(agent.queue_list),
                or_(RemoteJob.not_before.is_(None), RemoteJob.not_before <= now),
            )
            .order_by(RemoteJob.priority_weight.desc(), RemoteJob.id)
            .limit(free_slots + _EXTRA_CANDIDATES)
            .with_for_update(skip_locked=True)
        ).all()
        claimed: list[ClaimedJob] = []
        for job in candidates:
            if job.pool_slots > free_slots:
                continue
            # Conditional on still being queued, so two claimers can never both win (SQLite too).
            won = session.execute(
                update(RemoteJob)
                .where(RemoteJob.id == job.id, RemoteJob.state == JobState.QUEUED)
                .values(
                    state=JobState.CLAIMED,
                    agent_name=agent.name,
                    attempt=RemoteJob.attempt + 1,
                    claimed_at=now,
                )
            ).rowcount
            if won:
                free_slots -= job.pool_slots
                claimed.append(
                    ClaimedJob(
                        job_id=job.id,
                        attempt=job.attempt + 1,
                        pool_slots=job.pool_slots,
                        workload=job.workload,
                    )
                )
            if free_slots <= 0:
                break
    return claimed


@router.post("/claim", response_model=ClaimResponse, summary="Claim queued jobs, waiting for some if none")
async def claim(session_id: str, body: ClaimRequest, secret: SecretDep) -> ClaimResponse:
    deadline = time.monotonic() + min(body.wait_seconds, config.claim_wait_seconds())
    while True:
        jobs = await run_in_threadpool(claim_jobs, secret, session_id, body.free_slots)
        remaining = deadline - time.monotonic()
        if jobs or remaining <= 0:
            return ClaimResponse(jobs=jobs)
        await job_wakeup.wait(remaining)


def _true_outcome(session: Session, ti_id: str, detail: str | None) -> tuple[str, str | None]:
    """A task that fails still exits 0: the task instance's own state tells success from failure."""
    ti_id = uuid.UUID(ti_id)
    ti_state = session.scalar(select(TaskInstance.state).where(TaskInstance.id == ti_id))
    if ti_state is None:  # a later try has started; this try is in the history table
        ti_state = session.scalar(
            select(TaskInstanceHistory.state).where(TaskInstanceHistory.task_instance_id == ti_id)
        )
    if ti_state in _FAILED_TI_STATES:
        return JobState.FAILED, f"task instance ended {ti_state}"
    return JobState.SUCCESS, detail


_FAILED_TI_STATES = {
    TaskInstanceState.FAILED,
    TaskInstanceState.UP_FOR_RETRY,
    TaskInstanceState.UPSTREAM_FAILED,
}

_NEXT_STATES = {
    JobState.CLAIMED: {JobState.RUNNING, JobState.SUCCESS, JobState.FAILED},
    JobState.RUNNING: {JobState.RUNNING, JobState.SUCCESS, JobState.FAILED},
}


@router.post("/{job_id}/state", status_code=status.HTTP_204_NO_CONTENT, summary="Report a job's state")
def report_state(session_id: str, job_id: int, body: StateReport, secret: SecretDep) -> None:
    with create_session(scoped=False) as session:
        agent = authorize_agent(session, secret, session_id)
        job = session.execute(
            select(
                RemoteJob.attempt,
                RemoteJob.agent_name,
                RemoteJob.state,
                RemoteJob.ti_id,
                RemoteJob.started_at,
            )
            .where(RemoteJob.id == job_id)
            .with_for_update()
        ).first()
        if job is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"Job {job_id} does not exist (revoked or purged)."
            )
        if job.attempt != body.attempt:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"Stale report for job {job_id}: attempt {body.attempt} was superseded by {job.attempt}.",
            )
        if job.agent_name != agent.name:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"Job {job_id} is not held by agent {agent.name}.")
        if job.state == body.state:
            return  # a retried report that already landed
        if body.state not in _NEXT_STATES.get(job.state, ()):
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"Job {job_id} is {job.state}; it cannot become {body.state}."
            )
        now = utcnow()
        changes = {
            "state": body.state,
            "detail": body.detail,
            "exit_code": body.exit_code,
            "pending_sync": True,
        }
        if body.state == JobState.SUCCESS:
            changes["state"], changes["detail"] = _true_outcome(session, job.ti_id, body.detail)
        if body.state == JobState.RUNNING:
            changes["started_at"] = now
        else:
            changes["finished_at"] = now
            changes["started_at"] = job.started_at or now
        session.execute(update(RemoteJob).where(RemoteJob.id == job_id).values(**changes))
