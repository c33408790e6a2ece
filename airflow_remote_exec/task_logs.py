"""Task logs that agents ship to the orchestrator: how they are stored, and how Airflow reads them.

An agent appends the bytes of each task log file as it grows (``api/logs.py``). The orchestrator keeps
them in the database, which every api-server shares, so the log of a task is served while it runs,
after it ends and after its agent and its disk are gone. Airflow's log reader gets them through two
seams: ``RemoteExecutor.get_task_log`` while the task runs (as for Kubernetes pods), and, in every
state, ``ShippedLogIO``, the remote-log handler of ``airflow_remote_exec.logging_config``.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import bindparam, delete, insert, or_, select, update
from sqlalchemy.orm import Session

from airflow_remote_exec.models import JobKind, JobState, RemoteJob, RemoteLogChunk, RemoteLogStream

if TYPE_CHECKING:
    from airflow_remote_exec.api.auth import AgentOfRequest

_stream, _chunk, _job = RemoteLogStream.__table__.c, RemoteLogChunk.__table__.c, RemoteJob.__table__.c

SOURCE = "remote-exec"  # how the log's source details name what agents shipped

# A stream for each task job just claimed, in the claim's transaction: the claiming agent may append
# to it from then on, even after the job row is purged or its next attempt runs elsewhere.
_OPEN_STREAMS = insert(RemoteLogStream.__table__).from_select(
    ["job_id", "attempt", "ti_id", "dag_id", "task_id", "run_id", "map_index", "try_number", "agent_name",
     "token_id", "size", "truncated", "created_at", "last_written_at"],
    select(
        _job.id, _job.attempt, _job.ti_id, _job.dag_id, _job.task_id, _job.run_id, _job.map_index,
        _job.try_number, _job.agent_name, bindparam("token_id"), bindparam("zero"), bindparam("no"),
        bindparam("now"), bindparam("now"),
    ).where(_job.id.in_(bindparam("job_ids", expanding=True)), _job.kind == JobKind.TASK),
)  # fmt: skip

_STREAM_OF_AGENT = (
    select(_stream.id, _stream.size, _stream.truncated)
    .where(
        _stream.job_id == bindparam("job"),
        _stream.attempt == bindparam("job_attempt"),
        _stream.agent_name == bindparam("agent"),
        _stream.token_id == bindparam("token"),
    )
    .order_by(_stream.id.desc())
    .limit(1)
    .with_for_update()
)


def open_streams(session: Session, agent: AgentOfRequest, job_ids: list[int], now: datetime) -> None:
    """Record that ``agent`` may ship the logs of the task jobs it just claimed."""
    if job_ids:
        params = {"job_ids": job_ids, "token_id": agent.token_id, "zero": 0, "no": False, "now": now}
        session.execute(_OPEN_STREAMS, params)


def drop_streams(session: Session, agent: AgentOfRequest, attempts: list[tuple[int, int]]) -> None:
    """The job attempts ``agent`` handed back without running them have no log: nobody may write one."""
    for job_id, attempt in attempts:
        ids = select(_stream.id).where(
            _stream.job_id == job_id, _stream.attempt == attempt, _stream.agent_name == agent.name
        )
        session.execute(delete(RemoteLogChunk.__table__).where(_chunk.stream_id.in_(ids)))
        session.execute(delete(RemoteLogStream.__table__).where(_stream.id.in_(ids.scalar_subquery())))


class Appended(NamedTuple):
    size: int  # bytes the orchestrator holds: the agent's next chunk starts there
    truncated: bool  # the stream reached ``[remote_exec] task_log_max_bytes``: send no more


class StreamNotFound(LookupError):
    pass


def append_chunk(
    session: Session,
    agent: AgentOfRequest,
    job_id: int,
    attempt: int,
    offset: int,
    data: bytes,
    max_bytes: int,
    now: datetime,
) -> Appended:
    """Append ``data``, which starts at ``offset`` of the stream, and return what the stream now holds.

    Idempotent: bytes the stream already holds (a chunk sent again after its answer was lost) are not
    stored twice. A chunk starting past the end would leave a hole: nothing is stored, and the answer
    says where the agent must resume.
    """
    params = {"job": job_id, "job_attempt": attempt, "agent": agent.name, "token": agent.token_id}
    row = session.execute(_STREAM_OF_AGENT, params).first()
    if row is None:
        raise StreamNotFound(job_id)
    stream_id, size, truncated = row
    new = data[size - offset :]
    if truncated or not new or offset > size:
        return Appended(size, truncated)
    room = max(0, max_bytes - size)
    if len(new) > room:
        new, truncated = new[:room], True
    if new:
        chunk = {"stream_id": stream_id, "offset": size, "data": new}
        session.execute(insert(RemoteLogChunk.__table__), chunk)
    size += len(new)
    session.execute(
        update(RemoteLogStream.__table__)
        .where(_stream.id == stream_id)
        .values(size=size, truncated=truncated, last_written_at=now)
    )
    return Appended(size, truncated)


class ShippedStream(NamedTuple):
    id: int
    agent_name: str
    attempt: int
    size: int
    truncated: bool

    def source(self) -> str:
        return f"{SOURCE}: agent {self.agent_name}, job attempt {self.attempt}, {self.size} bytes"


_TRUNCATED = (
    "The agent stopped shipping this log at [remote_exec] task_log_max_bytes ({size} bytes); the rest is "
    "in the task log file on agent {agent}."
)
# Chunks a reader holds at once: a log of any size is served in bounded memory.
READ_BATCH_CHUNKS = 16


def streams_of_try(
    session: Session, dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int
) -> list[ShippedStream]:
    """The shipped logs of one try that hold anything, one per job attempt, in the order they ran."""
    rows = session.execute(
        select(_stream.id, _stream.agent_name, _stream.attempt, _stream.size, _stream.truncated)
        .where(
            _stream.dag_id == dag_id,
            _stream.run_id == run_id,
            _stream.task_id == task_id,
            _stream.map_index == map_index,
            _stream.try_number == try_number,
            or_(_stream.size > 0, _stream.truncated),
        )
        .order_by(_stream.id)  # as opened: a purged job's next row starts its attempts at 1 again
    ).all()
    return [ShippedStream(*row) for row in rows]


def stream_lines(stream: ShippedStream) -> Iterator[str]:
    """The lines of one shipped log, read a batch of chunks at a time in a session of their own (the
    reader consumes them after the request's look-up is over)."""
    from airflow.utils.session import create_session

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    rest = ""
    with create_session(scoped=False) as session:
        chunks = session.execute(
            select(_chunk.data)
            .where(_chunk.stream_id == stream.id)
            .order_by(_chunk.offset)
            .execution_options(yield_per=READ_BATCH_CHUNKS)
        )
        for (data,) in chunks:
            *lines, rest = (rest + decoder.decode(data)).split("\n")
            yield from lines
    rest += decoder.decode(b"", final=True)
    if rest:
        yield rest
    if stream.truncated:
        event = _TRUNCATED.format(size=stream.size, agent=stream.agent_name)
        yield json.dumps({"event": event, "level": "warning", "logger": "remote_exec"})


def read_try(session: Session, dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int):
    """The text of each shipped log of one try (for tests and the executor's seam)."""
    streams = streams_of_try(session, dag_id, run_id, task_id, map_index, try_number)
    return [(stream, "".join(f"{line}\n" for line in stream_lines(stream))) for stream in streams]


def read_task_log(ti: Any, try_number: int) -> tuple[list[str], list[str]]:
    """Airflow's legacy log response (whole texts) for one try of ``ti``: what the executor's seam
    returns for a running task."""
    from airflow.utils.session import create_session

    with create_session(scoped=False) as session:
        logs = read_try(session, ti.dag_id, ti.run_id, ti.task_id, ti.map_index, try_number)
    return [stream.source() for stream, _ in logs], [text for _, text in logs]


def stream_task_log(ti: Any, try_number: int) -> tuple[list[str], list[Iterator[str]]]:
    """Airflow's streaming log response for one try of ``ti``: one line iterator per shipped log."""
    from airflow.utils.session import create_session

    with create_session(scoped=False) as session:
        streams = streams_of_try(session, ti.dag_id, ti.run_id, ti.task_id, ti.map_index, try_number)
    return [stream.source() for stream in streams], [stream_lines(stream) for stream in streams]


# Streams deleted per purge, so that the scheduler loop that runs it never waits long.
PURGE_BATCH = 500


def purge_streams(session: Session, written_before: datetime) -> None:
    """Delete streams whose last line is older than ``written_before``, a batch at a time; a quiet task
    still running keeps its log. They are locked first, so an agent's append waits and then finds its
    stream gone, never half of it; chunks go first (SQLite may not enforce the cascade)."""
    running = (
        select(_job.id)
        .where(_job.id == _stream.job_id, _job.attempt == _stream.attempt, _job.state.in_(JobState.HELD))
        .exists()
    )
    ids = session.scalars(
        select(_stream.id)
        .where(_stream.last_written_at < written_before, ~running)
        .limit(PURGE_BATCH)
        .with_for_update(skip_locked=True)
    ).all()
    if ids:
        session.execute(delete(RemoteLogChunk.__table__).where(_chunk.stream_id.in_(ids)))
        session.execute(delete(RemoteLogStream.__table__).where(_stream.id.in_(ids)))


def shipped_logs_are_remote_logging() -> bool:
    """Whether Airflow's log reader gets the shipped logs through ``ShippedLogIO``: then they are the
    durable copy, not only the live view of running tasks."""
    from airflow.logging_config import get_remote_task_log

    from airflow_remote_exec.logging_config import ShippedLogIO

    return isinstance(get_remote_task_log(), ShippedLogIO)


def another_remote_log_store() -> bool:
    """Whether Airflow's log reader gets finished tasks' logs from a store of the user's (S3, say)."""
    from airflow.logging_config import get_remote_task_log

    return get_remote_task_log() is not None and not shipped_logs_are_remote_logging()
