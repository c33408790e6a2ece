"""Wake agents' waiting claims when jobs become claimable.

On Postgres the writer sends ``NOTIFY`` inside its own transaction, so the api-server hears about
a job exactly when it becomes visible. Other databases have no such channel; claims poll there.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

CHANNEL = "remote_exec_jobs"


def supports_listen(dialect_name: str) -> bool:
    return dialect_name == "postgresql"


def notify_jobs_queued(session: Session) -> None:
    """Announce new claimable jobs; Postgres delivers it at commit and folds duplicates."""
    if supports_listen(session.get_bind().dialect.name):
        session.execute(text(f"NOTIFY {CHANNEL}"))
