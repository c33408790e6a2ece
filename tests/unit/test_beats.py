"""The heartbeat writer: one thread per process, which must never leave a heartbeat waiting."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timezone

import pytest

from airflow_remote_exec.api import beats
from airflow_remote_exec.api.beats import Beat, HeartbeatWriter


def _beat_all(writer: HeartbeatWriter, pairs: list[tuple[str, str]]) -> list[Beat | None]:
    async def run() -> list[Beat | None]:
        return list(await asyncio.gather(*(writer.beat(sid, secret_hash) for sid, secret_hash in pairs)))

    return asyncio.run(run())


def test_heartbeats_waiting_together_are_written_in_one_batch(monkeypatch):
    batches: list[list[tuple[str, str]]] = []
    release = threading.Event()
    now = datetime.now(timezone.utc)

    def write(pairs):
        batches.append(list(pairs))
        release.wait(5)  # the first batch holds the thread while the others queue up
        return {pair: Beat(now, []) for pair in pairs if pair[1] == "good"}

    monkeypatch.setattr(beats, "write_beats", write)
    writer = HeartbeatWriter()
    threading.Timer(0.3, release.set).start()
    results = _beat_all(writer, [("a", "good"), ("b", "good"), ("c", "bad"), ("d", "good")])
    assert results == [Beat(now, []), Beat(now, []), None, Beat(now, [])]
    assert sum(len(batch) for batch in batches) == 4
    assert len(batches) <= 2  # the first heartbeat alone, then every one that waited meanwhile


@pytest.mark.parametrize("failure", [RuntimeError("database is down"), SystemExit(1)])
def test_a_batch_that_fails_sends_its_heartbeats_the_full_path_and_the_writer_goes_on(monkeypatch, failure):
    calls = []

    def write(pairs):
        calls.append(pairs)
        if len(calls) == 1:
            raise failure
        return {pair: Beat(datetime.now(timezone.utc), []) for pair in pairs}

    monkeypatch.setattr(beats, "write_beats", write)
    writer = HeartbeatWriter()
    assert _beat_all(writer, [("a", "h")]) == [None]
    started = time.monotonic()
    (second,) = _beat_all(writer, [("a", "h")])
    assert isinstance(second, Beat) and time.monotonic() - started < 1


def test_a_writer_that_hangs_holds_no_heartbeat_beyond_its_wait(monkeypatch):
    stuck = threading.Event()
    monkeypatch.setattr(beats, "write_beats", lambda pairs: (stuck.wait(10), {})[1])
    monkeypatch.setattr(HeartbeatWriter, "WAIT_SECONDS", 0.2)
    writer = HeartbeatWriter()
    started = time.monotonic()
    try:
        assert _beat_all(writer, [("a", "h"), ("b", "h")]) == [None, None]
        assert time.monotonic() - started < 2
    finally:
        stuck.set()


def test_a_dead_writer_thread_is_started_again(monkeypatch):
    monkeypatch.setattr(
        beats, "write_beats", lambda pairs: {pair: Beat(datetime.now(timezone.utc), []) for pair in pairs}
    )
    writer = HeartbeatWriter()
    assert _beat_all(writer, [("a", "h")])[0] is not None
    writer._thread = threading.Thread(target=lambda: None)  # as if the thread had died
    writer._thread.start()
    writer._thread.join()
    assert _beat_all(writer, [("a", "h")])[0] is not None


def test_a_heartbeat_that_stopped_waiting_is_not_written_late(monkeypatch):
    """It took the full path; writing it later would make a dead agent look alive for longer."""
    written: list[tuple[str, str]] = []
    first_batch = threading.Event()

    def write(pairs):
        if not first_batch.is_set():
            first_batch.set()
            time.sleep(0.5)  # slower than the wait: the heartbeats behind it give up
        written.extend(pairs)
        return {}

    monkeypatch.setattr(beats, "write_beats", write)
    monkeypatch.setattr(HeartbeatWriter, "WAIT_SECONDS", 0.2)
    writer = HeartbeatWriter()

    async def run() -> None:
        first = asyncio.ensure_future(writer.beat("first", "h"))
        await asyncio.sleep(0.05)  # the writer has taken "first" alone
        await asyncio.gather(writer.beat("late-1", "h"), writer.beat("late-2", "h"), first)
        await asyncio.sleep(0.6)  # the writer has come back for the queue

    asyncio.run(run())
    assert written == [("first", "h")]


def test_heartbeats_do_not_pile_up_behind_a_stuck_writer(monkeypatch):
    stuck = threading.Event()
    monkeypatch.setattr(beats, "write_beats", lambda pairs: (stuck.wait(10), {})[1])
    monkeypatch.setattr(beats, "MAX_WAITING", 3)
    monkeypatch.setattr(HeartbeatWriter, "WAIT_SECONDS", 0.2)
    writer = HeartbeatWriter()
    try:
        for _ in range(4):
            assert _beat_all(writer, [("a", "h"), ("b", "h")]) == [None, None]
        assert len(writer._waiting) <= 3
    finally:
        stuck.set()
