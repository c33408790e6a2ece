"""HTTP client for the agent API: token auth, API version header, retries with backoff."""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from airflow_remote_exec.api.datamodels import (
    API_VERSION,
    API_VERSION_HEADER,
    LOG_CONTENT_TYPE,
    ClaimRequest,
    ClaimResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    JobReport,
    LogChunkResponse,
    RefusedReport,
    RegisterRequest,
    RegisterResponse,
    ReportsRequest,
    ReportsResponse,
)

if TYPE_CHECKING:
    from airflow_remote_exec.agent.metrics import AgentMetrics

log = logging.getLogger(__name__)

URL_PREFIX = "/remote/v1"
MAX_BACKOFF_SECONDS = 30.0
STOP_CHECK_SECONDS = 0.2  # how soon a backoff notices that the agent stops
# Connect/read/write limit for ordinary calls: the API answers in milliseconds when healthy, and a
# call stuck longer than this is better retried on a fresh connection.
DEFAULT_TIMEOUT_SECONDS = 15.0
# A heartbeat is tried at most this many times, back to back: one immediate retry rides out a dropped
# connection or a restarting api-server without letting the heartbeat slip past its interval.
HEARTBEAT_TRIES = 2


class AgentApiError(Exception):
    """The orchestrator refused a request; retrying the same request will not help."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class Unauthorized(AgentApiError):
    """401: the token is unknown, expired or revoked."""


class Conflict(AgentApiError):
    """409: the agent name is held by another live agent (register), or the attempt is stale (report)."""


class SessionGone(AgentApiError):
    """410: this agent session is over (e.g. declared lost); register again."""


class VersionMismatch(AgentApiError):
    """426: this agent's Airflow or Task SDK major.minor differs from the orchestrator's."""


class Unreachable(Exception):
    """The orchestrator did not answer (transport error, timeout, 5xx) within the allowed tries."""


class Stopped(Unreachable):
    """The agent is shutting down and gave up waiting for the orchestrator."""


_ERRORS = {401: Unauthorized, 409: Conflict, 410: SessionGone, 426: VersionMismatch}


def _foreign_401(response: httpx.Response) -> bool:
    """A 401 that is not the agent API's own verdict on our token (an ingress or SSO proxy in the
    way, say): no reason to stop, so it is retried like an unreachable orchestrator."""
    if response.status_code != 401:
        return False
    ours = response.headers.get("WWW-Authenticate", "").lower().startswith("bearer")
    try:
        ours = ours and isinstance(response.json().get("detail"), str)
    except (ValueError, AttributeError):
        ours = False
    return not ours


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        detail = body.get("detail", body) if isinstance(body, dict) else body
    except ValueError:
        detail = response.text
    return str(detail)[:500]


class AgentClient:
    def __init__(
        self,
        api_url: str,
        token: str,
        stop: threading.Event | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        metrics: AgentMetrics | None = None,
    ):
        self.api_url = api_url.rstrip("/")
        self.metrics = metrics  # every try of every request is timed and counted into it, if given
        self._stop = stop or threading.Event()
        # Counts answers from the agent API: a retry waiting out its backoff goes at once when another
        # request gets through (the orchestrator is back), so outcomes are not held back after an outage.
        self._answers = 0
        self._answered = threading.Condition()
        self._http = httpx.Client(
            base_url=self.api_url + URL_PREFIX,
            headers={"Authorization": f"Bearer {token}", API_VERSION_HEADER: API_VERSION},
            timeout=httpx.Timeout(DEFAULT_TIMEOUT_SECONDS),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: httpx.Timeout | None = None,
        keep_trying: Callable[[], bool] | None = None,
        max_tries: int | None = None,
        backoff: bool = True,
        content: bytes | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Send one request, retrying while the orchestrator is unreachable (transport error, 5xx, 429).

        ``keep_trying`` decides whether to go on retrying; by default until the agent stops.
        ``max_tries`` caps the tries; ``backoff=False`` retries at once instead of after a jittered,
        growing delay. The same payload is re-sent each time, so a retried request must be idempotent.
        ``content`` is sent as raw bytes instead of a JSON ``body``.
        """
        # Requests bound to the agent's life stop retrying, and stop sleeping, once it stops.
        bound_to_life = keep_trying is None
        keep_trying = keep_trying or (lambda: not self._stop.is_set())
        payload = body.model_dump(mode="json") if body is not None else None
        delay_base, failures = 0.5, 0
        while True:
            started = time.monotonic()
            try:
                response = self._http.request(
                    method,
                    path,
                    json=payload,
                    content=content,
                    params=params,
                    headers={"Content-Type": LOG_CONTENT_TYPE} if content is not None else None,
                    timeout=timeout or httpx.USE_CLIENT_DEFAULT,
                )
                self._observe(method, path, response.status_code, started)
                if response.status_code < 500 and response.status_code != 429 and not _foreign_401(response):
                    self._note_answer()
                    break
                problem = f"HTTP {response.status_code}: {_detail(response)}"
            except httpx.TransportError as err:
                self._observe(method, path, "error", started)
                problem = f"{type(err).__name__}: {err}"
            failures += 1
            if (max_tries is not None and failures >= max_tries) or not keep_trying():
                raise (Stopped if self._stop.is_set() else Unreachable)(problem)
            if not backoff:
                log.info("Orchestrator unreachable (%s), try %d; retrying now", problem, failures)
                continue
            delay = min(MAX_BACKOFF_SECONDS, delay_base) * random.uniform(0.8, 1.2)
            log.warning("Orchestrator unreachable (%s), try %d; retrying in %.1fs", problem, failures, delay)
            self._pause(delay, bound_to_life)
            delay_base *= 2
        if failures:
            log.info("Orchestrator reachable again after %d failed tries", failures)
        if response.is_success:
            return response.json() if response.content else None
        error = _ERRORS.get(response.status_code, AgentApiError)
        raise error(response.status_code, _detail(response))

    def _observe(self, method: str, path: str, status: int | str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_request(method, path, status, time.monotonic() - started)

    @property
    def answers(self) -> int:
        """How many answers the agent API gave so far: a caller backing off on its own can tell when the
        orchestrator is back."""
        return self._answers

    def _note_answer(self) -> None:
        with self._answered:
            self._answers += 1
            self._answered.notify_all()

    def _pause(self, seconds: float, bound_to_life: bool) -> None:
        """Wait before a retry: ``seconds``, or less if another request gets an answer meanwhile, or
        (for a request bound to the agent's life) the agent stops."""
        deadline = time.monotonic() + seconds
        with self._answered:
            seen = self._answers
            while self._answers == seen and not (bound_to_life and self._stop.is_set()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._answered.wait(min(left, STOP_CHECK_SECONDS))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: httpx.Timeout | None = None,
        max_tries: int | None = None,
    ) -> Any:
        """Any other route under ``/remote/v1``: retried while the orchestrator is unreachable (at most
        ``max_tries`` times if given)."""
        return self._call(method, path, body, timeout=timeout, max_tries=max_tries)

    def register(self, request: RegisterRequest) -> RegisterResponse:
        """Register once; retries only while unreachable. 409 and 426 are the caller's to handle."""
        return RegisterResponse.model_validate(self._call("POST", "/agents", request))

    def heartbeat(self, session_id: str, request: HeartbeatRequest, interval: float) -> HeartbeatResponse:
        """One heartbeat: each try is limited to half the interval and a failed try is retried once at
        once, so the pair never delays the next heartbeat, which is due one interval after this one."""
        data = self._call(
            "POST",
            f"/agents/{session_id}/heartbeat",
            request,
            timeout=httpx.Timeout(interval / 2),
            keep_trying=lambda: True,
            max_tries=HEARTBEAT_TRIES,
            backoff=False,
        )
        return HeartbeatResponse.model_validate(data)

    def claim(
        self, session_id: str, free_slots: int, wait_seconds: float, reports: Sequence[JobReport] = ()
    ) -> ClaimResponse:
        """Long-poll for jobs, delivering ``reports`` first. A fresh ``request_id`` per claim makes its
        retries idempotent: a claim re-sent after its response was lost gets the same jobs back
        instead of stranding them, and its reports count once."""
        request = ClaimRequest(
            free_slots=free_slots,
            wait_seconds=wait_seconds,
            request_id=str(uuid.uuid4()),
            reports=list(reports),
        )
        data = self._call(
            "POST",
            f"/agents/{session_id}/jobs/claim",
            request,
            timeout=httpx.Timeout(DEFAULT_TIMEOUT_SECONDS, read=wait_seconds + DEFAULT_TIMEOUT_SECONDS),
        )
        return ClaimResponse.model_validate(data)

    def report_many(
        self, session_id: str, reports: Sequence[JobReport], keep_trying: Callable[[], bool]
    ) -> list[RefusedReport]:
        """Deliver reports in one request; returns those the orchestrator refused."""
        data = self._call(
            "POST",
            f"/agents/{session_id}/jobs/reports",
            ReportsRequest(reports=list(reports)),
            keep_trying=keep_trying,
        )
        return ReportsResponse.model_validate(data).refused

    def append_log(
        self, session_id: str, job_id: int, attempt: int, offset: int, data: bytes
    ) -> LogChunkResponse:
        """Ship ``data``, the bytes of a job attempt's log from ``offset`` on. Tried once: the log shipper
        keeps the bytes and its own pace, so an unreachable orchestrator never holds it up."""
        reply = self._call(
            "PUT",
            f"/agents/{session_id}/jobs/{job_id}/log",
            content=data,
            params={"attempt": attempt, "offset": offset},
            keep_trying=lambda: False,
        )
        return LogChunkResponse.model_validate(reply)

    def deregister(self, session_id: str) -> None:
        self._call("DELETE", f"/agents/{session_id}", keep_trying=lambda: False)
