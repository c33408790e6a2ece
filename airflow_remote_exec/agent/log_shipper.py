"""Ships each task's log file to the orchestrator while the task writes it, and catches up after outages.

Airflow's supervisor writes a task's log to ``[logging] base_log_folder`` on the agent. The orchestrator
shares no disk with the agent and cannot reach it, so the agent sends the file's new bytes, in order,
every second. That file is the buffer: the task never waits for the orchestrator, and what could not be
sent during an outage is sent once it answers again. A job attempt is one stream, from where the file
ended when the attempt started (a task resumed after a deferral appends to the same file) to where it
ended when the attempt did.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from airflow_remote_exec.agent.client import AgentApiError, AgentClient
from airflow_remote_exec.agent.log_format import job as job_extra
from airflow_remote_exec.agent.runner import JobKey
from airflow_remote_exec.api.datamodels import MAX_LOG_CHUNK_BYTES

log = logging.getLogger(__name__)

SHIP_EVERY_SECONDS = 1.0
# What one agent sends per second at most, whatever its tasks write: a runaway task cannot flood the
# orchestrator, and the backlog it leaves is bounded below.
SHIP_BYTES_PER_SECOND = 4 * MAX_LOG_CHUNK_BYTES
MAX_RETRY_SECONDS = 10.0


def base_log_folder() -> Path:
    """Where Airflow's supervisor writes task logs on this agent."""
    from airflow.configuration import conf

    return Path(conf.get("logging", "base_log_folder")).expanduser()


def task_log_path(workload_json: str) -> str | None:
    """The log file of a task workload, relative to ``base_log_folder``; None if it has none."""
    try:
        path = json.loads(workload_json).get("log_path")
    except (ValueError, AttributeError):
        return None
    return path if isinstance(path, str) and path else None


@dataclass
class _Stream:
    key: JobKey
    path: Path
    file: BinaryIO  # opened before the task started, never through a link: what is read is its log
    start: int  # where this attempt's log begins in the file
    shipped: int = 0  # bytes of it the orchestrator holds
    end: int | None = None  # where it ends in the file, once the attempt is over
    # What to run once the rest of an ended log is shipped (or given up), or at ``then_by`` at the latest.
    then: Callable[[], None] | None = None
    then_by: float = 0.0

    def written(self) -> int:
        """Bytes of this attempt's log in the file so far (the open file's: a path can be swapped)."""
        if self.end is not None:
            return self.end - self.start
        try:
            return max(0, os.fstat(self.file.fileno()).st_size - self.start)
        except (OSError, ValueError):
            return 0

    def unshipped(self) -> int:
        return max(0, self.written() - self.shipped)

    def read(self, limit: int) -> bytes:
        """The next unshipped bytes, at most ``limit``, cut after the last whole line while the task
        may still be writing (so a live reader never sees half a line), unless one line fills a chunk."""
        want = min(limit, self.unshipped())
        if want <= 0:
            return b""
        try:
            data = os.pread(self.file.fileno(), want, self.start + self.shipped)
        except (OSError, ValueError):
            data = b""
        if not data:  # shorter than it was: truncated under us, or unreadable
            self.end = self.start + self.shipped
            return b""
        if self.end is None and not data.endswith(b"\n") and len(data) < MAX_LOG_CHUNK_BYTES:
            data = data[: data.rfind(b"\n") + 1]
        return data

    def close(self) -> None:
        self.file.close()


def _open_log(base_folder: Path, relative_path: str) -> tuple[Path, BinaryIO]:
    """Create the log file as Airflow's supervisor does (its folder and file permissions) and open it
    for reading without following a link. The agent holds it before the task starts, so a task run as
    another user cannot swap its log for a link to a file only the agent may read."""
    from airflow.sdk.log import init_log_file

    base = os.path.realpath(base_folder)
    if not Path(os.path.normpath(os.path.join(base, relative_path))).is_relative_to(base):
        raise OSError(f"{relative_path} is outside [logging] base_log_folder")
    path = init_log_file(relative_path)
    if not Path(os.path.realpath(path)).is_relative_to(base):
        raise OSError(f"{relative_path} is outside [logging] base_log_folder")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return path, os.fdopen(fd, "rb")


def _run(then: Callable[[], None]) -> None:
    try:
        then()
    except Exception:
        log.exception("Unexpected error after shipping a task log; carrying on")


class LogShipper:
    """One thread's loop (``step``) sends the new bytes of every tracked stream."""

    def __init__(
        self,
        client: AgentClient,
        session_id: Callable[[], str | None],
        base_folder: Path,
        backlog_max_bytes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.session_id = session_id
        self.base_folder = base_folder
        self.backlog_max_bytes = backlog_max_bytes
        self.clock = clock
        self._streams: dict[JobKey, _Stream] = {}
        self._lock = threading.Lock()
        self._round = threading.Lock()
        self._wake = threading.Event()
        self._retry_at = 0.0
        self._failures = 0
        self._answers_at_failure = 0

    # -- called by the worker --------------------------------------------------------------
    def track(self, key: JobKey, relative_path: str) -> None:
        """Follow the log of a job attempt about to start; call before its runner starts."""
        try:
            path, file = _open_log(self.base_folder, relative_path)
        except Exception as err:  # noqa: BLE001 - no log shipped, but the job must start
            log.warning("Not shipping the log of job %s attempt %s: %s", *key, err, **job_extra(key.job_id))
            return
        start = os.fstat(file.fileno()).st_size
        with self._lock:
            for earlier in self._streams.values():
                # The same file, still followed for an attempt whose end the worker has not collected
                # yet (a task resumed at once on this agent): that attempt's log ends where this starts.
                if earlier.end is None and earlier.path == path:
                    earlier.end = max(earlier.start, start)
            replaced = self._streams.get(key)
            self._streams[key] = _Stream(key, path, file, start)
        if replaced is not None:  # a job id used again (SQLite): the earlier file is not ours to read
            self._forget(replaced)

    def end(self, key: JobKey, then: Callable[[], None] | None = None, within: float = 0.0) -> None:
        """The attempt is over: ship the rest of its log. ``then`` runs once that is done or given up,
        after ``within`` seconds at the latest, and at once while the orchestrator is unreachable:
        the worker reports the job finished from it, so that a job reported finished has its log in
        place, and nobody waits on an orchestrator that is away."""
        with self._lock:
            stream = self._streams.get(key)
            if stream is not None:
                if stream.end is None:
                    stream.end = stream.start + stream.written()
                if then is not None and stream.then is None:
                    stream.then, stream.then_by, then = then, self.clock() + within, None
        if then is not None:  # nothing of its log to wait for
            _run(then)
        self._wake.set()

    def holding(self) -> int:
        """How many ``then`` of ``end`` have not run yet."""
        with self._lock:
            return sum(1 for s in self._streams.values() if s.then is not None)

    def pending_bytes(self) -> int:
        with self._lock:
            return sum(s.unshipped() for s in self._streams.values())

    def flush(self, deadline: float) -> None:
        """At shutdown: ship what is left until ``deadline`` (monotonic)."""
        while time.monotonic() < deadline and self.pending_bytes():
            before = self.pending_bytes()
            if not self._backing_off():
                self.ship_round()
            if self.pending_bytes() >= before:  # nothing went: wait for the orchestrator or the file
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        if self.pending_bytes():
            log.warning("Stopping with %d bytes of task logs not shipped", self.pending_bytes())

    # -- the shipping loop -------------------------------------------------------------------
    def step(self) -> None:
        self._wake.wait(SHIP_EVERY_SECONDS)
        self._wake.clear()
        try:
            if not self._backing_off():
                self.ship_round()
            else:
                with self._round:
                    self._keep_backlog_bounded()
        finally:  # whatever went wrong, the reports waiting on logs go when due
            self._run_due(everything=self._backing_off())

    def _run_due(self, everything: bool) -> None:
        """Run the ``then`` of ended streams whose time is up (all of them when ``everything``)."""
        now, due = self.clock(), []
        with self._lock:
            for stream in self._streams.values():
                if stream.then is not None and (everything or now >= stream.then_by):
                    due.append(stream.then)
                    stream.then = None
        for then in due:
            _run(then)

    def _backing_off(self) -> bool:
        """Waiting to try again, unless another request of the agent got an answer meanwhile."""
        return self.clock() < self._retry_at and self.client.answers == self._answers_at_failure

    def ship_round(self) -> None:
        """Send up to a second's worth of bytes; one round at a time (the loop's, or the shutdown's)."""
        with self._round:
            self._ship_streams()
            self._keep_backlog_bounded()

    def _ship_streams(self) -> None:
        """At most one chunk of each stream a round, within the second's budget: a chatty task cannot
        hold up the lines of the others, and a round takes one request per log at most."""
        budget = SHIP_BYTES_PER_SECOND
        with self._lock:
            streams = sorted(self._streams.values(), key=lambda s: s.key)
        for stream in streams:
            data = stream.read(min(MAX_LOG_CHUNK_BYTES, budget)) if budget > 0 else b""
            if not data:
                if stream.end is not None and not stream.unshipped():
                    self._forget(stream)  # all of it shipped (or nothing more can be read)
                continue
            if not self._ship(stream, data):
                return
            budget -= len(data)
            if stream.end is not None and not stream.unshipped():
                self._forget(stream)  # its end is there: what waited for it goes now

    def _ship(self, stream: _Stream, data: bytes) -> bool:
        """Send one chunk; False when the orchestrator cannot take any now (try again later)."""
        session_id = self.session_id()
        if session_id is None:
            return False
        job_id, attempt = stream.key
        try:
            reply = self.client.append_log(session_id, job_id, attempt, stream.shipped, data)
        except AgentApiError as err:
            if err.status_code in (401, 410):  # the worker registers again, or its token is gone
                self._back_off(str(err))
                return False
            log.warning(
                "Not shipping the log of job %s attempt %s: %s", job_id, attempt, err, **job_extra(job_id)
            )
            self._forget(stream)
            return True
        except Exception as err:  # noqa: BLE001 - unreachable, or an answer it cannot read: try later
            self._back_off(f"{type(err).__name__}: {err}")
            return False
        if self._failures:
            log.info("Shipping task logs again after %d failed tries", self._failures)
        self._failures, self._retry_at = 0, 0.0
        stream.shipped = reply.size
        if reply.truncated:
            log.warning(
                "The orchestrator holds the most log it takes for job %s attempt %s; the rest stays in %s",
                job_id,
                attempt,
                stream.path,
                **job_extra(job_id),
            )
            self._forget(stream)
        return True

    def _back_off(self, problem: str) -> None:
        self._failures += 1
        self._answers_at_failure = self.client.answers
        delay = min(MAX_RETRY_SECONDS, SHIP_EVERY_SECONDS * 2 ** (self._failures - 1))
        self._retry_at = self.clock() + delay
        if self._failures == 1 or self._failures % 10 == 0:
            log.warning(
                "Cannot ship task logs (%s); %d bytes wait on disk, next try in %.0f s",
                problem,
                self.pending_bytes(),
                delay,
            )

    def _forget(self, stream: _Stream) -> None:
        """Stop following ``stream`` (done, given up or replaced), and run what waited for it."""
        with self._lock:
            if self._streams.get(stream.key) is stream:
                del self._streams[stream.key]
            then, stream.then = stream.then, None
        try:
            stream.close()
        finally:
            if then is not None:
                _run(then)

    def _keep_backlog_bounded(self) -> None:
        """Past the cap on what ended attempts still have to send, give up the largest rest first. The
        logs of running tasks do not count: Airflow writes them to their files whatever the agent does,
        and one chatty task must not cost the others their logs."""
        with self._lock:
            ended = sorted(
                (s for s in self._streams.values() if s.end is not None), key=lambda s: -s.unshipped()
            )
        excess = sum(s.unshipped() for s in ended) - self.backlog_max_bytes
        for stream in ended:
            if excess <= 0:
                break
            left = stream.unshipped()
            log.error(
                "Task log backlog over %d bytes: giving up the last %d bytes of the log of job %s attempt "
                "%s, kept in %s",
                self.backlog_max_bytes,
                left,
                *stream.key,
                stream.path,
                **job_extra(stream.key.job_id),
            )
            self._forget(stream)
            excess -= left
