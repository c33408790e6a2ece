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

import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from airflow.configuration import conf
from airflow.jobs.job import Job, JobState
from airflow.jobs.triggerer_job_runner import TriggererJobRunner, TriggerRunnerSupervisor
from airflow.models.asset import AssetWatcherModel, DagScheduleAssetReference
from airflow.models.crypto import get_fernet
from airflow.models.dag import DagModel
from airflow.models.dagbag import DBDagBag
from airflow.models.taskinstance import TaskInstance
from airflow.models.trigger import Trigger
from airflow.serialization.enums import DagAttributeTypes
from airflow.serialization.serialized_objects import BaseSerialization
from airflow.triggers.base import TaskFailedEvent, TaskSkippedEvent, TaskSuccessEvent, TriggerEvent
from airflow.utils.helpers import log_filename_template_renderer
from airflow.utils.session import create_session
from fastapi import APIRouter
from sqlalchemy import ColumnElement, Select, func, insert, or_, select, update
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
from airflow_remote_exec.api.db_threads import run_db
from airflow_remote_exec.api.parsed_dags import dicts_in
from airflow_remote_exec.models import Component, RemoteAgent, RemoteBundle

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


def _triggerer_job(session: Session, agent: RemoteAgent) -> int:
    """The Airflow job of this agent session, started at its first sync, heartbeated at every one."""
    now = datetime.now(UTC)
    if agent.triggerer_job_id is None:
        agent.triggerer_job_id = session.execute(
            insert(Job)
            .values(
                job_type=TRIGGERER_JOB,
                state=JobState.RUNNING,
                start_date=now,
                latest_heartbeat=now,
                hostname=agent.name,
                unixname="remote-agent",
            )
            .returning(Job.id)
        ).scalar_one()
    else:
        session.execute(update(Job).where(Job.id == agent.triggerer_job_id).values(latest_heartbeat=now))
    return agent.triggerer_job_id


# -- assignment ---------------------------------------------------------------------------------------


def watcher_triggers(*where: ColumnElement[bool]) -> Select:
    """Ids of the triggers of asset watchers that DAGs of agent bundles (``where``: which) schedule on."""
    return (
        select(AssetWatcherModel.trigger_id)
        .join(DagScheduleAssetReference, DagScheduleAssetReference.asset_id == AssetWatcherModel.asset_id)
        .join(DagModel, DagModel.dag_id == DagScheduleAssetReference.dag_id)
        .join(RemoteBundle, RemoteBundle.name == DagModel.bundle_name)
        .where(*where)
    )


def keep_watchers_on_agents(session: Session, bundle: str) -> None:
    """Give the triggers of a bundle's asset watchers a queue that no stock triggerer started without
    ``--queues`` takes: the token's triggerer agents run them, never the orchestrator."""
    session.execute(
        update(Trigger)
        .where(Trigger.id.in_(watcher_triggers(RemoteBundle.name == bundle)))
        .where(or_(Trigger.queue.is_(None), Trigger.queue != AGENT_TRIGGER_QUEUE))
        .values(queue=AGENT_TRIGGER_QUEUE)
        .execution_options(synchronize_session=False)
    )


def _assign(session: Session, agent: RemoteAgent, job_id: int, capacity: int) -> None:
    """Airflow's ``Trigger.assign_unassigned`` within the agent's scope: triggers with no live
    triggerer, deferred tasks' first (by priority), then asset watchers, at most
    ``[triggerer] max_trigger_to_select_per_loop`` at a time so that triggerers share a burst."""
    held = session.scalar(select(func.count(Trigger.id)).where(Trigger.triggerer_id == job_id)) or 0
    room = min(capacity - held, Trigger.max_trigger_to_select_per_loop)
    if room <= 0:
        return
    alive = select(Job.id).where(
        Job.end_date.is_(None),
        Job.latest_heartbeat > datetime.now(UTC) - _health_threshold(),
        Job.job_type == TRIGGERER_JOB,
    )
    unowned = or_(Trigger.triggerer_id.is_(None), Trigger.triggerer_id.not_in(alive))
    of_tasks = (
        select(Trigger.id)
        .join(TaskInstance, TaskInstance.trigger_id == Trigger.id)
        .where(unowned, TaskInstance.queue.in_(agent.queue_list))
        .order_by(func.coalesce(TaskInstance.priority_weight, 0).desc(), Trigger.created_date)
    )
    of_token = watcher_triggers(RemoteBundle.token_id == agent.token_id)
    of_assets = select(Trigger.id).where(unowned, Trigger.id.in_(of_token)).order_by(Trigger.created_date)
    taken: list[int] = []
    for query in (of_tasks, of_assets):
        if len(taken) >= room:
            break
        locked = query.limit(room - len(taken)).with_for_update(of=Trigger, skip_locked=True)
        taken.extend(session.scalars(locked))
    if taken:
        session.execute(update(Trigger).where(Trigger.id.in_(taken)).values(triggerer_id=job_id))


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
        workload = TriggerRunnerSupervisor._create_workload(
            builder, trigger=trigger, dag_bag=dag_bag, render_log_fname=render_log_fname, session=session
        )
        if workload is None:
            continue
        workload = workload.model_copy(update={"encrypted_kwargs": _plain_kwargs(workload.encrypted_kwargs)})
        logs = builder.logger_cache.pop(trigger.id, None)
        offered.append(
            OfferedTrigger(
                workload=workload.model_dump(mode="json"), log_path=logs.log_path if logs else None
            )
        )
    return offered


def _clean_unused(session: Session) -> None:
    global _last_clean
    if time.monotonic() - _last_clean >= CLEAN_UNUSED_EVERY_SECONDS:
        _last_clean = time.monotonic()
        Trigger.clean_unused(session=session)


def _sync(secret: str, session_id: str, body: TriggerSync) -> TriggerAssignment:
    with create_session(scoped=False) as session:
        of_request = authorize_agent(session, secret, session_id, lock=True, component=Component.TRIGGERER)
        agent = session.get(RemoteAgent, of_request.name)
        job_id = _triggerer_job(session, agent)
        _assign(session, agent, job_id, body.capacity)
        mine = _mine(session, job_id)
        known = set(body.known)
        offered = _offered(session, job_id, [i for i in mine if i not in known][:MAX_OFFERED])
    with create_session(scoped=False) as session:
        _clean_unused(session)
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


def _report(secret: str, session_id: str, body: TriggerReports) -> TriggerReportsResponse:
    with create_session(scoped=False) as session:
        of_request = authorize_agent(session, secret, session_id, lock=True, component=Component.TRIGGERER)
        agent = session.get(RemoteAgent, of_request.name)
        if agent.last_event_batch == body.batch_id:
            return TriggerReportsResponse(refused=[])
        reported = {e.trigger_id for e in body.events} | {f.trigger_id for f in body.failures}
        owned = set()
        if agent.triggerer_job_id is not None:
            owned = set(
                session.scalars(
                    select(Trigger.id)
                    .where(Trigger.id.in_(reported), Trigger.triggerer_id == agent.triggerer_job_id)
                    .order_by(Trigger.id)
                    .with_for_update()
                )
            )
        for fired in body.events:
            if fired.trigger_id not in owned:
                continue
            problem = _payload_problem({"payload": fired.payload, "xcoms": fired.xcoms})
            if problem:
                Trigger.submit_failure(
                    fired.trigger_id,
                    exc=[f"The orchestrator refused the trigger's event: its payload holds {problem}.\n"],
                    session=session,
                )
                continue
            Trigger.submit_event(fired.trigger_id, _event_of(fired), session=session)
        for failure in body.failures:
            if failure.trigger_id in owned:
                Trigger.submit_failure(failure.trigger_id, exc=failure.traceback, session=session)
        agent.last_event_batch = body.batch_id
        return TriggerReportsResponse(refused=sorted(reported - owned))


# -- routes -------------------------------------------------------------------------------------------


@router.post(
    "/triggers",
    response_model=TriggerAssignment,
    summary="Take triggers up to capacity; the agent's triggers, with workloads of those it lacks",
)
async def sync_triggers(session_id: SessionIdPath, body: TriggerSync, secret: SecretDep) -> TriggerAssignment:
    return await run_db(_sync, secret, session_id, body)


@router.post(
    "/events",
    response_model=TriggerReportsResponse,
    summary="Apply trigger events and failures, for triggers still assigned to this agent",
    responses=error_responses(413),
)
async def report_events(
    session_id: SessionIdPath, body: TriggerReports, secret: SecretDep
) -> TriggerReportsResponse:
    return await run_db(_report, secret, session_id, body)
