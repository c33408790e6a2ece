"""The dag processor's side of the agent API, in-process: who may publish what, and what is refused."""

from __future__ import annotations

import copy
import datetime
from collections.abc import Callable, Iterator

import pytest
from airflow.dag_processing.processor import DagFileParsingResult
from airflow.models.dag import DagModel
from airflow.models.dagbundle import DagBundleModel
from airflow.models.dagcode import DagCode
from airflow.models.db_callback_request import DbCallbackRequest
from airflow.models.errors import ParseImportError
from airflow.models.serialized_dag import SerializedDagModel
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG
from airflow.serialization.serialized_objects import DagSerialization, LazyDeserializedDAG
from sqlalchemy import delete, select, update

from airflow_remote_exec.api import dag_processing
from tests.api.conftest import AGENT_VERSIONS, headers

BUNDLE = "team-a"
FILE = "pipelines/etl.py"
SOURCE = "# the DAG's source, as the agent read it\n"


@pytest.fixture(autouse=True)
def _clean_airflow_rows(session) -> Iterator[None]:
    yield
    from airflow.models.callback import Callback  # noqa: F401  (mapped before deleting requests)

    for model in (DbCallbackRequest, ParseImportError, SerializedDagModel, DagModel, DagBundleModel):
        session.execute(delete(model))
    session.commit()


@pytest.fixture
def processor(client, make_token) -> Callable[..., tuple[str, str]]:
    """Register a dag-processor agent; return (token, session id)."""

    def make(token_name: str = "tok", name: str = "dp-1", token: str | None = None) -> tuple[str, str]:
        token = token or make_token(token_name, components=["dag-processor"])
        reply = client.post(
            "/agents",
            json={"name": name, "queues": [], "slots": 1, "components": ["dag-processor"], **AGENT_VERSIONS},
            headers=headers(token),
        )
        assert reply.status_code == 200, reply.text
        return token, reply.json()["session_id"]

    return make


def _token_id(session, secret: str) -> int:
    from airflow_remote_exec.tokens import find_valid_token

    return find_valid_token(session, secret).id


def _url(session_id: str, path: str) -> str:
    return f"/agents/{session_id}/dag-processor{path}"


def _claim(client, token: str, session_id: str, *names: str):
    return client.post(_url(session_id, "/bundles"), json={"names": list(names)}, headers=headers(token))


def _dag_data(dag_id: str = "etl", file: str = FILE, **operator_kwargs) -> dict:
    with DAG(dag_id, schedule=None, start_date=datetime.datetime(2024, 1, 1)) as dag:
        EmptyOperator(task_id="t", **operator_kwargs)
    data = DagSerialization.to_dict(dag)
    data["dag"]["fileloc"] = f"/agent/bundles/{BUNDLE}/{file}"  # a path only the agent has
    data["dag"]["relative_fileloc"] = file
    return data


def _result(*datas: dict, file: str = FILE, sources: dict | None = None, **result_fields) -> dict:
    result = DagFileParsingResult(
        fileloc=f"/agent/bundles/{BUNDLE}/{file}",
        serialized_dags=[LazyDeserializedDAG(data=d) for d in datas],
        **result_fields,
    )
    return {
        "relative_fileloc": file,
        "run_duration": 0.1,
        "result": result.model_dump(mode="json"),
        "sources": {file: SOURCE} if sources is None else sources,
    }


def _publish(client, token: str, session_id: str, body: dict, bundle: str = BUNDLE):
    return client.post(
        _url(session_id, f"/bundles/{bundle}/parsing-results"), json=body, headers=headers(token)
    )


def test_a_parsed_dag_is_persisted_with_the_source_the_agent_sent(client, processor, session):
    token, sid = processor()
    assert _claim(client, token, sid, BUNDLE).status_code == 204
    reply = _publish(client, token, sid, _result(_dag_data(), import_errors={"pipelines/etl.py/x": "boom"}))
    assert reply.status_code == 204, reply.text

    dag = session.get(DagModel, "etl")
    assert (dag.bundle_name, dag.relative_fileloc, dag.is_stale) == (BUNDLE, FILE, False)
    assert DagCode.code("etl", session=session) == SOURCE  # never read from the path on the agent
    assert session.scalar(select(ParseImportError.filename).where(ParseImportError.bundle_name == BUNDLE))


def test_only_the_token_that_claimed_a_bundle_may_publish_to_it(client, processor):
    token, sid = processor()
    assert _claim(client, token, sid, BUNDLE).status_code == 204
    other_token, other_sid = processor("other", name="dp-2")

    refused = _claim(client, other_token, other_sid, BUNDLE)
    assert refused.status_code == 403 and "another token" in refused.json()["detail"]
    assert _publish(client, other_token, other_sid, _result(_dag_data())).status_code == 403

    _, same_token_sid = processor(name="dp-3", token=token)  # a second agent of the same token: HA
    assert _claim(client, token, same_token_sid, BUNDLE).status_code == 204
    assert _publish(client, token, same_token_sid, _result(_dag_data())).status_code == 204


def test_the_orchestrators_own_bundles_cannot_be_claimed(client, processor, session):
    token, sid = processor()
    own = _claim(client, token, sid, "dags-folder")  # the default bundle of every Airflow
    assert own.status_code == 403 and "orchestrator's own" in own.json()["detail"]

    session.add(DagBundleModel(name="legacy"))
    session.flush()
    session.add(DagModel(dag_id="old", bundle_name="legacy", fileloc="/x.py"))
    session.commit()
    parsed_here = _claim(client, token, sid, "legacy")
    assert parsed_here.status_code == 403 and "parsed on the orchestrator" in parsed_here.json()["detail"]


def test_a_bundle_the_orchestrator_is_configured_with_later_is_no_longer_the_agents(
    client, processor, monkeypatch
):
    token, sid = processor()
    assert _claim(client, token, sid, BUNDLE).status_code == 204
    monkeypatch.setattr(dag_processing, "_orchestrator_bundles", lambda: frozenset({"dags-folder", BUNDLE}))
    assert _publish(client, token, sid, _result(_dag_data())).status_code == 403


def test_a_dag_id_of_another_bundle_cannot_be_taken_over(client, processor, session):
    token, sid = processor()
    assert _claim(client, token, sid, BUNDLE).status_code == 204
    session.add(DagBundleModel(name="legacy"))
    session.flush()
    session.add(DagModel(dag_id="etl", bundle_name="legacy", fileloc="/x.py", is_stale=True))
    session.commit()

    reply = _publish(client, token, sid, _result(_dag_data()))
    assert reply.status_code == 409 and "another bundle" in reply.json()["detail"]
    assert session.scalar(select(DagModel.bundle_name).where(DagModel.dag_id == "etl")) == "legacy"


def _encoded(value: dict) -> dict:
    return {"__var": value, "__type": "dict"}


def _param(schema: dict) -> list:
    """DAG params as Airflow serializes them, with this schema."""
    param = {"__class": "airflow.sdk.definitions.param.Param", "default": "a", "description": None}
    return [["p", {**param, "schema": _encoded(schema), "source": None}]]


def _with(path: tuple, value):
    def change(data: dict) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_with(("dag", "deadline"), [{"callback": {"path": "os.system"}}]), "deadline alert"),
        (_with(("dag", "tasks", 0, "__var", "start_from_trigger"), True), "starting from a trigger"),
        (_with(("dag", "tasks", 0, "__var", "executor"), "LocalExecutor"), "executor 'LocalExecutor'"),
        (_with(("dag", "tasks", 0, "__var", "executor"), {"not": "a name"}), "on executor \"{'not'"),
        (
            _with(("dag", "tasks", 0, "__var", "executor_config"), _encoded({"pod_override": 1})),
            "executor_config",
        ),
        (_with(("dag", "params"), _param({"$ref": "file:///etc/passwd"})), "$ref"),
        (_with(("dag", "params"), _param({"type": "string", "pattern": "^(a+)+$"})), "regular expression"),
        (_with(("dag", "params"), _param({"format": "regex"})), "regular expression"),
        (
            _with(("dag", "params"), _param({"type": "array", "items": _encoded({"pattern": "^(a+)+$"})})),
            "regular expression",
        ),
        (
            _with(("dag", "tasks", 0, "__var", "zzz"), {"__type": "deadline_alert", "__var": {}}),
            "'deadline_alert'",
        ),
        (_with(("dag", "default_args"), {"__type": "connection", "__var": {"conn_id": "x"}}), "'connection'"),
        (_with(("dag", "tasks", 0, "__var", "ref"), {"__class_path": "os.system"}), "class name"),
        (_with(("dag", "timetable"), {"__classname__": "airflow.models.Variable"}), "class name"),
        (_with(("dag", "relative_fileloc"), "other.py"), "not from the parsed file"),
        (_with(("dag", "dag_id"), "x" * 300), "cannot be loaded"),
        (_with(("dag", "tasks", 0, "__var", "queue"), "etl"), "outside its token's queues"),
    ],
)
def test_a_dag_that_would_run_or_break_something_on_the_orchestrator_is_refused(
    client, processor, session, change, reason
):
    token, sid = processor()
    assert _claim(client, token, sid, BUNDLE).status_code == 204
    data = _dag_data()
    change(data)
    reply = _publish(client, token, sid, _result(data))
    assert reply.status_code == 422 and reason in reply.json()["detail"], reply.text
    assert session.get(DagModel, "etl") is None


def test_a_mapped_tasks_executor_config_is_refused_and_user_values_are_not_mistaken_for_fields(
    client, processor
):
    from airflow.providers.standard.operators.bash import BashOperator

    token, sid = processor()
    assert _claim(client, token, sid, BUNDLE).status_code == 204
    with DAG("etl", schedule=None, start_date=datetime.datetime(2024, 1, 1)) as dag:
        BashOperator.partial(task_id="m", executor_config={"pod_override": 1}).expand(bash_command=["a"])
    mapped = DagSerialization.to_dict(dag)
    mapped["dag"].update(fileloc=f"/agent/{FILE}", relative_fileloc=FILE)
    reply = _publish(client, token, sid, _result(mapped))
    assert reply.status_code == 422 and "executor_config" in reply.json()["detail"], reply.text

    from airflow.sdk import Param

    # A property named "pattern" and an enum of dicts are data, not a regular expression to run.
    schema_with_data = {"properties": {"pattern": {"type": "string"}}, "enum": [{"pattern": "(a+)+"}]}
    with DAG(
        "etl",
        schedule=None,
        start_date=datetime.datetime(2024, 1, 1),
        params={"p": Param({}, **schema_with_data)},
    ) as dag:
        BashOperator(task_id="b", bash_command="env", env={"executor": "x", "deadline": "y", "watchers": "z"})
    plain = DagSerialization.to_dict(dag)
    plain["dag"].update(fileloc=f"/agent/{FILE}", relative_fileloc=FILE)
    assert _publish(client, token, sid, _result(plain)).status_code == 204


def test_an_asset_watchers_trigger_is_kept_off_stock_triggerers(client, processor, session):
    from airflow.models.trigger import Trigger
    from airflow.providers.standard.triggers.file import FileDeleteTrigger
    from airflow.sdk import Asset, AssetWatcher

    token, sid = processor()
    assert _claim(client, token, sid, BUNDLE).status_code == 204
    watched = Asset("watched", watchers=[AssetWatcher(name="w", trigger=FileDeleteTrigger(filepath="/x"))])
    with DAG("etl", schedule=[watched], start_date=datetime.datetime(2024, 1, 1)) as dag:
        EmptyOperator(task_id="b")
    data = DagSerialization.to_dict(dag)
    data["dag"].update(fileloc=f"/agent/{FILE}", relative_fileloc=FILE)
    assert _publish(client, token, sid, _result(data)).status_code == 204
    session.execute(update(DagModel).where(DagModel.dag_id == "etl").values(is_paused=False))
    session.commit()  # Airflow creates the triggers of unpaused DAGs' watchers, at the next parse
    assert _publish(client, token, sid, _result(data)).status_code == 204
    session.expire_all()
    triggers = session.query(Trigger).filter(Trigger.classpath.like("%FileDeleteTrigger")).all()
    # Created by Airflow's persistence, with a queue that stock triggerers (no --queues) never take.
    assert [t.queue for t in triggers] == [f"remote-exec-agents:{_token_id(session, token)}"]


def test_results_must_carry_sources_and_stay_inside_their_file(client, processor):
    token, sid = processor()
    assert _claim(client, token, sid, BUNDLE).status_code == 204
    no_source = _publish(client, token, sid, _result(_dag_data(), sources={}))
    assert no_source.status_code == 422 and "source" in no_source.json()["detail"]
    other_error = _publish(client, token, sid, _result(import_errors={"elsewhere.py": "x"}))
    assert other_error.status_code == 422 and "outside the parsed file" in other_error.json()["detail"]
    warning = {"dag_id": "not-this-file", "warning_type": "non-existent pool", "message": "m"}
    foreign_warning = _publish(client, token, sid, _result(_dag_data(), warnings=[warning]))
    assert foreign_warning.status_code == 422 and "does not define" in foreign_warning.json()["detail"]
    escape = _result(_dag_data())
    escape["relative_fileloc"] = "../../etc/passwd"
    assert _publish(client, token, sid, escape).status_code == 422


def test_an_oversized_body_is_refused_while_it_arrives(client, processor, monkeypatch):
    token, sid = processor()
    monkeypatch.setattr(dag_processing, "MAX_PARSING_RESULT_BYTES", 10_000)
    url = _url(sid, f"/bundles/{BUNDLE}/parsing-results")
    declared = client.post(url, content=b"{" + b" " * 20_000 + b"}", headers=headers(token))
    assert declared.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it comes
        yield b"{"
        for _ in range(100):
            yield b" " * 1000
        yield b"}"

    chunked = client.post(
        url, content=chunks(), headers={**headers(token), "Content-Type": "application/json"}
    )
    assert chunked.status_code == 413 and "larger than" in chunked.json()["detail"]


def test_deleted_files_and_stale_dags_are_deactivated_in_the_agents_bundle_only(client, processor, session):
    token, sid = processor()
    assert _claim(client, token, sid, BUNDLE).status_code == 204
    assert _publish(client, token, sid, _result(_dag_data())).status_code == 204
    session.add(DagBundleModel(name="theirs"))
    session.flush()
    session.add(
        DagModel(dag_id="theirs", bundle_name="theirs", fileloc="/t", relative_fileloc="t.py", is_stale=False)
    )
    session.commit()

    files = client.put(
        _url(sid, f"/bundles/{BUNDLE}/files"), json={"observed_filelocs": []}, headers=headers(token)
    )
    assert files.status_code == 204
    session.expire_all()
    assert session.get(DagModel, "etl").is_stale and not session.get(DagModel, "theirs").is_stale

    session.get(DagModel, "etl").is_stale = False
    session.commit()

    def stale_check(age: float):
        body = {"seconds_since_parsed": {FILE: age, "t.py": age}}
        return client.post(_url(sid, f"/bundles/{BUNDLE}/stale-check"), json=body, headers=headers(token))

    # The DAG was parsed just now: a parse of its file that ended now, or 40 s before it (the default
    # threshold is 50 s), does not make it stale, whatever the agent's clock says.
    assert stale_check(0).json() == [] and stale_check(40).json() == []
    session.execute(
        update(DagModel)
        .where(DagModel.dag_id == "etl")
        .values(last_parsed_time=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5))
    )
    session.commit()
    stale = stale_check(0)  # its file parsed now, 5 minutes after the DAG was last seen in it
    assert stale.status_code == 200 and stale.json() == ["etl"]
    session.expire_all()
    assert session.get(DagModel, "etl").is_stale and not session.get(DagModel, "theirs").is_stale


def test_callbacks_go_to_an_agent_parsing_their_bundle_once(client, processor, session):
    from airflow.callbacks.callback_requests import DagCallbackRequest

    token, sid = processor()
    assert _claim(client, token, sid, BUNDLE, "second").status_code == 204
    for bundle in (BUNDLE, "second", "theirs"):
        request = DagCallbackRequest(
            filepath=FILE,
            dag_id="etl",
            run_id="r1",
            bundle_name=bundle,
            bundle_version=None,
            is_failure_callback=True,
        )
        session.add(DbCallbackRequest(callback=request, priority_weight=1))
    session.commit()

    def take(*bundles: str) -> list[str]:
        reply = client.post(_url(sid, "/callbacks"), json={"bundles": list(bundles)}, headers=headers(token))
        assert reply.status_code == 200, reply.text
        return [c["bundle_name"] for c in reply.json()["callbacks"]]

    # An agent gets the callbacks of the bundles it parses, never those of the token's other bundles
    # (another agent of the token parses them) nor of another token's.
    assert take(BUNDLE, "theirs") == [BUNDLE]
    assert take(BUNDLE) == []
    assert take("second") == ["second"]
    assert session.scalar(select(DbCallbackRequest.id)) is not None  # "theirs" stays for its own agents


def test_a_worker_agent_cannot_use_the_dag_processor_routes(client, make_token, register):
    token = make_token("workers")
    sid = register(token)
    reply = _claim(client, token, sid, BUNDLE)
    assert reply.status_code == 403 and "not as a dag-processor" in reply.json()["detail"]


def test_a_token_without_the_dag_processor_scope_cannot_register_one(client, make_token):
    token = make_token("workers")
    reply = client.post(
        "/agents",
        json={"name": "dp", "queues": [], "slots": 1, "components": ["dag-processor"], **AGENT_VERSIONS},
        headers=headers(token),
    )
    assert reply.status_code == 403 and "dag-processor" in reply.json()["detail"]


def test_a_deep_copy_of_a_result_is_accepted_twice(client, processor):
    """Publishing is idempotent: an agent retrying after a lost response changes nothing."""
    token, sid = processor()
    assert _claim(client, token, sid, BUNDLE).status_code == 204
    body = _result(_dag_data())
    assert _publish(client, token, sid, copy.deepcopy(body)).status_code == 204
    assert _publish(client, token, sid, body).status_code == 204


def test_two_agents_writing_the_same_dags_at_once_get_a_retry_not_a_500(client, processor, monkeypatch):
    from sqlalchemy.exc import IntegrityError

    token, sid = processor()
    assert _claim(client, token, sid, BUNDLE).status_code == 204

    def concurrent_write(*args):
        raise IntegrityError("INSERT INTO dag_version ...", {}, Exception("duplicate key"))

    monkeypatch.setattr(dag_processing, "_persist_once", concurrent_write)
    reply = _publish(client, token, sid, _result(_dag_data()))
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "1"


def test_a_large_body_is_read_only_for_a_token_that_may_send_one(client, processor, make_token, monkeypatch):
    token, sid = processor()
    assert _claim(client, token, sid, BUNDLE).status_code == 204
    read = []
    monkeypatch.setattr(dag_processing, "checked_result", lambda *args: read.append(args) or 1 / 0)
    url = _url(sid, f"/bundles/{BUNDLE}/parsing-results")
    big = b'{"padding": "' + b"x" * (2 * 1024 * 1024) + b'"}'

    nobody = client.post(url, content=big, headers=headers("rex_not-a-real-token"))
    assert nobody.status_code == 401 and nobody.headers["WWW-Authenticate"] == "Bearer"
    worker = client.post(url, content=big, headers=headers(make_token("workers")))
    assert worker.status_code == 403 and "dag-processor component" in worker.json()["detail"]
    assert client.post(url, content=big, headers={"Remote-Exec-Api-Version": "2"}).status_code == 401
    assert read == []
    # The token that may send it gets its body read (and refused on its content, not its size).
    assert client.post(url, content=big, headers=headers(token)).status_code == 422
