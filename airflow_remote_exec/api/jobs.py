"""Jobs: claim (a long-poll that returns up to the agent's free slots) and state reports."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, NamedTuple

from airflow.utils.session import create_session
from fastapi import APIRouter, HTTPException, Path, Request, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import case, func, or_, select, update
from sqlalchemy.orm import Session

from airflow_remote_exec import config
from airflow_remote_exec.api.auth import SecretDep, SessionIdPath, authorize_agent
from airflow_remote_exec.api.datamodels import (
    ClaimedJob,
    ClaimRequest,
    ClaimResponse,
    JobReport,
    RefusedReport,
    ReportsRequest,
    ReportsResponse,
    StateReport,
    error_responses,
)
from airflow_remote_exec.api.wakeup import job_wakeup
from airflow_remote_exec.clock import db_now
from airflow_remote_exec.models import AgentState, JobState, RemoteAgent, RemoteJob
from airflow_remote_exec.notify import notify_jobs_queued

router = APIRouter(
    prefix="/agents/{session_id}/jobs", tags=["jobs"], responses=error_responses(400, 401, 403, 404, 410)
)

_CLAIM_COLUMNS = (RemoteJob.id, RemoteJob.kind, RemoteJob.pool_slots, RemoteJob.attempt, RemoteJob.workload)

# Read a few more rows than slots so a job needing many pool slots does not block smaller ones.
_EXTRA_CANDIDATES = 8


def _slots_taken(pool_slots: int, agent: RemoteAgent) -> int:
    """Agent slots a job takes. ``pool_slots`` weighs a task in an Airflow pool and says nothing about
    CPUs, so a task wider than the agent takes the whole agent rather than never running."""
    return min(pool_slots, agent.slots)


def _slots_held(session: Session, agent: RemoteAgent) -> int:
    """Slots the jobs this agent holds take, as the orchestrator sees them: claimed or running, with
    no final report yet. The agent's own count cannot be trusted to leave them out."""
    taken = case((RemoteJob.pool_slots > agent.slots, agent.slots), else_=RemoteJob.pool_slots)
    return session.scalar(
        select(func.coalesce(func.sum(taken), 0)).where(
            RemoteJob.agent_name == agent.name, RemoteJob.state.in_(JobState.HELD)
        )
    )


def _claimed(job, agent: RemoteAgent, attempt: int) -> ClaimedJob:
    return ClaimedJob(
        job_id=job.id,
        attempt=attempt,
        kind=job.kind,
        pool_slots=_slots_taken(job.pool_slots, agent),
        workload=job.workload,
    )


def _jobs_of_claim(session: Session, agent: RemoteAgent, request_id: str) -> list[ClaimedJob]:
    """Jobs an earlier delivery of this very claim request took (its response was lost).

    They count as claimed now, so the heartbeat's grace for jobs in flight starts again.
    """
    of_this_claim = (
        RemoteJob.agent_name == agent.name,
        RemoteJob.state == JobState.CLAIMED,
        RemoteJob.claim_request_id == request_id,
    )
    rows = session.execute(
        select(*_CLAIM_COLUMNS).where(*of_this_claim).order_by(RemoteJob.id).with_for_update()
    ).all()
    if rows:
        session.execute(update(RemoteJob).where(*of_this_claim).values(claimed_at=db_now(session)))
    return [_claimed(job, agent, job.attempt) for job in rows]


class ClaimResult(NamedTuple):
    jobs: list[ClaimedJob]
    # The agent's queues, for a claim that took nothing to wait on; none when it cannot take anything
    # now (draining, or its slots all held), so that it is never woken for a job another agent could run.
    wait_on: frozenset[str]
    refused: Sequence[RefusedReport] = ()  # reports the claim carried that were not applied


def claim_jobs(
    secret: str,
    session_id: str,
    free_slots: int,
    request_id: str = "",
    reports: Sequence[JobReport] = (),
) -> ClaimResult:
    """Apply the agent's ``reports`` (the result lists the refused ones), then take queued jobs of its
    queues, highest priority first, up to ``free_slots`` and never beyond the agent's slots minus the jobs it
    still holds."""
    with create_session(scoped=False) as session:
        agent = authorize_agent(session, secret, session_id, lock=True)
        refused = apply_reports(session, agent, reports) if reports else []
        # A job this agent just handed back goes to another agent, not straight back to it.
        handed_back = [r.job_id for r in reports if r.state == "returned"]
        queues = frozenset(agent.queue_list)
        if request_id and (again := _jobs_of_claim(session, agent, request_id)):
            return ClaimResult(again, queues, refused)
        if free_slots <= 0:
            return ClaimResult([], frozenset(), refused)  # a delivery of reports only
        if agent.state not in (AgentState.REGISTERED, AgentState.ACTIVE):
            return ClaimResult([], frozenset(), refused)  # draining: no new work
        free_slots = min(free_slots, agent.slots - _slots_held(session, agent))
        if free_slots <= 0:
            return ClaimResult([], frozenset(), refused)
        now = db_now(session)
        candidates = session.execute(
            select(*_CLAIM_COLUMNS)
            .where(
                RemoteJob.state == JobState.QUEUED,
                RemoteJob.queue.in_(agent.queue_list),
                or_(RemoteJob.not_before.is_(None), RemoteJob.not_before <= now),
                RemoteJob.id.not_in(handed_back),
            )
            .order_by(RemoteJob.priority_weight.desc(), RemoteJob.id)
            .limit(free_slots + _EXTRA_CANDIDATES)
            .with_for_update(skip_locked=True)
        ).all()
        claimed: list[ClaimedJob] = []
        for job in candidates:
            slots = _slots_taken(job.pool_slots, agent)
            if slots > free_slots:
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
                    claim_request_id=request_id or None,
                )
            ).rowcount
            if won:
                free_slots -= slots
                claimed.append(_claimed(job, agent, job.attempt + 1))
            if free_slots <= 0:
                break
    return ClaimResult(claimed, queues, refused)


@router.post("/claim", response_model=ClaimResponse, summary="Claim queued jobs, waiting for some if none")
async def claim(
    session_id: SessionIdPath, body: ClaimRequest, secret: SecretDep, request: Request
) -> ClaimResponse:
    """Claim at once, or wait to be woken for jobs of the agent's queues. One claim per session is
    open at a time: a newer one makes this one return empty."""
    deadline = time.monotonic() + min(body.wait_seconds, config.claim_wait_seconds())
    # The first attempt authorizes the caller before it may touch the session's open claim.
    result = await run_in_threadpool(
        claim_jobs, secret, session_id, body.free_slots, body.request_id, body.reports
    )
    refused = result.refused  # only the first attempt carries the reports
    if body.reports:
        # Delivered reports are answered at once, so the agent can act on their refusals; its next
        # claim waits for jobs.
        return ClaimResponse(jobs=result.jobs, refused=refused)
    open_claim = job_wakeup.open(session_id)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if result.jobs or remaining <= 0 or job_wakeup.superseded(open_claim):
                return ClaimResponse(jobs=result.jobs, refused=refused)
            await job_wakeup.wait(open_claim, result.wait_on, remaining)
            if (
                job_wakeup.superseded(open_claim)
                or time.monotonic() >= deadline
                or await request.is_disconnected()  # jobs claimed now would go nowhere
            ):
                return ClaimResponse(jobs=[], refused=refused)
            result = await run_in_threadpool(claim_jobs, secret, session_id, body.free_slots, body.request_id)
            job_wakeup.tried(open_claim, took_jobs=bool(result.jobs))
    finally:
        job_wakeup.tried(open_claim, took_jobs=False)  # a wake-up it did not use goes to another waiter
        job_wakeup.close(open_claim)


# The agent reports "running" when a runner takes the job, before Airflow starts the try; so a
# running job may still turn out not started, or unreadable.
_NEXT_STATES = {
    state: {JobState.RUNNING, JobState.SUCCESS, JobState.FAILED, JobState.NOT_STARTED, "returned"}
    for state in JobState.HELD
}


def apply_report(
    session: Session, agent: RemoteAgent, job_id: int, report: StateReport, now: datetime | None = None
) -> None:
    """Apply one state report of ``agent``'s, or raise the 403/404/409 that refuses it (before any
    write). Only the agent's own job is locked: a report cannot hold up another agent's claim."""
    job = session.execute(
        select(RemoteJob.attempt, RemoteJob.state)
        .where(RemoteJob.id == job_id, RemoteJob.agent_name == agent.name)
        .with_for_update()
    ).first()
    if job is None:
        if session.scalar(select(RemoteJob.id).where(RemoteJob.id == job_id)) is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"Job {job_id} does not exist (revoked or purged)."
            )
        # Checked before the attempt: another agent's attempts are not ours to see.
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"Job {job_id} is not held by agent {agent.name}.")
    if job.attempt != report.attempt:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"Stale report for job {job_id}: attempt {report.attempt} was superseded by {job.attempt}.",
        )
    if job.state == report.state:
        return  # a retried report that already landed
    if report.state not in _NEXT_STATES.get(job.state, ()):
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"Job {job_id} is {job.state}; it cannot become {report.state}."
        )
    now = now or db_now(session)
    if report.state == "returned":  # the agent cannot run it: back to the queue for another agent
        changes = {"state": JobState.QUEUED, "agent_name": None, "claimed_at": None, "claim_request_id": None}
        notify_jobs_queued(session)
    elif report.state == JobState.RUNNING:
        changes = {"state": report.state, "started_at": now, "pending_sync": True}
    else:
        changes = {
            "state": report.state,
            "detail": report.detail,
            "exit_code": report.exit_code,
            "pending_sync": True,
            "finished_at": now,
            "started_at": func.coalesce(RemoteJob.started_at, now),
        }
    session.execute(update(RemoteJob).where(RemoteJob.id == job_id).values(**changes))


def apply_reports(session: Session, agent: RemoteAgent, reports: Sequence[JobReport]) -> list[RefusedReport]:
    """Apply a batch of reports (the caller holds the agent's row lock); returns those refused. Job
    rows are locked in id order (a job's own reports keep theirs), as everywhere after the agent's."""
    refused = []
    now = db_now(session)
    for report in sorted(reports, key=lambda r: r.job_id):
        try:
            apply_report(session, agent, report.job_id, report, now)
        except HTTPException as refusal:
            refused.append(
                RefusedReport(
                    job_id=report.job_id,
                    attempt=report.attempt,
                    state=report.state,
                    status=refusal.status_code,
                    detail=refusal.detail,
                )
            )
    return refused


@router.post(
    "/{job_id}/state",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Report a job's state",
    responses=error_responses(409),
)
def report_state(
    session_id: SessionIdPath,
    job_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
    body: StateReport,
    secret: SecretDep,
) -> None:
    with create_session(scoped=False) as session:
        apply_report(session, authorize_agent(session, secret, session_id), job_id, body)


@router.post("/reports", response_model=ReportsResponse, summary="Report the states of several jobs at once")
def report_states(session_id: SessionIdPath, body: ReportsRequest, secret: SecretDep) -> ReportsResponse:
    """One request for many reports: each is applied as the single-report route would, and a refused
    one is listed with the status that route would have answered, without stopping the others."""
    with create_session(scoped=False) as session:
        agent = authorize_agent(session, secret, session_id, lock=True)
        return ReportsResponse(refused=apply_reports(session, agent, body.reports))
