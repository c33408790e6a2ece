"""Jobs: claim (a long-poll that returns up to the agent's free slots) and state reports."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, NamedTuple

from airflow.utils.session import create_session
from airflow.utils.sqlalchemy import UtcDateTime
from fastapi import APIRouter, HTTPException, Path, Request, status
from sqlalchemy import Integer, Row, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from airflow_remote_exec import config
from airflow_remote_exec.api.auth import AgentOfRequest, SecretDep, SessionIdPath, authorize_agent
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
from airflow_remote_exec.api.db_threads import run_db
from airflow_remote_exec.api.wakeup import job_wakeup
from airflow_remote_exec.clock import db_now
from airflow_remote_exec.models import AgentState, Component, JobState, RemoteJob
from airflow_remote_exec.notify import notify_jobs_queued
from airflow_remote_exec.task_logs import drop_streams, open_streams

router = APIRouter(
    prefix="/agents/{session_id}/jobs", tags=["jobs"], responses=error_responses(400, 401, 403, 404, 410)
)

# The statements of the job path are built once: building them costs more than running them. They are
# Core statements on the table, which skip the ORM's per-statement bookkeeping.
_JOBS = RemoteJob.__table__
_job = _JOBS.c
# (A bind parameter named after a column would become a SET value of an UPDATE, hence the names.)
_CLAIM_COLUMNS = (_job.id, _job.kind, _job.pool_slots, _job.attempt, _job.workload)
_JOB_IDS = bindparam("job_ids", expanding=True)
_NOW = bindparam("now", type_=UtcDateTime())  # the database's clock (see clock.py), read once per request

_HELD_BY_AGENT = select(_job.id, _job.state, _job.pool_slots, _job.claim_request_id).where(
    _job.agent_name == bindparam("holder"), _job.state.in_(JobState.HELD)
)

_OF_THIS_CLAIM = (
    _job.agent_name == bindparam("holder"),
    _job.state == JobState.CLAIMED,
    _job.claim_request_id == bindparam("claim_request"),
)
_JOBS_OF_CLAIM = select(*_CLAIM_COLUMNS).where(*_OF_THIS_CLAIM).order_by(_job.id).with_for_update()
_RECLAIM = update(_JOBS).where(*_OF_THIS_CLAIM).values(claimed_at=_NOW)

# Read a few more rows than slots so a job needing many pool slots does not block smaller ones.
_EXTRA_CANDIDATES = 8
_CANDIDATES = (
    select(*_CLAIM_COLUMNS)
    .where(
        _job.state == JobState.QUEUED,
        _job.queue.in_(bindparam("queues", expanding=True)),
        or_(_job.not_before.is_(None), _job.not_before <= _NOW),
        _job.id.not_in(bindparam("handed_back", expanding=True)),
    )
    .order_by(_job.priority_weight.desc(), _job.id)
    .limit(bindparam("how_many", type_=Integer))
    .with_for_update(skip_locked=True)
)
# The candidates were read FOR UPDATE, so on a database with row locks the jobs are still queued and
# taken by id alone (a condition on the state would lead the planner to the claim index, which reads
# every queued row). SQLite has no row locks: there the update takes only jobs still queued, so two
# claimers can never both win.
_TAKE_LOCKED = (
    update(_JOBS)
    .where(_job.id.in_(_JOB_IDS))
    .values(
        state=JobState.CLAIMED,
        agent_name=bindparam("holder"),
        attempt=_job.attempt + 1,
        claimed_at=_NOW,
        claim_request_id=bindparam("claim_request"),
    )
)
_TAKE_LOCKED_RETURNING = _TAKE_LOCKED.returning(_job.id, _job.attempt)
_TAKE_IF_QUEUED = _TAKE_LOCKED.where(_job.state == JobState.QUEUED)
_TAKE_IF_QUEUED_RETURNING = _TAKE_IF_QUEUED.returning(_job.id, _job.attempt)


def _slots_taken(pool_slots: int, agent: AgentOfRequest) -> int:
    """Agent slots a job takes. ``pool_slots`` weighs a task in an Airflow pool and says nothing about
    CPUs, so a task wider than the agent takes the whole agent rather than never running."""
    return min(pool_slots, agent.slots)


def _claimed(job, agent: AgentOfRequest, attempt: int) -> ClaimedJob:
    return ClaimedJob(
        job_id=job.id,
        attempt=attempt,
        kind=job.kind,
        pool_slots=_slots_taken(job.pool_slots, agent),
        workload=job.workload,
    )


def _jobs_of_claim(
    session: Session, agent: AgentOfRequest, request_id: str, now: datetime
) -> list[ClaimedJob]:
    """Jobs an earlier delivery of this very claim request took (its response was lost).

    They count as claimed now, so the heartbeat's grace for jobs in flight starts again.
    """
    params = {"holder": agent.name, "claim_request": request_id}
    rows = session.execute(_JOBS_OF_CLAIM, params).all()
    session.execute(_RECLAIM, {**params, "now": now})
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
        agent = authorize_agent(session, secret, session_id, lock=True, component=Component.WORKER)
        now = db_now(session)
        refused = apply_reports(session, agent, reports, now)
        # A job this agent just handed back goes to another agent, not straight back to it.
        handed_back = [r.job_id for r in reports if r.state == "returned"]
        queues = frozenset(agent.queue_list)
        held = session.execute(_HELD_BY_AGENT, {"holder": agent.name}).all()
        if request_id and any(j.state == JobState.CLAIMED and j.claim_request_id == request_id for j in held):
            return ClaimResult(_jobs_of_claim(session, agent, request_id, now), queues, refused)
        if free_slots <= 0:
            return ClaimResult([], frozenset(), refused)  # a delivery of reports only
        if agent.state not in (AgentState.REGISTERED, AgentState.ACTIVE):
            return ClaimResult([], frozenset(), refused)  # draining: no new work
        free_slots = min(free_slots, agent.slots - sum(_slots_taken(j.pool_slots, agent) for j in held))
        if free_slots <= 0:
            return ClaimResult([], frozenset(), refused)
        candidates = session.execute(
            _CANDIDATES,
            {"queues": agent.queue_list, "now": now, "handed_back": handed_back,
             "how_many": free_slots + _EXTRA_CANDIDATES},
        ).all()  # fmt: skip
        picked = []
        for job in candidates:
            slots = _slots_taken(job.pool_slots, agent)
            if slots <= free_slots:
                picked.append(job)
                free_slots -= slots
            if free_slots <= 0:
                break
        won = _take(session, agent, picked, request_id, now)
        open_streams(session, agent, list(won), now)
        claimed = [_claimed(job, agent, won[job.id]) for job in picked if job.id in won]
    return ClaimResult(claimed, queues, refused)


def _take(
    session: Session, agent: AgentOfRequest, picked: Sequence[Row], request_id: str, now: datetime
) -> dict[int, int]:
    """Claim the ``picked`` queued jobs for ``agent`` in one statement; returns the attempt of each job
    won."""
    if not picked:
        return {}
    params = {"job_ids": [job.id for job in picked], "holder": agent.name, "now": now,
              "claim_request": request_id or None}  # fmt: skip
    dialect = session.get_bind().dialect
    if dialect.name != "sqlite":  # the rows are locked: every one of them is taken
        if dialect.update_returning:
            return dict(session.execute(_TAKE_LOCKED_RETURNING, params).all())
        session.execute(_TAKE_LOCKED, params)  # no RETURNING (MySQL)
        return {job.id: job.attempt + 1 for job in picked}
    if dialect.update_returning:
        return dict(session.execute(_TAKE_IF_QUEUED_RETURNING, params).all())
    won = {}  # SQLite before 3.35 has no RETURNING: one job at a time
    for job in picked:
        if session.execute(_TAKE_IF_QUEUED, {**params, "job_ids": [job.id]}).rowcount:
            won[job.id] = job.attempt + 1
    return won


@router.post("/claim", response_model=ClaimResponse, summary="Claim queued jobs, waiting for some if none")
async def claim(
    session_id: SessionIdPath, body: ClaimRequest, secret: SecretDep, request: Request
) -> ClaimResponse:
    """Claim at once, or wait to be woken for jobs of the agent's queues. One claim per session is
    open at a time: a newer one makes this one return empty."""
    deadline = time.monotonic() + min(body.wait_seconds, config.claim_wait_seconds())
    # The first attempt authorizes the caller before it may touch the session's open claim.
    result = await run_db(claim_jobs, secret, session_id, body.free_slots, body.request_id, body.reports)
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
            result = await run_db(claim_jobs, secret, session_id, body.free_slots, body.request_id)
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

# Only the agent's own jobs are locked (in id order, as everywhere after the agent's row): a report
# cannot hold up another agent's claim.
_OWN_JOBS = (
    select(_job.id, _job.attempt, _job.state)
    .where(_job.id.in_(_JOB_IDS), _job.agent_name == bindparam("holder"))
    .order_by(_job.id)
    .with_for_update()
)
_EXISTING = select(_job.id).where(_job.id.in_(_JOB_IDS))
_RETURN = (  # the agent cannot run it: back to the queue for another agent
    update(_JOBS)
    .where(_job.id.in_(_JOB_IDS))
    .values(state=JobState.QUEUED, agent_name=None, claimed_at=None, claim_request_id=None)
)
_START = (
    update(_JOBS)
    .where(_job.id.in_(_JOB_IDS))
    .values(state=JobState.RUNNING, started_at=_NOW, pending_sync=True)
)
_FINISH = (
    update(_JOBS)
    .where(_job.id.in_(_JOB_IDS))
    .values(
        state=bindparam("outcome"),
        detail=bindparam("outcome_detail"),
        exit_code=bindparam("outcome_exit_code"),
        pending_sync=True,
        finished_at=_NOW,
        started_at=func.coalesce(_job.started_at, _NOW),
    )
)


def _refusal(report: JobReport, held: tuple[int, str] | None, exists: bool) -> tuple[int, str] | None:
    """The status and reason refusing ``report``, given the (attempt, state) of the job if the agent
    holds it; None to accept it."""
    job_id = report.job_id
    if held is None:
        if not exists:
            return status.HTTP_404_NOT_FOUND, f"Job {job_id} does not exist (revoked or purged)."
        # Checked before the attempt: another agent's attempts are not ours to see.
        return status.HTTP_403_FORBIDDEN, f"Job {job_id} is not held by this agent."
    attempt, state = held
    if attempt != report.attempt:
        return (
            status.HTTP_409_CONFLICT,
            f"Stale report for job {job_id}: attempt {report.attempt} was superseded by {attempt}.",
        )
    if report.state != state and report.state not in _NEXT_STATES.get(state, ()):
        return status.HTTP_409_CONFLICT, f"Job {job_id} is {state}; it cannot become {report.state}."
    return None


def apply_reports(
    session: Session, agent: AgentOfRequest, reports: Sequence[JobReport], now: datetime | None = None
) -> list[RefusedReport]:
    """Apply a batch of ``agent``'s reports in a few statements, whatever their number; returns those
    refused, each with the status the single-report route answers. The caller holds the agent's row
    lock. A job's reports apply in their order; a retried report that already landed changes nothing."""
    if not reports:
        return []
    job_ids = sorted({report.job_id for report in reports})
    rows = session.execute(_OWN_JOBS, {"job_ids": job_ids, "holder": agent.name}).all()
    held = {row.id: (row.attempt, row.state) for row in rows}
    missing = [job_id for job_id in job_ids if job_id not in held]
    existing = set(session.scalars(_EXISTING, {"job_ids": missing})) if missing else set()
    refused: list[RefusedReport] = []
    last: dict[int, JobReport] = {}  # each job's last applied report
    for report in sorted(reports, key=lambda r: r.job_id):  # stable: a job's reports keep their order
        job_id = report.job_id
        refusal = _refusal(report, held.get(job_id), job_id in existing)
        if refusal is not None:
            status_code, detail = refusal
            refused.append(RefusedReport(**report.model_dump(include={"job_id", "attempt", "state"}),
                                         status=status_code, detail=detail))  # fmt: skip
        elif report.state == "returned":
            del held[job_id]  # no longer this agent's: a later report of it is refused
            existing.add(job_id)
            last[job_id] = report
        elif report.state != held[job_id][1]:
            held[job_id] = (report.attempt, report.state)
            last[job_id] = report
    if last:
        _write_reports(session, list(last.values()), now or db_now(session))
        drop_streams(session, agent, [(r.job_id, r.attempt) for r in last.values() if r.state == "returned"])
    return refused


def _write_reports(session: Session, reports: list[JobReport], now: datetime) -> None:
    """Write each job's last applied report: one statement per kind of change."""
    returned = [r.job_id for r in reports if r.state == "returned"]
    started = [r.job_id for r in reports if r.state == JobState.RUNNING]
    finished: dict[tuple[str, str | None, int | None], list[int]] = {}
    for r in reports:
        if r.state in JobState.FINISHED:
            finished.setdefault((r.state, r.detail, r.exit_code), []).append(r.job_id)
    if returned:
        session.execute(_RETURN, {"job_ids": returned})
        notify_jobs_queued(session)
    if started:
        session.execute(_START, {"job_ids": started, "now": now})
    for (outcome, detail, exit_code), job_ids in finished.items():
        session.execute(
            _FINISH,
            {"job_ids": job_ids, "now": now, "outcome": outcome, "outcome_detail": detail,
             "outcome_exit_code": exit_code},
        )  # fmt: skip


@router.post(
    "/{job_id}/state",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Report a job's state",
    responses=error_responses(409),
)
async def report_state(
    session_id: SessionIdPath,
    job_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
    body: StateReport,
    secret: SecretDep,
) -> None:
    refused = await run_db(_apply, secret, session_id, [JobReport(job_id=job_id, **body.model_dump())])
    if refused:
        raise HTTPException(refused[0].status, refused[0].detail)


@router.post("/reports", response_model=ReportsResponse, summary="Report the states of several jobs at once")
async def report_states(
    session_id: SessionIdPath, body: ReportsRequest, secret: SecretDep
) -> ReportsResponse:
    """One request for many reports: each is applied as the single-report route would, and a refused
    one is listed with the status that route would have answered, without stopping the others."""
    return ReportsResponse(refused=await run_db(_apply, secret, session_id, body.reports))


def _apply(secret: str, session_id: str, reports: list[JobReport]) -> list[RefusedReport]:
    with create_session(scoped=False) as session:
        agent = authorize_agent(session, secret, session_id, lock=True, component=Component.WORKER)
        return apply_reports(session, agent, reports)
