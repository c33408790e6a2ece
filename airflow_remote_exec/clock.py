"""One clock for every comparison: the database's.

Heartbeats and presence are written by api-servers, read by schedulers, and fences are set by one
and checked by the other. Their hosts' clocks may disagree by seconds, which is as long as a heartbeat
window. Every timestamp this package stores or compares therefore comes from the database server.
SQLite lives on one host, so there the process clock is the database's clock.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import text
from sqlalchemy.orm import Session

_NOW_SQL = {
    "postgresql": "SELECT statement_timestamp()",
    "mysql": "SELECT UTC_TIMESTAMP(6)",
}


def db_now(session: Session) -> datetime:
    """The database server's current time, timezone-aware UTC (one cheap query, none on SQLite)."""
    sql = _NOW_SQL.get(session.get_bind().dialect.name)
    if sql is None:
        return datetime.now(timezone.utc)
    value: datetime = session.execute(text(sql)).scalar_one()
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
