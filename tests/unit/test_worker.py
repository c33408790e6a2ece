"""The worker's bookkeeping against a fake orchestrator and a fake runner pool."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest

from airflow_remote_exec import compat
from airflow_remote_exec.agent import registration
from airflow_remote_exec.agent import worker as worker_module
from airflow_remote_exec.agent.client import (
    AgentApiError,
    Conflict,
    SessionGone,
    Stopped,
    Unauthorized,
    Unreachable,
    VersionMismatch,
)
from airflow_remote_exec.agent.ledger import Session
from airflow_remote_exec.agent.runner import Assignment, JobKey, Outcome
from airflow_remote_exec.agent.threads import GuardedThreads
from airflow_remote_exec.agent.worker import Worker, WorkerSettings
from airflow_remote_exec.api.datamodels import (
    ClaimedJob,
    ClaimResponse,
    HeartbeatResponse,
    HeldJob,
    LogChunkResponse,
    RefusedReport,
    RegisterResponse,
)


class FakeClient:
    """Records what the agent sends; each hook may be replaced by a test."""

    def __init__(self):
        self.registrations: list = []
        self.heartbeats: list = []
        self.reports: list[tuple[str, HeldJob, object]] = []
        self.register_results: list = []
        self.heartbeat_result: object = HeartbeatResponse(state="active")
        self.report_error: dict[tuple[int, int], Exception] = {}
        self.claims: list = []
        self.claim_calls: list = []
        self.executors = "LocalExecutor,airflow_remote_exec.executor.RemoteExecutor"
        self.logs: dict[tuple[int, int], bytearray] = {}

    def register(self, request):
        self.registrations.append(request)
        result = self.register_results.pop(0) if self.register_results else None
        if isinstance(result, BaseException):
            raise result
        n = len(self.registrations)
        return RegisterResponse(
            session_id=f"s{n}",
            heartbeat_interval=10,
            lost_after_missed_heartbeats=3,
            claim_wait_seconds=20,
            executors=self.executors,
        )

    def heartbeat(self, session_id, request, interval):
        self.heartbeats.append((time.monotonic(), session_id, request, interval))
        if callable(self.heartbeat_result):
            return self.heartbeat_result()
        if isinstance(self.heartbeat_result, BaseException):
            raise self.heartbeat_result
        return self.heartbeat_result

    def claim(self, session_id, free_slots, wait_seconds, reports=()):
        self.claim_calls.append((session_id, free_slots, wait_seconds, list(reports)))
        result = self.claims.pop(0) if self.claims else []
        if isinstance(result, BaseException):
            raise result
        refused = self.report_many(session_id, reports, keep_trying=lambda: True)
        return ClaimResponse(jobs=result, refused=refused)

    def report_many(self, session_id, reports, keep_trying):
        refused = []
        for report in reports:
            self.reports.append((session_id, HeldJob(job_id=report.job_id, attempt=report.attempt), report))
            error = self.report_error.get((report.job_id, report.attempt))
            if isinstance(error, AgentApiError) and not isinstance(error, SessionGone):
                refused.append(
                    RefusedReport(job_id=report.job_id, attempt=report.attempt, state=report.state,
                                  status=error.status_code, detail=error.detail)
                )  # fmt: skip
            elif error is not None:
                raise error
        return refused

    answers = 0

    def append_log(self, session_id, job_id, attempt, offset, data):
        held = self.logs.setdefault((job_id, attempt), bytearray())
        if offset == len(held):
            held.extend(data)
        return LogChunkResponse(size=len(held), truncated=False)

    def deregister(self, session_id):
        pass

    def close(self):
        pass


class FakePool:
    """Runner slots without processes: a stopped job's runner dies when the test says so."""

    def __init__(self, size: int):
        self.size = size
        self.started: list[Assignment] = []
        self.stopped: list[tuple[int, int]] = []
        self.busy: set[JobKey] = set()
        self.released: list[Outcome] = []
        self.kill_on_stop = False

    def idle_count(self):
        return self.size - len(self.busy)

    def start(self, assignment):
        if self.idle_count() <= 0:
            return False
        self.started.append(assignment)
        self.busy.add(assignment.key)
        return True

    def stop_job(self, job_id, attempt):
        if JobKey(job_id, attempt) not in self.busy:
            return False
        self.stopped.append((job_id, attempt))
        if self.kill_on_stop:
            self.die(JobKey(job_id, attempt))
        return True

    def die(self, key: JobKey, state="failed", detail="runner died (signal 9)"):
        self.busy.discard(key)
        self.released.append(Outcome(key.job_id, key.attempt, state, -9, detail))

    def collect(self, timeout=0.5):
        out, self.released = self.released, []
        if not out:
            time.sleep(min(timeout, 0.05))
        return out

    def shutdown(self, timeout=10):
        pass


SETTINGS = WorkerSettings(api_url="http://orchestrator", token="t", queues=["default"], slots=4, name="a1")


@pytest.fixture(autouse=True)
def _versions(monkeypatch):
    monkeypatch.setattr(worker_module, "installed_versions", lambda: ("3.3.2", "1.3.2"))


@pytest.fixture
def client():
    return FakeClient()


@pytest.fixture
def pool():
    return FakePool(4)


@pytest.fixture
def worker(client, pool):
    worker = Worker(SETTINGS, client=client, pool=pool)
    worker._register()
    yield worker
    worker._done.set()
    worker._stop.set()


def _job(job_id: int, attempt: int = 1, kind: str = "task", pool_slots: int = 1) -> ClaimedJob:
    return ClaimedJob(job_id=job_id, attempt=attempt, kind=kind, pool_slots=pool_slots, workload="{}")


def _deliver_all(worker: Worker) -> None:
    for _ in range(20):
        if not worker.reporter.pending():
            return
        worker.reporter.step()
    raise AssertionError(f"{worker.reporter.pending()} reports stuck: neither delivered nor waiting")


def _finals(client: FakeClient) -> list[tuple[int, int, str]]:
    return [(j.job_id, j.attempt, r.state) for _, j, r in client.reports if r.state != "running"]


def _set_session(worker: Worker, **changes) -> Session:
    fields = {**worker.session.__dict__, **changes}
    worker._session = Session(**fields)
    return worker._session


# -- registration ------------------------------------------------------------------------------


def test_register_sends_airflow_and_task_sdk_versions_pid_and_hostname(worker, client):
    request = client.registrations[0]
    assert (request.airflow_version, request.task_sdk_version) == ("3.3.2", "1.3.2")
    assert request.pid > 0 and request.hostname
    assert worker.session.lost_after_missed_heartbeats == 3


def test_register_version_mismatch_exits_1_with_one_clear_line(client, pool, caplog, monkeypatch):
    monkeypatch.setattr(worker_module.signal, "signal", lambda *a: None)
    client.register_results = [VersionMismatch(426, "orchestrator runs Airflow 3.4")]
    with caplog.at_level(logging.ERROR):
        assert Worker(SETTINGS, client=client, pool=pool).run() == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and compat.AIRFLOW_VERSION in errors[0] and "Airflow 3.4" in errors[0]


def test_register_name_conflict_retries_and_says_use_own_name(client, pool, caplog, monkeypatch):
    monkeypatch.setattr(worker_module, "NAME_TAKEN_RETRY_SECONDS", 0.01)
    client.register_results = [Conflict(409, "held by host-b pid 7"), Conflict(409, "held by host-b pid 7")]
    worker = Worker(SETTINGS, client=client, pool=pool)
    with caplog.at_level(logging.WARNING):
        worker._register()
    assert len(client.registrations) == 3 and worker.session.session_id == "s3"
    assert "--name" in caplog.text


def test_runners_parse_dags_with_the_orchestrator_executors(client, pool, monkeypatch, caplog):
    """A task pinned with executor="RemoteExecutor" only parses where that name is configured."""
    monkeypatch.setenv(registration.EXECUTOR_ENV, "LocalExecutor")
    worker = Worker(SETTINGS, client=client, pool=pool)
    worker._register()
    worker._use_orchestrator_executors()
    assert registration.os.environ[registration.EXECUTOR_ENV] == client.executors
    # A later session keeps what the running runners were started with, and says how to change it.
    client.executors = "CeleryExecutor"
    with caplog.at_level(logging.WARNING):
        worker._register()
    assert "restart the agent" in caplog.text and "CeleryExecutor" in caplog.text
    worker._use_orchestrator_executors()
    assert (
        registration.os.environ[registration.EXECUTOR_ENV]
        == "LocalExecutor,airflow_remote_exec.executor.RemoteExecutor"
    )


@pytest.mark.parametrize("bad", ["LocalExecutor\x00", "Local;rm -rf /", "x" * 3000])
def test_an_orchestrator_executor_list_that_is_not_one_is_ignored(client, pool, monkeypatch, caplog, bad):
    monkeypatch.setenv(registration.EXECUTOR_ENV, "LocalExecutor")
    client.executors = bad
    worker = Worker(SETTINGS, client=client, pool=pool)
    worker._register()
    with caplog.at_level(logging.ERROR):
        worker._use_orchestrator_executors()
    assert registration.os.environ[registration.EXECUTOR_ENV] == "LocalExecutor"
    assert "Ignoring the orchestrator's [core] executor" in caplog.text


# -- outcomes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["success", "not_started", "failed"])
def test_outcome_state_from_runner_is_reported_as_is(worker, client, pool, state):
    worker._start_job(_job(1), "s1")
    pool.die(JobKey(1, 1), state=state, detail="task process exit code 1")
    worker._collect_outcomes()
    _deliver_all(worker)
    assert _finals(client) == [(1, 1, state)]


def test_unreadable_workload_is_returned_and_agent_stops_fatally(worker, client, pool, caplog):
    worker._start_job(_job(1), "s1")
    pool.die(JobKey(1, 1), state="returned", detail="ValidationError: 1 validation error for ExecuteTask")
    with caplog.at_level(logging.ERROR):
        worker._collect_outcomes()
    _deliver_all(worker)
    assert _finals(client) == [(1, 1, "returned")]
    assert worker._fatal and worker._stop.is_set()
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_callback_job_keeps_its_kind_in_the_assignment(worker, pool):
    worker._start_job(_job(9, kind="callback"), "s1")
    assert pool.started[-1].kind == "callback"


def test_runner_error_over_1000_chars_does_not_kill_outcomes(worker, client, pool):
    worker._start_job(_job(1), "s1")
    pool.die(JobKey(1, 1), detail="x" * 5000)
    worker._collect_outcomes()
    _deliver_all(worker)
    assert len(client.reports[-1][2].detail) <= 1000


# -- keyed by (job_id, attempt) ----------------------------------------------------------------


def test_stale_stop_for_old_attempt_leaves_new_attempt_running(worker, client, pool):
    worker._start_job(_job(7, attempt=2), "s1")
    client.heartbeat_result = HeartbeatResponse(state="active", stop=[HeldJob(job_id=7, attempt=1)])
    worker.heartbeat.beat(worker.session)
    assert pool.stopped == []
    assert [h.key for h in worker.ledger.active()] == [(7, 2)]
    client.heartbeat_result = HeartbeatResponse(state="active", stop=[HeldJob(job_id=7, attempt=2)])
    worker.heartbeat.beat(worker.session)
    assert pool.stopped == [(7, 2)]


def test_stale_conflict_for_old_attempt_leaves_new_attempt_running(worker, client, pool):
    client.report_error[(7, 1)] = Conflict(409, "stale attempt")
    worker.reporter.put(JobKey(7, 1), worker_module.StateReport(attempt=1, state="success"), "s1")
    worker._start_job(_job(7, attempt=2), "s1")
    _deliver_all(worker)
    assert pool.stopped == [] and [h.key for h in worker.ledger.active()] == [(7, 2)]


def test_stale_outcome_for_old_attempt_is_ignored(worker, client, pool):
    worker._start_job(_job(7, attempt=2), "s1")
    worker._finish_job(Outcome(7, 1, "failed", 1, "old"))
    _deliver_all(worker)
    assert _finals(client) == [] and [h.key for h in worker.ledger.active()] == [(7, 2)]


def test_abandoned_job_keeps_its_slots_until_its_runner_is_dead_and_gets_no_report(worker, client, pool):
    worker._start_job(_job(1, pool_slots=3), "s1")
    worker.abandon(JobKey(1, 1), "not ours")
    assert pool.stopped == [(1, 1)] and worker.ledger.free_slots() == 1
    pool.die(JobKey(1, 1))
    worker._collect_outcomes()
    _deliver_all(worker)
    assert worker.ledger.free_slots() == 4 and _finals(client) == []


def test_a_finished_task_is_reported_once_the_end_of_its_log_is_shipped(
    worker, client, pool, tmp_path, monkeypatch
):
    monkeypatch.setenv("AIRFLOW__LOGGING__BASE_LOG_FOLDER", str(tmp_path))
    worker.shipper.base_folder = tmp_path
    log_file = tmp_path / "d" / "t.log"
    job = _job(1).model_copy(update={"workload": '{"log_path": "d/t.log"}'})
    worker._start_job(job, "s1")
    _deliver_all(worker)  # the running report
    log_file.write_text('{"event": "last line"}\n')
    pool.die(JobKey(1, 1), state="success", detail="")
    worker._collect_outcomes()
    _deliver_all(worker)
    assert _finals(client) == []  # not before its log's end is on the orchestrator
    worker.shipper.step()
    assert bytes(client.logs[(1, 1)]) == b'{"event": "last line"}\n'
    _deliver_all(worker)
    assert _finals(client) == [(1, 1, "success")]


def test_an_agent_that_keeps_task_logs_ships_none(client, pool, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW__LOGGING__BASE_LOG_FOLDER", str(tmp_path))
    keeper = Worker(dataclasses.replace(SETTINGS, ship_task_logs=False), client=client, pool=pool)
    keeper._register()
    keeper.shipper.base_folder = tmp_path
    keeper._start_job(_job(1).model_copy(update={"workload": '{"log_path": "d/t.log"}'}), "s1")
    assert not keeper.shipper._streams and not (tmp_path / "d").exists()


def test_finished_job_keeps_its_slots_until_its_report_is_delivered(worker, client, pool):
    """The orchestrator counts a job against the agent's slots until its final report lands."""
    worker._start_job(_job(1, pool_slots=3), "s1")
    _deliver_all(worker)  # the running report
    pool.die(JobKey(1, 1), state="success", detail="")
    worker._collect_outcomes()
    assert worker.ledger.free_slots() == 1
    assert [j.job_id for j in worker.ledger.heartbeat_jobs("s1")] == [1]
    worker.ledger.slot_freed.clear()
    _deliver_all(worker)
    assert _finals(client) == [(1, 1, "success")]
    assert worker.ledger.free_slots() == 4 and worker.ledger.slot_freed.is_set()


def test_a_claim_carries_the_waiting_reports_and_asks_for_the_slots_their_finals_free(worker, client, pool):
    worker._start_job(_job(1, pool_slots=2), "s1")
    pool.die(JobKey(1, 1), state="success", detail="")
    worker._collect_outcomes()
    worker._claim_once()
    ((_, free_slots, wait_seconds, carried),) = client.claim_calls
    assert (free_slots, wait_seconds) == (4, 0)  # answered at once: the next claim waits for jobs
    assert [(r.job_id, r.state) for r in carried] == [(1, "running"), (1, "success")]
    assert worker.reporter.pending() == 0 and worker.ledger.free_slots() == 4


def test_a_claim_leaves_the_reports_to_a_batch_being_sent(worker, client, pool):
    worker._start_job(_job(1, pool_slots=2), "s1")
    pool.die(JobKey(1, 1), state="success", detail="")
    worker._collect_outcomes()
    with worker.reporter.delivering:
        worker._claim_once()
    ((_, free_slots, wait_seconds, carried),) = client.claim_calls
    assert (free_slots, wait_seconds, carried) == (2, 20, [])  # the unreported job keeps its slots
    assert worker.reporter.pending() == 2


def test_reports_a_failed_claim_carried_go_back_and_are_delivered_in_order(worker, client, pool):
    worker._start_job(_job(1), "s1")
    pool.die(JobKey(1, 1), state="failed", detail="runner died")
    worker._collect_outcomes()
    client.claims = [Stopped("the agent is stopping")]
    worker._claim_once()
    assert worker.reporter.pending() == 2 and client.reports == []
    _deliver_all(worker)
    assert [(j.job_id, r.state) for _, j, r in client.reports] == [(1, "running"), (1, "failed")]
    assert worker.ledger.free_slots() == 4


# -- heartbeat ---------------------------------------------------------------------------------


def test_heartbeat_runs_at_a_fixed_rate_from_each_request_start(worker, client):
    _set_session(worker, heartbeat_interval=0.5)

    def slow():
        time.sleep(0.3)
        return HeartbeatResponse(state="active")

    client.heartbeat_result = slow
    for _ in range(3):
        worker.heartbeat.step()
    starts = [beat[0] for beat in client.heartbeats]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(0.45 < gap < 0.65 for gap in gaps), gaps


def test_heartbeat_lists_jobs_whose_final_report_is_undelivered(worker, client, pool):
    worker._start_job(_job(1), "s1")
    worker._start_job(_job(2, attempt=3), "s1")
    pool.die(JobKey(2, 3), state="success", detail=None)
    worker._collect_outcomes()  # job 2's report is queued, not delivered
    worker.heartbeat.beat(worker.session)
    running = client.heartbeats[-1][2].running
    assert sorted((j.job_id, j.attempt) for j in running) == [(1, 1), (2, 3)]
    _deliver_all(worker)
    worker.heartbeat.beat(worker.session)
    assert [(j.job_id, j.attempt) for j in client.heartbeats[-1][2].running] == [(1, 1)]


def test_tasks_stopped_half_an_interval_before_the_agent_would_be_lost(worker, client, pool):
    session = _set_session(worker, heartbeat_interval=0.5, lost_after_missed_heartbeats=3)
    worker._start_job(_job(1), "s1")
    worker._start_job(_job(2), "s1")
    client.heartbeat_result = Unreachable("ConnectTimeout")
    worker.heartbeat.beat(session)
    assert pool.stopped == []  # silent for less than 2.5 intervals
    time.sleep(max(0.0, 1.25 - worker.heartbeat.silence(session)) + 0.05)
    worker._collect_outcomes()  # the outcomes thread's wake-up checks the silence too
    assert sorted(pool.stopped) == [(1, 1), (2, 1)]
    for key in [JobKey(1, 1), JobKey(2, 1)]:
        pool.die(key)
    worker._collect_outcomes()
    _deliver_all(worker)  # still attempted; the orchestrator may refuse them
    reports = [r for _, _, r in client.reports if r.state != "running"]
    assert [r.state for r in reports] == ["failed", "failed"]
    assert all("no heartbeat accepted" in r.detail for r in reports)


def test_session_gone_stops_jobs_and_registers_without_holding_the_ledger_lock(worker, client, pool):
    worker._start_job(_job(1), "s1")
    release = threading.Event()
    registering = threading.Event()
    original = client.register

    def slow_register(request):
        registering.set()
        release.wait(5)
        return original(request)

    client.register = slow_register
    client.heartbeat_result = SessionGone(410, "lost")
    thread = threading.Thread(target=worker.heartbeat.beat, args=(worker.session,))
    thread.start()
    assert registering.wait(5)
    assert worker.ledger.free_slots() == 3  # not blocked by the registration
    assert worker.health()[1]["running_jobs"] == 1
    release.set()
    thread.join(5)
    assert pool.stopped == [(1, 1)] and worker.session.session_id == "s2"


def test_register_error_does_not_escape_the_claim_loop(worker, client):
    client.claims = [SessionGone(410, "lost")]
    client.register_results = [AgentApiError(403, "queue outside the token's scope")]
    worker._claim_loop()  # returns: the refusal is fatal, not an exception
    assert worker._fatal and "403" in worker._fatal


# -- drain and threads -----------------------------------------------------------------------------


def test_rejected_token_stops_running_jobs_at_once_and_stops_the_agent(worker, client, pool, caplog):
    worker._start_job(_job(1), worker.session.session_id)
    client.heartbeat_result = Unauthorized(401, "Agent token is unknown, expired or revoked.")
    with caplog.at_level(logging.ERROR):
        worker.heartbeat.beat(worker.session)
        worker.heartbeat.beat(worker.session)
    assert pool.stopped == [(1, 1)]  # not left running until the drain timeout
    assert worker.draining() and not worker.health()[0]
    assert caplog.text.count("Agent token rejected") == 1


def test_a_rejected_token_stops_the_agent_without_waiting_on_what_it_cannot_deliver(worker, client, caplog):
    """Nothing gets past a revoked token: a report or log still waiting must not hold the exit."""
    worker.ledger.awaiting_report(JobKey(1, 1), worker.session.session_id)  # its report undelivered
    worker.shipper.pending_bytes = lambda: 4096  # and part of a log
    worker.token_rejected(Unauthorized(401, "Agent token is unknown, expired or revoked."))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        worker._drain()
    assert time.monotonic() - started < 5  # not REPORT_FLUSH_SECONDS, nor LOG_FLUSH_SECONDS
    assert worker.reporter.give_up.is_set()
    assert "Token rejected: 1 job reports and the unshipped task logs are not delivered" in caplog.text


def test_a_later_different_fatal_error_is_logged_too(worker, caplog):
    with caplog.at_level(logging.ERROR):
        worker.fail("Cannot read the workload")
        worker.fail("Cannot read the workload")
        worker.fail("Agent token rejected")
    assert caplog.text.count("Cannot read the workload") == 1 and "Agent token rejected" in caplog.text


def test_drain_timeout_terminates_jobs_and_reports_them_failed(client, pool, monkeypatch):
    monkeypatch.setattr(worker_module, "REPORT_FLUSH_SECONDS", 2)
    settings = WorkerSettings(**{**SETTINGS.__dict__, "drain_timeout": 0.3})
    worker = Worker(settings, client=client, pool=pool)
    worker._register()
    pool.kill_on_stop = True
    worker._start_job(_job(1), "s1")
    worker._start_job(_job(2), "s1")
    worker.abandon(JobKey(2, 1), "not ours")  # an abandoned job gets no report
    worker.start_threads()
    worker._stop.set()
    worker._drain()
    finals = [(j.job_id, r.state, r.detail) for _, j, r in client.reports if r.state != "running"]
    assert len(finals) == 1 and finals[0][:2] == (1, "failed")
    assert "terminated at drain timeout after 0 s" in finals[0][2]


def test_loop_error_is_logged_and_the_loop_goes_on(caplog):
    done, calls = threading.Event(), []

    def step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        done.set()

    threads = GuardedThreads(done)
    with caplog.at_level(logging.ERROR):
        threads.start("reporter", step).join(5)
    assert len(calls) == 2 and "boom" in caplog.text and "Traceback" in caplog.text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_turns_unhealthy_and_names_a_dead_thread(worker):
    worker.threads.start("heartbeat", lambda: (_ for _ in ()).throw(SystemExit()))
    time.sleep(0.2)
    healthy, body = worker.health()
    assert not healthy and body["dead_threads"] == ["heartbeat"]


def test_a_batch_whose_reply_cannot_be_read_is_sent_again(worker, client, pool):
    """An unreadable answer (a proxy's HTML page, say) strands nothing: the batch goes again."""
    worker._start_job(_job(1), "s1")
    pool.die(JobKey(1, 1), state="success", detail="")
    worker._collect_outcomes()
    real_report_many = client.report_many

    def unreadable_once(session_id, reports, keep_trying):
        client.report_many = real_report_many
        raise ValueError("Expecting value: line 1 column 1 (char 0)")

    client.report_many = unreadable_once
    with pytest.raises(ValueError):
        worker.reporter.step()
    _deliver_all(worker)
    assert _finals(client) == [(1, 1, "success")]
    assert worker.reporter.pending() == 0 and worker.ledger.free_slots() == 4


def test_a_refused_claim_backs_off_without_holding_up_the_reporter(worker, client, pool):
    worker._start_job(_job(1), "s1")
    client.claims = [AgentApiError(422, "unprocessable")]
    thread = threading.Thread(target=worker._claim_once)
    thread.start()
    try:
        time.sleep(0.5)  # the claim was refused; the claim loop now waits out its back-off
        assert len(client.claim_calls) == 1 and thread.is_alive()
        assert not worker.reporter.delivering.locked()
        _deliver_all(worker)  # the running report it carried goes out meanwhile
        assert [(j.job_id, r.state) for _, j, r in client.reports][-1] == (1, "running")
    finally:
        worker._stop.set()
        thread.join(5)


def test_a_final_report_is_queued_before_the_full_agent_is_woken_to_carry_it(worker, client, pool):
    for job_id in range(1, 5):
        worker._start_job(_job(job_id), "s1")
    _deliver_all(worker)
    queued_when_woken = []

    class Recording(threading.Event):
        def set(self):
            queued_when_woken.append(worker.reporter.pending())
            super().set()

    worker.ledger.slot_freed = Recording()
    pool.die(JobKey(1, 1), state="success", detail="")
    worker._collect_outcomes()
    assert queued_when_woken and queued_when_woken[0] == 1
