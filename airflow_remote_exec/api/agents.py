"""Agent lifecycle: register, heartbeat (whose reply carries commands), deregister."""

from __future__ import annotations

import uuid

from airflow.utils.session import create_session
from fastapi import APIRouter, HTTPException, status
from sqlalchemy import select

from airflow_remote_exec import config
from airflow_remote_exec.api.auth import SecretDep, authenticate, authorize_agent
from airflow_remote_exec.api.datamodels import (
    HeartbeatRequest,
    HeartbeatResponse,
    RegisterRequest,
    RegisterResponse,
)
from airflow_remote_exec.models import AgentState, JobState, RemoteAgent, RemoteJob, utcnow
from airflow_remote_exec.reroute import release_agent_jobs

router = APIRouter(prefix="/agents", tags=["agents"])


@router.post("", response_model=RegisterResponse, summary="Register an agent and open a new session")
def register(body: RegisterRequest, secret: SecretDep) -> RegisterResponse:
    queues = sorted(set(body.queues))
    with create_session(scoped=False) as session:
        token = authenticate(session, secret)
        outside = [q for q in queues if q not in token.queue_list]
        if outside:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"Token {token.name!r} may not serve queue(s) {outside}; it allows {token.queue_list}.",
            )
        agent = session.get(RemoteAgent, body.name, with_for_update=True)
        now = utcnow()
        if agent is None:
            agent = RemoteAgent(name=body.name, registered_at=now, state="", drain_requested=False)
            session.add(agent)
        else:
            if agent.token_id != token.id and agent.state in AgentState.LIVE:
                raise HTTPException(
                    status.HTTP_403_FORBIDDEN,
                    f"Agent name {body.name!r} is in use by a live agent of another token.",
                )
            # The previous session of this name is over: whatever it held is released.
            release_agent_jobs(session, body.name, reason=f"agent {body.name} restarted")
        agent.session_id = str(uuid.uuid4())
        agent.token_id = token.id
        agent.hostname = body.hostname
        agent.version = body.version
        agent.queues = ",".join(queues)
        agent.slots = body.slots
        agent.registered_at = now
        agent.last_heartbeat_at = now
        agent.state = ""  # every registration is recorded, also one that follows a registration
        agent.set_state(session, AgentState.REGISTERED, f"session {agent.session_id} from {body.hostname}")
        session_id = agent.session_id
    return RegisterResponse(
        session_id=session_id,
        heartbeat_interval=config.heartbeat_interval(),
        claim_wait_seconds=config.claim_wait_seconds(),
    )


@router.post("/{session_id}/heartbeat", response_model=HeartbeatResponse, summary="Report liveness")
def heartbeat(session_id: str, body: HeartbeatRequest, secret: SecretDep) -> HeartbeatResponse:
    held = {job.job_id: job.attempt for job in body.running}
    with create_session(scoped=False) as session:
        agent = authorize_agent(session, secret, session_id, lock=True)
        agent.last_heartbeat_at = utcnow()
        if body.draining:
            agent.set_state(session, AgentState.DRAINING, "agent is shutting down")
        elif agent.drain_requested:
            agent.set_state(session, AgentState.DRAINING, "drain requested by an operator")
        else:
            agent.set_state(session, AgentState.ACTIVE)
        valid: set[int] = set()
        if held:
            jobs = session.execute(
                select(RemoteJob.id, RemoteJob.attempt, RemoteJob.agent_name, RemoteJob.state).where(
                    RemoteJob.id.in_(held)
                )
            ).all()
            valid = {
                job.id
                for job in jobs
                if job.agent_name == agent.name and job.attempt == held[job.id] and job.state in JobState.HELD
            }
        state = agent.state
    return HeartbeatResponse(state=state, stop=sorted(set(held) - valid))


@router.delete("/{session_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Deregister on shutdown")
def deregister(session_id: str, secret: SecretDep) -> None:
    with create_session(scoped=False) as session:
        agent = authorize_agent(session, secret, session_id, lock=True)
        release_agent_jobs(session, agent.name, reason=f"agent {agent.name} shut down")
        agent.set_state(session, AgentState.GONE, "deregistered on shutdown")
