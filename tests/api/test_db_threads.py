"""The agent API's database work runs on at most DB_THREADS threads, whatever the number of requests."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi import HTTPException

from airflow_remote_exec.api import agents, jobs
from airflow_remote_exec.api.db_threads import DB_THREADS
from tests.api.conftest import AGENT_VERSIONS, headers

SESSION = "0f3e9a52-5d3c-4c1e-9f0e-3b1d2a4c5e6f"
AGENT = {"name": "a", "queues": ["default"], "slots": 1, **AGENT_VERSIONS}
REQUESTS = 3 * DB_THREADS


class Overlap:
    """Stands in for a route's database function: records how many run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, *args: object) -> None:
        with self._lock:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
        time.sleep(0.1)
        with self._lock:
            self.running -= 1
        raise HTTPException(409, "stand-in")


@pytest.mark.parametrize(
    "module, function, method, path, body",
    [
        (jobs, "_apply", "post", f"/agents/{SESSION}/jobs/reports", {"reports": []}),
        (jobs, "_apply", "post", f"/agents/{SESSION}/jobs/1/state", {"attempt": 1, "state": "running"}),
        (jobs, "claim_jobs", "post", f"/agents/{SESSION}/jobs/claim", {"free_slots": 1, "wait_seconds": 0}),
        (agents, "_register", "post", "/agents", AGENT),
        (agents, "_deregister", "delete", f"/agents/{SESSION}", None),
    ],
    ids=["reports", "one report", "claim", "register", "deregister"],
)
def test_database_work_of_many_requests_runs_on_the_api_threads_only(
    client, monkeypatch, module, function, method, path, body
):
    overlap = Overlap()
    monkeypatch.setattr(module, function, overlap)

    def call(_: int) -> int:
        kwargs = {"headers": headers("some-token")}
        if body is not None:
            kwargs["json"] = body
        return client.request(method, path, **kwargs).status_code

    with ThreadPoolExecutor(REQUESTS) as pool:
        statuses = list(pool.map(call, range(REQUESTS)))

    assert statuses == [409] * REQUESTS
    assert overlap.calls == REQUESTS
    assert overlap.most == DB_THREADS
