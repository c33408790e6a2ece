"""Request and response bodies of the agent API, shared by the api-server and the agent client."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

API_VERSION = "1"
API_VERSION_HEADER = "Remote-Exec-Api-Version"
SUPPORTED_API_VERSIONS = frozenset({"1"})

_NAME = r"^[A-Za-z0-9_.:\-]{1,250}$"


class RegisterRequest(BaseModel):
    name: str = Field(pattern=_NAME, description="Agent name, unique among live agents.")
    hostname: str = Field(default="", max_length=250)
    version: str = Field(default="", max_length=50)
    queues: list[str] = Field(min_length=1, max_length=100)
    slots: int = Field(ge=1, le=1024)


class RegisterResponse(BaseModel):
    session_id: str
    heartbeat_interval: int
    claim_wait_seconds: int


class HeldJob(BaseModel):
    job_id: int
    attempt: int


class HeartbeatRequest(BaseModel):
    running: list[HeldJob] = Field(default_factory=list, max_length=1024)
    free_slots: int = Field(ge=0, le=1024)
    draining: bool = False


class HeartbeatResponse(BaseModel):
    state: str
    stop: list[int] = Field(
        default_factory=list, description="Jobs the agent must stop: not its own any more."
    )


class ClaimRequest(BaseModel):
    free_slots: int = Field(ge=1, le=1024)
    wait_seconds: float = Field(default=0, ge=0, le=60)


class ClaimedJob(BaseModel):
    job_id: int
    attempt: int = Field(description="Fencing token: every report on this job must carry it.")
    pool_slots: int
    workload: str = Field(description="The ExecuteTask workload as JSON, token included.")


class ClaimResponse(BaseModel):
    jobs: list[ClaimedJob]


class StateReport(BaseModel):
    attempt: int
    state: Literal["running", "success", "failed"]
    exit_code: int | None = None
    detail: str | None = Field(default=None, max_length=1000)
