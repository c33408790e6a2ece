"""Implementations of ``airflow remote-exec`` commands (imported lazily by ``cli.py``)."""

from __future__ import annotations

import sys

from airflow.cli.simple_table import AirflowConsole
from airflow.utils import cli as cli_utils
from airflow.utils.session import create_session
from sqlalchemy import select

from airflow_remote_exec.cli import fail
from airflow_remote_exec.models import RemoteAgent, RemoteToken, utcnow
from airflow_remote_exec.tokens import TokenError, create_token, parse_duration, parse_queues, token_status


def _iso(value) -> str:
    return value.isoformat(timespec="seconds") if value else ""


@cli_utils.action_cli
def tokens_create(args) -> None:
    try:
        queues = parse_queues(args.queues)
        expires_in = parse_duration(args.expires) if args.expires else None
        with create_session() as session:
            row, secret = create_token(session, args.name, queues, expires_in)
            expires = _iso(row.expires_at) or "never"
    except TokenError as err:
        fail(str(err))
    print(
        f"Created agent token {args.name!r} for queues {','.join(queues)} (expires: {expires}).\n"
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
                "status": token_status(row, now),
                "created_at": _iso(row.created_at),
                "expires_at": _iso(row.expires_at),
                "revoked_at": _iso(row.revoked_at),
            }
            for row in rows
        ]
    AirflowConsole().print_as(data=data, output=args.output)


@cli_utils.action_cli
def tokens_revoke(args) -> None:
    with create_session() as session:
        row = session.scalar(select(RemoteToken).where(RemoteToken.name == args.name))
        if row is None:
            fail(f"No token named {args.name!r}; see `airflow remote-exec tokens list`.")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
    print(f"Revoked agent token {args.name!r}; its agents get 401 on their next request.")


@cli_utils.action_cli
def agents_list(args) -> None:
    with create_session() as session:
        rows = session.scalars(select(RemoteAgent).order_by(RemoteAgent.name)).all()
        data = [
            {
                "name": row.name,
                "state": row.state,
                "since": _iso(row.state_changed_at),
                "hostname": row.hostname,
                "queues": row.queues,
                "slots": row.slots,
                "last_heartbeat": _iso(row.last_heartbeat_at),
                "version": row.version,
            }
            for row in rows
        ]
    AirflowConsole().print_as(data=data, output=args.output)
