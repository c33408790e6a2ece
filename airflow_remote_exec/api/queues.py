"""Queue depth for autoscalers: how many jobs of some queues wait or run, for KEDA's ``metrics-api``
scaler, which reads one number out of a JSON answer and needs no Prometheus in between.

Any live agent token may ask about the queues its scope allows, so a worker group's autoscaler uses
the same token (and Secret) as the group's agents. No ``Remote-Exec-Api-Version`` header is needed:
the scaler sends none, and this answer is not part of the agents' protocol.
"""

from __future__ import annotations

from typing import Annotated

from airflow.utils.session import create_session
from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import func, select

from airflow_remote_exec.api.auth import ScalerSecretDep, authenticate, require_queues_in_scope
from airflow_remote_exec.api.datamodels import QueueDepth, QueueDepthResponse, error_responses
from airflow_remote_exec.api.db_threads import run_db
from airflow_remote_exec.models import JobState, RemoteJob

router = APIRouter(prefix="/queues", tags=["queues"], responses=error_responses(401, 403))

MAX_QUEUES = 100

QueuesParam = Annotated[
    str,
    Query(
        min_length=1,
        max_length=4000,
        pattern=r"^[A-Za-z0-9_.:\-]{1,256}(,[A-Za-z0-9_.:\-]{1,256})*$",
        description="Comma-separated queues; the answer adds them up.",
    ),
]


@router.get(
    "/depth",
    response_model=QueueDepthResponse,
    summary="Jobs queued and running on some queues, for an autoscaler",
)
async def queue_depth(queues: QueuesParam, secret: ScalerSecretDep) -> QueueDepthResponse:
    names = sorted(set(queues.split(",")))
    if len(names) > MAX_QUEUES:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"At most {MAX_QUEUES} queues at a time.")
    return await run_db(_depth, names, secret)


def _depth(names: list[str], secret: str) -> QueueDepthResponse:
    with create_session(scoped=False) as session:
        token = authenticate(session, secret)
        require_queues_in_scope(token, names, "see")
        rows = session.execute(
            select(RemoteJob.queue, RemoteJob.state, func.count(), func.sum(RemoteJob.pool_slots))
            .where(RemoteJob.queue.in_(names), RemoteJob.state.in_((JobState.QUEUED, *JobState.HELD)))
            .group_by(RemoteJob.queue, RemoteJob.state)
        ).all()
    per_queue = {name: QueueDepth(queued=0, running=0, slots=0) for name in names}
    for queue, state, count, slots in rows:
        depth = per_queue.get(queue)
        if depth is None:  # a database comparing names without case (MySQL): not a queue asked about
            continue
        if state == JobState.QUEUED:
            depth.queued += count
        else:
            depth.running += count
        depth.slots += int(slots or 0)
    queued = sum(d.queued for d in per_queue.values())
    running = sum(d.running for d in per_queue.values())
    slots = sum(d.slots for d in per_queue.values())
    return QueueDepthResponse(
        queued=queued, running=running, depth=queued + running, slots=slots, queues=per_queue
    )
