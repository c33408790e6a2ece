"""Claiming and reporting through the agent API."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from sqlalchemy import select, update

from airflow_remote_exec import config
from airflow_remote_exec.api import jobs as jobs_api
from airflow_remote_exec.api.wakeup import job_wakeup
from airflow_remote_exec.models import AgentState, JobState, RemoteAgent, RemoteJob
from dev.stack import wait_until
from tests.api.conftest import headers
from tests.factories import make_job


def _add(session, *jobs: RemoteJob) -> list[int]:
    session.add_all(jobs)
    session.commit()
    return [job.id for job in jobs]


def _claim(client, token, session_id, free_slots=4, wait=0.0):
    reply = client.post(
        f"/agents/{session_id}/jobs/claim",
        json={"free_slots": free_slots, "wait_seconds": wait},
        headers=headers(token),
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["jobs"]


def _report(client, token, session_id, job_id, attempt, state, **extra):
    return client.post(
        f"/agents/{session_id}/jobs/{job_id}/state",
        json={"attempt": attempt, "state": state, **extra},
        headers=headers(token),
    )


def _job(session, job_id) -> RemoteJob:
    session.expire_all()
    return session.get(RemoteJob, job_id)


def _count_claim_attempts(monkeypatch) -> list[str]:
    """The session id of every claim attempt the API makes from now on, in order."""
    calls: list[str] = []
    real_claim_jobs = jobs_api.claim_jobs

    def counted(secret, session_id, *args):
        calls.append(session_id)
        return real_claim_jobs(secret, session_id, *args)

    monkeypatch.setattr(jobs_api, "claim_jobs", counted)
    return calls


def test_claim_takes_only_the_agents_queues_highest_priority_first(client, session, make_token, register):
    token = make_token(queues=("default", "gpu"))
    session_id = register(token, queues=("default",))
    low, high, other = _add(
        session,
        make_job("low", priority_weight=1),
        make_job("high", priority_weight=9),
        make_job("other", queue="gpu"),
    )
    jobs = _claim(client, token, session_id)
    assert [j["job_id"] for j in jobs] == [high, low]
    assert all(j["attempt"] == 1 for j in jobs)
    assert _job(session, other).state == JobState.QUEUED
    claimed = _job(session, high)
    assert (claimed.state, claimed.agent_name) == (JobState.CLAIMED, "agent-1")


def test_claim_respects_free_slots_and_pool_slots(client, session, make_token, register):
    token = make_token()
    session_id = register(token, slots=5)
    big, small1, small2 = _add(
        session,
        make_job("big", pool_slots=3, priority_weight=5),
        make_job("small1", priority_weight=4),
        make_job("small2", priority_weight=3),
    )
    jobs = _claim(client, token, session_id, free_slots=2)
    assert [j["job_id"] for j in jobs] == [small1, small2]  # big does not fit in 2 slots
    assert _job(session, big).state == JobState.QUEUED
    jobs = _claim(client, token, session_id, free_slots=3)
    assert [j["job_id"] for j in jobs] == [big]


def test_claim_never_exceeds_the_agents_slots_minus_the_jobs_it_holds(client, session, make_token, register):
    """An agent that says it has free slots while it holds jobs gets only what its slots leave."""
    token = make_token()
    session_id = register(token, slots=2)
    job_ids = _add(session, *(make_job(f"held{n}") for n in range(3)), make_job("wide", pool_slots=8))
    first = _claim(client, token, session_id, free_slots=2)
    assert [j["job_id"] for j in first] == job_ids[:2]
    assert _claim(client, token, session_id, free_slots=2) == []
    assert _report(client, token, session_id, job_ids[0], 1, "success").status_code == 204
    again = _claim(client, token, session_id, free_slots=2)
    assert [j["job_id"] for j in again] == [job_ids[2]]
    assert _job(session, job_ids[3]).state == JobState.QUEUED  # the wide job needs the whole agent


def test_concurrent_claimers_never_take_the_same_job(client, session, make_token, register):
    token = make_token()
    sessions = [register(token, name=f"a{n}") for n in range(6)]
    job_ids = _add(session, *(make_job(f"race{n}") for n in range(10)))
    start = threading.Barrier(len(sessions))
    taken: list[int] = []

    def claimer(session_id: str) -> None:
        start.wait()
        for _ in range(3):
            taken.extend(j["job_id"] for j in _claim(client, token, session_id, free_slots=2))

    threads = [threading.Thread(target=claimer, args=(s,)) for s in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(taken) == sorted(job_ids)  # every job once, none twice


def test_draining_agent_claims_nothing(client, session, make_token, register):
    token = make_token()
    session_id = register(token)
    _add(session, make_job("x"))
    client.post(
        f"/agents/{session_id}/heartbeat", json={"free_slots": 4, "draining": True}, headers=headers(token)
    )
    assert session.scalar(select(RemoteAgent.state)) == AgentState.DRAINING
    assert _claim(client, token, session_id) == []


def test_long_poll_returns_a_job_queued_while_waiting(client, session, make_token, register):
    token = make_token()
    session_id = register(token)

    def queue_later():
        time.sleep(0.5)
        _add(session, make_job("late"))

    thread = threading.Thread(target=queue_later)
    started = time.monotonic()
    thread.start()
    jobs = _claim(client, token, session_id, wait=10)
    elapsed = time.monotonic() - started
    thread.join()
    assert [j for j in jobs if j["job_id"]], "the job queued during the wait was not returned"
    assert elapsed >= 0.45, "the claim returned before the job was queued: nothing waited"
    assert elapsed < 5, f"long-poll answered after {elapsed:.1f}s"


def test_long_poll_times_out_empty(client, make_token, register):
    token = make_token()
    session_id = register(token)
    started = time.monotonic()
    assert _claim(client, token, session_id, wait=0.5) == []
    assert 0.4 < time.monotonic() - started < 10


def test_a_newer_claim_of_the_session_makes_the_waiting_one_return_empty(client, make_token, register):
    token = make_token()
    session_id = register(token)
    first: dict = {}

    def wait_long():
        started = time.monotonic()
        first["jobs"] = _claim(client, token, session_id, wait=20)
        first["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=wait_long)
    thread.start()
    time.sleep(1.0)
    assert _claim(client, token, session_id, wait=0.5) == []
    thread.join(30)
    assert first["jobs"] == [] and first["seconds"] < 10, first


def test_a_claim_refused_for_its_token_does_not_end_the_sessions_waiting_claim(
    client, session, make_token, register
):
    token, other = make_token("mine"), make_token("other")
    session_id = register(token)
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(jobs=_claim(client, token, session_id, wait=20)))
    thread.start()
    time.sleep(1.0)
    for intruder in (other, "rex_not-a-token"):
        reply = client.post(
            f"/agents/{session_id}/jobs/claim", json={"free_slots": 1}, headers=headers(intruder)
        )
        assert reply.status_code in (401, 403), reply.text
    (job_id,) = _add(session, make_job("still-waiting"))
    thread.join(30)
    assert [j["job_id"] for j in first["jobs"]] == [job_id]


def test_a_queued_job_wakes_one_waiter_of_its_queue_and_no_other(
    client, session, make_token, register, monkeypatch
):
    """Four claims wait: three on "default", one on "gpu". One default job wakes exactly one claim."""
    token = make_token(queues=("default", "gpu"))
    sessions = {name: register(token, name=name) for name in ("d1", "d2", "d3")}
    sessions["g1"] = register(token, name="g1", queues=("gpu",))
    calls = _count_claim_attempts(monkeypatch)
    results: dict[str, list] = {}
    threads = [
        threading.Thread(target=lambda n=n, s=s: results.__setitem__(n, _claim(client, token, s, wait=4)))
        for n, s in sessions.items()
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(calls) == 4, 10, what="every claim to try once and wait")
    (job_id,) = _add(session, make_job("wake-one"))
    for thread in threads:
        thread.join(30)
    winners = [name for name, jobs in results.items() if jobs]
    assert winners and winners[0] in ("d1", "d2", "d3") and len(winners) == 1, results
    assert results[winners[0]][0]["job_id"] == job_id
    assert len(calls) == 5, f"one claim woken for one job, not {len(calls) - 4}: {calls}"
    assert calls.count(sessions["g1"]) == 1  # the gpu claim was never woken


@pytest.mark.parametrize("blocker", ["draining", "too_few_free_slots", "ended_session"])
def test_a_waiting_claim_that_cannot_take_the_job_does_not_keep_it_from_another(
    client, session, make_token, register, monkeypatch, blocker
):
    """The older of two waiting claims cannot take the new job: the younger one gets it at once, not at
    the next recheck (5 s here, as with LISTEN on Postgres)."""
    monkeypatch.setattr(config, "wakeup_poll_interval", lambda: 5.0)
    token = make_token()
    older, younger = register(token, name="older"), register(token, name="younger")
    if blocker == "draining":
        session.execute(
            update(RemoteAgent).where(RemoteAgent.name == "older").values(state=AgentState.DRAINING)
        )
        session.commit()
    calls = _count_claim_attempts(monkeypatch)
    results: dict[str, tuple[int, float]] = {}

    def claim(name: str, session_id: str, free_slots: int) -> None:
        reply = client.post(
            f"/agents/{session_id}/jobs/claim",
            json={"free_slots": free_slots, "wait_seconds": 15},
            headers=headers(token),
        )
        results[name] = (reply.status_code, reply.json(), time.monotonic())

    first = threading.Thread(target=claim, args=("older", older, 1 if blocker == "too_few_free_slots" else 4))
    first.start()
    wait_until(lambda: len(calls) == 1, 10, what="the older claim to wait")
    if blocker == "ended_session":
        register(token, name="older")  # the same process registers again: the waiting claim's session ends
    second = threading.Thread(target=claim, args=("younger", younger, 4))
    second.start()
    wait_until(lambda: len(calls) == 2, 10, what="the younger claim to wait")
    time.sleep(0.2)
    (job_id,) = _add(session, make_job("needs-two", pool_slots=2))
    queued = time.monotonic()
    job_wakeup._signal_from_thread()  # what the LISTEN thread does on a NOTIFY
    second.join(30)
    first.join(30)
    status, body, answered = results["younger"]
    assert (status, [j["job_id"] for j in body["jobs"]]) == (200, [job_id])
    assert answered - queued < 2.0, (
        f"the younger claim got the job {answered - queued:.1f} s after it was queued"
    )


def test_report_lifecycle_sets_pending_sync(client, session, make_token, register):
    token = make_token()
    session_id = register(token)
    (job_id,) = _add(session, make_job("life"))
    (claimed,) = _claim(client, token, session_id)
    assert _report(client, token, session_id, job_id, claimed["attempt"], "running").status_code == 204
    job = _job(session, job_id)
    assert (job.state, job.pending_sync, job.started_at is not None) == (JobState.RUNNING, True, True)
    reply = _report(client, token, session_id, job_id, claimed["attempt"], "success", exit_code=0)
    assert reply.status_code == 204
    # A retried report that already landed is accepted again.
    assert (
        _report(client, token, session_id, job_id, claimed["attempt"], "success", exit_code=0).status_code
        == 204
    )
    job = _job(session, job_id)
    assert (job.state, job.exit_code, job.finished_at is not None) == (JobState.SUCCESS, 0, True)


def test_failed_report_keeps_its_detail(client, session, make_token, register):
    token = make_token()
    session_id = register(token)
    (job_id,) = _add(session, make_job("boom"))
    (claimed,) = _claim(client, token, session_id)
    reply = _report(
        client, token, session_id, job_id, claimed["attempt"], "failed", exit_code=-9, detail="killed"
    )
    assert reply.status_code == 204
    job = _job(session, job_id)
    assert (job.state, job.detail) == (JobState.FAILED, "killed")


def test_report_on_job_held_by_another_agent_is_403(client, session, make_token, register):
    token = make_token()
    holder, other = register(token, name="holder"), register(token, name="other")
    (job_id,) = _add(session, make_job("held"))
    (claimed,) = _claim(client, token, holder)
    assert _report(client, token, other, job_id, claimed["attempt"], "success").status_code == 403


def test_stale_attempt_is_409(client, session, make_token, register):
    token = make_token()
    session_id = register(token)
    (job_id,) = _add(session, make_job("stale"))
    (claimed,) = _claim(client, token, session_id)
    reply = _report(client, token, session_id, job_id, claimed["attempt"] - 1, "success")
    assert reply.status_code == 409
    assert "Stale" in reply.json()["detail"]


def test_report_on_unknown_job_is_404(client, make_token, register):
    token = make_token()
    session_id = register(token)
    assert _report(client, token, session_id, 999999, 1, "success").status_code == 404


def test_finished_job_cannot_change_state(client, session, make_token, register):
    token = make_token()
    session_id = register(token)
    (job_id,) = _add(session, make_job("done"))
    (claimed,) = _claim(client, token, session_id)
    _report(client, token, session_id, job_id, claimed["attempt"], "success")
    assert _report(client, token, session_id, job_id, claimed["attempt"], "running").status_code == 409


def test_heartbeat_tells_agent_to_stop_jobs_it_no_longer_holds(client, session, make_token, register):
    token = make_token()
    session_id = register(token)
    (job_id,) = _add(session, make_job("hb"))
    (claimed,) = _claim(client, token, session_id)
    body = {"free_slots": 3, "running": [{"job_id": job_id, "attempt": claimed["attempt"]}]}
    reply = client.post(f"/agents/{session_id}/heartbeat", json=body, headers=headers(token))
    assert reply.json() == {"state": AgentState.ACTIVE, "stop": []}
    session.delete(_job(session, job_id))  # revoked by the scheduler
    session.commit()
    reply = client.post(f"/agents/{session_id}/heartbeat", json=body, headers=headers(token))
    assert reply.json()["stop"] == [{"job_id": job_id, "attempt": claimed["attempt"]}]


def test_deregister_requeues_unstarted_and_fails_running_jobs(client, session, make_token, register):
    token = make_token()
    session_id = register(token)
    unstarted, running = _add(session, make_job("u", priority_weight=2), make_job("r", priority_weight=1))
    claims = {j["job_id"]: j["attempt"] for j in _claim(client, token, session_id)}
    _report(client, token, session_id, running, claims[running], "running")
    assert client.delete(f"/agents/{session_id}", headers=headers(token)).status_code == 204
    assert _job(session, unstarted).state == JobState.QUEUED
    job = _job(session, running)
    assert (job.state, job.pending_sync) == (JobState.FAILED, True)
    assert "shut down" in job.detail
    assert session.scalar(select(RemoteAgent.state)) == AgentState.GONE


def test_re_registration_fences_the_previous_session(client, session, make_token, register):
    token = make_token()
    old = register(token)
    (job_id,) = _add(session, make_job("fence"))
    (claimed,) = _claim(client, token, old)
    new = register(token)
    assert new != old
    assert _job(session, job_id).state == JobState.QUEUED
    (reclaimed,) = _claim(client, token, new)
    assert reclaimed["attempt"] == claimed["attempt"] + 1
    assert _report(client, token, old, job_id, claimed["attempt"], "success").status_code == 410
    assert _report(client, token, new, job_id, claimed["attempt"], "success").status_code == 409


def test_fenced_job_is_not_claimed_before_not_before(client, session, make_token, register):
    from datetime import timedelta

    from airflow_remote_exec.models import utcnow

    token = make_token()
    session_id = register(token)
    (fenced,) = _add(session, make_job("fenced", not_before=utcnow() + timedelta(seconds=60)))
    assert _claim(client, token, session_id) == []
    job = _job(session, fenced)
    job.not_before = utcnow() - timedelta(seconds=1)
    session.commit()
    assert [j["job_id"] for j in _claim(client, token, session_id)] == [fenced]


def test_operator_drain_and_resume(client, session, make_token, register):
    from airflow_remote_exec.cli_commands import _set_drain
    from airflow_remote_exec.models import RemoteAgentEvent

    token = make_token()
    session_id = register(token)
    _add(session, make_job("wait-for-resume"))
    _set_drain("agent-1", True)
    reply = client.post(f"/agents/{session_id}/heartbeat", json={"free_slots": 4}, headers=headers(token))
    assert reply.json()["state"] == AgentState.DRAINING  # the agent's heartbeat does not undo it
    assert _claim(client, token, session_id) == []
    _set_drain("agent-1", False)
    assert len(_claim(client, token, session_id)) == 1
    session.expire_all()
    states = [e.state for e in session.scalars(select(RemoteAgentEvent).order_by(RemoteAgentEvent.id))]
    assert states == [AgentState.REGISTERED, AgentState.DRAINING, AgentState.ACTIVE]


def test_reports_in_one_request_apply_in_order_and_list_each_refusal(client, session, make_token, register):
    token = make_token()
    session_id = register(token)
    first, second = _add(session, make_job("batch1"), make_job("batch2"))
    attempts = {j["job_id"]: j["attempt"] for j in _claim(client, token, session_id)}
    reports = [
        {"job_id": second, "attempt": attempts[second] + 1, "state": "running"},  # stale
        {"job_id": first, "attempt": attempts[first], "state": "running"},
        {"job_id": first, "attempt": attempts[first], "state": "failed", "exit_code": 1, "detail": "boom"},
        {"job_id": 999999, "attempt": 1, "state": "success"},
    ]
    reply = client.post(
        f"/agents/{session_id}/jobs/reports", json={"reports": reports}, headers=headers(token)
    )
    assert reply.status_code == 200, reply.text
    refused = {(r["job_id"], r["state"]): r["status"] for r in reply.json()["refused"]}
    assert refused == {(second, "running"): 409, (999999, "success"): 404}
    job = _job(session, first)
    assert (job.state, job.detail, job.started_at is not None) == (JobState.FAILED, "boom", True)
    assert _job(session, second).state == JobState.CLAIMED


def test_a_claim_carrying_a_final_report_uses_the_slot_it_frees(client, session, make_token, register):
    """One request per task: the outcome of the last job rides on the claim of the next."""
    token = make_token()
    session_id = register(token, slots=1)
    first, second = _add(session, make_job("carry1", priority_weight=2), make_job("carry2"))
    (claimed,) = _claim(client, token, session_id, free_slots=1)
    assert claimed["job_id"] == first
    body = {
        "free_slots": 1,
        "wait_seconds": 5,
        "reports": [{"job_id": first, "attempt": claimed["attempt"], "state": "success", "exit_code": 0}],
    }
    started = time.monotonic()
    reply = client.post(f"/agents/{session_id}/jobs/claim", json=body, headers=headers(token))
    assert reply.status_code == 200, reply.text
    assert [j["job_id"] for j in reply.json()["jobs"]] == [second]
    assert reply.json()["refused"] == []
    assert _job(session, first).state == JobState.SUCCESS
    # Reports delivered with nothing to claim are answered at once, not after the long-poll.
    body["reports"] = [{"job_id": second, "attempt": 1, "state": "running"}]
    reply = client.post(f"/agents/{session_id}/jobs/claim", json=body, headers=headers(token))
    assert reply.json() == {"jobs": [], "refused": []}
    assert time.monotonic() - started < 4
    assert _job(session, second).state == JobState.RUNNING


def test_a_claim_asking_for_no_slots_must_carry_reports(client, make_token, register):
    token = make_token()
    session_id = register(token)
    body = {"free_slots": 0, "wait_seconds": 3}
    started = time.monotonic()
    reply = client.post(f"/agents/{session_id}/jobs/claim", json=body, headers=headers(token))
    assert reply.status_code == 422 and time.monotonic() - started < 2
    assert "reports" in reply.text


def test_a_job_handed_back_on_a_claim_is_not_claimed_again_by_that_claim(
    client, session, make_token, register
):
    token = make_token()
    session_id = register(token)
    (job_id,) = _add(session, make_job("handback"))
    (claimed,) = _claim(client, token, session_id)
    body = {
        "free_slots": 1,
        "reports": [
            {"job_id": job_id, "attempt": claimed["attempt"], "state": "returned", "detail": "unreadable"}
        ],
    }
    reply = client.post(f"/agents/{session_id}/jobs/claim", json=body, headers=headers(token))
    assert reply.json() == {"jobs": [], "refused": []}
    assert _job(session, job_id).state == JobState.QUEUED


def test_a_job_returned_in_a_batch_is_no_longer_the_agents_for_the_reports_after_it(
    client, session, make_token, register
):
    token = make_token()
    session_id = register(token)
    (job_id,) = _add(session, make_job("returned-then"))
    (claimed,) = _claim(client, token, session_id)
    attempt = claimed["attempt"]
    reports = [
        {"job_id": job_id, "attempt": attempt, "state": "running"},
        {"job_id": job_id, "attempt": attempt, "state": "running"},  # a re-send: changes nothing
        {"job_id": job_id, "attempt": attempt, "state": "returned", "detail": "unreadable"},
        {"job_id": job_id, "attempt": attempt, "state": "success"},
    ]
    reply = client.post(
        f"/agents/{session_id}/jobs/reports", json={"reports": reports}, headers=headers(token)
    )
    assert [(r["state"], r["status"]) for r in reply.json()["refused"]] == [("success", 403)]
    job = _job(session, job_id)
    assert (job.state, job.agent_name, job.claim_request_id) == (JobState.QUEUED, None, None)


def _statements_of(fn) -> int:
    from airflow import settings
    from sqlalchemy import event

    count = 0

    def counted(*_args) -> None:
        nonlocal count
        count += 1

    event.listen(settings.engine, "before_cursor_execute", counted)
    try:
        fn()
    finally:
        event.remove(settings.engine, "before_cursor_execute", counted)
    return count


def test_a_claims_statements_do_not_grow_with_the_reports_it_carries_or_the_jobs_it_takes(
    client, session, make_token, register
):
    """A busy agent's claim carries the outcomes of a whole batch and takes the next batch: its cost
    in statements is the same for one job as for eight."""
    token = make_token()
    session_id = register(token, slots=8)

    def cycle(size: int) -> int:
        _add(session, *(make_job(f"cost-{size}-{i}") for i in range(size)))
        claimed = _claim(client, token, session_id, free_slots=size)
        assert len(claimed) == size
        finals = [{"job_id": j["job_id"], "attempt": j["attempt"], "state": "success"} for j in claimed]
        _add(session, *(make_job(f"next-{size}-{i}") for i in range(size)))
        body = {"free_slots": size, "reports": finals}

        def claim_carrying_finals() -> None:
            reply = client.post(f"/agents/{session_id}/jobs/claim", json=body, headers=headers(token))
            assert reply.json()["refused"] == [] and len(reply.json()["jobs"]) == size

        statements = _statements_of(claim_carrying_finals)
        # Leave nothing held for the next round.
        taken = session.scalars(select(RemoteJob).where(RemoteJob.state == JobState.CLAIMED)).all()
        session.execute(
            update(RemoteJob).where(RemoteJob.id.in_([j.id for j in taken])).values(state="success")
        )
        session.commit()
        return statements

    assert cycle(1) == cycle(8)


def test_a_wakeup_count_refused_for_want_of_a_thread_logs_one_line(
    client, make_token, register, monkeypatch, caplog
):
    """Past saturation the wake-up count gets no database thread in time: a warning, not a traceback."""
    from fastapi import HTTPException

    from airflow_remote_exec.api import wakeup

    async def no_thread(function, *args):
        raise HTTPException(503, "No database thread was free within 5 s; retry.")

    monkeypatch.setattr(wakeup, "run_db", no_thread)
    monkeypatch.setattr(config, "wakeup_poll_interval", lambda: 5.0)
    token = make_token()
    session_id = register(token)
    calls = _count_claim_attempts(monkeypatch)
    claim = threading.Thread(
        target=client.post,
        args=(f"/agents/{session_id}/jobs/claim",),
        kwargs={"json": {"free_slots": 1, "wait_seconds": 2}, "headers": headers(token)},
    )
    with caplog.at_level(logging.WARNING, logger=wakeup.__name__):
        claim.start()
        # Waiting, not only tried: a signal before the claim waits has no waiter to count for.
        wait_until(lambda: calls and session_id in job_wakeup._waiting, 10, what="the claim to wait")
        job_wakeup._signal_from_thread()
        claim.join(30)
    records = [r for r in caplog.records if "claimable jobs" in r.getMessage()]
    assert records
    assert all("No database thread was free" in r.getMessage() and r.exc_info is None for r in records)
