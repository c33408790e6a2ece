"""Task logs through the agent API: who may append, in what order, how much, and how Airflow reads them."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select, update

from airflow_remote_exec import config
from airflow_remote_exec import task_logs as task_logs_module
from airflow_remote_exec.api import logs as logs_api
from airflow_remote_exec.api.datamodels import MAX_LOG_CHUNK_BYTES
from airflow_remote_exec.executor import RemoteExecutor
from airflow_remote_exec.housekeeping import purge_old_rows
from airflow_remote_exec.logging_config import ShippedLogIO
from airflow_remote_exec.models import JobKind, RemoteLogChunk, RemoteLogStream
from airflow_remote_exec.task_logs import read_try
from tests.api.conftest import headers
from tests.api.test_jobs import _add, _claim
from tests.factories import make_job

OCTETS = {"Content-Type": "application/octet-stream"}


def _put(client, token, session_id, job_id, attempt, offset, data: bytes, extra_headers=None):
    return client.put(
        f"/agents/{session_id}/jobs/{job_id}/log",
        params={"attempt": attempt, "offset": offset},
        content=data,
        headers={**headers(token), **OCTETS, **(extra_headers or {})},
    )


@pytest.fixture
def claimed(client, session, make_token, register):
    """An agent that claimed one task job: (token, session id, job id, attempt)."""
    token = make_token()
    session_id = register(token)
    _add(session, make_job("t1"))
    (job,) = _claim(client, token, session_id)
    return token, session_id, job["job_id"], job["attempt"]


def _log(session, task_id="t1", try_number=1) -> str:
    session.expire_all()
    return "".join(text for _, text in read_try(session, "d1", "r1", task_id, -1, try_number))


def test_chunks_append_in_order_and_a_resent_chunk_is_stored_once(client, session, claimed):
    token, session_id, job_id, attempt = claimed
    first = _put(client, token, session_id, job_id, attempt, 0, b'{"event": "one"}\n')
    assert first.status_code == 200, first.text
    assert first.json() == {"size": 17, "truncated": False}
    assert _put(client, token, session_id, job_id, attempt, 0, b'{"event": "one"}\n').json()["size"] == 17
    # Overlapping the end: only the new part is added.
    both = b'{"event": "one"}\n{"event": "two"}\n'
    assert _put(client, token, session_id, job_id, attempt, 0, both).json()["size"] == len(both)
    assert _log(session) == both.decode()
    assert session.scalar(select(func.count()).select_from(RemoteLogChunk)) == 2


def test_a_chunk_past_the_end_stores_nothing_and_says_where_to_resume(client, session, claimed):
    token, session_id, job_id, attempt = claimed
    _put(client, token, session_id, job_id, attempt, 0, b"a\n")
    reply = _put(client, token, session_id, job_id, attempt, 10, b"lost?\n")
    assert reply.status_code == 200
    assert reply.json()["size"] == 2
    assert _log(session) == "a\n"


def test_a_chunk_stored_meanwhile_by_the_request_it_replaces_is_not_a_server_error(
    client, session, claimed, monkeypatch
):
    """Without row locks (SQLite) a resent chunk can race the slow request it replaces."""
    token, session_id, job_id, attempt = claimed
    stream = session.scalar(select(RemoteLogStream))
    session.add(RemoteLogChunk(stream_id=stream.id, offset=0, data=b"x\n"))
    session.commit()
    real_append = task_logs_module.append_chunk
    calls = []

    def racing(session, *args):
        calls.append(1)
        if len(calls) == 2:  # the other request committed its size by now
            session.execute(update(RemoteLogStream).values(size=2))
        return real_append(session, *args)

    monkeypatch.setattr(logs_api, "append_chunk", racing)
    reply = _put(client, token, session_id, job_id, attempt, 0, b"x\n")
    assert reply.status_code == 200, reply.text
    assert reply.json()["size"] == 2 and len(calls) == 2
    assert _log(session) == "x\n"


def test_only_the_agent_that_claimed_the_job_may_append(client, session, claimed, make_token, register):
    token, session_id, job_id, attempt = claimed
    other_token = make_token("other")
    other_session = register(other_token, name="agent-2")
    reply = _put(client, other_token, other_session, job_id, attempt, 0, b"forged\n")
    assert reply.status_code == 404
    assert "no log to add to" in reply.json()["detail"]
    assert _put(client, token, session_id, job_id, attempt + 1, 0, b"wrong attempt\n").status_code == 404
    assert _put(client, "not-a-token", session_id, job_id, attempt, 0, b"x\n").status_code == 401
    assert _log(session) == ""


def test_the_claiming_agent_may_append_after_the_job_row_is_gone(client, session, claimed):
    """A log can still be catching up after its job is finished and purged, or runs its next attempt."""
    token, session_id, job_id, attempt = claimed
    from airflow_remote_exec.models import RemoteJob

    session.query(RemoteJob).delete()
    session.commit()
    assert _put(client, token, session_id, job_id, attempt, 0, b"late line\n").status_code == 200
    assert _log(session) == "late line\n"


def test_bad_chunks_get_a_clear_4xx(client, session, claimed):
    token, session_id, job_id, attempt = claimed
    too_big = _put(client, token, session_id, job_id, attempt, 0, b"x" * (MAX_LOG_CHUNK_BYTES + 1))
    assert too_big.status_code == 413
    assert f"at most {MAX_LOG_CHUNK_BYTES} bytes" in too_big.json()["detail"]
    json_body = _put(
        client, token, session_id, job_id, attempt, 0, b"{}", {"Content-Type": "application/json"}
    )
    assert json_body.status_code == 415
    assert _put(client, token, session_id, job_id, attempt, -1, b"x\n").status_code == 422
    assert _put(client, token, session_id, job_id, 0, 0, b"x\n").status_code == 422
    missing = client.put(
        f"/agents/{session_id}/jobs/{job_id}/log", content=b"x", headers={**headers(token), **OCTETS}
    )
    assert missing.status_code == 422
    assert _log(session) == ""


def test_a_log_past_the_cap_is_cut_and_says_so(client, session, claimed, monkeypatch):
    token, session_id, job_id, attempt = claimed
    monkeypatch.setattr(config, "task_log_max_bytes", lambda: 10)
    reply = _put(client, token, session_id, job_id, attempt, 0, b"0123456789abcdef\n")
    assert reply.json() == {"size": 10, "truncated": True}
    assert _put(client, token, session_id, job_id, attempt, 10, b"more\n").json() == {
        "size": 10,
        "truncated": True,
    }
    text = _log(session)
    assert text.startswith("0123456789\n")
    assert "task_log_max_bytes (10 bytes)" in text and "agent-1" in text


def test_a_try_that_ran_twice_reads_as_both_attempts_in_order(client, session, make_token, register):
    """A deferred task resumes as the job's next attempt, perhaps on another agent."""
    token = make_token()
    first_agent = register(token, name="agent-1")
    second_agent = register(token, name="agent-2")
    (job_id,) = _add(session, make_job("t1"))
    (first,) = _claim(client, token, first_agent)
    _put(client, token, first_agent, job_id, first["attempt"], 0, b"before deferral\n")
    from airflow_remote_exec.models import RemoteJob

    session.execute(update(RemoteJob).values(state="queued", agent_name=None))
    session.commit()
    (second,) = _claim(client, token, second_agent)
    assert second["attempt"] == first["attempt"] + 1
    _put(client, token, second_agent, job_id, second["attempt"], 0, b"after resume")
    assert _log(session) == "before deferral\nafter resume\n"
    logs = read_try(session, "d1", "r1", "t1", -1, 1)
    assert [stream.agent_name for stream, _ in logs] == ["agent-1", "agent-2"]


def test_a_task_resumed_after_its_job_row_was_purged_is_claimed_and_logs_in_order(
    client, session, make_token, register
):
    """A deferral or reschedule longer than the finished-job retention: the resumed try gets a new job
    row whose attempts start at 1 again, for the same task instance id."""
    token = make_token()
    session_id = register(token)
    first_row = make_job("t1")
    _add(session, first_row)
    ti_id = first_row.ti_id
    (first,) = _claim(client, token, session_id)
    _put(client, token, session_id, first["job_id"], first["attempt"], 0, b"before deferral\n")
    from airflow_remote_exec.models import RemoteJob

    session.query(RemoteJob).delete()  # finished, then purged
    session.commit()
    resumed = make_job("t1")
    resumed.ti_id = ti_id
    _add(session, resumed)
    (second,) = _claim(client, token, session_id)  # was a 500: the stream's (ti id, attempt) existed
    assert second["attempt"] == first["attempt"]
    _put(client, token, session_id, second["job_id"], second["attempt"], 0, b"after resume\n")
    assert _log(session) == "before deferral\nafter resume\n"


def test_a_job_handed_back_unrun_has_no_log_to_add_to(client, session, claimed):
    """Else a token could claim a task, hand it back, and write lines into the log of its real run."""
    token, session_id, job_id, attempt = claimed
    reply = client.post(
        f"/agents/{session_id}/jobs/{job_id}/state",
        json={"attempt": attempt, "state": "returned", "detail": "cannot read it"},
        headers=headers(token),
    )
    assert reply.status_code == 204, reply.text
    assert _put(client, token, session_id, job_id, attempt, 0, b"forged line\n").status_code == 404
    assert session.scalar(select(func.count()).select_from(RemoteLogStream)) == 0


def test_a_log_is_streamed_line_by_line_across_chunks_and_batches(client, session, claimed, monkeypatch):
    """A character or a line split between chunks comes out whole; the reader holds a batch at a time."""
    token, session_id, job_id, attempt = claimed
    monkeypatch.setattr("airflow_remote_exec.task_logs.READ_BATCH_CHUNKS", 2)
    text = "première ligne\nsecond line\n".encode()
    offset = 0
    for size in (3, 1, 7, 2, 100):  # "è" is two bytes: the cut after 3 splits it
        _put(client, token, session_id, job_id, attempt, offset, text[offset : offset + size])
        offset = min(len(text), offset + size)
    ti = SimpleNamespace(dag_id="d1", run_id="r1", task_id="t1", map_index=-1, try_number=1)
    _, (lines,) = ShippedLogIO().stream("ignored", ti)
    assert list(lines) == ["première ligne", "second line"]


def test_no_stream_for_callbacks_and_connection_tests(client, session, make_token, register):
    token = make_token()
    session_id = register(token)
    _add(session, make_job("t1"), make_job("t2", kind=JobKind.CALLBACK))
    _claim(client, token, session_id)
    assert session.scalars(select(RemoteLogStream.task_id)).all() == ["t1"]


def test_airflow_reads_the_shipped_log_through_the_io_and_the_executor(client, session, claimed, monkeypatch):
    token, session_id, job_id, attempt = claimed
    _put(client, token, session_id, job_id, attempt, 0, b'{"event": "hello"}\n')
    ti = SimpleNamespace(dag_id="d1", run_id="r1", task_id="t1", map_index=-1, try_number=1)
    sources, texts = ShippedLogIO().read("ignored/path.log", ti)
    assert texts == ['{"event": "hello"}\n']
    assert sources == [f"remote-exec: agent agent-1, job attempt {attempt}, 19 bytes"]

    sources_streamed, streams = ShippedLogIO().stream("ignored/path.log", ti)
    assert sources_streamed == sources
    assert [list(lines) for lines in streams] == [['{"event": "hello"}']]

    executor = RemoteExecutor()
    monkeypatch.setattr("airflow_remote_exec.executor.shipped_logs_are_remote_logging", lambda: False)
    assert executor.get_task_log(ti, 1) == (sources, texts)
    # With ShippedLogIO in use the reader has the log already: the executor adds nothing, and its
    # source keeps the reader from calling the agent's unreachable log server.
    monkeypatch.setattr("airflow_remote_exec.executor.shipped_logs_are_remote_logging", lambda: True)
    sources, texts = executor.get_task_log(ti, 1)
    assert texts == [] and sources


def _written_two_days_ago(client, session, claimed, job_state: str = "success") -> None:
    token, session_id, job_id, attempt = claimed
    _put(client, token, session_id, job_id, attempt, 0, b"x\n")
    from airflow_remote_exec.models import RemoteJob

    session.execute(update(RemoteJob).values(state=job_state))
    stream = session.scalar(select(RemoteLogStream))
    stream.last_written_at -= timedelta(days=2)
    session.commit()


def _streams_after_purge(session) -> int:
    purge_old_rows(session)
    session.commit()
    return session.scalar(select(func.count()).select_from(RemoteLogStream))


def test_shipped_logs_are_kept_for_their_retention_and_then_gone_for_their_agent_too(
    client, session, claimed, monkeypatch
):
    _written_two_days_ago(client, session, claimed)
    monkeypatch.setattr("airflow_remote_exec.housekeeping.another_remote_log_store", lambda: False)
    assert _streams_after_purge(session) == 1  # 30 days by default
    monkeypatch.setattr(config, "task_log_retention_days", lambda: 0)  # 0: kept
    assert _streams_after_purge(session) == 1
    monkeypatch.setattr(config, "task_log_retention_days", lambda: 1)
    assert _streams_after_purge(session) == 0
    assert session.scalar(select(func.count()).select_from(RemoteLogChunk)) == 0
    token, session_id, job_id, attempt = claimed
    assert _put(client, token, session_id, job_id, attempt, 2, b"y\n").status_code == 404


def test_beside_another_log_store_the_shipped_copy_is_kept_a_day(client, session, claimed, monkeypatch):
    _written_two_days_ago(client, session, claimed)
    monkeypatch.setattr("airflow_remote_exec.housekeeping.another_remote_log_store", lambda: True)
    assert _streams_after_purge(session) == 0
    assert session.scalar(select(func.count()).select_from(RemoteLogChunk)) == 0


def test_a_quiet_task_still_running_keeps_its_log_past_the_retention(client, session, claimed, monkeypatch):
    _written_two_days_ago(client, session, claimed, job_state="running")
    monkeypatch.setattr("airflow_remote_exec.housekeeping.another_remote_log_store", lambda: True)
    assert _streams_after_purge(session) == 1


def test_a_negative_retention_keeps_logs_rather_than_deleting_them_all(monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_EXEC__TASK_LOG_RETENTION_DAYS", "-5")
    assert config.task_log_retention_days() == 0
