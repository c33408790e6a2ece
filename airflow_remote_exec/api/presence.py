"""Each api-server process records that it is serving the agent API (see ``RemoteApiServer``)."""

from __future__ import annotations

import logging
import os
import socket
import threading

from airflow.utils.session import create_session

from airflow_remote_exec.models import RemoteApiServer, utcnow

log = logging.getLogger(__name__)

PRESENCE_INTERVAL_SECONDS = 1.0

_started = threading.Event()
_lock = threading.Lock()


def ensure_presence() -> None:
    """Start the presence thread of this process once; called on every agent request (cheap)."""
    if _started.is_set():
        return
    with _lock:
        if not _started.is_set():
            threading.Thread(target=_record_forever, name="remote-exec-presence", daemon=True).start()
            _started.set()


def _record_forever() -> None:
    name = f"{socket.gethostname()}:{os.getpid()}"
    started_at = utcnow()
    while True:
        try:
            with create_session(scoped=False) as session:
                row = session.get(RemoteApiServer, name)
                if row is None:
                    session.add(RemoteApiServer(name=name, started_at=started_at, last_seen_at=utcnow()))
                else:
                    row.last_seen_at = utcnow()
        except Exception:
            log.warning("Could not record api-server presence; retrying", exc_info=True)
        threading.Event().wait(PRESENCE_INTERVAL_SECONDS)
