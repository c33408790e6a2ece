"""Wake long-polling claims as soon as a job is queued.

On Postgres one background thread per api-server process ``LISTEN``s on the channel the executor
notifies; every waiting claim is woken and retries its claim. Elsewhere waiters simply re-check
every ``[remote_exec] wakeup_poll_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import select
import threading

from airflow import settings

from airflow_remote_exec import config
from airflow_remote_exec.notify import CHANNEL, supports_listen

log = logging.getLogger(__name__)

# With LISTEN a waiter still re-checks now and then, in case a notification was lost while the
# listening connection was being re-established.
SAFETY_RECHECK_SECONDS = 5.0


class JobWakeup:
    def __init__(self) -> None:
        self._waiters: set[asyncio.Future] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._listening = False
        self._thread: threading.Thread | None = None

    def _ensure_listener(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._loop = asyncio.get_running_loop()
            if settings.engine is not None and supports_listen(settings.engine.dialect.name):
                self._thread = threading.Thread(
                    target=self._listen_forever, name="remote-exec-listen", daemon=True
                )
                self._thread.start()
            else:
                self._thread = threading.current_thread()  # marks "set up"; nothing to run

    @property
    def recheck_interval(self) -> float:
        return SAFETY_RECHECK_SECONDS if self._listening else config.wakeup_poll_interval()

    async def wait(self, timeout: float) -> None:
        """Return when a job may have been queued, or after ``timeout`` seconds."""
        self._ensure_listener()
        future = asyncio.get_running_loop().create_future()
        self._waiters.add(future)
        try:
            await asyncio.wait_for(future, timeout=min(timeout, self.recheck_interval))
        except asyncio.TimeoutError:
            pass
        finally:
            self._waiters.discard(future)

    def _wake_all(self) -> None:
        for future in list(self._waiters):
            if not future.done():
                future.set_result(None)

    def _listen_forever(self) -> None:
        while True:
            try:
                self._listen_once()
            except Exception:
                log.warning("LISTEN connection lost; retrying in 1 s", exc_info=True)
            self._listening = False
            threading.Event().wait(1.0)

    def _listen_once(self) -> None:
        raw = settings.engine.raw_connection()
        try:
            conn = raw.driver_connection
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}")
            self._listening = True
            self._loop.call_soon_threadsafe(self._wake_all)  # catch up on anything missed meanwhile
            while True:
                readable, _, _ = select.select([conn], [], [], 30.0)
                if not readable:
                    with conn.cursor() as cursor:
                        cursor.execute("SELECT 1")  # detect a dead connection
                    continue
                conn.poll()
                if conn.notifies:
                    conn.notifies.clear()
                    self._loop.call_soon_threadsafe(self._wake_all)
        finally:
            raw.invalidate()


job_wakeup = JobWakeup()
