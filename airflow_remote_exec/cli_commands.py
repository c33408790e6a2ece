"""Implementations of ``airflow remote-exec`` commands (imported lazily by ``cli.py``)."""

from __future__ import annotations

import json
import sys

from airflow.cli.simple_table import AirflowConsole
from airflow.utils import cli as cli_utils
from airflow.utils.session import create_session
from rich.markup import escape
from sqlalchemy import select

from airflow_remote_exec import config
from airflow_remote_exec.cli import fail
from airflow_remote_exec.clock import db_now
from airflow_remote_exec.models import (
    AgentState,
    Component,
    RemoteAgent,
    RemoteAgentEvent,
    RemoteToken,
    utcnow,
)
from airflow_remote_exec.tokens import (
    TokenError,
    create_token,
    parse_components,
    parse_duration,
    parse_queues,
    token_status,
)


def _iso(value) -> str:
    return value.isoformat(timespec="seconds") if value else ""


@cli_utils.action_cli
def tokens_create(args) -> None:
    try:
        queues = parse_queues(args.queues)
        components = parse_components(args.components)
        expires_in = parse_duration(args.expires) if args.expires else None
        with create_session() as session:
            row, secret = create_token(session, args.name, queues, expires_in, components)
            expires = _iso(row.expires_at) or "never"
    except TokenError as err:
        fail(str(err))
    print(
        f"Created agent token {args.name!r} for queues {','.join(queues)} and components "
        f"{','.join(components)} (expires: {expires}).\n"
        "Store it now; it is not shown again:",
        file=sys.stderr,
    )
    print(secret)


@cli_utils.action_cli
def tokens_list(args) -> None:
    now = utcnow()
    with create_session() as session:
        rows = session.scalars(select(RemoteToken).order_by(RemoteToken.name)).all()
        data = [
            {
                "name": row.name,
                "queues": row.queues,
                "components": row.components,
                "status": token_status(row, now),
                "created_at": _iso(row.created_at),
                "expires_at": _iso(row.expires_at),
                "revoked_at": _iso(row.revoked_at),
            }
            for row in rows
        ]
    _print_rows(data, args.output)


@cli_utils.action_cli
def tokens_revoke(args) -> None:
    with create_session() as session:
        row = session.scalar(select(RemoteToken).where(RemoteToken.name == args.name))
        if row is None:
            fail(f"No token named {args.name!r}; see `airflow remote-exec tokens list`.")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
    print(f"Revoked agent token {args.name!r}; its agents get 401 on their next request.")


RECENT_TRANSITIONS = 4
# A sentinel's report is stale once this many reports are missing.
STALE_AFTER_REPORTS = 3


def _recent_transitions(session) -> dict[str, str]:
    """The latest few state changes of each agent, oldest first, as 'state@HH:MM:SS' words."""
    recent: dict[str, list[str]] = {}
    events = session.scalars(
        select(RemoteAgentEvent).order_by(RemoteAgentEvent.at.desc(), RemoteAgentEvent.id.desc())
    )
    for event in events:
        seen = recent.setdefault(event.agent_name, [])
        if len(seen) < RECENT_TRANSITIONS:
            seen.append(f"{event.state}@{event.at:%H:%M:%S}")
    return {name: " ".join(reversed(words)) for name, words in recent.items()}


@cli_utils.action_cli
def agents_list(args) -> None:
    with create_session() as session:
        rows = session.scalars(select(RemoteAgent).order_by(RemoteAgent.name)).all()
        transitions = _recent_transitions(session)
        now = db_now(session)  # the clock the reports were stamped with
        data = [
            {
                "name": row.name,
                "state": row.state,
                "since": _iso(row.state_changed_at),
                "recent_transitions": transitions.get(row.name, ""),
                "hostname": row.hostname,
                "components": row.components,
                "queues": row.queues,
                "slots": row.slots,
                "last_heartbeat": _iso(row.last_heartbeat_at),
                "version": row.version,
                "health": sentinel_health(row, now),
            }
            for row in rows
        ]
    _print_rows(data, args.output)


def sentinel_health(agent: RemoteAgent, now) -> str:
    """A sentinel's last report in one line: ``healthy (3 components)``, or what is not, and ``stale``
    once three reports are missing. Empty for agents that are not sentinels."""
    if agent.health is None or agent.health_reported_at is None:
        return "no report yet" if Component.SENTINEL in agent.components.split(",") else ""
    components = json.loads(agent.health)
    sick = [f"{name} ({c['detail'] or 'unhealthy'})" for name, c in components.items() if not c["healthy"]]
    text = f"unhealthy: {', '.join(sick)}" if sick else f"healthy ({len(components)} components)"
    age = (now - agent.health_reported_at).total_seconds()
    if age > STALE_AFTER_REPORTS * config.sentinel_report_interval():
        text = f"stale, {age:.0f} s old: {text}"
    return text


@cli_utils.action_cli
def agents_history(args) -> None:
    with create_session() as session:
        query = select(RemoteAgentEvent).order_by(RemoteAgentEvent.at, RemoteAgentEvent.id)
        if args.name:
            query = query.where(RemoteAgentEvent.agent_name == args.name)
        data = [
            {"at": _iso(e.at), "agent": e.agent_name, "state": e.state, "reason": e.reason}
            for e in session.scalars(query)
        ]
    _print_rows(data, args.output)


def _set_drain(name: str, drain: bool) -> None:
    with create_session() as session:
        agent = session.get(RemoteAgent, name, with_for_update=True)
        if agent is None:
            fail(f"No agent named {name!r}; see `airflow remote-exec agents list`.")
        agent.drain_requested = drain
        if agent.state in (AgentState.REGISTERED, AgentState.ACTIVE, AgentState.DRAINING):
            if drain:
                agent.set_state(session, AgentState.DRAINING, "drain requested by an operator")
            else:
                agent.set_state(session, AgentState.ACTIVE, "resumed by an operator")


@cli_utils.action_cli
def agents_drain(args) -> None:
    _set_drain(args.name, True)
    print(f"Agent {args.name!r} takes no new jobs; its running tasks finish. Undo with `agents resume`.")


@cli_utils.action_cli
def agents_resume(args) -> None:
    _set_drain(args.name, False)
    print(f"Agent {args.name!r} claims jobs again.")


def _print_rows(data: list[dict], output: str) -> None:
    """Print rows as Airflow's CLI does; in a table, text an agent sent is shown as is, never read as
    rich markup (a hostname of ``[blink]...`` stays literal)."""
    if output in ("table", "plain"):
        data = [{k: escape(v) if isinstance(v, str) else v for k, v in row.items()} for row in data]
    AirflowConsole().print_as(data=data, output=output)


@cli_utils.action_cli
def api_server(args) -> None:
    import uvicorn

    if not 1 <= args.port <= 65535:
        fail(f"--port must be between 1 and 65535, not {args.port}.")
    if args.workers < 1:
        fail(f"--workers must be at least 1, not {args.workers}.")
    print(
        f"Serving the agent API at http://{args.host}:{args.port}/remote/v1 with {args.workers} worker(s)",
        file=sys.stderr,
    )
    uvicorn.run(
        "airflow_remote_exec.api.app:create_standalone_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        proxy_headers=True,
        log_level="info",
    )
