"""RemoteExecutor: runs inside the scheduler and hands workloads to agents through the DB.

Data path: ``queue_workload`` writes a ``remote_job`` row in the scheduler's own transaction (so
the job exists exactly when the task instance is QUEUED); agents claim rows through the agent API;
their reports set ``pending_sync``; ``sync`` turns those rows into executor events. Task workloads,
deadline-alert callbacks (``ExecuteCallback``) and connection tests (``TestConnection``) travel the
same way.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from airflow.configuration import conf
from airflow.executors import workloads
from airflow.executors.base_executor import BaseExecutor
from airflow.models.taskinstance import TaskInstance
from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.utils.db import DBLocks, create_global_lock
from airflow.utils.session import create_session
from airflow.utils.state import TaskInstanceState
from sqlalchemy import and_, delete, select, true, tuple_, update

from airflow_remote_exec.clock import db_now
from airflow_remote_exec.compat import CONNECTION_TESTS, CallbackKey, ConnectionTestKey, callback_key
from airflow_remote_exec.db import RemoteDBManager
from airflow_remote_exec.housekeeping import purge_old_rows
from airflow_remote_exec.models import JobKind, JobState, RemoteJob
from airflow_remote_exec.notify import notify_jobs_queued
from airflow_remote_exec.reroute import (
    drain_agents_on_another_minor,
    fail_connection_tests,
    fence_of_previous_try,
    mark_lost_agents,
    release_jobs_of_agents_not_live,
)
from airflow_remote_exec.task_logs import SOURCE, read_task_log, shipped_logs_are_remote_logging

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

PURGE_EVERY_SECONDS = 30.0
LIVENESS_EVERY_SECONDS = 1.0
RUNNING_RECHECK_EVERY_SECONDS = 10.0
# Connection tests are short, and a user waits on each: claimed before any task of their queue.
CONNECTION_TEST_PRIORITY = 2**31 - 1


# The columns that identify a task's job, and a task instance's (or its key's) values for them.
_IDENTITY_COLUMNS = (
    RemoteJob.dag_id,
    RemoteJob.task_id,
    RemoteJob.run_id,
    RemoteJob.map_index,
    RemoteJob.try_number,
)
# The columns ``_key_of`` reads.
_KEY_COLUMNS = (RemoteJob.kind, RemoteJob.ti_id, *_IDENTITY_COLUMNS)
# Five parameters a key: 150 keys stay under the 999 bound parameters of older SQLite builds.
_KEYS_PER_QUERY = 150


WorkloadKey = TaskInstanceKey | CallbackKey | ConnectionTestKey


def _key_of(job) -> WorkloadKey:
    if job.kind == JobKind.CALLBACK:
        return callback_key(job.ti_id)
    if job.kind == JobKind.CONNECTION_TEST:
        return ConnectionTestKey(id=job.ti_id)
    return TaskInstanceKey(
        dag_id=job.dag_id,
        task_id=job.task_id,
        run_id=job.run_id,
        try_number=job.try_number,
        map_index=job.map_index,
    )


def _identity_of(ti: TaskInstance | TaskInstanceKey) -> tuple[str, str, str, int, int]:
    return (ti.dag_id, ti.task_id, ti.run_id, ti.map_index, ti.try_number)


def _identity_in(identities: Sequence[tuple]) -> Iterator:
    """``(dag_id, ..., try_number) IN (...)`` conditions over ``identities``, a few keys each."""
    for start in range(0, len(identities), _KEYS_PER_QUERY):
        yield tuple_(*_IDENTITY_COLUMNS).in_(identities[start : start + _KEYS_PER_QUERY])


def _default_queue() -> str:
    """Where workloads that carry no queue of their own go (callbacks, connection tests)."""
    return conf.get("operators", "default_queue", fallback="default")


def _key_filter(key: TaskInstanceKey):
    values = _identity_of(key)
    return and_(*(column == value for column, value in zip(_IDENTITY_COLUMNS, values, strict=True)))


class RemoteExecutor(BaseExecutor):
    """Queue task workloads for remote agents; report their outcome back to the scheduler."""

    supports_ad_hoc_ti_run = True
    supports_callbacks = True
    supports_connection_test = CONNECTION_TESTS  # on an agent of the test's queue, inside the agents' network
    serve_logs = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Keys this executor queued or adopted, until it reports their end. ``running`` holds the keys
        # that count against [core] parallelism: a task counts from queueing until its agent reports it
        # running, so parallelism bounds the tasks waiting for an agent and the agents' slots bound the
        # tasks that run (LocalExecutor frees the slot sooner, when it hands the task to its workers).
        self.own_jobs: set[WorkloadKey] = set()
        self._last_purge = 0.0
        self._last_liveness_check = 0.0
        self._last_running_recheck = 0.0

    def start(self) -> None:
        """Create the remote_* tables if ``airflow db migrate`` has not yet done so."""
        with create_session() as session:
            manager = RemoteDBManager(session)
            if not manager.check_migration():
                with create_global_lock(session=session, lock=DBLocks.MIGRATIONS):
                    manager.initdb()

    def queue_workload(self, workload: workloads.All, session: Session) -> None:
        """Write the workload's job row. Never raises for a workload it cannot run: an exception here
        would stop the scheduler's loop, and again at every restart while the workload is pending."""
        if isinstance(workload, workloads.ExecuteTask):
            self._queue_task(workload, session)
        elif isinstance(workload, workloads.ExecuteCallback):
            self._queue_callback(workload, session)
        elif CONNECTION_TESTS and isinstance(workload, workloads.TestConnection):
            self._queue_connection_test(workload, session)
        else:
            self.log.error("RemoteExecutor cannot run %s workloads; ignored", type(workload).__name__)
            return
        notify_jobs_queued(session)

    def _queue_task(self, workload: workloads.ExecuteTask, session: Session) -> None:
        ti = workload.ti
        fence = fence_of_previous_try(session, ti.dag_id, ti.task_id, ti.run_id, ti.map_index, ti.try_number)
        self._write_job(
            session,
            key=ti.key,
            kind=JobKind.TASK,
            ti_id=str(ti.id),
            queue=ti.queue or "default",
            priority_weight=ti.priority_weight,
            pool_slots=max(1, ti.pool_slots),
            workload=workload,
            not_before=fence,
        )
        self._hold(ti.key)

    def _queue_callback(self, workload: workloads.ExecuteCallback, session: Session) -> None:
        """A deadline-alert callback runs on an agent of the default queue (callbacks carry none)."""
        data = workload.callback.data
        callback_id = str(workload.callback.id)
        key = TaskInstanceKey(
            dag_id=str(data.get("dag_id", "")),
            task_id=f"callback:{callback_id}",
            run_id=str(data.get("dag_run_id", "")),
            try_number=1,
            map_index=-1,
        )
        self._write_job(
            session,
            key=key,
            kind=JobKind.CALLBACK,
            ti_id=callback_id,
            queue=str(data.get("queue") or _default_queue()),
            priority_weight=int(data.get("priority_weight", 1)),
            pool_slots=1,
            workload=workload,
            not_before=None,
        )
        self._hold(callback_key(callback_id))

    def _queue_connection_test(self, workload: workloads.TestConnection, session: Session) -> None:
        """A connection test runs on an agent of its queue, which has the network (and perhaps the
        secrets) to reach the connection's system. Its result travels through Airflow's Execution API;
        the job row only routes it and tracks its agent."""
        test_id = str(workload.connection_test_id)
        self._write_job(
            session,
            key=TaskInstanceKey(
                dag_id="", task_id=f"connection-test:{test_id}", run_id="", try_number=1, map_index=-1
            ),
            kind=JobKind.CONNECTION_TEST,
            ti_id=test_id,
            queue=workload.queue or _default_queue(),
            priority_weight=CONNECTION_TEST_PRIORITY,
            pool_slots=1,
            workload=workload,
            not_before=None,
        )
        self._hold(workload.key)

    def fail_connection_test(self, key: ConnectionTestKey) -> None:
        """The scheduler's reaper failed this test (it timed out): no agent should start it now, and
        one running it is told to stop at its next heartbeat."""
        self._let_go(key)
        with create_session(scoped=False) as session:
            session.execute(
                delete(RemoteJob).where(RemoteJob.kind == JobKind.CONNECTION_TEST, RemoteJob.ti_id == key.id)
            )

    def _write_job(
        self, session: Session, *, key: TaskInstanceKey, kind: str, workload: workloads.All, **fields
    ) -> None:
        fields.update(
            state=JobState.QUEUED,
            workload=workload.model_dump_json(),
            agent_name=None,
            exit_code=None,
            detail=None,
            pending_sync=False,
            queued_at=db_now(session),
            queued_by_job_id=self.job_id,
            claimed_at=None,
            claim_request_id=None,
            started_at=None,
            finished_at=None,
            fenced_until=None,
        )
        # A reschedule or a resumed deferral reuses the try number: the row is reset, and the
        # claim that follows raises ``attempt``, which fences any late report of the previous run.
        existing = session.scalar(select(RemoteJob).where(_key_filter(key)).with_for_update())
        if existing is None:
            session.add(
                RemoteJob(
                    kind=kind,
                    dag_id=key.dag_id,
                    task_id=key.task_id,
                    run_id=key.run_id,
                    map_index=key.map_index,
                    try_number=key.try_number,
                    attempt=0,
                    **fields,
                )
            )
        else:
            for name, value in fields.items():
                setattr(existing, name, value)

    def _process_workloads(self, workload_items: Sequence[workloads.All]) -> None:
        """Unused: ``queue_workload`` writes jobs straight to the table."""

    def sync(self) -> None:
        with create_session(scoped=False) as session:
            if time.monotonic() - self._last_liveness_check > LIVENESS_EVERY_SECONDS:
                for name in mark_lost_agents(session):
                    self.log.warning("Agent %s missed its heartbeats: declared lost, its jobs rerouted", name)
                session.flush()
                self._last_liveness_check = time.monotonic()
            if time.monotonic() - self._last_purge > PURGE_EVERY_SECONDS:
                for name in release_jobs_of_agents_not_live(session):
                    self.log.warning("Released jobs still held by agent %s, which is not live", name)
                for name in drain_agents_on_another_minor(session):
                    self.log.warning("Agent %s runs another Airflow minor than this scheduler: drained", name)
                purge_old_rows(session)
                session.flush()
                self._last_purge = time.monotonic()
            if time.monotonic() - self._last_running_recheck > RUNNING_RECHECK_EVERY_SECONDS:
                self._let_go_of_jobs_no_longer_ours(session)
                self._report_running_again_where_not_recorded(session)
                self._last_running_recheck = time.monotonic()
            self._report_changed_jobs(session)

    def _let_go_of_jobs_no_longer_ours(self, session: Session) -> None:
        """Forget task keys whose row is gone, names another scheduler, or was already reported.

        Another scheduler may queue a key again (a deferral resume) and report it before this one
        sees the row; or the scheduler's transaction that queued a key again was rolled back, leaving
        the previous, reported row. Without this, such a key would stay in ``own_jobs`` (and in
        ``running``, holding a parallelism slot) for ever. A key queued in this process is never
        taken for one of those: the scheduler commits its loop's queueing before it calls the
        executor's heartbeat.
        """
        if self.job_id is None:
            return
        task_keys = [key for key in self.own_jobs if isinstance(key, TaskInstanceKey)]
        reported = and_(RemoteJob.state.in_(JobState.FINISHED), RemoteJob.pending_sync.is_(False))
        still_ours: set[WorkloadKey] = set()
        for in_chunk in _identity_in([_identity_of(key) for key in task_keys]):
            rows = session.execute(
                select(*_KEY_COLUMNS).where(in_chunk, RemoteJob.queued_by_job_id == self.job_id, ~reported)
            ).all()
            still_ours.update(_key_of(row) for row in rows)
        for key in set(task_keys) - still_ours:
            self.log.info("%s is no longer this scheduler's job (queued again elsewhere, or gone)", key)
            self._let_go(key)
        self._let_go_of_connection_tests_gone(session)

    def _let_go_of_connection_tests_gone(self, session: Session) -> None:
        """Another scheduler's reaper deletes the row of a test that timed out (``fail_connection_test``
        runs on each scheduler, but only for the tests that one reaped)."""
        tests = {key.id: key for key in self.own_jobs if isinstance(key, ConnectionTestKey)}
        if not tests:
            return
        present = session.scalars(
            select(RemoteJob.ti_id).where(
                RemoteJob.kind == JobKind.CONNECTION_TEST, RemoteJob.ti_id.in_(tests)
            )
        ).all()
        for test_id in set(tests) - set(present):
            self.log.info("Connection test %s was ended elsewhere", test_id)
            self._let_go(tests[test_id])

    def _report_running_again_where_not_recorded(self, session: Session) -> None:
        """Re-send "running" for tasks whose instance still names no agent.

        The scheduler applies executor events only to task instances it can lock at once
        (``skip_locked``), so a running event that meets a locked row is dropped for good.
        """
        running_jobs = session.execute(
            select(*_KEY_COLUMNS, RemoteJob.agent_name).where(
                RemoteJob.kind == JobKind.TASK,
                RemoteJob.state == JobState.RUNNING,
                RemoteJob.pending_sync.is_(False),
                RemoteJob.queued_by_job_id == self.job_id if self.job_id is not None else true(),
            )
        ).all()
        ours = {row.ti_id: row for row in running_jobs if _key_of(row) in self.own_jobs}
        if not ours:
            return
        unrecorded = session.scalars(
            select(TaskInstance.id).where(
                TaskInstance.id.in_([uuid.UUID(ti_id) for ti_id in ours]),
                TaskInstance.state == TaskInstanceState.RUNNING,
                TaskInstance.external_executor_id.is_(None),
            )
        ).all()
        for ti_id in unrecorded:
            row = ours[str(ti_id)]
            self._report_running(_key_of(row), row.agent_name)

    def _report_changed_jobs(self, session: Session) -> None:
        """Turn rows agents have reported on into executor events, each exactly once."""
        rows = session.execute(
            select(
                RemoteJob.id,
                *_KEY_COLUMNS,
                RemoteJob.state,
                RemoteJob.agent_name,
                RemoteJob.detail,
                RemoteJob.queued_by_job_id,
            )
            .where(RemoteJob.pending_sync.is_(True))
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            key = _key_of(row)
            if key not in self.own_jobs:
                continue  # queued by another scheduler; that one reports it
            if self._queued_by_another_scheduler(row):
                # Queued again by another scheduler (a deferral resume or reschedule of the same try):
                # that one reports it, and this one must let go of the key or it leaks a slot.
                self._let_go(key)
                continue
            if row.state == JobState.RUNNING:
                self._report_running(key, row.agent_name)
            elif row.state == JobState.SUCCESS:
                self._let_go(key)
                self.success(key)
            elif row.state == JobState.FAILED:
                self._let_go(key)
                self.fail(key, info=row.detail)
                if row.kind == JobKind.CONNECTION_TEST:  # its runner died: the test will never report
                    fail_connection_tests(session, [row.ti_id], f"The agent's runner failed: {row.detail}")
            elif row.state == JobState.NOT_STARTED:
                # Airflow refused to start this try: it is no longer queued, or runs elsewhere.
                # An event would make the scheduler fail a task instance that is not ours to judge.
                self.log.info("%s was not started: %s", key, row.detail)
                self._let_go(key)
            # Only clear the flag if the state is still the one just reported, so a report that
            # landed meanwhile is read on the next loop instead of being lost.
            session.execute(
                update(RemoteJob)
                .where(RemoteJob.id == row.id, RemoteJob.state == row.state)
                .values(pending_sync=False)
            )

    def _hold(self, key: WorkloadKey) -> None:
        self.own_jobs.add(key)
        self.running.add(key)

    def _let_go(self, key: WorkloadKey) -> None:
        self.own_jobs.discard(key)
        self.running.discard(key)

    def _report_running(self, key: WorkloadKey, agent_name: str | None) -> None:
        """Report "running" and free the task's parallelism slot (see ``own_jobs``). An event the
        scheduler has not read yet is newer news (its own "failed" for a task gone silent, say)."""
        self.running.discard(key)
        if key not in self.event_buffer:
            self.running_state(key, agent_name)

    def _queued_by_another_scheduler(self, row) -> bool:
        return None not in (row.queued_by_job_id, self.job_id) and row.queued_by_job_id != self.job_id

    def revoke_task(self, *, ti: TaskInstance) -> None:
        """Forget the job; an agent running it is told to stop at its next heartbeat."""
        self._let_go(ti.key)
        self.queued_tasks.pop(ti.key, None)
        with create_session(scoped=False) as session:
            session.execute(delete(RemoteJob).where(_key_filter(ti.key)))
        self.log.info("Revoked %s", ti.key)

    def try_adopt_task_instances(self, tis: Sequence[TaskInstance]) -> Sequence[TaskInstance]:
        """Adopt every task instance whose job is still in the table; the rest are reset."""
        if not tis:
            return []
        keys = [_identity_of(ti) for ti in tis]
        known = set()
        with create_session(scoped=False) as session:
            for in_keys in _identity_in(keys):
                known.update(session.execute(select(*_IDENTITY_COLUMNS).where(in_keys)).all())
                # A job that finished while no scheduler was listening must be reported again.
                session.execute(update(RemoteJob).where(in_keys).values(queued_by_job_id=self.job_id))
                session.execute(
                    update(RemoteJob)
                    .where(in_keys, RemoteJob.state.in_(JobState.FINISHED + (JobState.RUNNING,)))
                    .values(pending_sync=True)
                )
        rejected = []
        for ti, key in zip(tis, keys, strict=True):
            if key in known:
                self._hold(ti.key)
            else:
                rejected.append(ti)
        return rejected

    def get_task_log(self, ti: TaskInstance, try_number: int) -> tuple[list[str], list[str]]:
        """What agents shipped of the log of a running try: Airflow's log reader asks the executor only
        while a task runs. Its sources also tell the reader not to look for the agent's own log server,
        which is behind the agent's firewall."""
        if shipped_logs_are_remote_logging():  # the reader gets the same from ShippedLogIO
            return [f"{SOURCE}: read through [logging] logging_config_class"], []
        return read_task_log(ti, try_number)

    def end(self) -> None:
        """Nothing to wait for: jobs live in the DB and agents keep running them."""

    def terminate(self) -> None:
        """Nothing to stop in this process; see ``end``."""

    @staticmethod
    def get_cli_commands():
        from airflow_remote_exec.cli import get_cli_commands

        return get_cli_commands()
