"""Agent lifecycle: register, heartbeat (whose reply carries commands), deregister."""

from __future__ import annotations

import uuid
from datetime import timedelta

from airflow.configuration import conf
from airflow.utils.session import create_session
from fastapi import APIRouter, HTTPException, status
from sqlalchemy.orm import Session

from airflow_remote_exec import config
from airflow_remote_exec.api.auth import (
    SecretDep,
    SessionIdPath,
    authenticate,
    authorize_agent,
    require_queues_in_scope,
)
from airflow_remote_exec.api.beats import HELD_JOBS, Beat, heartbeat_writer
from airflow_remote_exec.api.datamodels import (
    HeartbeatRequest,
    HeartbeatResponse,
    HeldJob,
    RegisterRequest,
    RegisterResponse,
    error_responses,
)
from airflow_remote_exec.api.db_threads import run_db
from airflow_remote_exec.api.versions import version_mismatch
from airflow_remote_exec.clock import db_now
from airflow_remote_exec.models import AgentState, RemoteAgent, RemoteToken
from airflow_remote_exec.reroute import release_agent_jobs, release_jobs, silence_window
from airflow_remote_exec.tokens import hash_token, token_is_live

router = APIRouter(prefix="/agents", tags=["agents"], responses=error_responses(400, 401, 403))

# A live agent whose name is taken by a registration from another process keeps it while its
# heartbeats are this fresh: two intervals tell a running agent from a dead one, and a dead
# agent's restarted successor waits at most that long.
NAME_HELD_FOR_INTERVALS = 2


@router.post(
    "",
    response_model=RegisterResponse,
    summary="Register an agent and open a new session",
    responses=error_responses(409, 426),
)
async def register(body: RegisterRequest, secret: SecretDep) -> RegisterResponse:
    mismatch = version_mismatch(body.airflow_version, body.task_sdk_version, body.components)
    if mismatch:
        raise HTTPException(status.HTTP_426_UPGRADE_REQUIRED, mismatch)
    session_id = await run_db(_register, body, secret)
    return RegisterResponse(
        session_id=session_id,
        heartbeat_interval=config.heartbeat_interval(),
        lost_after_missed_heartbeats=config.lost_after_missed_heartbeats(),
        claim_wait_seconds=config.claim_wait_seconds(),
        executors=global_executors(),
    )


def _register(body: RegisterRequest, secret: str) -> str:
    """Record the agent under its name and open a new session; returns the session id."""
    queues = sorted(set(body.queues))
    components = sorted(set(body.components))
    with create_session(scoped=False) as session:
        token = authenticate(session, secret)
        require_queues_in_scope(token, queues, "serve")
        not_allowed = [c for c in components if c not in token.component_list]
        if not_allowed:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"Token {token.name!r} may not run {not_allowed}; it allows {token.component_list}. "
                "Create a token with `airflow remote-exec tokens create ... --components`.",
            )
        agent = session.get(RemoteAgent, body.name, with_for_update=True)
        now = db_now(session)
        if agent is None:
            agent = RemoteAgent(name=body.name, registered_at=now, state="", drain_requested=False)
            session.add(agent)
        else:
            _refuse_a_name_of_another_token(session, agent, token.id)
            if agent.state in AgentState.LIVE:
                _refuse_taking_a_live_name(agent, body, now)
            # The previous session of this name is over: whatever it held is released.
            release_agent_jobs(session, body.name, f"agent {body.name} restarted", now)
        agent.session_id = str(uuid.uuid4())
        agent.token_id = token.id
        agent.hostname = body.hostname
        agent.pid = body.pid
        agent.version = body.version
        agent.airflow_version = body.airflow_version
        agent.queues = ",".join(queues)
        agent.components = ",".join(components)
        agent.slots = body.slots
        agent.health = agent.health_reported_at = None  # a sentinel's report belongs to its session
        agent.registered_at = now
        agent.last_heartbeat_at = now
        agent.state = ""  # every registration is recorded, also one that follows a registration
        agent.set_state(
            session, AgentState.REGISTERED, f"session {agent.session_id} from {body.hostname}", now=now
        )
        return agent.session_id


def global_executors() -> str:
    """The ``[core] executor`` list every team shares. Teams' own sections (``;team=...``) stay on the
    orchestrator: they would name other teams to every agent, and agents do not run multi-team."""
    shared = conf.get("core", "executor").split(";")[0].strip().lstrip("=")
    return ",".join(name.strip() for name in shared.split(",") if name.strip())


def _refuse_a_name_of_another_token(session: Session, agent: RemoteAgent, token_id: int) -> None:
    """A name belongs to the token that registered it while that token is valid: another token can
    neither take it nor learn whether its agent is alive (the answer is the same either way)."""
    if agent.token_id == token_id:
        return
    owner = session.get(RemoteToken, agent.token_id)
    if owner is not None and token_is_live(owner):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"Agent name {agent.name!r} belongs to another token; give this agent another --name.",
        )


def _refuse_taking_a_live_name(agent: RemoteAgent, body: RegisterRequest, now) -> None:
    """A live name may be taken over only by its own process restarting, or once its holder is silent."""
    same_process = (agent.hostname, agent.pid) == (body.hostname, body.pid)
    silent_for = now - agent.last_heartbeat_at
    held_for = timedelta(seconds=NAME_HELD_FOR_INTERVALS * config.heartbeat_interval())
    if not same_process and silent_for < held_for:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"Agent name {body.name!r} is in use by a live agent on {agent.hostname} (pid {agent.pid}, "
            f"heartbeat {int(silent_for.total_seconds())}s ago). Give each agent its own --name; a "
            f"restarted agent may take the name once the old one has been silent for "
            f"{int(held_for.total_seconds())}s.",
        )


@router.post(
    "/{session_id}/heartbeat",
    response_model=HeartbeatResponse,
    summary="Report liveness",
    responses=error_responses(404, 410),
)
async def heartbeat(
    session_id: SessionIdPath, body: HeartbeatRequest, secret: SecretDep
) -> HeartbeatResponse:
    held = {(job.job_id, job.attempt) for job in body.running}
    beat = None if body.draining else await heartbeat_writer.beat(session_id, hash_token(secret))
    valid = None if beat is None else _still_held(beat, held)
    state = AgentState.ACTIVE
    if valid is None:  # anything but a plain "still here": the full path
        valid, state = await run_db(_beat, secret, session_id, body.draining, held)
    stop = [HeldJob(job_id=job_id, attempt=attempt) for job_id, attempt in sorted(held - valid)]
    return HeartbeatResponse(state=state, stop=stop)


def _still_held(beat: Beat, held: set[tuple[int, int]]) -> set[tuple[int, int]] | None:
    """The (job, attempt) pairs the agent holds, or None if one of them is an orphaned claim to give
    back, which the full path does."""
    unknown = [j for j in beat.held_jobs if (j.id, j.attempt) not in held]
    if unknown:
        unknown_before = beat.now - silence_window()
        if any(j.claimed_at < unknown_before for j in unknown):
            return None
    return {(j.id, j.attempt) for j in beat.held_jobs}


def _locked_agent(session: Session, secret: str, session_id: str) -> RemoteAgent:
    """The caller's agent, authorized and row-locked, as an ORM object for a route that changes it."""
    agent = session.get(RemoteAgent, authorize_agent(session, secret, session_id, lock=True).name)
    if agent is None:  # purged between the two reads (SQLite has no row lock to prevent it)
        raise HTTPException(status.HTTP_410_GONE, "Unknown agent session; register again.")
    return agent


def _beat(
    secret: str, session_id: str, draining: bool, held: set[tuple[int, int]]
) -> tuple[set[tuple[int, int]], str]:
    """The full heartbeat: state changes and their history, orphaned claims given back, refusals."""
    with create_session(scoped=False) as session:
        agent = _locked_agent(session, secret, session_id)
        now = db_now(session)
        agent.last_heartbeat_at = now
        if draining:
            agent.set_state(session, AgentState.DRAINING, "agent is shutting down", now=now)
        elif agent.drain_requested:
            agent.set_state(session, AgentState.DRAINING, "drain requested by an operator", now=now)
        else:
            agent.set_state(session, AgentState.ACTIVE, now=now)
        ours = session.execute(HELD_JOBS, {"holder": agent.name}).all()
        # A job claimed for this agent that it does not list, long after the claim, never reached it
        # (a claim response lost in transit): give it back.
        unknown_before = now - silence_window()
        orphans = [j.id for j in ours if (j.id, j.attempt) not in held and j.claimed_at < unknown_before]
        release_jobs(session, orphans, f"agent {agent.name} does not hold this job", now)
        return {(job.id, job.attempt) for job in ours}, agent.state


@router.delete(
    "/{session_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Deregister on shutdown",
    responses=error_responses(404, 410),
)
async def deregister(session_id: SessionIdPath, secret: SecretDep) -> None:
    await run_db(_deregister, secret, session_id)


def _deregister(secret: str, session_id: str) -> None:
    with create_session(scoped=False) as session:
        agent = _locked_agent(session, secret, session_id)
        now = db_now(session)
        release_agent_jobs(session, agent.name, f"agent {agent.name} shut down", now)
        agent.set_state(session, AgentState.GONE, "deregistered on shutdown", now=now)
