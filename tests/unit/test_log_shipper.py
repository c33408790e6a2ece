"""The agent's log shipper against a fake orchestrator that stores what it is sent as the API does."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from airflow_remote_exec.agent.client import AgentApiError, Unreachable
from airflow_remote_exec.agent.log_shipper import SHIP_BYTES_PER_SECOND, LogShipper, task_log_path
from airflow_remote_exec.agent.runner import JobKey
from airflow_remote_exec.api.datamodels import MAX_LOG_CHUNK_BYTES, LogChunkResponse

KEY = JobKey(7, 1)
LOG = "dag_id=d/run_id=r/task_id=t/attempt=1.log"


class FakeOrchestrator:
    """Stores each stream as ``api/logs.py`` does: in order, once, never with a hole."""

    def __init__(self, max_bytes: int = 10**9):
        self.logs: dict[JobKey, bytes] = {}
        self.chunks: list[tuple[JobKey, int, int]] = []  # (key, offset, length) of every request
        self.down = False
        self.refuse: AgentApiError | None = None
        self.max_bytes = max_bytes
        self.answers = 0

    def append_log(self, session_id, job_id, attempt, offset, data):
        key = JobKey(job_id, attempt)
        self.chunks.append((key, offset, len(data)))
        if self.down:
            raise Unreachable("ConnectError: refused")
        if self.refuse:
            raise self.refuse
        self.answers += 1
        held = self.logs.get(key, b"")
        if offset <= len(held):
            held = (held + data[len(held) - offset :])[: self.max_bytes]
            self.logs[key] = held
        return LogChunkResponse(size=len(held), truncated=len(held) >= self.max_bytes)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """The agent's ``[logging] base_log_folder``, where Airflow (and the shipper) create task logs."""
    monkeypatch.setenv("AIRFLOW__LOGGING__BASE_LOG_FOLDER", str(tmp_path))
    return tmp_path


def _shipper(folder, orchestrator, backlog=10**9, clock=None) -> LogShipper:
    return LogShipper(orchestrator, lambda: "session-1", folder, backlog, clock=clock or Clock())


def _write(folder: Path, text: str | bytes) -> None:
    with (folder / LOG).open("ab") as f:
        f.write(text.encode() if isinstance(text, str) else text)


def test_new_lines_are_shipped_in_order_and_a_half_written_line_waits(folder):
    orchestrator = FakeOrchestrator()
    shipper = _shipper(folder, orchestrator)
    shipper.track(KEY, LOG)
    _write(folder, "one\ntw")
    shipper.ship_round()
    assert orchestrator.logs[KEY] == b"one\n"
    _write(folder, "o\nthree\n")
    shipper.ship_round()
    assert orchestrator.logs[KEY] == b"one\ntwo\nthree\n"
    _write(folder, "no newline at the end")
    shipper.end(KEY)
    shipper.ship_round()
    assert orchestrator.logs[KEY] == b"one\ntwo\nthree\nno newline at the end"
    assert shipper.pending_bytes() == 0
    assert KEY not in shipper._streams  # done with it


def test_an_attempt_resumed_on_the_same_agent_ships_only_its_own_part_of_the_file(folder):
    """A task resumed after a deferral appends to the same log file as its first attempt."""
    orchestrator = FakeOrchestrator()
    shipper = _shipper(folder, orchestrator)
    shipper.track(KEY, LOG)
    _write(folder, "first attempt\n")
    shipper.end(KEY)
    second = JobKey(7, 2)
    shipper.track(second, LOG)
    _write(folder, "second attempt\n")
    shipper.end(second)
    shipper.ship_round()
    assert orchestrator.logs == {KEY: b"first attempt\n", second: b"second attempt\n"}


def test_an_unreachable_orchestrator_never_loses_a_line_and_the_shipper_backs_off(folder, caplog):
    orchestrator, clock = FakeOrchestrator(), Clock()
    shipper = _shipper(folder, orchestrator, clock=clock)
    shipper.track(KEY, LOG)
    _write(folder, "before\n")
    shipper.ship_round()
    orchestrator.down = True
    _write(folder, "during 1\n")
    with caplog.at_level(logging.WARNING):
        shipper.ship_round()
    assert "Cannot ship task logs" in caplog.text and "9 bytes wait on disk" in caplog.text
    tries = len(orchestrator.chunks)
    shipper.step()  # backing off: no request
    assert len(orchestrator.chunks) == tries
    _write(folder, "during 2\n")
    orchestrator.down = False
    clock.now += 1.5
    shipper.step()
    assert orchestrator.logs[KEY] == b"before\nduring 1\nduring 2\n"


def test_the_back_off_ends_when_another_request_of_the_agent_gets_an_answer(folder):
    orchestrator, clock = FakeOrchestrator(), Clock()
    shipper = _shipper(folder, orchestrator, clock=clock)
    shipper.track(KEY, LOG)
    orchestrator.down = True
    for _ in range(5):  # back-off grows
        _write(folder, "x\n")
        clock.now += 20
        shipper.ship_round()
    orchestrator.down = False
    assert shipper._backing_off()
    orchestrator.answers += 1  # a heartbeat got through: the orchestrator is back
    assert not shipper._backing_off()


def test_the_shipper_resumes_where_the_orchestrator_says_its_copy_ends(folder):
    """A chunk whose answer was lost, or an orchestrator that lost the end: the answer's size rules."""
    orchestrator = FakeOrchestrator()
    shipper = _shipper(folder, orchestrator)
    shipper.track(KEY, LOG)
    _write(folder, "a\nb\n")
    shipper.ship_round()
    orchestrator.logs[KEY] = b"a\n"  # the orchestrator holds less than the agent thinks
    _write(folder, "c\n")
    shipper.ship_round()
    shipper.ship_round()
    assert orchestrator.logs[KEY] == b"a\nb\nc\n"


def test_a_refused_stream_is_given_up_and_the_others_go_on(folder, caplog):
    orchestrator = FakeOrchestrator()
    shipper = _shipper(folder, orchestrator)
    shipper.track(KEY, LOG)
    _write(folder, "x\n")
    orchestrator.refuse = AgentApiError(404, "This agent ran no task as attempt 1 of job 7")
    with caplog.at_level(logging.WARNING):
        shipper.ship_round()
    assert "Not shipping the log of job 7 attempt 1" in caplog.text
    assert shipper.pending_bytes() == 0


def test_a_log_the_orchestrator_cut_at_its_cap_is_not_sent_again(folder):
    orchestrator = FakeOrchestrator(max_bytes=4)
    shipper = _shipper(folder, orchestrator)
    shipper.track(KEY, LOG)
    _write(folder, "12345678\n")
    shipper.ship_round()
    _write(folder, "more\n")
    shipper.ship_round()
    assert orchestrator.logs[KEY] == b"1234"
    assert len(orchestrator.chunks) == 1


def test_a_round_sends_at_most_the_rate_in_chunks_of_at_most_the_chunk_size(folder):
    orchestrator = FakeOrchestrator()
    shipper = _shipper(folder, orchestrator)
    shipper.track(KEY, LOG)
    _write(folder, b"y" * (MAX_LOG_CHUNK_BYTES - 1) + b"\n")
    _write(folder, (b"z" * 1000 + b"\n") * (SHIP_BYTES_PER_SECOND // 1000))
    shipper.ship_round()
    sent = [length for _, _, length in orchestrator.chunks]
    assert len(sent) == 1 and sent[0] <= MAX_LOG_CHUNK_BYTES  # one chunk per log and round
    assert shipper.pending_bytes() > 0
    for _ in range(10):
        shipper.ship_round()
    sent = [length for _, _, length in orchestrator.chunks]
    assert max(sent) <= MAX_LOG_CHUNK_BYTES and len(sent) <= 7
    assert shipper.pending_bytes() == 0


def test_past_the_backlog_cap_the_largest_finished_rest_is_given_up_and_running_logs_do_not_count(
    folder, caplog
):
    orchestrator, clock = FakeOrchestrator(), Clock()
    shipper = _shipper(folder, orchestrator, backlog=30, clock=clock)
    orchestrator.down = True
    small, big, running = JobKey(1, 1), JobKey(2, 1), JobKey(3, 1)
    for key, text in ((small, "s" * 9 + "\n"), (big, "b" * 29 + "\n"), (running, "r" * 999 + "\n")):
        path = f"dag_id=d/run_id=r/task_id=t{key.job_id}/attempt=1.log"
        shipper.track(key, path)
        (folder / path).write_text(text)
        if key != running:
            shipper.end(key)
    with caplog.at_level(logging.ERROR):
        shipper.ship_round()
        shipper.step()
    assert "giving up the last 30 bytes of the log of job 2 attempt 1" in caplog.text
    assert set(shipper._streams) == {small, running}


def test_a_chatty_task_does_not_hold_up_the_lines_of_the_others(folder):
    orchestrator = FakeOrchestrator()
    shipper = _shipper(folder, orchestrator)
    chatty, quiet = JobKey(1, 1), JobKey(2, 1)
    shipper.track(chatty, LOG)
    _write(folder, ("z" * 999 + "\n") * (2 * SHIP_BYTES_PER_SECOND // 1000))
    shipper.track(quiet, "dag_id=d/run_id=r/task_id=q/attempt=1.log")
    (folder / "dag_id=d/run_id=r/task_id=q/attempt=1.log").write_text("one line\n")
    shipper.ship_round()
    assert orchestrator.logs[quiet] == b"one line\n"
    assert 0 < len(orchestrator.logs[chatty]) < SHIP_BYTES_PER_SECOND


def test_a_log_swapped_for_a_link_before_the_task_starts_is_not_followed(folder, caplog):
    """A task run as another user could replace its log with a link to a file only the agent reads."""
    secret = folder / "agent-token"
    secret.write_text("rex_secret\n")
    (folder / LOG).parent.mkdir(parents=True)
    (folder / LOG).symlink_to(secret)
    orchestrator = FakeOrchestrator()
    shipper = _shipper(folder, orchestrator)
    with caplog.at_level(logging.WARNING):
        shipper.track(KEY, LOG)
    shipper.ship_round()
    assert "Not shipping the log of job 7 attempt 1" in caplog.text
    assert orchestrator.logs == {}


def test_the_log_opened_at_the_start_is_read_whatever_later_happens_to_its_path(folder):
    orchestrator = FakeOrchestrator()
    shipper = _shipper(folder, orchestrator)
    shipper.track(KEY, LOG)
    _write(folder, "written before the swap\n")
    secret = folder / "agent-token"
    secret.write_text("rex_secret\n")
    (folder / LOG).unlink()
    (folder / LOG).symlink_to(secret)
    shipper.end(KEY)
    shipper.ship_round()
    assert orchestrator.logs[KEY] == b"written before the swap\n"


def test_a_task_resumed_at_once_on_the_same_agent_does_not_ship_its_lines_twice(folder):
    """Attempt 2 starts before the worker collected attempt 1's end: attempt 1 ends where 2 starts."""
    orchestrator = FakeOrchestrator()
    shipper = _shipper(folder, orchestrator)
    shipper.track(KEY, LOG)
    _write(folder, "first\n")
    second = JobKey(7, 2)
    shipper.track(second, LOG)
    _write(folder, "second\n")
    shipper.end(KEY)
    shipper.end(second)
    shipper.ship_round()
    assert orchestrator.logs == {KEY: b"first\n", second: b"second\n"}


def test_a_truncated_log_ends_its_stream_instead_of_waiting_forever(folder):
    orchestrator = FakeOrchestrator()
    shipper = _shipper(folder, orchestrator)
    shipper.track(KEY, LOG)
    _write(folder, "a\nb\n")
    shipper.ship_round()
    _write(folder, "c\n")
    stream = shipper._streams[KEY]
    stream.end = stream.start + 6
    (folder / LOG).write_text("")  # truncated under the shipper
    shipper.ship_round()
    shipper.ship_round()
    assert KEY not in shipper._streams and shipper.pending_bytes() == 0


def test_the_report_of_an_ended_job_waits_for_the_tail_of_its_log(folder):
    orchestrator, clock = FakeOrchestrator(), Clock()
    shipper = _shipper(folder, orchestrator, clock=clock)
    shipper.track(KEY, LOG)
    _write(folder, "last words\n")
    reported = []
    shipper.end(KEY, lambda: reported.append(orchestrator.logs.get(KEY)), within=5.0)
    assert reported == [] and shipper.holding() == 1
    shipper.step()
    assert reported == [b"last words\n"] and shipper.holding() == 0


def test_the_report_goes_at_once_while_the_orchestrator_is_away_and_after_the_wait_at_worst(folder):
    orchestrator, clock = FakeOrchestrator(), Clock()
    shipper = _shipper(folder, orchestrator, clock=clock)
    shipper.track(KEY, LOG)
    slow = JobKey(8, 1)
    shipper.track(slow, "dag_id=d/run_id=r/task_id=t/slow.log")
    (folder / "dag_id=d/run_id=r/task_id=t/slow.log").write_text("x" * 999 + "\n" * (4 * MAX_LOG_CHUNK_BYTES))
    reported = []
    shipper.end(slow, lambda: reported.append("slow"), within=5.0)  # a tail of four rounds
    shipper.step()
    assert reported == []
    clock.now += 5.0
    shipper.step()
    assert reported == ["slow"]
    orchestrator.down = True
    _write(folder, "x\n")
    shipper.ship_round()  # unreachable: backing off
    shipper.end(KEY, lambda: reported.append("during outage"), within=5.0)
    shipper.step()
    assert reported == ["slow", "during outage"]
    assert shipper.pending_bytes() > 0  # still shipped once the orchestrator is back


def test_a_job_without_a_tracked_log_is_reported_at_once(folder):
    shipper = _shipper(folder, FakeOrchestrator())
    reported = []
    shipper.end(JobKey(99, 1), lambda: reported.append(True), within=5.0)
    assert reported == [True]


def test_an_answer_the_shipper_cannot_read_backs_off_and_still_lets_the_report_go(folder):
    """Any error of a request, not only an unreachable orchestrator, must leave reports free to go."""
    orchestrator, clock = FakeOrchestrator(), Clock()
    shipper = _shipper(folder, orchestrator, clock=clock)
    shipper.track(KEY, LOG)
    _write(folder, "x\n")
    orchestrator.refuse = ValueError("the 2xx body is not JSON")
    reported = []
    shipper.end(KEY, lambda: reported.append(True), within=5.0)
    shipper.step()
    assert reported == [True]
    orchestrator.refuse = None
    clock.now += 2
    shipper.step()
    assert orchestrator.logs[KEY] == b"x\n"


def test_a_log_that_cannot_be_opened_does_not_keep_its_job_from_starting(folder, monkeypatch):
    monkeypatch.setenv("AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FILE_PERMISSIONS", "not-octal")
    shipper = _shipper(folder, FakeOrchestrator())
    shipper.track(KEY, LOG)  # no exception
    assert not shipper._streams


def test_flush_at_shutdown_ships_what_is_left(folder):
    import time

    orchestrator = FakeOrchestrator()
    shipper = _shipper(folder, orchestrator)
    shipper.track(KEY, LOG)
    _write(folder, "z" * (3 * SHIP_BYTES_PER_SECOND))
    shipper.end(KEY)
    shipper.flush(time.monotonic() + 10)
    assert len(orchestrator.logs[KEY]) == 3 * SHIP_BYTES_PER_SECOND


def test_a_log_path_outside_the_log_folder_is_not_followed(folder, caplog):
    orchestrator = FakeOrchestrator()
    shipper = _shipper(folder, orchestrator)
    with caplog.at_level(logging.WARNING):
        shipper.track(KEY, "../outside.log")
    assert not (folder.parent / "outside.log").exists()  # not even created
    assert "outside [logging] base_log_folder" in caplog.text
    assert not shipper._streams


def test_the_log_path_comes_from_the_task_workload():
    assert task_log_path('{"log_path": "a/b.log", "ti": {}}') == "a/b.log"
    assert task_log_path('{"ti": {}}') is None
    assert task_log_path("not json") is None
    assert task_log_path("[1, 2]") is None


def test_a_job_id_used_again_does_not_lose_the_report_waiting_on_the_earlier_log(folder):
    """SQLite gives a purged job's id to the next job: the earlier stream's report still goes."""
    orchestrator = FakeOrchestrator()
    shipper = _shipper(folder, orchestrator)
    shipper.track(KEY, LOG)
    _write(folder, "x\n")
    reported = []
    orchestrator.down = True
    shipper.ship_round()  # backing off: the report would go at the next step
    shipper.end(KEY, lambda: reported.append("earlier"), within=60)
    shipper.track(KEY, "dag_id=d/run_id=r/task_id=other/attempt=1.log")
    assert reported == ["earlier"]
