"""Background threads that survive their own bugs, and notice when one did not."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# After an unexpected error a loop waits this long before its next round, so a persistent fault
# logs a traceback a second instead of spinning a core.
ERROR_PAUSE_SECONDS = 1.0


def run_guarded(name: str, step: Callable[[], None], done: threading.Event) -> None:
    """Call ``step`` until ``done`` is set; an unexpected exception is logged with its traceback and the
    loop goes on, because a dead reporter or heartbeat thread silently strands every job."""
    while not done.is_set():
        try:
            step()
        except Exception:
            log.exception("Unexpected error in the %s thread; carrying on", name)
            done.wait(ERROR_PAUSE_SECONDS)
        except BaseException:
            log.critical(
                "The %s thread died; /healthz and /livez now report the agent unhealthy", name, exc_info=True
            )
            raise


class GuardedThreads:
    """The agent's background loops, each in a daemon thread, with a health view of which died."""

    def __init__(self, done: threading.Event):
        self._done = done
        self._threads: list[threading.Thread] = []

    def start(self, name: str, step: Callable[[], None]) -> threading.Thread:
        thread = threading.Thread(target=run_guarded, args=(name, step, self._done), name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def dead(self) -> list[str]:
        """Names of loops that ended while the agent still needs them."""
        if self._done.is_set():
            return []
        return [t.name for t in self._threads if not t.is_alive()]
