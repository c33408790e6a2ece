"""The dag-processor agent's manager without an orchestrator: what it sends, and what it does when a
call is refused."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.dag_processing.manager import DagFileInfo
from airflow.dag_processing.processor import DagFileParsingResult

from airflow_remote_exec.agent.client import AgentApiError
from airflow_remote_exec.agent.dag_processor import _manager_class


class FakeSession:
    """Stands in for AgentSession: records calls, answers from a script (an exception is raised)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls: list[tuple[str, str, object]] = []

    def call(self, method, path, body=None, **options):
        self.calls.append((method, path, body))
        answer = self.answers.pop(0) if self.answers else None
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def manager_for():
    def make(*answers):
        session = FakeSession(*answers)
        return _manager_class()(max_runs=1, agent=session), session

    return make


def test_a_refused_callback_fetch_is_logged_and_the_loop_goes_on(manager_for, caplog):
    manager, session = manager_for(AgentApiError(403, "not your bundle"))
    manager._dag_bundles = [SimpleNamespace(name="b", path=Path("/bundle"))]
    assert manager.fetch_callbacks() == []
    assert session.calls[0][2].bundles == ["b"]  # only the bundles this agent parses
    assert "POST /callbacks failed" in caplog.text


def _persist(manager, tmp_path: Path) -> None:
    result = DagFileParsingResult(fileloc=str(tmp_path / "x.py"), serialized_dags=[], import_errors={})
    manager.persist_parsing_result(
        bundle_name="b",
        bundle_version=None,
        version_data=None,
        parsing_result=result,
        run_duration=0.1,
        relative_fileloc="x.py",
    )


def test_a_refused_file_becomes_that_files_import_error(manager_for, tmp_path):
    manager, session = manager_for(AgentApiError(422, "DAG 'x' has a deadline alert"), None)
    _persist(manager, tmp_path)
    (_, _, first), (_, path, second) = session.calls
    assert path == "/bundles/b/parsing-results"
    assert second.result["serialized_dags"] == [] and second.sources == {}
    assert second.result["import_errors"] == {"x.py": "DAG 'x' has a deadline alert"}


def test_a_failure_other_than_a_refused_file_is_raised_for_airflow_to_log(manager_for, tmp_path):
    manager, _ = manager_for(AgentApiError(403, "bundle not claimed"))
    with pytest.raises(AgentApiError):
        _persist(manager, tmp_path)


def test_the_stale_check_sends_ages_not_the_agents_clock(manager_for):
    manager, session = manager_for([])
    now = datetime.datetime.now(datetime.timezone.utc)
    file = DagFileInfo(rel_path=Path("a.py"), bundle_name="b", bundle_path=Path("/bundle"))
    manager.deactivate_stale_dags({file: now - datetime.timedelta(seconds=30)})
    ((method, path, body),) = session.calls
    assert (method, path) == ("POST", "/bundles/b/stale-check")
    assert 29 <= body.seconds_since_parsed["a.py"] < 60


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ('[{"name": "b", "classpath": "no.such.Bundle", "kwargs": {}}]', "No module named 'no'"),
        ('[{"name": "b"}]', "failed validation"),
        ("[]", "No DAG bundles to parse"),
    ],
)
def test_an_unusable_bundle_list_is_one_clear_line_before_registering(monkeypatch, caplog, config, says):
    from airflow_remote_exec.agent.dag_processor import DagProcessorAgent
    from airflow_remote_exec.agent.session import ComponentSettings

    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", config)
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    agent = DagProcessorAgent(ComponentSettings("http://127.0.0.1:9", "token", "dp", "dag-processor"))
    with caplog.at_level(logging.ERROR):
        assert agent.run() == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and says in errors[0], errors
    assert agent.session.session_id == ""  # never registered


def test_the_heartbeat_thread_survives_a_refused_re_registration(caplog):
    import threading

    from airflow_remote_exec.agent.client import SessionGone
    from airflow_remote_exec.agent.session import AgentSession, ComponentSettings

    class Client:
        beats = 0

        def heartbeat(self, session_id, request, interval):
            self.beats += 1
            if self.beats >= 3:
                stop.set()
            raise SessionGone(410, "declared lost")

        def register(self, request):
            raise AgentApiError(403, "component not allowed any more")

    stop = threading.Event()
    settings = ComponentSettings("http://127.0.0.1:9", "t", "dp", "dag-processor")
    session = AgentSession(settings, stop, Client())
    session.heartbeat_interval = 0.01
    thread = threading.Thread(target=session.beat_forever)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive() and session.client.beats == 3  # kept beating after each refusal
    assert "Could not register again" in caplog.text
