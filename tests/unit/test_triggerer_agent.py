"""The triggerer agent's supervisor, with the agent API scripted: events are delivered once per batch
and kept until the orchestrator answers, workloads come from the sync, a silent runner stops syncing."""

from __future__ import annotations

import datetime
import logging
import time
import uuid
from collections import deque
from typing import Any

import pytest
from airflow.jobs.triggerer_job_runner import TriggerEventEntry
from airflow.triggers.base import TaskSuccessEvent, TriggerEvent

from airflow_remote_exec.agent.client import AgentApiError, Unreachable
from airflow_remote_exec.agent.triggerer import MAX_PAYLOAD_BYTES, _fired, _supervisor_class
from airflow_remote_exec.api.datamodels import FiredEvent, TriggerFailure


class ScriptedSession:
    """Stands in for AgentSession: records calls, answers from a script (an exception is raised)."""

    def __init__(self, *answers: Any):
        self.answers = deque(answers)
        self.calls: list[tuple[str, str, Any]] = []
        self.stop = type("Never", (), {"is_set": lambda self: False})()
        self.settings = type("S", (), {"name": "trig-1", "api_url": "http://127.0.0.1:9", "token": "t"})()

    def call(self, method: str, path: str, body: Any = None, **options: Any) -> Any:
        self.calls.append((method, path, body))
        answer = self.answers.popleft()
        if isinstance(answer, BaseException):
            raise answer
        return answer


def _supervisor(session: ScriptedSession):
    return _supervisor_class()(
        id=uuid.uuid4(), pid=0, stdin=None, process=None, process_log=None, capacity=10, agent=session
    )


def test_an_event_travels_as_airflow_serializes_it_and_an_end_event_as_its_state():
    moment = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    fired = _fired(7, TriggerEvent({"at": moment}))
    assert isinstance(fired, FiredEvent) and fired.kind == "_event_"
    assert fired.payload["__var"]["at"]["__type"] == "datetime"
    ended = _fired(8, TaskSuccessEvent(xcoms={"k": 1}))
    assert ended.kind == "success" and ended.xcoms == {"k": 1}


def test_an_oversized_event_fails_its_trigger_instead():
    failure = _fired(9, TriggerEvent("x" * (MAX_PAYLOAD_BYTES + 1)))
    assert isinstance(failure, TriggerFailure) and "bytes" in failure.traceback[0]


def test_a_batch_is_sent_again_unchanged_until_the_orchestrator_answers():
    session = ScriptedSession(Unreachable("down"), {"refused": []})
    supervisor = _supervisor(session)
    supervisor.events.append(TriggerEventEntry(trigger_id=3, event=TriggerEvent("done"), persist_seq=11))
    supervisor.failed_triggers.append((4, ["Traceback\n"]))
    supervisor.handle_events()
    assert supervisor.persisted_event_seqs == deque() and {3, 4} <= supervisor._known()
    supervisor.handle_events()
    first, second = session.calls[0][2], session.calls[1][2]
    assert first.batch_id == second.batch_id and [e.trigger_id for e in second.events] == [3]
    assert [f.trigger_id for f in second.failures] == [4]
    assert list(supervisor.persisted_event_seqs) == [11] and supervisor._batch is None


def test_a_refused_batch_fails_its_triggers_rather_than_leave_their_tasks_waiting(caplog):
    session = ScriptedSession(AgentApiError(422, "bad"), {"refused": [5]})
    supervisor = _supervisor(session)
    supervisor.events.append(TriggerEventEntry(trigger_id=5, event=TriggerEvent(1), persist_seq=None))
    with caplog.at_level(logging.INFO):
        supervisor.handle_events()
    assert "refused a batch" in caplog.text and supervisor._batch is None
    refused, instead = session.calls[0][2], session.calls[1][2]
    assert [e.trigger_id for e in refused.events] == [5] and instead.events == []
    assert [f.trigger_id for f in instead.failures] == [5] and "bad" in instead.failures[0].traceback[0]
    assert "their triggers now run elsewhere" in caplog.text


def test_a_long_traceback_is_cut_to_what_the_api_takes():
    session = ScriptedSession({"refused": []})
    supervisor = _supervisor(session)
    supervisor.failed_triggers.append((6, ["€" * 200_000] * 5000))
    supervisor.events.append(TriggerEventEntry(trigger_id=7, event=TriggerEvent(1), persist_seq=None))
    supervisor.handle_events()
    batch = session.calls[0][2]
    assert len(batch.failures[0].traceback) == 100 and max(map(len, batch.failures[0].traceback)) == 1000
    assert len(batch.model_dump_json().encode()) < 1024 * 1024  # within the agent API's body limit


def test_workloads_come_from_the_sync_and_unknown_ones_wait_for_a_later_one():
    workload = {
        "id": 21,
        "classpath": "airflow.providers.standard.triggers.temporal.DateTimeTrigger",
        "encrypted_kwargs": "{}",
        "type": "RunTrigger",
    }
    session = ScriptedSession({"trigger_ids": [21, 22], "new": [{"workload": workload, "log_path": None}]})
    supervisor = _supervisor(session)
    supervisor._last_runner_comms = time.monotonic()
    supervisor.load_triggers()
    assert session.calls[0][2].capacity == 10
    assert [w.id for w in supervisor.creating_triggers] == [21]  # 22's workload comes later


def test_a_silent_runner_stops_syncing_so_its_triggers_move(caplog):
    session = ScriptedSession()
    supervisor = _supervisor(session)
    supervisor._last_runner_comms = time.monotonic() - supervisor.runner_health_check_threshold - 5
    supervisor.load_triggers()
    assert session.calls == [] and "silent" in caplog.text


@pytest.mark.parametrize("error", [Unreachable("down"), AgentApiError(503, "busy")])
def test_a_failed_sync_keeps_the_running_triggers(error, caplog):
    session = ScriptedSession(error)
    supervisor = _supervisor(session)
    supervisor._last_runner_comms = time.monotonic()
    supervisor.running_triggers.add(1)
    supervisor.load_triggers()
    assert supervisor.running_triggers == {1} and not supervisor.cancelling_triggers
    assert "Trigger sync failed" in caplog.text
