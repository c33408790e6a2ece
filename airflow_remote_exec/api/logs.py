"""Task logs: an agent appends the bytes of a task's log file, in order, as the task writes them."""

from __future__ import annotations

from typing import Annotated

from airflow.utils.session import create_session
from fastapi import APIRouter, Header, HTTPException, Path, Query, Request, status
from sqlalchemy.exc import IntegrityError

from airflow_remote_exec import config
from airflow_remote_exec.api.auth import SecretDep, SessionIdPath, authorize_agent
from airflow_remote_exec.api.datamodels import (
    LOG_CONTENT_TYPE,
    MAX_LOG_CHUNK_BYTES,
    LogChunkResponse,
    error_responses,
)
from airflow_remote_exec.api.db_threads import LOGS, run_db
from airflow_remote_exec.clock import db_now
from airflow_remote_exec.models import Component
from airflow_remote_exec.task_logs import Appended, StreamNotFound, append_chunk

router = APIRouter(
    prefix="/agents/{session_id}/jobs", tags=["logs"], responses=error_responses(400, 401, 403, 404, 410, 413)
)


@router.put(
    "/{job_id}/log",
    response_model=LogChunkResponse,
    summary="Append to the log of a job attempt this agent ran",
    responses=error_responses(415),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {LOG_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def append_log(
    session_id: SessionIdPath,
    job_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
    attempt: Annotated[int, Query(ge=1, le=2**31 - 1)],
    offset: Annotated[int, Query(ge=0, le=2**62, description="Where the body starts in the log, in bytes.")],
    secret: SecretDep,
    request: Request,
    content_type: Annotated[str | None, Header()] = None,
) -> LogChunkResponse:
    """The body is the log's raw bytes from ``offset`` on, at most 256 KiB. The answer says how much of
    the log the orchestrator holds: the agent's next chunk starts there. A chunk sent again is stored
    once, and one starting past the end stores nothing, so the agent resumes from the answer."""
    if (content_type or "").split(";")[0].strip().lower() != LOG_CONTENT_TYPE:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, f"Send the log bytes as Content-Type: {LOG_CONTENT_TYPE}."
        )
    data = await request.body()
    if len(data) > MAX_LOG_CHUNK_BYTES:
        raise HTTPException(
            status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            f"A log chunk is at most {MAX_LOG_CHUNK_BYTES} bytes; this one is {len(data)}.",
        )
    appended = await run_db(_append, secret, session_id, job_id, attempt, offset, data, lane=LOGS)
    return LogChunkResponse(size=appended.size, truncated=appended.truncated)


def _append(secret: str, session_id: str, job_id: int, attempt: int, offset: int, data: bytes) -> Appended:
    try:
        return _append_once(secret, session_id, job_id, attempt, offset, data)
    except IntegrityError:
        # A resent chunk stored meanwhile by the request it replaces (SQLite has no row locks to make
        # it wait): once more, it finds those bytes there.
        return _append_once(secret, session_id, job_id, attempt, offset, data)


def _append_once(
    secret: str, session_id: str, job_id: int, attempt: int, offset: int, data: bytes
) -> Appended:
    with create_session(scoped=False) as session:
        agent = authorize_agent(session, secret, session_id, component=Component.WORKER)
        try:
            return append_chunk(
                session, agent, job_id, attempt, offset, data, config.task_log_max_bytes(), db_now(session)
            )
        except StreamNotFound:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"This agent ran no task as attempt {attempt} of job {job_id}, so it has no log to add to.",
            ) from None
