"""The agent API's database work runs on a few threads of its own, not on the thread pool that every
synchronous route of the api-server shares.

Why: that work is short statements under Python's global interpreter lock. Forty threads of the shared
pool, each holding a pooled connection, spend the lock taking turns, make the connection pool open and
close overflow connections at every burst, and keep the event loop, which answers heartbeats, waiting
for its turn. With ``./dev/bench/scale`` at 2,000 agents, four threads cut heartbeat latency several
times over and the jobs per second stay the same. A process that needs more database concurrency (a
distant database) is better served by more api-server processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

DB_THREADS = 4

_T = TypeVar("_T")
_limiters: dict[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = {}


def _limiter() -> anyio.CapacityLimiter:
    """This event loop's limiter: a limiter belongs to the loop it was made on."""
    loop = asyncio.get_running_loop()
    limiter = _limiters.get(loop)
    if limiter is None:
        _limiters.clear()  # an earlier loop (a test's, a restarted server's) is gone
        limiter = _limiters[loop] = anyio.CapacityLimiter(DB_THREADS)
    return limiter


async def run_db(function: Callable[..., _T], *args: object) -> _T:
    """Run ``function(*args)``, which does the request's database work, on one of the API's threads."""
    return await anyio.to_thread.run_sync(function, *args, limiter=_limiter())
