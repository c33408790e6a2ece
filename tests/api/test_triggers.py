"""The triggerer routes of the agent API: assignment within the agent's scope, Airflow's triggerer job
per session, events applied once and only from the triggerer a trigger is assigned to."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Callable, Iterator

import pytest
from airflow.jobs.job import Job
from airflow.models.dag import DagModel
from airflow.models.dagbag import DBDagBag
from airflow.models.dagbundle import DagBundleModel
from airflow.models.dagrun import DagRun
from airflow.models.serialized_dag import SerializedDagModel
from airflow.models.taskinstance import TaskInstance
from airflow.models.trigger import Trigger
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.triggers.file import FileDeleteTrigger
from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
from airflow.sdk import DAG, Asset, AssetWatcher
from airflow.sdk.serde import deserialize
from airflow.serialization.serialized_objects import BaseSerialization, DagSerialization
from airflow.utils.state import DagRunState, TaskInstanceState
from airflow.utils.types import DagRunTriggeredByType, DagRunType
from sqlalchemy import delete, select, update

from tests.api.conftest import AGENT_VERSIONS, headers
from tests.api.test_dag_processing import BUNDLE, FILE, _claim, _publish, _result

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


@pytest.fixture(autouse=True)
def _clean_airflow_rows(session) -> Iterator[None]:
    yield
    from airflow.models.asset import AssetModel, AssetWatcherModel, DagScheduleAssetReference

    for model in (TaskInstance, DagRun, Trigger, AssetWatcherModel, DagScheduleAssetReference, AssetModel):
        session.execute(delete(model))
    for model in (SerializedDagModel, DagModel, DagBundleModel, Job):
        session.execute(delete(model))
    session.commit()


@pytest.fixture
def owner(client, make_token) -> str:
    """The token whose dag-processor agent publishes the tests' DAGs (it owns bundle ``BUNDLE``)."""
    token = make_token("owner", queues=("default", "other"), components=["dag-processor", "triggerer"])
    body = {"name": "dp-1", "queues": [], "slots": 1, "components": ["dag-processor"], **AGENT_VERSIONS}
    sid = client.post("/agents", json=body, headers=headers(token)).json()["session_id"]
    assert _claim(client, token, sid, BUNDLE).status_code == 204
    _publishers[token] = sid
    return token


_publishers: dict[str, str] = {}


@pytest.fixture
def triggerer(client, owner) -> Callable[..., str]:
    """Register a triggerer agent (of the owner's token unless told); return its session id."""

    def make(name: str = "trig-1", token: str | None = None, queues=("default",), components=("triggerer",)):
        body = {"name": name, "queues": list(queues), "slots": 1, "components": list(components)}
        reply = client.post("/agents", json={**body, **AGENT_VERSIONS}, headers=headers(token or owner))
        assert reply.status_code == 200, reply.text
        return reply.json()["session_id"]

    return make


def _publish_dag(client, owner: str, dag: DAG, file: str = FILE) -> None:
    data = DagSerialization.to_dict(dag)
    data["dag"].update(fileloc=f"/agent/{file}", relative_fileloc=file)
    assert _publish(client, owner, _publishers[owner], _result(data, file=file)).status_code == 204


@pytest.fixture
def deferred(client, session, owner) -> Callable[..., tuple[int, str]]:
    """A DAG published by the owner's dag processor, a run of it, its task deferred on a trigger:
    returns (trigger id, task instance id)."""

    def make(dag_id="etl", queue="default", priority=1, executor=None, kwargs=None) -> tuple[int, str]:
        with DAG(dag_id, schedule=None, start_date=START) as dag:
            EmptyOperator(task_id="t", queue=queue, priority_weight=priority)
        _publish_dag(client, owner, dag)
        run = (
            DBDagBag()
            .get_latest_version_of_dag(dag_id, session=session)
            .create_dagrun(
                run_id=f"run-{uuid.uuid4().hex[:6]}",
                run_after=START,
                run_type=DagRunType.MANUAL,
                triggered_by=DagRunTriggeredByType.TEST,
                state=DagRunState.RUNNING,
                session=session,
            )
        )
        trigger = Trigger.from_object(TimeDeltaTrigger(datetime.timedelta(seconds=1)))
        if kwargs is not None:
            trigger.encrypted_kwargs = kwargs
        session.add(trigger)
        session.flush()
        ti = run.get_task_instances(session=session)[0]
        ti.executor = executor
        ti.state, ti.trigger_id, ti.next_method = TaskInstanceState.DEFERRED, trigger.id, "execute_complete"
        session.commit()
        return trigger.id, str(ti.id)

    return make


def _sync(client, token: str, sid: str, capacity: int = 10, known=()):
    body = {"capacity": capacity, "known": list(known)}
    return client.post(f"/agents/{sid}/triggerer/triggers", json=body, headers=headers(token))


def _report(client, token: str, sid: str, events=(), failures=(), batch_id: str | None = None):
    body = {"batch_id": batch_id or str(uuid.uuid4()), "events": list(events), "failures": list(failures)}
    return client.post(f"/agents/{sid}/triggerer/events", json=body, headers=headers(token))


def _event(trigger_id: int, payload) -> dict:
    return {"trigger_id": trigger_id, "kind": "_event_", "payload": BaseSerialization.serialize(payload)}


def _ti(session, ti_id: str) -> TaskInstance:
    session.expire_all()
    return session.get(TaskInstance, uuid.UUID(ti_id))


# -- tests ----------------------------------------------------------------------------------------------


def test_a_trigger_of_its_queue_is_assigned_with_its_workload_and_plain_kwargs(
    client, session, owner, triggerer, deferred
):
    trigger_id, ti_id = deferred()
    assert not session.get(Trigger, trigger_id).encrypted_kwargs.startswith("{")  # encrypted at rest
    sid = triggerer()
    reply = _sync(client, owner, sid)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["trigger_ids"] == [trigger_id]
    [offered] = body["new"]
    workload = offered["workload"]
    assert workload["id"] == trigger_id and workload["ti"]["id"] == ti_id
    assert workload["classpath"].endswith("DateTimeTrigger")  # what TimeDeltaTrigger serializes as
    assert workload["encrypted_kwargs"].startswith("{")  # the agent has no Fernet key of ours
    job = session.scalars(select(Job).where(Job.job_type == "TriggererJob")).one()
    assert job.hostname == "trig-1" and job.end_date is None
    assert offered["log_path"].startswith("dag_id=etl/") and offered["log_path"].endswith(
        f".log.trigger.{job.id}.log"
    )
    # Known triggers are not sent again; they stay assigned.
    again = _sync(client, owner, sid, known=[trigger_id]).json()
    assert again == {"trigger_ids": [trigger_id], "new": []}


def test_triggers_of_other_queues_and_beyond_capacity_are_not_assigned(client, owner, triggerer, deferred):
    other, _ = deferred("on_other", queue="other")
    low, _ = deferred("low", priority=1)
    high, _ = deferred("high", priority=10)
    sid = triggerer()
    assert _sync(client, owner, sid, capacity=1).json()["trigger_ids"] == [high]  # by priority
    assert _sync(client, owner, sid, capacity=5).json()["trigger_ids"] == sorted([high, low])
    assert other not in _sync(client, owner, sid, capacity=5).json()["trigger_ids"]


def test_a_worker_or_dag_processor_session_may_not_sync_triggers(client, owner, triggerer):
    sid = triggerer("dp-only", components=("dag-processor",), queues=())
    reply = _sync(client, owner, sid)
    assert reply.status_code == 403 and "not as a triggerer" in reply.json()["detail"]


def test_an_event_is_applied_once_and_only_from_the_assigned_triggerer(
    client, session, owner, triggerer, deferred
):
    trigger_id, ti_id = deferred()
    first, second = triggerer("trig-1"), triggerer("trig-2")
    assert _sync(client, owner, first).json()["trigger_ids"] == [trigger_id]
    assert _sync(client, owner, second).json()["trigger_ids"] == []  # taken while trig-1 lives

    stolen = _report(client, owner, second, events=[_event(trigger_id, {"from": "trig-2"})])
    assert stolen.json() == {"refused": [trigger_id]}
    assert _ti(session, ti_id).state == TaskInstanceState.DEFERRED

    batch = str(uuid.uuid4())
    payload = {"at": datetime.datetime(2024, 5, 1, tzinfo=datetime.timezone.utc), "n": 1}
    assert _report(client, owner, first, [_event(trigger_id, payload)], batch_id=batch).json() == {
        "refused": []
    }
    ti = _ti(session, ti_id)
    assert ti.state == TaskInstanceState.SCHEDULED and ti.trigger_id is None
    assert deserialize(ti.next_kwargs)["event"] == payload  # stored as Airflow stores it: a datetime
    # The same batch again (its answer was lost): nothing applied twice.
    session.execute(update(TaskInstance).values(state=TaskInstanceState.DEFERRED, trigger_id=trigger_id))
    session.commit()
    assert _report(client, owner, first, [_event(trigger_id, payload)], batch_id=batch).status_code == 200
    assert _ti(session, ti_id).state == TaskInstanceState.DEFERRED


def test_a_failure_fails_the_task_through_a_worker_and_a_payload_object_is_refused(
    client, session, owner, triggerer, deferred
):
    failing, failing_ti = deferred("failing")
    crafted, crafted_ti = deferred("crafted")
    sid = triggerer()
    assert sorted(_sync(client, owner, sid).json()["trigger_ids"]) == sorted([failing, crafted])
    failure = {"trigger_id": failing, "traceback": ["Traceback ...\n", "RuntimeError: boom\n"]}
    pod = {"trigger_id": crafted, "kind": "_event_", "payload": {"__type": "k8s.V1Pod", "__var": {}}}
    assert _report(client, owner, sid, events=[pod], failures=[failure]).json() == {"refused": []}
    ti = _ti(session, failing_ti)
    assert ti.state == TaskInstanceState.SCHEDULED and ti.next_method == "__fail__"
    assert "RuntimeError: boom" in "".join(ti.next_kwargs["traceback"])
    ti = _ti(session, crafted_ti)
    assert ti.next_method == "__fail__" and "refused" in "".join(ti.next_kwargs["traceback"])


def test_a_deregistered_triggerers_triggers_go_to_another_at_once(
    client, session, owner, triggerer, deferred
):
    trigger_id, _ = deferred()
    first, second = triggerer("trig-1"), triggerer("trig-2")
    assert _sync(client, owner, first).json()["trigger_ids"] == [trigger_id]
    assert client.delete(f"/agents/{first}", headers=headers(owner)).status_code == 204
    session.expire_all()
    ended = session.scalars(select(Job).where(Job.hostname == "trig-1")).one()
    assert ended.end_date is not None and ended.state == "success"
    assert _sync(client, owner, second).json()["trigger_ids"] == [trigger_id]


def test_asset_watchers_go_to_the_triggerers_of_the_token_that_owns_their_dag(
    client, session, make_token, owner, triggerer
):
    watched = Asset("watched", watchers=[AssetWatcher(name="w", trigger=FileDeleteTrigger(filepath="/x"))])
    with DAG("watching", schedule=[watched], start_date=START) as dag:
        EmptyOperator(task_id="t")
    _publish_dag(client, owner, dag)
    session.execute(update(DagModel).where(DagModel.dag_id == "watching").values(is_paused=False))
    session.commit()
    _publish_dag(client, owner, dag)  # Airflow adds an unpaused DAG's watchers at its next parse
    [watcher] = session.scalars(select(Trigger.id)).all()

    stranger = make_token("stranger", components=["triggerer"])
    assert _sync(client, stranger, triggerer("trig-x", token=stranger)).json()["trigger_ids"] == []
    reply = _sync(client, owner, triggerer("trig-1")).json()
    assert reply["trigger_ids"] == [watcher] and reply["new"][0]["workload"]["watched_assets"]


def test_a_deferred_task_of_another_executor_keeps_its_trigger_off_the_agents(
    client, owner, triggerer, deferred
):
    local, _ = deferred("local", executor="LocalExecutor")
    remote, _ = deferred("remote", executor="RemoteExecutor")
    default, _ = deferred("default_executor")  # none named: the default, RemoteExecutor here
    assert _sync(client, owner, triggerer()).json()["trigger_ids"] == sorted([remote, default])
    assert local not in _sync(client, owner, triggerer("trig-2")).json()["trigger_ids"]


def test_a_trigger_that_cannot_be_sent_fails_alone_and_the_others_still_go(
    client, session, owner, triggerer, deferred
):
    broken, broken_ti = deferred("broken", kwargs="not-fernet-encrypted")
    fine, _ = deferred("fine")
    reply = _sync(client, owner, triggerer())
    assert reply.status_code == 200, reply.text
    assert [offered["workload"]["id"] for offered in reply.json()["new"]] == [fine]
    ti = _ti(session, broken_ti)
    assert ti.next_method == "__fail__" and "cannot be run" in "".join(ti.next_kwargs["traceback"])


def test_an_event_of_a_session_that_ended_is_applied_unless_another_triggerer_took_the_trigger(
    client, session, owner, triggerer, deferred
):
    trigger_id, ti_id = deferred()
    first = triggerer("trig-1")
    assert _sync(client, owner, first).json()["trigger_ids"] == [trigger_id]
    again = triggerer("trig-1")  # the same process registering again: its job ends
    assert _report(client, owner, again, [_event(trigger_id, "late")]).json() == {"refused": []}
    assert _ti(session, ti_id).state == TaskInstanceState.SCHEDULED

    taken, taken_ti = deferred("taken")
    assert _sync(client, owner, again).json()["trigger_ids"] == [taken]
    other = triggerer("trig-2")
    session.execute(update(Job).where(Job.hostname == "trig-1").values(end_date=START))
    session.commit()
    assert _sync(client, owner, other).json()["trigger_ids"] == [taken]
    assert _report(client, owner, again, [_event(taken, "late")]).json() == {"refused": [taken]}
    assert _ti(session, taken_ti).state == TaskInstanceState.DEFERRED


def test_a_watcher_declared_anywhere_in_an_agents_dag_is_kept_off_stock_triggerers(client, session, owner):
    outlet = Asset("written", watchers=[AssetWatcher(name="w", trigger=FileDeleteTrigger(filepath="/y"))])
    with DAG("writes", schedule=None, start_date=START) as writes:
        EmptyOperator(task_id="t", outlets=[outlet])
    with DAG("reads", schedule=[Asset("written")], start_date=START) as reads:  # makes the asset active
        EmptyOperator(task_id="t")
    _publish_dag(client, owner, reads, file="reads.py")
    _publish_dag(client, owner, writes)
    session.execute(update(DagModel).values(is_paused=False))
    session.commit()
    _publish_dag(client, owner, reads, file="reads.py")
    _publish_dag(client, owner, writes)
    queues = list(session.scalars(select(Trigger.queue)))
    assert queues and None not in queues  # created from the outlet's watcher, the token's own


def test_triggers_may_ask_how_other_tasks_and_runs_are_doing_and_nothing_more(
    client, make_token, owner, deferred
):
    _, _ = deferred()
    from airflow.sdk.api.datamodels._generated import API_VERSION

    api_version = {"Airflow-API-Version": API_VERSION}  # what Airflow's own client sends
    runs = client.get(
        "/triggerer/dag-runs/count",
        params={"dag_id": "etl", "states": ["running"]},
        headers={**headers(owner), **api_version},
    )
    assert runs.status_code == 200, runs.text
    assert runs.json() == 1
    tis = client.get(
        "/triggerer/task-instances/count",
        params={"dag_id": "etl", "states": ["deferred"]},
        headers={**headers(owner), **api_version},
    )
    assert tis.status_code == 200 and tis.json() == 1, tis.text
    xcom = client.get("/triggerer/xcoms/etl/r/t/k", headers=headers(owner))
    assert xcom.status_code == 404 and "cannot ask" in xcom.json()["detail"]
    parser_only = make_token("parser-only", components=["dag-processor"])
    assert (
        client.get(
            "/triggerer/dag-runs/count", params={"dag_id": "etl"}, headers=headers(parser_only)
        ).status_code
        == 403
    )


def test_a_token_cannot_report_on_a_trigger_outside_its_scope_even_one_nobody_holds(
    client, session, make_token, owner, triggerer, deferred
):
    trigger_id, ti_id = deferred()  # deferred on "default", not yet assigned to anyone
    stranger = make_token("stranger", queues=("elsewhere",), components=["triggerer"])
    sid = triggerer("trig-x", token=stranger, queues=("elsewhere",))
    ended = {"trigger_id": trigger_id, "kind": "success", "xcoms": {"return_value": "forged"}}
    assert _report(client, stranger, sid, events=[ended]).json() == {"refused": [trigger_id]}
    assert _ti(session, ti_id).state == TaskInstanceState.DEFERRED


@pytest.mark.parametrize(
    "path",
    [
        "/triggerer/dag-runs/%2E%2E/xcoms%252Fetl%252Fr%252Ft%252Fk%3F/state",
        "/triggerer/dag-runs/%2E%2E/%2E%2E/xcoms/etl/r/t/k%3F/state",
        "/triggerer/dag-runs/etl/run%3F/state",
        "/triggerer/task-instances/previous/etl/t%23x",
    ],
)
def test_only_the_read_only_state_questions_reach_the_execution_api(client, owner, path):
    reply = client.get(path, headers=headers(owner))
    assert reply.status_code == 404 and "cannot ask" in reply.json()["detail"], reply.text


def test_a_watcher_another_process_creates_during_a_persist_is_not_the_agents(
    client, session, owner, monkeypatch
):
    """A stock dag processor commits its own watcher while the agent's result is being persisted."""
    from airflow.dag_processing.manager import DagFileProcessorManager
    from airflow.models.asset import AssetModel, AssetWatcherModel
    from airflow.utils.session import create_session

    original = DagFileProcessorManager.persist_parsing_result

    def with_a_stock_watcher_committed_meanwhile(self, **kwargs):
        with create_session(scoped=False) as other:
            asset = AssetModel(name="stock", uri="stock", group="asset")
            trigger = Trigger(classpath="stock.Trigger", kwargs={})
            other.add_all([asset, trigger])
            other.flush()
            other.add(AssetWatcherModel(name="w", trigger_id=trigger.id, asset_id=asset.id))
        return original(self, **kwargs)

    monkeypatch.setattr(
        DagFileProcessorManager, "persist_parsing_result", with_a_stock_watcher_committed_meanwhile
    )
    with DAG("plain", schedule=None, start_date=START) as dag:
        EmptyOperator(task_id="t")
    _publish_dag(client, owner, dag)
    session.expire_all()
    stock = session.scalars(select(Trigger).where(Trigger.classpath == "stock.Trigger")).one()
    assert stock.queue is None


def test_an_end_event_with_xcoms_ends_the_task_and_stores_them(client, session, owner, triggerer, deferred):
    from airflow.models.xcom import XComModel

    trigger_id, ti_id = deferred()
    sid = triggerer()
    assert _sync(client, owner, sid).json()["trigger_ids"] == [trigger_id]
    ended = {"trigger_id": trigger_id, "kind": "success", "xcoms": {"answer": 42}}
    assert _report(client, owner, sid, events=[ended]).json() == {"refused": []}
    assert _ti(session, ti_id).state == TaskInstanceState.SUCCESS
    stored = session.scalars(select(XComModel).where(XComModel.key == "answer")).one()
    assert stored.value in (42, "42")


def test_a_batch_that_fails_half_way_applies_nothing(
    client, session, owner, triggerer, deferred, monkeypatch
):
    first, first_ti = deferred("first")
    second, _ = deferred("second")
    sid = triggerer()
    assert sorted(_sync(client, owner, sid).json()["trigger_ids"]) == sorted([first, second])

    def broken(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(Trigger, "submit_failure", broken)
    with pytest.raises(RuntimeError):
        _report(client, owner, sid, events=[_event(first, 1)], failures=[{"trigger_id": second}])
    assert _ti(session, first_ti).state == TaskInstanceState.DEFERRED


def test_a_watcher_whose_insert_was_rolled_back_leaves_the_id_to_its_next_owner(session, owner):
    """Airflow retries a persist after "database is locked" with a rollback; on SQLite the rolled-back
    trigger's id goes to the next insert, here another process's stock watcher."""
    from airflow.models.asset import AssetModel, AssetWatcherModel
    from airflow.utils.session import create_session

    from airflow_remote_exec.api.triggers import watchers_owned_by

    with create_session(scoped=False) as persisting, watchers_owned_by(persisting, token_id=1):
        agents = Trigger(classpath="agent.Trigger", kwargs={})
        persisting.add(agents)
        persisting.flush()
        rolled_back = agents.id
        persisting.rollback()
        with create_session(scoped=False) as other:
            asset = AssetModel(name="stock-after-rollback", uri="stock-after-rollback", group="asset")
            stock = Trigger(classpath="stock.Trigger", kwargs={})
            other.add_all([asset, stock])
            other.flush()
            other.add(AssetWatcherModel(name="w", trigger_id=stock.id, asset_id=asset.id))
            stock_id = stock.id
    assert stock_id == rolled_back  # the id was reused, which is what the guard is for
    session.expire_all()
    assert session.get(Trigger, stock_id).queue is None
