"""The triggerer agent: Airflow's own ``TriggerRunnerSupervisor`` and ``TriggerRunner``, running the
triggers of deferred tasks and asset watchers inside the user's network, with the metadata database
replaced by the agent API (the job-less path Airflow's supervisor offers, AIP-92).

The supervisor's override points carry it: ``load_triggers`` syncs with the orchestrator, which assigns
triggers within the token's scope and sends Airflow's ``RunTrigger`` workloads; events and failures go
back in one batch per loop, sent again until the orchestrator answers (it applies a batch once). Trigger
code reads variables and connections from the agent's own secrets backends first, then from the
orchestrator. Each trigger of a task logs to Airflow's trigger log file beside the task's log.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from typing import Any

import attrs

from airflow_remote_exec.agent.client import URL_PREFIX, AgentApiError, AgentClient, Unreachable
from airflow_remote_exec.agent.session import AgentSession, ComponentSettings, register_or_explain
from airflow_remote_exec.api.datamodels import (
    API_VERSION,
    API_VERSION_HEADER,
    MAX_TRIGGER_REPORTS,
    FiredEvent,
    TriggerAssignment,
    TriggerFailure,
    TriggerReports,
    TriggerReportsResponse,
    TriggerSync,
)

log = logging.getLogger(__name__)

# The agent API takes bodies up to 1 MiB: a batch stays under half of it, and one event's payload
# larger than this fails its trigger (Airflow keeps a payload in the task's next_kwargs, in the DB).
MAX_BATCH_BYTES = 512 * 1024
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_TRACEBACK_LINES, MAX_TRACEBACK_LINE = 100, 1000  # at most 400 KB even in 4-byte characters
# A sync or a batch is tried this often before the loop goes on (and tries again next time round):
# Airflow's loop also serves the trigger runner's requests, which must not wait on an outage.
CALL_TRIES = 3


def _fired(trigger_id: int, event: Any) -> FiredEvent | TriggerFailure:
    """An event as the agent API carries it, or the failure of its trigger if it cannot be carried."""
    from airflow.serialization.serialized_objects import BaseSerialization
    from airflow.triggers.base import trigger_event_discriminator

    kind = str(trigger_event_discriminator(event))
    try:
        if kind == "_event_":
            fired = FiredEvent(
                trigger_id=trigger_id, kind="_event_", payload=BaseSerialization.serialize(event.payload)
            )
        else:
            fired = FiredEvent(trigger_id=trigger_id, kind=kind, xcoms=getattr(event, "xcoms", None))
        size = _bytes(fired)
    except (TypeError, ValueError) as err:
        return TriggerFailure(
            trigger_id=trigger_id, traceback=[f"The trigger's event cannot be sent: {err}\n"]
        )
    if size > MAX_PAYLOAD_BYTES:
        return TriggerFailure(
            trigger_id=trigger_id,
            traceback=[
                f"The trigger's event is {size} bytes; events may hold at most {MAX_PAYLOAD_BYTES}.\n"
            ],
        )
    return fired


def _bytes(item: FiredEvent | TriggerFailure) -> int:
    """Its size on the wire, as the agent API's body limit counts it."""
    return len(item.model_dump_json().encode())


def _bounded(traceback: list[str] | None) -> list[str] | None:
    """A traceback within what the agent API takes: its last lines, each cut to a length."""
    if traceback is None:
        return None
    return [line[:MAX_TRACEBACK_LINE] for line in traceback[-MAX_TRACEBACK_LINES:]]


def _as_failures(batch: TriggerReports, reason: str) -> TriggerReports:
    """A refused batch's triggers failed with the reason, so that their tasks do not wait for ever."""
    message = [f"The orchestrator refused this trigger's event: {reason[:1000]}"]
    failures = [TriggerFailure(trigger_id=e.trigger_id, traceback=message) for e in batch.events]
    failures += [TriggerFailure(trigger_id=f.trigger_id, traceback=message) for f in batch.failures]
    return TriggerReports(batch_id=str(uuid.uuid4()), failures=failures)


def _supervisor_class():
    """Defined on first use: importing Airflow's triggerer takes seconds, and the command line does not
    need it."""
    from airflow.executors import workloads
    from airflow.jobs.triggerer_job_runner import TriggerLoggingFactory, TriggerRunnerSupervisor
    from airflow.sdk.api.client import Client

    @attrs.define(kw_only=True)
    class AgentTriggerRunnerSupervisor(TriggerRunnerSupervisor):
        agent: AgentSession
        # Workloads of the last sync, taken by ``build_trigger_workloads``.
        _offered: dict[int, tuple[workloads.RunTrigger, str | None]] = attrs.field(factory=dict, init=False)
        # The batch of events and failures being delivered, with the shared-stream seqs it confirms.
        _batch: tuple[TriggerReports, list[int]] | None = attrs.field(default=None, init=False)

        # -- no database ---------------------------------------------------------------------------
        def make_client(self) -> Client:
            """Variables and connections a trigger reads that the agent's own secrets backends do not
            hold: asked of the agent API, which answers as Airflow's Execution API does."""
            client = Client(
                base_url=f"{self.agent.settings.api_url}{URL_PREFIX}/triggerer/",
                token=self.agent.settings.token,
            )
            client.headers[API_VERSION_HEADER] = API_VERSION
            return client

        def should_stop(self) -> bool:
            return self.stop or self.agent.stop.is_set()

        def metric_tags(self) -> dict[str, str]:
            return {"hostname": self.agent.settings.name}

        def heartbeat(self) -> None:
            """The agent session's thread heartbeats; each sync heartbeats the triggerer job."""

        def clean_unused(self) -> None:
            """The orchestrator removes triggers nothing waits for."""

        def handle_failed_triggers(self) -> None:
            """Failures go with the events, in ``handle_events``."""

        # -- assignment ----------------------------------------------------------------------------
        def _runner_silent(self) -> bool:
            """Airflow's deadlock watchdog: a runner silent past the threshold gets no new triggers and
            stops heartbeating its job, so other triggerers take its triggers."""
            silent_for = time.monotonic() - self._last_runner_comms
            if 0 < self.runner_health_check_threshold < silent_for:
                if not self._runner_comms_silence_logged:
                    log.error(
                        "The trigger runner has been silent for %.0f s (its event loop looks blocked); "
                        "no longer syncing, so its triggers move to another triggerer",
                        silent_for,
                    )
                    self._runner_comms_silence_logged = True
                return True
            self._runner_comms_silence_logged = False
            return False

        def _known(self) -> set[int]:
            known = self.running_triggers | self.cancelling_triggers
            known.update(entry.trigger_id for entry in self.events)
            known.update(trigger_id for trigger_id, _ in self.failed_triggers)
            known.update(workload.id for workload in self.creating_triggers)
            if self._batch is not None:
                body = self._batch[0]
                known.update(e.trigger_id for e in body.events)
                known.update(f.trigger_id for f in body.failures)
            return known

        def load_triggers(self) -> None:
            if self._runner_silent():
                return
            body = TriggerSync(capacity=self.capacity, known=sorted(self._known()))
            try:
                reply = TriggerAssignment.model_validate(
                    self.agent.call("POST", "/triggers", body, max_tries=CALL_TRIES)
                )
            except (AgentApiError, Unreachable) as err:
                log.warning("Trigger sync failed (running triggers go on): %s", err)
                return
            self._offered = {}
            for offered in reply.new:
                workload = workloads.RunTrigger.model_validate(offered.workload)
                self._offered[workload.id] = (workload, offered.log_path)
            self.update_triggers(set(reply.trigger_ids))

        def build_trigger_workloads(self, new_trigger_ids: set[int]) -> list:
            to_create = []
            for trigger_id in sorted(new_trigger_ids):
                offered = self._offered.pop(trigger_id, None)
                if offered is None:  # its workload comes with a later sync
                    continue
                workload, log_path = offered
                if workload.ti is not None and log_path:
                    self.logger_cache[trigger_id] = TriggerLoggingFactory(log_path=log_path, ti=workload.ti)
                to_create.append(workload)
            return to_create

        # -- events --------------------------------------------------------------------------------
        def _next_batch(self) -> tuple[TriggerReports, list[int]] | None:
            events: list[FiredEvent] = []
            failures: list[TriggerFailure] = []
            seqs: list[int] = []
            size = 0
            while self.events and len(events) < MAX_TRIGGER_REPORTS and size < MAX_BATCH_BYTES:
                entry = self.events.popleft()
                fired = _fired(entry.trigger_id, entry.event)
                (events if isinstance(fired, FiredEvent) else failures).append(fired)
                size += _bytes(fired)
                if entry.persist_seq is not None:
                    seqs.append(entry.persist_seq)
            while self.failed_triggers and len(failures) < MAX_TRIGGER_REPORTS and size < MAX_BATCH_BYTES:
                trigger_id, traceback = self.failed_triggers.popleft()
                failure = TriggerFailure(trigger_id=trigger_id, traceback=_bounded(traceback))
                failures.append(failure)
                size += _bytes(failure)
            if not events and not failures:
                return None
            return TriggerReports(batch_id=str(uuid.uuid4()), events=events, failures=failures), seqs

        def handle_events(self) -> None:
            """Deliver events and failures; a batch is sent again, as it is, until the orchestrator
            answers, and the next one is made only then."""
            while True:
                if self._batch is None:
                    self._batch = self._next_batch()
                    if self._batch is None:
                        return
                body, seqs = self._batch
                try:
                    reply = TriggerReportsResponse.model_validate(
                        self.agent.call("POST", "/events", body, max_tries=CALL_TRIES)
                    )
                except Unreachable as err:
                    log.warning("Could not deliver %d trigger event(s) yet: %s", len(body.events), err)
                    return
                except AgentApiError as err:  # the batch itself is refused: sending it again won't help
                    log.error("The orchestrator refused a batch of trigger events and failures: %s", err)
                    self._batch = _as_failures(body, err.detail), seqs
                    if not body.events:  # even plain failures: nothing more to try
                        self._batch = None
                    continue
                self.persisted_event_seqs.extend(seqs)
                if reply.refused:
                    log.info("Not applied, their triggers now run elsewhere: %s", reply.refused)
                self._batch = None

    return AgentTriggerRunnerSupervisor


class TriggererAgent:
    def __init__(self, settings: ComponentSettings, client: AgentClient | None = None):
        self.stop = threading.Event()
        self.session = AgentSession(settings, self.stop, client)
        self.supervisor = None

    def _on_signal(self, signum, frame) -> None:
        if self.supervisor is not None and not self.supervisor.stop:
            log.info("Stopping on signal %s; other triggerers take over these triggers", signum)
            self.supervisor.stop = True
        else:
            self.stop.set()
            if self.supervisor is not None:
                self.supervisor.kill(signal.SIGKILL)

    def run(self) -> int:
        import structlog

        self.session.serve_probes()  # before registering: liveness must answer while the orchestrator is down
        refused = register_or_explain(self.session)
        if refused is not None:
            return refused
        self.session.start_heartbeats()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        settings = self.session.settings
        try:
            self.supervisor = _supervisor_class().start(
                capacity=settings.capacity,
                agent=self.session,
                logger=structlog.get_logger(logger_name=__name__),
            )
            log.info("Running up to %d triggers of queues %s", settings.capacity, ", ".join(settings.queues))
            self.supervisor.run()
            return 0
        finally:
            if self.supervisor is not None:
                self.supervisor.kill(escalation_delay=10, force=True)
            self.stop.set()
            self.session.deregister()
