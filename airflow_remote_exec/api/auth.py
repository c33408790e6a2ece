"""Who is calling: the API version (400), the agent token (401) and the agent session (403, or 410 when
the session is over and the agent must register again)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from airflow.utils.session import create_session
from fastapi import Depends, Header, HTTPException, Path, status
from sqlalchemy import select

from airflow_remote_exec.api.datamodels import API_VERSION_HEADER, SUPPORTED_API_VERSIONS
from airflow_remote_exec.api.presence import ensure_presence
from airflow_remote_exec.models import AgentState, RemoteAgent
from airflow_remote_exec.tokens import find_valid_token


@dataclass(frozen=True)
class TokenIdentity:
    id: int
    name: str
    queues: frozenset[str]


@dataclass(frozen=True)
class AgentIdentity:
    name: str
    session_id: str
    token_id: int
    queues: tuple[str, ...]
    slots: int


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def check_api_version(version: Annotated[str | None, Header(alias=API_VERSION_HEADER)] = None) -> None:
    ensure_presence()
    if version not in SUPPORTED_API_VERSIONS:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"Unsupported or missing {API_VERSION_HEADER} header {version!r}; "
            f"this orchestrator speaks {sorted(SUPPORTED_API_VERSIONS)}. Upgrade the agent or the provider.",
        )


def authenticated_token(
    authorization: Annotated[str | None, Header()] = None,
    _version: Annotated[None, Depends(check_api_version)] = None,
) -> TokenIdentity:
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret:
        raise _unauthorized("Missing agent token: send 'Authorization: Bearer <token>'.")
    with create_session(scoped=False) as session:
        row = find_valid_token(session, secret.strip())
        if row is None:
            raise _unauthorized("Agent token is unknown, expired or revoked.")
        return TokenIdentity(id=row.id, name=row.name, queues=frozenset(row.queue_list))


def current_agent(
    session_id: Annotated[str, Path(max_length=36)],
    token: Annotated[TokenIdentity, Depends(authenticated_token)],
) -> AgentIdentity:
    with create_session(scoped=False) as session:
        agent = session.scalar(select(RemoteAgent).where(RemoteAgent.session_id == session_id))
        if agent is None:
            raise HTTPException(status.HTTP_410_GONE, "Unknown agent session; register again.")
        if agent.token_id != token.id:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "This agent session belongs to another token.")
        if agent.state in (AgentState.LOST, AgentState.GONE):
            raise HTTPException(
                status.HTTP_410_GONE, f"Agent session is {agent.state}; register again to continue."
            )
        return AgentIdentity(
            name=agent.name,
            session_id=agent.session_id,
            token_id=agent.token_id,
            queues=tuple(agent.queue_list),
            slots=agent.slots,
        )


TokenDep = Annotated[TokenIdentity, Depends(authenticated_token)]
AgentDep = Annotated[AgentIdentity, Depends(current_agent)]
