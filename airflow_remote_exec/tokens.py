"""Agent tokens: generated once, stored only as a SHA-256 hash, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from airflow_remote_exec.models import Component, RemoteToken, utcnow

TOKEN_PREFIX = "rex_"
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,256}$")


class TokenFields(Protocol):
    """What checking a token reads: a ``RemoteToken``, or a row of those columns."""

    token_hash: str
    revoked_at: datetime | None
    expires_at: datetime | None


class TokenError(ValueError):
    """A token request a user can fix (bad name, queue or duration)."""


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_duration(text: str) -> timedelta:
    """Parse ``30d``, ``12h``, ``90m``, ``2w`` or ``45s``."""
    match = _DURATION.match(text or "")
    if not match:
        raise TokenError(f"Invalid duration {text!r}: use a number and one of s, m, h, d, w (e.g. 30d).")
    amount, unit = int(match.group(1)), match.group(2)
    if amount <= 0:
        raise TokenError(f"Invalid duration {text!r}: it must be positive.")
    return timedelta(seconds=amount * _UNIT_SECONDS[unit])


def parse_queues(text: str) -> list[str]:
    """Split a comma-separated queue list, rejecting empty lists and odd characters."""
    queues = [q.strip() for q in (text or "").split(",") if q.strip()]
    if not queues:
        raise TokenError("At least one queue is required, e.g. --queues default,gpu.")
    bad = [q for q in queues if not _QUEUE_NAME.match(q)]
    if bad:
        raise TokenError(f"Invalid queue name(s) {bad}: use letters, digits and . _ - :")
    return sorted(set(queues))


def parse_components(text: str) -> list[str]:
    """Split a comma-separated component list (worker, dag-processor, triggerer, sentinel)."""
    components = [c.strip() for c in (text or "").split(",") if c.strip()]
    if not components:
        raise TokenError(f"At least one component is required, e.g. --components {Component.WORKER}.")
    bad = [c for c in components if c not in Component.ALL]
    if bad:
        raise TokenError(f"Unknown component(s) {bad}: choose from {', '.join(Component.ALL)}.")
    return sorted(set(components))


def create_token(
    session: Session,
    name: str,
    queues: list[str],
    expires_in: timedelta | None = None,
    components: Sequence[str] = (Component.WORKER,),
) -> tuple[RemoteToken, str]:
    """Create a token row and return it with the secret, which is not stored anywhere."""
    name = (name or "").strip()
    if not name or len(name) > 250:
        raise TokenError("A token needs a name of 1 to 250 characters.")
    if session.scalar(select(RemoteToken).where(RemoteToken.name == name)) is not None:
        raise TokenError(f"A token named {name!r} already exists; revoke it or choose another name.")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = RemoteToken(
        name=name,
        token_hash=hash_token(secret),
        queues=",".join(queues),
        components=",".join(components),
        created_at=utcnow(),
        expires_at=utcnow() + expires_in if expires_in else None,
    )
    session.add(row)
    session.flush()
    return row, secret


def find_valid_token(session: Session, secret: str, now: datetime | None = None) -> RemoteToken | None:
    """Return the live token matching ``secret``; None when unknown, expired or revoked."""
    if not secret or not secret.startswith(TOKEN_PREFIX):
        return None
    digest = hash_token(secret)
    row = session.scalar(select(RemoteToken).where(RemoteToken.token_hash == digest))
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        return None
    return row if token_is_live(row, now) else None


def token_matches(row: TokenFields, secret: str) -> bool:
    """Whether ``secret`` is this token's, compared in constant time."""
    return hmac.compare_digest(row.token_hash, hash_token(secret or ""))


def token_is_live(row: TokenFields, now: datetime | None = None) -> bool:
    return token_status(row, now) == "active"


def token_status(row: TokenFields, now: datetime | None = None) -> str:
    now = now or utcnow()
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"
