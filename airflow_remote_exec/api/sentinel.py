"""Sentinel health reports: an agent's aggregate view of its components' health, probed from outside
them, kept on the sentinel's own agent row for ``airflow remote-exec agents list``."""

from __future__ import annotations

import json

from airflow.utils.session import create_session
from fastapi import APIRouter

from airflow_remote_exec import config
from airflow_remote_exec.api.auth import SecretDep, SessionIdPath, authorize_agent
from airflow_remote_exec.api.datamodels import SentinelReply, SentinelReport, error_responses
from airflow_remote_exec.api.db_threads import run_db
from airflow_remote_exec.clock import db_now
from airflow_remote_exec.models import Component, RemoteAgent

router = APIRouter(prefix="/agents", tags=["sentinel"], responses=error_responses(400, 401, 403, 410))


@router.post(
    "/{session_id}/sentinel/health",
    response_model=SentinelReply,
    summary="Record a sentinel's health report; the answer says when to send the next",
)
async def report_health(session_id: SessionIdPath, body: SentinelReport, secret: SecretDep) -> SentinelReply:
    await run_db(_record, session_id, body, secret)
    return SentinelReply(report_every_seconds=config.sentinel_report_interval())


def _record(session_id: str, body: SentinelReport, secret: str) -> None:
    with create_session(scoped=False) as session:
        agent = authorize_agent(session, secret, session_id, component=Component.SENTINEL)
        row = session.get(RemoteAgent, agent.name)
        row.health = json.dumps({name: c.model_dump() for name, c in sorted(body.components.items())})
        row.health_reported_at = db_now(session)
