"""Stand-ins for the runner loop, imported by runner processes: kept free of heavy imports so a forked
runner starts in milliseconds."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from airflow_remote_exec.agent.runner import Outcome


def stubborn_runner(inbox, outbox, server) -> None:
    """A runner whose 'task' ignores SIGTERM, like a supervisor stuck in on_kill.

    An assignment's workload is ``SECONDS[:READY_FILE]``: it touches READY_FILE once SIGTERM is ignored,
    sleeps, then posts success.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        assignment = inbox.get()
        if assignment is None:
            return
        seconds, _, ready = assignment.workload_json.partition(":")
        if ready:
            Path(ready).touch()
        time.sleep(float(seconds))
        outbox.put(Outcome(assignment.job_id, assignment.attempt, "success", 0, None))
