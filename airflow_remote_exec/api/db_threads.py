"""The agent API's database work runs on at most a few threads at once, whatever the thread pool that
every synchronous route of the api-server shares is doing.

Why: that work is short statements under Python's global interpreter lock. Forty threads of the shared
pool, each holding a pooled connection, spend the lock taking turns, make the connection pool open and
close overflow connections at every burst, and keep the event loop, which answers heartbeats, waiting
for its turn. With ``./dev/bench/scale`` at 2,000 agents, four threads cut heartbeat latency several
times over. How many is ``[remote_exec] api_db_threads``.

A request waits at most ``SLOT_WAIT_SECONDS`` for a thread and is then answered 503, which agents
retry: when threads hang on locks or on a dead connection, work does not pile up behind them to run
long after its agent stopped waiting.

Dag-processor agents' work (a parsing result is deserialized and persisted, which can take seconds)
runs on ``PARSING_THREADS`` threads of its own, and triggerer agents' work (trigger syncs, events,
look-ups that may ask an external secrets backend) on ``TRIGGER_THREADS``, and task log chunks on
``LOG_THREADS``, so that none of them ever holds the threads that heartbeats, claims and reports of
running tasks need: a flood of log lines slows the logs, never an agent's liveness.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from fastapi import HTTPException, status

from airflow_remote_exec import config

SLOT_WAIT_SECONDS = 5.0
PARSING_THREADS = 2
TRIGGER_THREADS = 2
LOG_THREADS = 2
AGENTS, PARSING, TRIGGERS, LOGS = "agents", "parsing", "triggers", "logs"  # the lanes

_T = TypeVar("_T")
# Forgotten with their loop (a test's, a restarted server's).
_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, anyio.CapacityLimiter]] = (
    weakref.WeakKeyDictionary()
)


def _limiters_of_loop(lane: str = AGENTS) -> tuple[anyio.CapacityLimiter, anyio.CapacityLimiter]:
    """This event loop's limiters (a limiter belongs to the loop it was made on): the lane's few
    threads, and an unbounded one to run the work under, so that it never also waits for the shared
    pool's threads, which anyio's default limiter would make it do."""
    loop = asyncio.get_running_loop()
    limiters = _limiters.get(loop)
    if limiters is None:
        limiters = _limiters[loop] = {
            AGENTS: anyio.CapacityLimiter(config.api_db_threads()),
            PARSING: anyio.CapacityLimiter(PARSING_THREADS),
            TRIGGERS: anyio.CapacityLimiter(TRIGGER_THREADS),
            LOGS: anyio.CapacityLimiter(LOG_THREADS),
            "unbounded": anyio.CapacityLimiter(math.inf),
        }
    return limiters[lane], limiters["unbounded"]


async def run_db(function: Callable[..., _T], *args: object, lane: str = AGENTS) -> _T:
    """Run ``function(*args)``, which does the request's database work, on one of the lane's threads."""
    (limiter, unbounded), acquired = _limiters_of_loop(lane), False
    with anyio.move_on_after(SLOT_WAIT_SECONDS):
        await limiter.acquire()
        acquired = True
    if not acquired:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"The agent API's {limiter.total_tokens} database threads stayed busy for "
            f"{SLOT_WAIT_SECONDS:g} s; retry.",
            headers={"Retry-After": "1"},
        )
    try:
        return await anyio.to_thread.run_sync(function, *args, limiter=unbounded)
    finally:
        limiter.release()
