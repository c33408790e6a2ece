"""Each api-server process records that it is serving the agent API (see ``RemoteApiServer``).

``started_at`` marks the start of the current unbroken stretch of presence: it is reset when this
process starts and after any gap (a database outage, or a row left by an earlier process of the
same name, as after a container restart). The executor declares agents lost only once the agent
API has been up for a whole silence window, so agents always get that long to heartbeat again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta

from airflow.utils.session import create_session

from airflow_remote_exec.clock import db_now
from airflow_remote_exec.models import RemoteApiServer
from airflow_remote_exec.reroute import API_PRESENCE_STALE_SECONDS

log = logging.getLogger(__name__)

PRESENCE_INTERVAL_SECONDS = 1.0

_started_in_pid: int | None = None
_thread: threading.Thread | None = None
_stop = threading.Event()
_lock = threading.Lock()


def ensure_presence() -> None:
    """Start this process's presence thread once (also in a process forked after it started)."""
    global _started_in_pid, _thread
    if _started_in_pid == os.getpid():
        return
    with _lock:
        if _started_in_pid != os.getpid():
            _stop.clear()
            _thread = threading.Thread(target=_record_forever, name="remote-exec-presence", daemon=True)
            _thread.start()
            _started_in_pid = os.getpid()


def stop_presence() -> None:
    """Stop recording (the api-server is shutting down): its row then goes stale, as it should."""
    global _started_in_pid
    with _lock:
        _stop.set()
        if _thread is not None:
            _thread.join(timeout=5)
        _started_in_pid = None


def record_presence(name: str, first: bool) -> None:
    """Mark ``name`` present now; start a new stretch if this is its first record or after a gap."""
    with create_session(scoped=False) as session:
        now = db_now(session)
        row = session.get(RemoteApiServer, name, with_for_update=True)
        if row is None:
            session.add(RemoteApiServer(name=name, started_at=now, last_seen_at=now))
            return
        if first or row.last_seen_at < now - timedelta(seconds=API_PRESENCE_STALE_SECONDS):
            row.started_at = now
        row.last_seen_at = now


def _record_forever() -> None:
    name = f"{socket.gethostname()}:{os.getpid()}"
    first = True
    while not _stop.is_set():
        try:
            record_presence(name, first)
            first = False
        except Exception:
            log.warning("Could not record api-server presence; retrying", exc_info=True)
        _stop.wait(PRESENCE_INTERVAL_SECONDS)
