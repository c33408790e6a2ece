"""Request and response bodies of the agent API, shared by the api-server and the agent client."""

from __future__ import annotations

from datetime import datetime
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
    model_validator,
)

# 2 adds batched reports (on a claim too): an agent that sends them must not meet an orchestrator
# that would silently drop them, so it says 2, which an older orchestrator refuses. 1 still works.
API_VERSION = "2"
API_VERSION_HEADER = "Remote-Exec-Api-Version"
SUPPORTED_API_VERSIONS = frozenset({"1", "2"})

_NAME = r"^[A-Za-z0-9_.:\-]{1,250}$"
# What an agent says about itself is shown to operators: only the characters these values can hold.
_HOSTNAME = r"^[A-Za-z0-9_.:\-]{0,250}$"
_VERSION = r"^[A-Za-z0-9_.+!\-]{0,50}$"
_INT32 = 2**31 - 1  # every integer column is 32-bit: larger values are a 422, not a 500
DETAIL_MAX_CHARS = 1000

JobKind = Literal["task", "callback", "connection_test"]
ComponentName = Literal["worker", "dag-processor", "triggerer", "sentinel"]  # models.Component.ALL


class AgentRequest(BaseModel):
    """A body an agent sends: types are strict (``false`` is not ``0``), so a wrong type is a 422."""

    model_config = ConfigDict(strict=True)


class RegisterRequest(AgentRequest):
    name: str = Field(
        pattern=_NAME,
        description="Agent name, unique among live agents; it belongs to the token that registered it "
        "until that token is revoked or expires.",
    )
    hostname: str = Field(default="", pattern=_HOSTNAME)
    pid: int = Field(
        default=0, ge=0, le=_INT32, description="Process id: with hostname, tells a restart apart."
    )
    version: str = Field(
        default="", pattern=_VERSION, description="airflow-remote-exec version of the agent."
    )
    airflow_version: str = Field(pattern=_VERSION, description="Airflow core installed on the agent.")
    task_sdk_version: str = Field(pattern=_VERSION, description="Airflow Task SDK installed on the agent.")
    queues: list[str] = Field(
        max_length=100, description="Queues the agent's worker serves: at least one for a worker."
    )
    slots: int = Field(ge=1, le=1024)
    components: list[ComponentName] = Field(
        default=["worker"],
        min_length=1,
        max_length=4,
        description="What this agent runs; its token must allow each one.",
    )

    @model_validator(mode="after")
    def _worker_has_queues(self) -> RegisterRequest:
        if "worker" in self.components and not self.queues:
            raise ValueError("a worker needs at least one queue")
        return self


class RegisterResponse(BaseModel):
    session_id: str
    heartbeat_interval: int
    lost_after_missed_heartbeats: int = Field(
        description="The orchestrator declares the agent lost after this many missed heartbeats; the "
        "agent stops its own tasks one interval earlier, so a cut-off agent never overlaps a retry."
    )
    claim_wait_seconds: int
    executors: str = Field(
        default="",
        description="The orchestrator's [core] executor setting. Tasks parse their DAG file on the agent, "
        "and a task that names its executor (executor='RemoteExecutor') only parses where that name is "
        "configured, so the agent's runners use this list.",
    )


class HeldJob(AgentRequest):
    job_id: int = Field(ge=1, le=2**63 - 1)
    attempt: int = Field(ge=0, le=_INT32)


class HeartbeatRequest(AgentRequest):
    running: list[HeldJob] = Field(
        default_factory=list,
        max_length=1024,
        description="Every job the agent holds: running, or finished with its report not yet delivered.",
    )
    free_slots: int = Field(ge=0, le=1024)
    draining: bool = False


class HeartbeatResponse(BaseModel):
    state: str
    stop: list[HeldJob] = Field(
        default_factory=list, description="Jobs (with the attempt) the agent must stop: not its own any more."
    )


class ClaimedJob(BaseModel):
    job_id: int
    attempt: int = Field(description="Fencing token: every report on this job must carry it.")
    kind: JobKind = "task"
    pool_slots: int = Field(
        description="Agent slots the job takes: its pool_slots, at most the agent's slots."
    )
    workload: str = Field(
        description="The ExecuteTask, ExecuteCallback or TestConnection workload as JSON, token included."
    )


ReportedState = Literal["running", "success", "failed", "not_started", "returned"]


class StateReport(AgentRequest):
    """``success``: the supervisor returned (the task instance's own state says how the task ended);
    ``failed``: the workload could not run to completion (the runner died or raised);
    ``not_started``: Airflow refused to start this try (it runs elsewhere or is no longer queued);
    ``returned``: the agent cannot run this workload at all (it cannot read it); queue it again."""

    attempt: int = Field(ge=0, le=_INT32)
    state: ReportedState
    exit_code: int | None = Field(default=None, ge=-_INT32, le=_INT32)
    detail: str | None = None

    @field_validator("detail")
    @classmethod
    def _truncate(cls, value: str | None) -> str | None:
        """A long error message is cut, and NUL bytes (which Postgres cannot store) dropped: never a
        reason to refuse the report, which the agent would otherwise send again and again."""
        if value is None:
            return None
        value = value.replace("\x00", "")
        return value if len(value) <= DETAIL_MAX_CHARS else value[: DETAIL_MAX_CHARS - 1] + "…"


class JobReport(StateReport):
    """A state report in a batch: the job it is about, then the report."""

    job_id: int = Field(ge=1, le=2**63 - 1)


MAX_REPORTS = 256


class ReportsRequest(AgentRequest):
    reports: list[JobReport] = Field(
        default_factory=list,
        max_length=MAX_REPORTS,
        description="State reports, applied in order before anything else: on a claim, a final report "
        "frees its job's slots for this same claim.",
    )


class ClaimRequest(ReportsRequest):
    free_slots: int = Field(ge=0, le=1024, description="0 only with reports: deliver them, claim nothing.")
    wait_seconds: float = Field(default=0, ge=0, le=60)
    request_id: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9-]{0,36}$",
        description="Idempotency key: a claim re-sent after its response was lost returns the same jobs.",
    )

    @model_validator(mode="after")
    def _claims_or_reports(self) -> ClaimRequest:
        if self.free_slots == 0 and not self.reports:
            raise ValueError("free_slots must be at least 1, or reports must be given")
        return self


class RefusedReport(BaseModel):
    job_id: int
    attempt: int
    state: str
    status: int = Field(description="What the single-report route would have answered: 403, 404 or 409.")
    detail: str


class ReportsResponse(BaseModel):
    refused: list[RefusedReport] = Field(
        default_factory=list, description="Reports not applied, and why; every other report was."
    )


class ClaimResponse(ReportsResponse):
    jobs: list[ClaimedJob]


class ErrorResponse(BaseModel):
    detail: str = Field(description="What was wrong, in words an operator can act on.")


_ERROR_MEANINGS = {
    400: "Missing or unsupported API version header, or a body that is not JSON.",
    401: "Missing, unknown, expired or revoked agent token.",
    403: "Outside the token's scope: a queue, a component, an agent name, a session, a job of another "
    "agent, or a bundle of another token or of the orchestrator.",
    404: "No such job (revoked or purged), or no such route.",
    409: "A stale attempt, an impossible state change, a name in use by a live agent process, or a DAG "
    "id another bundle defines.",
    410: "The agent session is over: register again.",
    413: "The body is larger than the route accepts.",
    415: "The body is not of the content type the route takes.",
    426: "The agent's Airflow or Task SDK differs from the orchestrator's.",
}


def error_responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI entries for the errors a route can answer, so clients and fuzzers know them all."""
    return {code: {"model": ErrorResponse, "description": _ERROR_MEANINGS[code]} for code in codes}


# -- task logs ---------------------------------------------------------------------------------


LOG_CONTENT_TYPE = "application/octet-stream"
# One request carries at most this many bytes of log: a few seconds of a chatty task.
MAX_LOG_CHUNK_BYTES = 256 * 1024


class LogChunkResponse(BaseModel):
    """Where the stream stands after a chunk: the agent's next chunk starts at ``size``, whether this
    one was stored, had been stored already (a retry), or started past the end (nothing stored)."""

    size: int = Field(description="Bytes of the log the orchestrator holds, in order from the start.")
    truncated: bool = Field(
        description="The log reached [remote_exec] task_log_max_bytes: the orchestrator takes no more of it."
    )


# -- dag processor -----------------------------------------------------------------------------

BUNDLE_NAME = _NAME
MAX_FILES = 100_000  # DAG files of one bundle


def _relative_path(value: str) -> str:
    """A path inside a bundle: relative, without ``..``, NUL or backslashes (Airflow joins it to the
    bundle's path, and Postgres cannot store NUL)."""
    path = PurePosixPath(value)
    if not value or "\x00" in value or "\\" in value or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{value[:100]!r} is not a relative path inside the bundle")
    return value


RelativePath = Annotated[str, Field(min_length=1, max_length=2000)]


def _iso_text(value: object) -> object:
    """JSON carries a time as an ISO 8601 string: a number is not one (lax parsing would take it)."""
    if not isinstance(value, (str, datetime)):  # a datetime: built in Python by the agent itself
        raise ValueError("a time must be an ISO 8601 string")
    return value


IsoDatetime = Annotated[datetime, Field(strict=False), BeforeValidator(_iso_text)]


class BundlesClaim(AgentRequest):
    names: list[Annotated[str, Field(pattern=_NAME)]] = Field(min_length=1, max_length=100)


class BundleState(BaseModel):
    last_refreshed: datetime | None = None
    version: str | None = None


class BundleStateUpdate(AgentRequest):
    last_refreshed: IsoDatetime
    version: str | None = Field(default=None, max_length=200)


class ParsingResult(AgentRequest):
    """One parsed file of a bundle: what Airflow's dag processor persists, and the source text of the
    files its DAGs come from, which the orchestrator does not have."""

    bundle_version: str | None = Field(default=None, max_length=200)
    version_data: dict | None = Field(default=None, strict=False)
    relative_fileloc: RelativePath
    run_duration: float = Field(ge=0, le=86400)
    # Airflow's own model (it holds datetimes and lazily read DAGs, so not strict); checked further on
    # the server against this orchestrator's serialization schema.
    result: dict = Field(strict=False)
    sources: dict[RelativePath, str] = Field(default_factory=dict, max_length=1000)

    @field_validator("relative_fileloc")
    @classmethod
    def _inside_bundle(cls, value: str) -> str:
        return _relative_path(value)

    @field_validator("sources")
    @classmethod
    def _sources_inside_bundle(cls, value: dict[str, str]) -> dict[str, str]:
        for path in value:
            _relative_path(path)
        return value


class PresentFiles(AgentRequest):
    """The files a bundle holds after a refresh: DAGs of other files are deactivated, and their import
    errors cleared."""

    observed_filelocs: list[RelativePath] = Field(max_length=MAX_FILES)


class ParsedFiles(AgentRequest):
    """How long ago each file of the bundle was last parsed, in seconds: a DAG not seen in a parse of
    its file that ended ``stale_dag_threshold`` after the DAG's own last parse is gone from the file.
    Ages, not times: the orchestrator compares them with its own clock, never with the agent's."""

    seconds_since_parsed: dict[RelativePath, Annotated[float, Field(ge=0, le=10 * 365 * 86400)]] = Field(
        max_length=MAX_FILES
    )


class BundleNames(AgentRequest):
    """The bundles the asking agent parses: it gets only their callbacks and reparse requests (another
    agent of the token may parse others)."""

    bundles: list[Annotated[str, Field(pattern=_NAME)]] = Field(min_length=1, max_length=100)


class CallbacksResponse(BaseModel):
    callbacks: list[dict] = Field(
        description="Airflow CallbackRequest objects (DAG or task callbacks) for the token's bundles, "
        "as JSON; each is handed out once."
    )


class PriorityFilesResponse(BaseModel):
    files: list[dict[str, str]] = Field(
        description="Files users asked to reparse: bundle_name and relative_fileloc of each."
    )


# -- triggerer ----------------------------------------------------------------------------------------

TriggerId = Annotated[int, Field(ge=1, le=_INT32)]
MAX_TRIGGERS = 10_000  # the largest --capacity
MAX_TRIGGER_REPORTS = 1000
_UUID = r"^[0-9a-fA-F-]{36}$"


class TriggerSync(AgentRequest):
    """What a triggerer agent runs and can run: the orchestrator assigns it more triggers up to its
    capacity and answers with all its triggers, with the workload of each it does not know yet."""

    capacity: int = Field(ge=1, le=MAX_TRIGGERS)
    known: list[TriggerId] = Field(
        max_length=MAX_TRIGGERS,
        description="Triggers the agent runs, or has events or failures of that it has not reported yet.",
    )


class OfferedTrigger(BaseModel):
    workload: dict = Field(
        description="Airflow's RunTrigger workload; its kwargs are plain JSON (TLS protects them on the "
        "way), since the agent does not hold the orchestrator's Fernet key."
    )
    log_path: str | None = Field(description="The trigger's log file, relative to the agent's log folder.")


class TriggerAssignment(BaseModel):
    trigger_ids: list[int] = Field(description="Every trigger assigned to this agent: it cancels others.")
    new: list[OfferedTrigger]


class FiredEvent(AgentRequest):
    trigger_id: TriggerId
    kind: Literal["_event_", "success", "failed", "skipped"] = Field(
        description="A TriggerEvent (the task resumes on a worker), or the state a task ends in."
    )
    payload: JsonValue = Field(default=None, description="Airflow's BaseSerialization JSON.")
    xcoms: dict[str, JsonValue] | None = None


class TriggerFailure(AgentRequest):
    trigger_id: TriggerId
    traceback: list[Annotated[str, Field(max_length=100_000)]] | None = Field(default=None, max_length=1000)


class TriggerReports(AgentRequest):
    """Events and failures of the agent's triggers. A batch is applied once: sent again with the same
    ``batch_id`` (its answer was lost), it changes nothing."""

    batch_id: str = Field(pattern=_UUID)
    events: list[FiredEvent] = Field(default_factory=list, max_length=MAX_TRIGGER_REPORTS)
    failures: list[TriggerFailure] = Field(default_factory=list, max_length=MAX_TRIGGER_REPORTS)


class TriggerReportsResponse(BaseModel):
    refused: list[int] = Field(
        description="Triggers not assigned to this agent any more (another triggerer runs them): their "
        "events and failures were not applied."
    )


# -- queue depth -------------------------------------------------------------------------------


class QueueDepth(BaseModel):
    queued: int = Field(description="Jobs waiting for an agent.")
    running: int = Field(description="Jobs an agent holds: claimed or running.")
    slots: int = Field(description="The pool_slots of those jobs: the worker slots they take.")


class QueueDepthResponse(BaseModel):
    """Queued plus running: what a worker group needs now. KEDA reads ``slots``."""

    queued: int
    running: int
    depth: int = Field(description="queued + running, over all the queues asked about.")
    slots: int = Field(
        description="The pool_slots of those jobs, added up: what a worker group with several slots per "
        "agent scales on (a job wider than an agent still takes a whole agent)."
    )
    queues: dict[str, QueueDepth] = Field(description="The same per queue.")


# -- sentinel ----------------------------------------------------------------------------------


class ComponentHealth(AgentRequest):
    healthy: bool
    detail: str = Field(
        default="", max_length=500, pattern=r"^[\x20-\x7e]*$", description="Why not, in a few words."
    )


class SentinelReport(AgentRequest):
    """What a sentinel saw of the components it watches, each probed from outside."""

    components: dict[Annotated[str, Field(pattern=_NAME)], ComponentHealth] = Field(
        min_length=1, max_length=100
    )


class SentinelReply(BaseModel):
    report_every_seconds: int = Field(description="When to send the next report: the orchestrator's cadence.")
