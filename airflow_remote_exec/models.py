"""The ``remote_*`` tables: agent tokens, agents, the jobs the executor hands to agents, and their logs.

They live in their own ``MetaData`` so Airflow's core schema checks never see them; the
``RemoteDBManager`` in ``db.py`` creates and migrates them during ``airflow db migrate``.
"""

from __future__ import annotations

from datetime import datetime, timezone

from airflow.models.base import _get_schema, naming_convention
from airflow.utils.sqlalchemy import UtcDateTime
from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.mysql import LONGBLOB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

metadata = MetaData(schema=_get_schema(), naming_convention=naming_convention)


# Row ids that never run out on Postgres; SQLite's rowid is its INTEGER PRIMARY KEY.
BIG_ID = BigInteger().with_variant(Integer, "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = metadata


class JobState:
    """Life of a job row: queued -> claimed -> running -> success | failed | not_started.

    As with Airflow's own executors, ``success`` means the supervisor returned (the task instance's
    state says how the task ended) and ``failed`` that the workload could not run to completion.
    ``not_started`` means Airflow refused to start this try (it is no longer queued, or runs
    elsewhere): the scheduler gets no event for it, since the task instance is not ours to judge.
    """

    QUEUED = "queued"
    CLAIMED = "claimed"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    NOT_STARTED = "not_started"

    FINISHED = (SUCCESS, FAILED, NOT_STARTED)
    HELD = (CLAIMED, RUNNING)  # an agent holds the job


class JobKind:
    TASK = "task"  # an ExecuteTask workload, keyed by its task instance
    CALLBACK = "callback"  # an ExecuteCallback workload (deadline alerts), keyed by its callback id
    CONNECTION_TEST = "connection_test"  # a TestConnection workload, keyed by its connection test id


class AgentState:
    REGISTERED = "registered"
    ACTIVE = "active"
    DRAINING = "draining"
    LOST = "lost"
    GONE = "gone"

    LIVE = (REGISTERED, ACTIVE, DRAINING)


class Component:
    """What an agent runs. A token names the components its agents may run; an agent names the ones it
    runs when it registers."""

    WORKER = "worker"  # claims and runs jobs
    DAG_PROCESSOR = "dag-processor"
    TRIGGERER = "triggerer"
    SENTINEL = "sentinel"

    ALL = (WORKER, DAG_PROCESSOR, TRIGGERER, SENTINEL)


class RemoteToken(Base):
    """An agent token. Only the SHA-256 of the secret is stored; the secret is shown once."""

    __tablename__ = "remote_token"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(250), unique=True, nullable=False)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    queues: Mapped[str] = mapped_column(String(2000), nullable=False)
    components: Mapped[str] = mapped_column(String(200), nullable=False, server_default=Component.WORKER)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    @property
    def queue_list(self) -> list[str]:
        return [q for q in self.queues.split(",") if q]

    @property
    def component_list(self) -> list[str]:
        return [c for c in self.components.split(",") if c]


class RemoteAgent(Base):
    """One agent process. ``session_id`` changes at every registration, which fences old sessions."""

    __tablename__ = "remote_agent"

    name: Mapped[str] = mapped_column(String(250), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(36), unique=True, nullable=False)
    token_id: Mapped[int] = mapped_column(Integer, ForeignKey("remote_token.id"), nullable=False)
    hostname: Mapped[str] = mapped_column(String(250), nullable=False, default="")
    pid: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    version: Mapped[str] = mapped_column(String(50), nullable=False, default="")
    # Airflow core on the agent; None for a session opened before this was recorded.
    airflow_version: Mapped[str | None] = mapped_column(String(50), nullable=True)
    queues: Mapped[str] = mapped_column(String(2000), nullable=False)
    components: Mapped[str] = mapped_column(String(200), nullable=False, server_default=Component.WORKER)
    slots: Mapped[int] = mapped_column(Integer, nullable=False)
    state: Mapped[str] = mapped_column(String(20), nullable=False)
    registered_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, nullable=False)
    last_heartbeat_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, nullable=False)
    state_changed_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, nullable=False)
    drain_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # A triggerer agent's session is an Airflow triggerer job: trigger rows name it as their triggerer,
    # and Airflow's own liveness (the job's heartbeat) decides when another triggerer takes them.
    triggerer_job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The last batch of trigger events applied for this agent: a batch sent again after its answer was
    # lost is not applied twice.
    last_event_batch: Mapped[str | None] = mapped_column(String(36), nullable=True)
    # A sentinel agent's last aggregate health report (JSON), and when it came.
    health: Mapped[str | None] = mapped_column(Text, nullable=True)
    health_reported_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    @property
    def queue_list(self) -> list[str]:
        return [q for q in self.queues.split(",") if q]

    def set_state(self, session: Session, state: str, reason: str = "", now: datetime | None = None) -> None:
        """Change state and record the transition, so ``agents history`` can show each one."""
        if self.state == state:
            return
        self.state = state
        self.state_changed_at = now or utcnow()
        session.add(
            RemoteAgentEvent(agent_name=self.name, state=state, at=self.state_changed_at, reason=reason)
        )


class RemoteAgentEvent(Base):
    """One state change of an agent: registered, active, draining, lost or gone."""

    __tablename__ = "remote_agent_event"
    __table_args__ = (
        Index("idx_remote_agent_event_agent", "agent_name", "at"),
        Index("idx_remote_agent_event_at", "at"),  # the purge of old history
    )

    id: Mapped[int] = mapped_column(BIG_ID, primary_key=True, autoincrement=True)
    agent_name: Mapped[str] = mapped_column(String(250), nullable=False)
    state: Mapped[str] = mapped_column(String(20), nullable=False)
    at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    reason: Mapped[str] = mapped_column(String(1000), nullable=False, default="")


class RemoteBundle(Base):
    """A DAG bundle parsed by agent dag processors, and the token whose agents may write its DAGs.

    A bundle belongs to the token that first claimed it while that token is valid: an agent of another
    token can neither publish DAGs under its name nor take over the DAG ids it defines.
    """

    __tablename__ = "remote_bundle"

    name: Mapped[str] = mapped_column(String(250), primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, ForeignKey("remote_token.id"), nullable=False)
    agent_name: Mapped[str] = mapped_column(String(250), nullable=False)  # the last to claim it
    claimed_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)


class RemoteApiServer(Base):
    """Presence of each api-server process serving the agent API.

    Agents can only heartbeat while an api-server is up; the executor declares an agent lost only
    if the agent API has been up for the whole silence window, so an api-server outage is never
    mistaken for dead agents.
    """

    __tablename__ = "remote_api_server"

    name: Mapped[str] = mapped_column(String(250), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)


class TaskTry:
    """The columns naming the try of a task instance a row is about."""

    dag_id: Mapped[str] = mapped_column(String(250), nullable=False)
    task_id: Mapped[str] = mapped_column(String(250), nullable=False)
    run_id: Mapped[str] = mapped_column(String(250), nullable=False)
    map_index: Mapped[int] = mapped_column(Integer, nullable=False)
    try_number: Mapped[int] = mapped_column(Integer, nullable=False)


class RemoteJob(TaskTry, Base):
    """One try of one task instance, waiting for, held by, or finished on an agent.

    ``attempt`` grows at every claim; an agent's report must carry the attempt it claimed, so a
    report from an agent the job was taken from can never be read as the current one.
    ``pending_sync`` marks rows whose state the executor has not yet passed to the scheduler.
    """

    __tablename__ = "remote_job"
    __table_args__ = (
        UniqueConstraint("dag_id", "task_id", "run_id", "map_index", "try_number", name="remote_job_ti_key"),
        Index("idx_remote_job_sync", "pending_sync"),
        Index("idx_remote_job_agent", "agent_name", "state"),  # the jobs an agent holds
        Index("idx_remote_job_finished", "finished_at"),  # the purge reads only rows past retention
    )

    id: Mapped[int] = mapped_column(BIG_ID, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(20), nullable=False, default=JobKind.TASK)
    # The task instance id, or for a callback the callback id.
    ti_id: Mapped[str] = mapped_column(String(36), nullable=False)
    queue: Mapped[str] = mapped_column(String(256), nullable=False)
    priority_weight: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    pool_slots: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    state: Mapped[str] = mapped_column(String(20), nullable=False)
    workload: Mapped[str] = mapped_column(Text, nullable=False)
    agent_name: Mapped[str | None] = mapped_column(String(250), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # The claim request that took the job: a claim re-sent after its response was lost gets it back.
    claim_request_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    pending_sync: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    queued_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, nullable=False)
    # The scheduler job whose executor queued (or adopted) the row: only that one reports it.
    queued_by_job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Fencing across agents: a job taken from a lost agent while running carries ``fenced_until``;
    # the next try of the same task may not be claimed before it (``not_before``), which gives the
    # old try's supervisor time to learn from Airflow that its try is over and stop.
    fenced_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    not_before: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


# A claim reads the first queued jobs of its queues in priority order, oldest first among equals: in
# the index's own order, so it reads a few rows however many are queued rather than sorting them all.
Index(
    "idx_remote_job_claim",
    RemoteJob.state,
    RemoteJob.queue,
    RemoteJob.priority_weight.desc(),
    RemoteJob.id,
)


class RemoteLogStream(TaskTry, Base):
    """The task log one agent writes for one attempt of a job, shipped to the orchestrator as it grows.

    A task that defers or reschedules runs again as the job's next attempt (or, once the finished job
    row was purged, as attempt 1 of a new row), perhaps on another agent, so the log of a try is its
    streams in the order they were opened. A stream outlives its job row: it records who may append to
    it, the agent's name and token, from the claim on.
    """

    __tablename__ = "remote_log_stream"
    __table_args__ = (
        Index("idx_remote_log_stream_try", "dag_id", "run_id", "task_id", "map_index", "try_number"),
        Index("idx_remote_log_stream_job", "job_id", "attempt"),
        Index("idx_remote_log_stream_written", "last_written_at"),  # the purge
    )

    id: Mapped[int] = mapped_column(BIG_ID, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(BIG_ID, nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    ti_id: Mapped[str] = mapped_column(String(36), nullable=False)
    agent_name: Mapped[str] = mapped_column(String(250), nullable=False)
    token_id: Mapped[int] = mapped_column(Integer, nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)  # bytes held, in order
    truncated: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    last_written_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)


class RemoteLogChunk(Base):
    """``data`` is the stream's bytes from ``offset`` on: a stream is its chunks in offset order."""

    __tablename__ = "remote_log_chunk"

    stream_id: Mapped[int] = mapped_column(
        BIG_ID,
        ForeignKey("remote_log_stream.id", ondelete="CASCADE"),
        primary_key=True,
    )
    offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # MySQL's plain BLOB holds 64 KiB, less than a chunk.
    data: Mapped[bytes] = mapped_column(LargeBinary().with_variant(LONGBLOB(), "mysql"), nullable=False)
