"""The agent API's database work runs on at most ``[remote_exec] api_db_threads`` threads, whatever the
number of requests, and a request that cannot get one in time is answered 503 without running."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi import HTTPException

from airflow_remote_exec import config
from airflow_remote_exec.api import agents, db_threads, jobs
from tests.api.conftest import AGENT_VERSIONS, headers

SESSION = "0f3e9a52-5d3c-4c1e-9f0e-3b1d2a4c5e6f"
AGENT = {"name": "a", "queues": ["default"], "slots": 1, **AGENT_VERSIONS}
THREADS = 3
REQUESTS = 3 * THREADS


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
        time.sleep(0.3)
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
    monkeypatch.setattr(config, "api_db_threads", lambda: THREADS)

    def call(_: int) -> int:
        kwargs = {"headers": headers("some-token")}
        if body is not None:
            kwargs["json"] = body
        return client.request(method, path, **kwargs).status_code

    with ThreadPoolExecutor(REQUESTS) as pool:
        statuses = list(pool.map(call, range(REQUESTS)))

    assert statuses == [409] * REQUESTS
    assert overlap.calls == REQUESTS
    assert overlap.most == THREADS


def test_a_request_that_gets_no_thread_in_time_is_503_and_never_runs(client, monkeypatch):
    release, calls = threading.Event(), []

    def stuck(*args: object) -> None:
        calls.append(args)
        release.wait(10)  # a lock wait, a dead connection
        raise HTTPException(409, "stand-in")

    monkeypatch.setattr(jobs, "_apply", stuck)
    monkeypatch.setattr(config, "api_db_threads", lambda: 1)
    monkeypatch.setattr(db_threads, "SLOT_WAIT_SECONDS", 0.5)
    path, body = f"/agents/{SESSION}/jobs/reports", {"reports": []}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, path, json=body, headers=headers("some-token"))
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        second = client.post(path, json=body, headers=headers("some-token"))
        release.set()
        assert first.result(timeout=10).status_code == 409
    assert second.status_code == 503
    assert second.headers["Retry-After"] == "1"
    assert "database threads" in second.json()["detail"]
    assert len(calls) == 1


def test_the_api_threads_never_wait_for_the_shared_pool_of_other_routes(monkeypatch):
    """Airflow's own sync routes share anyio's default pool; when those threads are all stuck, the
    agent API's database work still runs."""
    import anyio
    import anyio.to_thread

    async def main() -> int:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1
        stuck = threading.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(anyio.to_thread.run_sync, stuck.wait)  # the shared pool's only thread
            await anyio.sleep(0.1)
            try:
                with anyio.fail_after(5):
                    return await db_threads.run_db(lambda: 7)
            finally:
                stuck.set()

    assert anyio.run(main) == 7


def test_each_event_loop_keeps_its_own_limiter_while_another_loop_runs_work():
    """A second loop (a second test client, say) must not hand the first a fresh set of threads."""
    import asyncio

    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:

        async def limiters():
            return db_threads._limiters_of_loop()

        mine = first.run_until_complete(limiters())
        second.run_until_complete(limiters())
        assert all(
            again is before for again, before in zip(first.run_until_complete(limiters()), mine, strict=True)
        )
    finally:
        first.close()
        second.close()


def _fill_a_lane_then_report(client, monkeypatch, module, work: str, threads: int, send) -> list[int]:
    """Hold every thread of a lane with slow ``module.work`` calls made by ``send()`` (one more than
    the lane has threads), send a report meanwhile, and return the statuses of the held calls. The
    report must run: a lane never takes the threads of another."""
    release, working = threading.Event(), []

    def slow(*args: object) -> None:
        working.append(args)
        release.wait(10)
        raise HTTPException(409, "stand-in")

    def report(*args: object) -> None:
        raise HTTPException(409, "report ran")

    monkeypatch.setattr(module, work, slow)
    monkeypatch.setattr(jobs, "_apply", report)
    monkeypatch.setattr(config, "api_db_threads", lambda: 1)
    monkeypatch.setattr(db_threads, "SLOT_WAIT_SECONDS", 0.5)
    with ThreadPoolExecutor(threads + 1) as pool:
        calls = [pool.submit(send) for _ in range(threads + 1)]
        deadline = time.monotonic() + 10
        while len(working) < threads and time.monotonic() < deadline:
            time.sleep(0.01)
        reply = client.post(
            f"/agents/{SESSION}/jobs/reports", json={"reports": []}, headers=headers("some-token")
        )
        time.sleep(2 * db_threads.SLOT_WAIT_SECONDS)  # the call without a thread gives up meanwhile
        release.set()
        statuses = sorted(c.result(timeout=10).status_code for c in calls)
    assert reply.json()["detail"] == "report ran"
    return statuses


def test_dag_processor_work_never_takes_the_threads_claims_and_reports_need(client, monkeypatch, make_token):
    """Parsing results persist on threads of their own: with those all busy, a report still runs."""
    from airflow_remote_exec.api import dag_processing

    result = {"relative_fileloc": "a.py", "run_duration": 0.1, "result": {}, "sources": {}}
    upload = f"/agents/{SESSION}/dag-processor/bundles/b/parsing-results"
    token = make_token("parser", components=["dag-processor"])
    statuses = _fill_a_lane_then_report(
        client, monkeypatch, dag_processing, "_persist", db_threads.PARSING_THREADS,
        lambda: client.post(upload, json=result, headers=headers(token)),
    )  # fmt: skip
    assert statuses == [409] * db_threads.PARSING_THREADS + [503]  # the parsing lane's own limit


def test_log_chunks_never_take_the_threads_heartbeats_claims_and_reports_need(client, monkeypatch):
    """A flood of log lines waits on the log lane's own threads; a report still runs."""
    from airflow_remote_exec.api import logs

    put = f"/agents/{SESSION}/jobs/1/log"
    octets = {**headers("some-token"), "Content-Type": "application/octet-stream"}
    statuses = _fill_a_lane_then_report(
        client, monkeypatch, logs, "_append", db_threads.LOG_THREADS,
        lambda: client.put(put, params={"attempt": 1, "offset": 0}, content=b"x\n", headers=octets),
    )  # fmt: skip
    assert statuses == [409] * db_threads.LOG_THREADS + [503]  # the log lane's own limit
