"""Who is calling: the API version (400), the agent token (401) and the agent session (403, or 410 when
the session is over and the agent must register again).

Header checks are ``async`` dependencies (no thread hop). The database checks are plain functions
the route calls inside its own session, so a request costs one session and one query for auth, and
no database work happens for a caller without a valid token beyond the look-up of that token.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, NamedTuple

from fastapi import Depends, Header, HTTPException, Path, status
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from airflow_remote_exec.api.datamodels import API_VERSION_HEADER, SUPPORTED_API_VERSIONS
from airflow_remote_exec.api.presence import ensure_presence
from airflow_remote_exec.models import AgentState, RemoteAgent, RemoteToken
from airflow_remote_exec.tokens import find_valid_token, hash_token, token_is_live, token_matches


def _unauthorized(detail: str = "Agent token is unknown, expired or revoked.") -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


async def check_api_version(version: Annotated[str | None, Header(alias=API_VERSION_HEADER)] = None) -> None:
    ensure_presence()
    if version not in SUPPORTED_API_VERSIONS:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"Unsupported or missing {API_VERSION_HEADER} header {version!r}; "
            f"this orchestrator speaks {sorted(SUPPORTED_API_VERSIONS)}. Upgrade the agent or the provider.",
        )


async def any_client_secret(authorization: Annotated[str | None, Header()] = None) -> str:
    """The bearer token of a caller that is not an agent (an autoscaler): no API version header."""
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise _unauthorized("Missing agent token: send 'Authorization: Bearer <token>'.")
    return secret.strip()


async def bearer_secret(
    secret: Annotated[str, Depends(any_client_secret)],
    _version: Annotated[None, Depends(check_api_version)] = None,
) -> str:
    return secret


SecretDep = Annotated[str, Depends(bearer_secret)]
# KEDA's metrics-api scaler sends a bearer token and no other header.
ScalerSecretDep = Annotated[str, Depends(any_client_secret)]
# Session ids are UUIDs: anything else (a NUL byte, a newline) is a 422, never a database error.
SessionIdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9-]{1,36}$")]


def authenticate(session: Session, secret: str) -> RemoteToken:
    """The live token for ``secret``, or 401."""
    token = find_valid_token(session, secret)
    if token is None:
        raise _unauthorized()
    return token


def require_queues_in_scope(token: RemoteToken, queues: list[str], action: str) -> None:
    """403 naming the queues of ``queues`` outside the token's scope, if any."""
    outside = [q for q in queues if q not in token.queue_list]
    if outside:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"Token {token.name!r} may not {action} queue(s) {outside}; it allows {token.queue_list}.",
        )


class AgentOfRequest(NamedTuple):
    """What a request needs of its agent's row, read without loading ORM objects (the job routes run it
    for every claim and report); a route that changes the agent loads it with ``session.get``."""

    name: str
    token_id: int
    state: str
    slots: int
    queues: str
    components: str
    token_hash: str
    revoked_at: datetime | None
    expires_at: datetime | None

    @property
    def queue_list(self) -> list[str]:
        return [q for q in self.queues.split(",") if q]


# Built once: every agent request runs it, and building it costs more than running it.
_agent, _token = RemoteAgent.__table__.c, RemoteToken.__table__.c
_AGENT_OF_SESSION = (
    select(
        _agent.name,
        _agent.token_id,
        _agent.state,
        _agent.slots,
        _agent.queues,
        _agent.components,
        _token.token_hash,
        _token.revoked_at,
        _token.expires_at,
    )  # fmt: skip
    .join_from(RemoteAgent.__table__, RemoteToken.__table__, _token.id == _agent.token_id)
    .where(_agent.session_id == bindparam("agent_session"), _token.token_hash == bindparam("secret_hash"))
)
_AGENT_OF_SESSION_LOCKED = _AGENT_OF_SESSION.with_for_update(of=RemoteAgent.__table__)


def authorize_agent(
    session: Session,
    secret: str,
    session_id: str,
    lock: bool = False,
    component: str | None = None,
) -> AgentOfRequest:
    """The agent of ``session_id`` if ``secret`` is its live token (and it registered as ``component``,
    if given): one query on the usual path.

    The token's hash is part of that query, so a caller without the token never reads or locks the
    agent's row. ``lock`` row-locks the agent for the rest of the transaction: no other claim,
    heartbeat or loss verdict on it meanwhile (a claim must never land on a lost agent, nor two
    claims count the same free slots).
    """
    query = _AGENT_OF_SESSION_LOCKED if lock else _AGENT_OF_SESSION
    row = session.execute(query, {"agent_session": session_id, "secret_hash": hash_token(secret)}).first()
    if row is not None:
        agent = AgentOfRequest(*row)
        if token_matches(agent, secret) and token_is_live(agent):
            if agent.state not in AgentState.LIVE:
                raise HTTPException(status.HTTP_410_GONE, f"Agent session is {agent.state}; register again.")
            if component is not None and component not in agent.components.split(","):
                raise HTTPException(
                    status.HTTP_403_FORBIDDEN,
                    f"Agent {agent.name!r} registered as {agent.components}, not as a {component}.",
                )
            return agent
    authenticate(session, secret)  # 401 before anything else for a bad token
    if session.scalar(select(RemoteAgent.name).where(RemoteAgent.session_id == session_id)) is None:
        raise HTTPException(status.HTTP_410_GONE, "Unknown agent session; register again.")
    raise HTTPException(status.HTTP_403_FORBIDDEN, "This agent session belongs to another token.")
