"""What the agent holds: jobs occupying its runners, and finished jobs whose report is undelivered.

Everything is keyed by (job_id, attempt): the orchestrator reuses a job row with a higher attempt for
a reschedule or deferral resume, so a stale stop, refusal or outcome about an old attempt must never
touch the new one.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass

from airflow_remote_exec.agent.runner import JobKey
from airflow_remote_exec.api.datamodels import HeldJob, JobKind

# HeartbeatRequest.running accepts at most this many entries.
MAX_HEARTBEAT_JOBS = 1024


@dataclass(frozen=True)
class Session:
    """One registration: the orchestrator's timing for it, and when it began (monotonic)."""

    session_id: str
    heartbeat_interval: float
    lost_after_missed_heartbeats: int
    claim_wait_seconds: float
    started: float


@dataclass
class Holding:
    key: JobKey
    kind: JobKind
    pool_slots: int
    session_id: str
    abandoned: bool = False  # not ours any more: stop it and never report on it
    stop_reason: str | None = None  # we stopped it ourselves: its failed report says why


class Ledger:
    """Thread-safe bookkeeping. A job keeps its slots until its runner is free again (finished, or
    dead and replaced), even once abandoned, so a slot is never claimed twice. A finished job of ours
    keeps them until its final report is delivered too: the orchestrator counts the job against our
    slots until then, so a claim sent earlier would be refused the slot anyway."""

    def __init__(self, slots: int):
        self.slots = slots
        self.lock = threading.Lock()
        self.slot_freed = threading.Event()
        self._held: dict[JobKey, Holding] = {}
        # Final report queued, not yet delivered: its session and the slots it still takes.
        self._unreported: dict[JobKey, tuple[str, int]] = {}

    def add(self, holding: Holding) -> None:
        with self.lock:
            self._held[holding.key] = holding

    def release(self, key: JobKey) -> Holding | None:
        """The runner of ``key`` is free: returns what was held, if anything. A job of ours now awaits
        its final report, which the caller queues; an abandoned one frees its slots at once."""
        with self.lock:
            holding = self._held.pop(key, None)
            if holding is not None and not holding.abandoned:
                self._unreported[key] = (holding.session_id, holding.pool_slots)
        if holding is not None and holding.abandoned:
            self.slot_freed.set()
        return holding

    def free_slots(self, reporting: Collection[JobKey] = ()) -> int:
        """Slots not taken; a finished job whose final report is in ``reporting`` (carried by the
        claim that asks) counts as free, since the orchestrator applies the report first."""
        with self.lock:
            taken = sum(h.pool_slots for h in self._held.values())
            taken += sum(
                slots
                for key, (_, slots) in self._unreported.items()
                if key not in self._held and key not in reporting
            )
            return self.slots - taken

    def unreported(self) -> int:
        """Finished jobs of ours whose final report is not yet delivered (nor dropped)."""
        with self.lock:
            return len(self._unreported)

    def count(self) -> int:
        with self.lock:
            return len(self._held)

    def active(self) -> list[Holding]:
        """Jobs still ours (not abandoned)."""
        with self.lock:
            return [h for h in self._held.values() if not h.abandoned]

    def abandon(self, key: JobKey) -> bool:
        """Mark ``key`` as no longer ours; True if it was held and not abandoned already."""
        with self.lock:
            holding = self._held.get(key)
            if holding is None or holding.abandoned:
                return False
            holding.abandoned = True
            return True

    def abandon_all(self) -> list[JobKey]:
        with self.lock:
            keys = [k for k, h in self._held.items() if not h.abandoned]
            for key in keys:
                self._held[key].abandoned = True
            return keys

    def mark_stopping(self, reason: str) -> list[JobKey]:
        """Give every job of ours that is not already being stopped a stop reason; returns their keys."""
        with self.lock:
            keys = [k for k, h in self._held.items() if not h.abandoned and h.stop_reason is None]
            for key in keys:
                self._held[key].stop_reason = reason
            return keys

    def awaiting_report(self, key: JobKey, session_id: str) -> None:
        """A final report on ``key`` is queued (``release`` already recorded a job that was held)."""
        with self.lock:
            self._unreported.setdefault(key, (session_id, 0))

    def reported(self, key: JobKey) -> None:
        with self.lock:
            self._unreported.pop(key, None)
        self.slot_freed.set()

    def heartbeat_jobs(self, session_id: str) -> list[HeldJob]:
        """Every job this session holds: running, or finished with its report not yet delivered, so the
        orchestrator does not sweep a job as orphaned while an outage delays its outcome."""
        with self.lock:
            keys = [k for k, h in self._held.items() if not h.abandoned and h.session_id == session_id]
            keys += [k for k, (s, _) in self._unreported.items() if s == session_id and k not in self._held]
        return [HeldJob(job_id=k.job_id, attempt=k.attempt) for k in keys[:MAX_HEARTBEAT_JOBS]]
