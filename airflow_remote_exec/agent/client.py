"""HTTP client for the agent API: token auth, API version header, retries with backoff."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from airflow_remote_exec.api.datamodels import (
    API_VERSION,
    API_VERSION_HEADER,
    ClaimedJob,
    ClaimRequest,
    ClaimResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    HeldJob,
    RegisterRequest,
    RegisterResponse,
    StateReport,
)

log = logging.getLogger(__name__)

URL_PREFIX = "/remote/v1"
MAX_BACKOFF_SECONDS = 30.0


class AgentApiError(Exception):
    """The orchestrator refused a request; retrying the same request will not help."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class Unauthorized(AgentApiError):
    """401: the token is unknown, expired or revoked."""


class SessionGone(AgentApiError):
    """410: this agent session is over (e.g. declared lost); register again."""


class Stopped(Exception):
    """The agent is shutting down and gave up waiting for the orchestrator."""


_ERRORS = {401: Unauthorized, 410: SessionGone}


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        detail = body.get("detail", body) if isinstance(body, dict) else body
    except ValueError:
        detail = response.text
    return str(detail)[:500]


class AgentClient:
    def __init__(self, api_url: str, token: str, stop: threading.Event | None = None):
        self.api_url = api_url.rstrip("/")
        self._stop = stop or threading.Event()
        self._http = httpx.Client(
            base_url=self.api_url + URL_PREFIX,
            headers={"Authorization": f"Bearer {token}", API_VERSION_HEADER: API_VERSION},
            timeout=httpx.Timeout(15.0),
        )

    def close(self) -> None:
        self._http.close()

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        read_timeout: float | None = None,
        keep_trying: Callable[[], bool] | None = None,
    ) -> Any:
        """Send one request, retrying with jittered backoff while the orchestrator is unreachable.

        ``keep_trying`` decides whether to go on retrying; by default until the agent stops.
        """
        # Requests bound to the agent's life stop retrying, and stop sleeping, once it stops.
        sleep = self._stop.wait if keep_trying is None else time.sleep
        keep_trying = keep_trying or (lambda: not self._stop.is_set())
        payload = body.model_dump(mode="json") if body is not None else None
        timeout = httpx.Timeout(15.0, read=read_timeout) if read_timeout else httpx.USE_CLIENT_DEFAULT
        backoff, failures = 0.5, 0
        while True:
            try:
                response = self._http.request(method, path, json=payload, timeout=timeout)
                if response.status_code < 500 and response.status_code != 429:
                    break
                problem = f"HTTP {response.status_code}: {_detail(response)}"
            except httpx.TransportError as err:
                problem = f"{type(err).__name__}: {err}"
            failures += 1
            if not keep_trying():
                raise Stopped(problem)
            delay = min(MAX_BACKOFF_SECONDS, backoff) * random.uniform(0.8, 1.2)
            log.warning("Orchestrator unreachable (%s), try %d; retrying in %.1fs", problem, failures, delay)
            sleep(delay)
            backoff *= 2
        if failures:
            log.info("Orchestrator reachable again after %d failed tries", failures)
        if response.is_success:
            return response.json() if response.content else None
        error = _ERRORS.get(response.status_code, AgentApiError)
        raise error(response.status_code, _detail(response))

    def register(self, request: RegisterRequest) -> RegisterResponse:
        return RegisterResponse.model_validate(self._call("POST", "/agents", request))

    def heartbeat(self, session_id: str, request: HeartbeatRequest) -> HeartbeatResponse:
        data = self._call("POST", f"/agents/{session_id}/heartbeat", request, keep_trying=lambda: False)
        return HeartbeatResponse.model_validate(data)

    def claim(self, session_id: str, free_slots: int, wait_seconds: float) -> list[ClaimedJob]:
        request = ClaimRequest(free_slots=free_slots, wait_seconds=wait_seconds)
        data = self._call(
            "POST", f"/agents/{session_id}/jobs/claim", request, read_timeout=wait_seconds + 15.0
        )
        return ClaimResponse.model_validate(data).jobs

    def report(
        self, session_id: str, job: HeldJob, report: StateReport, keep_trying: Callable[[], bool]
    ) -> None:
        self._call("POST", f"/agents/{session_id}/jobs/{job.job_id}/state", report, keep_trying=keep_trying)

    def deregister(self, session_id: str) -> None:
        self._call("DELETE", f"/agents/{session_id}", keep_trying=lambda: False)
