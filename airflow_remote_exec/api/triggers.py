"""The triggerer's side of the agent API: triggerer agents run Airflow's own trigger runner, and the
orchestrator assigns them triggers and applies their events with Airflow's own ``Trigger`` model.

Each triggerer agent session is an Airflow triggerer ``Job``: trigger rows name it as their triggerer,
its heartbeat (every trigger sync) keeps them, and once it is older than ``[triggerer]
triggerer_health_check_threshold``, or the agent is lost or gone (which ends the job), another
triggerer takes them, as between stock triggerers. The UI's triggerer health counts these jobs too.

An agent gets the triggers of deferred tasks on its queues and the asset watchers of DAGs its token's
dag processors publish, never others. Its events and failures are applied only for triggers still
assigned to it (a trigger taken over by another triggerer is that one's to report), and a batch of them
sent again after a lost answer is applied once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from functools import cache
from types import SimpleNamespace
from typing import Any

from airflow.configuration import conf
from airflow.jobs.job import Job, JobState
from airflow.jobs.triggerer_job_runner import TriggererJobRunner, TriggerRunnerSupervisor
from airflow.models.asset import AssetWatcherModel
from airflow.models.crypto import get_fernet
from airflow.models.dagbag import DBDagBag
from airflow.models.taskinstance import TaskInstance
from airflow.models.trigger import Trigger, handle_event_submit
from airflow.serialization.enums import DagAttributeTypes
from airflow.serialization.serialized_objects import BaseSerialization
from airflow.triggers.base import TaskFailedEvent, TaskSkippedEvent, TaskSuccessEvent, TriggerEvent
from airflow.utils.helpers import log_filename_template_renderer
from airflow.utils.session import create_session
from airflow.utils.state import TaskInstanceState
from fastapi import APIRouter, HTTPException, status
from sqlalchemy import ColumnElement, and_, event, false, func, insert, inspect, or_, select, update
from sqlalchemy.orm import Session

from airflow_remote_exec.api.auth import SecretDep, SessionIdPath, authorize_agent
from airflow_remote_exec.api.datamodels import (
    FiredEvent,
    OfferedTrigger,
    TriggerAssignment,
    TriggerReports,
    TriggerReportsResponse,
    TriggerSync,
    error_responses,
)
from airflow_remote_exec.api.db_threads import TRIGGERS, run_db
from airflow_remote_exec.api.parsed_dags import EXECUTOR_PATH, dicts_in, remote_executor_names
from airflow_remote_exec.clock import db_now
from airflow_remote_exec.models import Component, RemoteAgent

log = logging.getLogger(__name__)
router = APIRouter(
    prefix="/agents/{session_id}/triggerer",
    tags=["triggerer"],
    responses=error_responses(400, 401, 403, 404, 410),
)
TRIGGERER_JOB = TriggererJobRunner.job_type
AGENT_TRIGGER_QUEUE = "remote-exec-agents"
# Workloads sent in one answer; the rest come with the next sync, a second later.
MAX_OFFERED = 100
# Airflow's triggerer removes triggers nothing waits for at every loop; here at most this often.
CLEAN_UNUSED_EVERY_SECONDS = 1.0
_last_clean = 0.0
# What an event's payload may hold: plain data. Anything Airflow would build an object of (by class
# name, or a pod, a connection, an exception) fails the trigger instead.
_PAYLOAD_TYPES = frozenset(
    t.value
    for t in (
        DagAttributeTypes.DICT,
        DagAttributeTypes.SET,
        DagAttributeTypes.TUPLE,
        DagAttributeTypes.DATETIME,
        DagAttributeTypes.TIMEDELTA,
        DagAttributeTypes.TIMEZONE,
        DagAttributeTypes.RELATIVEDELTA,
    )
)
_END_EVENTS = {"success": TaskSuccessEvent, "failed": TaskFailedEvent, "skipped": TaskSkippedEvent}


def _health_threshold() -> timedelta:
    return timedelta(seconds=conf.getfloat("triggerer", "triggerer_health_check_threshold"))


# -- the agent's triggerer job ------------------------------------------------------------------------


def _new_triggerer_job(session: Session, agent_name: str) -> int:
    """The Airflow job of an agent session, started at its first sync."""
    now = db_now(session)
    return session.execute(
        insert(Job)
        .values(
            job_type=TRIGGERER_JOB,
            state=JobState.RUNNING,
            start_date=now,
            latest_heartbeat=now,
            hostname=agent_name,
            unixname="remote-agent",
        )
        .returning(Job.id)
    ).scalar_one()


def _locked_triggerer(session: Session, secret: str, session_id: str) -> RemoteAgent:
    name = authorize_agent(session, secret, session_id, lock=True, component=Component.TRIGGERER).name
    agent = session.get(RemoteAgent, name)
    if agent is None:  # purged between the two reads (SQLite has no row lock to prevent it)
        raise HTTPException(status.HTTP_410_GONE, "Unknown agent session; register again.")
    return agent


# -- assignment ---------------------------------------------------------------------------------------


def watcher_queue(token_id: int) -> str:
    """The queue of the asset-watcher triggers an agent token's DAGs created: no stock triggerer
    started without ``--queues`` takes it, and only that token's triggerer agents do."""
    return f"{AGENT_TRIGGER_QUEUE}:{token_id}"


@contextlib.contextmanager
def watchers_owned_by(session: Session, token_id: int) -> Iterator[None]:
    """Give the asset-watcher triggers created in ``session`` meanwhile (persisting an agent's DAGs) the
    token's watcher queue. Their classpath and kwargs came from the agent: they must never run on the
    orchestrator, nor on another token's agents. A watcher identical to an existing one reuses that
    trigger, which keeps its owner; triggers other processes create meanwhile are never counted."""
    created: list[Trigger] = []

    def collect(_session: Session, instance: object) -> None:
        if isinstance(instance, Trigger):
            created.append(instance)

    event.listen(session, "pending_to_persistent", collect)
    try:
        yield
    finally:
        event.remove(session, "pending_to_persistent", collect)
    # A trigger whose insert was rolled back (and retried) is no longer persistent: its id may be
    # another process's trigger by now (SQLite reuses ids).
    created = [trigger for trigger in created if inspect(trigger).persistent]
    if created:
        session.execute(
            update(Trigger)
            .where(
                Trigger.id.in_([trigger.id for trigger in created]),
                Trigger.id.in_(select(AssetWatcherModel.trigger_id)),
            )
            .values(queue=watcher_queue(token_id))
            .execution_options(synchronize_session=False)
        )


@cache
def _on_remote_executor() -> ColumnElement[bool]:
    """Task instances RemoteExecutor runs: their executor names it, or names none and it is the
    default. A deferred task of another executor keeps its trigger off the agents."""
    from airflow.executors.executor_loader import ExecutorLoader

    named = TaskInstance.executor.in_(remote_executor_names())
    if ExecutorLoader.get_default_executor_name().module_path == EXECUTOR_PATH:
        return or_(named, TaskInstance.executor.is_(None))
    return named


def _task_in_scope(agent: RemoteAgent) -> ColumnElement[bool]:
    """A deferred task whose trigger the agent may run: a RemoteExecutor task on one of its queues."""
    return and_(TaskInstance.queue.in_(agent.queue_list), _on_remote_executor())


def _watcher_in_scope(agent: RemoteAgent) -> ColumnElement[bool]:
    """An asset-watcher trigger the agent may run: one its token's DAGs created."""
    return and_(Trigger.queue == watcher_queue(agent.token_id), Trigger.assets.any())


def _in_scope(agent: RemoteAgent) -> ColumnElement[bool]:
    of_tasks = select(TaskInstance.trigger_id).where(
        TaskInstance.trigger_id.is_not(None), _task_in_scope(agent)
    )
    return or_(Trigger.id.in_(of_tasks), _watcher_in_scope(agent))


def _assign(session: Session, agent: RemoteAgent, job_id: int, capacity: int) -> None:
    """Airflow's ``Trigger.assign_unassigned`` within the agent's scope: triggers with no live
    triggerer, deferred tasks' first (by priority), then asset watchers, at most
    ``[triggerer] max_trigger_to_select_per_loop`` at a time so that triggerers share a burst."""
    held = session.scalar(select(func.count(Trigger.id)).where(Trigger.triggerer_id == job_id)) or 0
    room = min(capacity - held, Trigger.max_trigger_to_select_per_loop)
    if room <= 0:
        return
    unowned = _unowned(session)
    of_tasks = (
        select(Trigger.id)
        .join(TaskInstance, TaskInstance.trigger_id == Trigger.id)
        .where(unowned, _task_in_scope(agent))
        .order_by(func.coalesce(TaskInstance.priority_weight, 0).desc(), Trigger.created_date)
    )
    of_assets = select(Trigger.id).where(unowned, _watcher_in_scope(agent)).order_by(Trigger.created_date)
    taken: list[int] = []
    for query in (of_tasks, of_assets):
        if len(taken) >= room:
            break
        locked = query.limit(room - len(taken)).with_for_update(of=Trigger, skip_locked=True)
        taken.extend(session.scalars(locked))
    if taken:
        session.execute(update(Trigger).where(Trigger.id.in_(taken)).values(triggerer_id=job_id))


def _unowned(session: Session) -> ColumnElement[bool]:
    """Triggers no live triggerer holds (as in Airflow's ``assign_unassigned``, on the DB's clock)."""
    alive = select(Job.id).where(
        Job.end_date.is_(None),
        Job.latest_heartbeat > db_now(session) - _health_threshold(),
        Job.job_type == TRIGGERER_JOB,
    )
    return or_(Trigger.triggerer_id.is_(None), Trigger.triggerer_id.not_in(alive))


def _mine(session: Session, job_id: int) -> list[int]:
    """The job's triggers that something still waits on (a deferred task or an asset)."""
    return list(
        session.scalars(
            select(Trigger.id)
            .where(
                Trigger.triggerer_id == job_id,
                or_(Trigger.task_instance.has(), Trigger.assets.any()),
            )
            .order_by(Trigger.id)
        )
    )


def _plain_kwargs(encrypted: str) -> str:
    """The trigger's serialized kwargs as JSON text: decrypted, never deserialized here. Airflow's trigger
    runner on the agent reads unencrypted kwargs as they are."""
    if encrypted.startswith("{"):
        return encrypted
    return get_fernet().decrypt(encrypted.encode("utf-8")).decode("utf-8")


def _offered(session: Session, job_id: int, trigger_ids: list[int]) -> list[OfferedTrigger]:
    """Airflow's own RunTrigger workloads (``TriggerRunnerSupervisor._create_workload``, which needs of
    its triggerer only the job id and a place to put each trigger's log file name)."""
    if not trigger_ids:
        return []
    builder = SimpleNamespace(job=SimpleNamespace(id=job_id), id=job_id, logger_cache={})
    dag_bag, render_log_fname = DBDagBag(), log_filename_template_renderer()
    offered = []
    for trigger in Trigger.bulk_fetch(trigger_ids, session=session).values():
        if trigger.task_instance is None and not trigger.assets:
            continue
        try:
            with session.begin_nested():
                workload = TriggerRunnerSupervisor._create_workload(
                    builder,
                    trigger=trigger,
                    dag_bag=dag_bag,
                    render_log_fname=render_log_fname,
                    session=session,
                )
                if workload is None:
                    continue
                plain = _plain_kwargs(workload.encrypted_kwargs)
        except Exception as err:  # one unusable trigger (kwargs another key encrypted, say) fails alone
            log.warning("Trigger %s cannot be sent to a triggerer: %r", trigger.id, err)
            Trigger.submit_failure(trigger.id, exc=[f"The trigger cannot be run: {err!r}"], session=session)
            continue
        workload = workload.model_copy(update={"encrypted_kwargs": plain})
        logs = builder.logger_cache.pop(trigger.id, None)
        offered.append(
            OfferedTrigger(
                workload=workload.model_dump(mode="json"), log_path=logs.log_path if logs else None
            )
        )
    return offered


def _clean_unused() -> None:
    global _last_clean
    if time.monotonic() - _last_clean >= CLEAN_UNUSED_EVERY_SECONDS:
        _last_clean = time.monotonic()
        with create_session(scoped=False) as session:
            Trigger.clean_unused(session=session)


def _sync(secret: str, session_id: str, body: TriggerSync) -> TriggerAssignment:
    with create_session(scoped=False) as session:
        agent = _locked_triggerer(session, secret, session_id)
        if agent.triggerer_job_id is None:
            # Committed before the job's first assignment: another triggerer's assignment must see it
            # alive before it sees a trigger assigned to it.
            agent.triggerer_job_id = _new_triggerer_job(session, agent.name)
            session.commit()
            agent = _locked_triggerer(session, secret, session_id)
        job_id = agent.triggerer_job_id
        if job_id is None:  # its session ended meanwhile
            raise HTTPException(status.HTTP_410_GONE, "Agent session is over; register again.")
        session.execute(update(Job).where(Job.id == job_id).values(latest_heartbeat=db_now(session)))
        _assign(session, agent, job_id, body.capacity)
        mine = _mine(session, job_id)
        known = set(body.known)
        offered = _offered(session, job_id, [i for i in mine if i not in known][:MAX_OFFERED])
    _clean_unused()
    return TriggerAssignment(trigger_ids=mine, new=offered)


# -- events and failures ------------------------------------------------------------------------------


def _payload_problem(value: Any) -> str | None:
    for node in dicts_in(value):
        if "__classname__" in node or "__class_path" in node:
            return "an object decoded by class name"
        kind = node.get("__type")
        if kind is not None and kind not in _PAYLOAD_TYPES:
            return f"an object of type {str(kind)[:50]!r}"
    return None


def _event_of(fired: FiredEvent) -> TriggerEvent:
    if fired.kind in _END_EVENTS:
        return _END_EVENTS[fired.kind](xcoms=fired.xcoms)
    return TriggerEvent(BaseSerialization.deserialize(fired.payload))


def _ours(session: Session, agent: RemoteAgent, reported: set[int]) -> set[int]:
    """Of the reported triggers, those the agent may report on, row-locked: assigned to its job, or, in
    its scope, to no live triggerer (its session ended while it held them, and nobody took them over
    yet). A trigger another live triggerer holds is that one's to report."""
    mine = Trigger.triggerer_id == agent.triggerer_job_id if agent.triggerer_job_id else false()
    return set(
        session.scalars(
            select(Trigger.id)
            .where(Trigger.id.in_(reported), or_(mine, and_(_unowned(session), _in_scope(agent))))
            .order_by(Trigger.id)
            .with_for_update()
        )
    )


def _submit_event(session: Session, trigger_id: int, event: TriggerEvent) -> None:
    """``Trigger.submit_event``, with the XComs of an event that ends its task pushed in this session:
    Airflow's ``xcom_push`` there opens a session of its own, which on SQLite waits for this one."""
    deferred = select(TaskInstance).where(
        TaskInstance.trigger_id == trigger_id, TaskInstance.state == TaskInstanceState.DEFERRED
    )
    for task_instance in session.scalars(deferred):
        task_instance.xcom_push = functools.partial(task_instance.xcom_push, session=session)
        handle_event_submit(event, task_instance=task_instance, session=session)
    Trigger.submit_event(trigger_id, event, session=session)  # its assets and callback; no task is left


def _apply_event(session: Session, fired: FiredEvent) -> None:
    problem = _payload_problem({"payload": fired.payload, "xcoms": fired.xcoms})
    if problem:
        reason = f"The orchestrator refused the trigger's event: its payload holds {problem}."
        Trigger.submit_failure(fired.trigger_id, exc=[reason], session=session)
        return
    try:
        with session.begin_nested():
            _submit_event(session, fired.trigger_id, _event_of(fired))
    except Exception as err:  # an event Airflow cannot store (an asset event's extra, say) fails alone
        log.warning("Trigger %s's event could not be applied: %r", fired.trigger_id, err)
        reason = f"The orchestrator could not apply the trigger's event: {err!r}"
        Trigger.submit_failure(fired.trigger_id, exc=[reason[:2000]], session=session)


def _report(secret: str, session_id: str, body: TriggerReports) -> TriggerReportsResponse:
    with create_session(scoped=False) as session:
        agent = _locked_triggerer(session, secret, session_id)
        if agent.last_event_batch == body.batch_id:
            return TriggerReportsResponse(refused=[])
        # Written first: on SQLite the transaction begins with the first write, and the savepoints
        # below must be inside it, or releasing the first would commit it.
        agent.last_event_batch = body.batch_id
        session.flush()
        reported = {e.trigger_id for e in body.events} | {f.trigger_id for f in body.failures}
        ours = _ours(session, agent, reported)
        for fired in body.events:
            if fired.trigger_id in ours:
                _apply_event(session, fired)
        for failure in body.failures:
            if failure.trigger_id in ours:
                Trigger.submit_failure(failure.trigger_id, exc=failure.traceback, session=session)
        return TriggerReportsResponse(refused=sorted(reported - ours))


# -- routes -------------------------------------------------------------------------------------------


@router.post(
    "/triggers",
    response_model=TriggerAssignment,
    summary="Take triggers up to capacity; the agent's triggers, with workloads of those it lacks",
)
async def sync_triggers(session_id: SessionIdPath, body: TriggerSync, secret: SecretDep) -> TriggerAssignment:
    return await run_db(_sync, secret, session_id, body, lane=TRIGGERS)


@router.post(
    "/events",
    response_model=TriggerReportsResponse,
    summary="Apply trigger events and failures, for triggers still assigned to this agent",
    responses=error_responses(413),
)
async def report_events(
    session_id: SessionIdPath, body: TriggerReports, secret: SecretDep
) -> TriggerReportsResponse:
    return await run_db(_report, secret, session_id, body, lane=TRIGGERS)
