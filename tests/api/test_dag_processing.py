"""The dag processor's routes: DAGs an agent parsed land in the DB as Airflow's own dag processor
leaves them, and only for bundles the agent's token owns."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
import structlog
from airflow.dag_processing.processor import DagFileParseRequest, _parse_file
from airflow.models.dag import DagModel
from airflow.models.dagbundle import DagBundleModel
from airflow.models.dagcode import DagCode
from airflow.models.errors import ParseImportError
from airflow.models.serialized_dag import SerializedDagModel
from sqlalchemy import delete, select

from airflow_remote_exec.models import RemoteBundle
from tests.api.conftest import AGENT_VERSIONS, headers

DAG_SOURCE = """
from datetime import datetime
from airflow.sdk import DAG
from airflow.providers.standard.operators.empty import EmptyOperator

with DAG("{dag_id}", schedule=None, start_date=datetime(2026, 1, 1)):
    EmptyOperator(task_id="only")
"""


@pytest.fixture(autouse=True)
def clean_airflow_tables(session):
    yield
    for model in (SerializedDagModel, DagCode, ParseImportError, DagModel, RemoteBundle, DagBundleModel):
        session.execute(delete(model))
    session.commit()


@pytest.fixture
def dag_processor(client, make_token):
    """Register a dag-processor agent of a new token; return (token, session id)."""

    def make(token_name: str = "parsers", agent_name: str = "dp-1") -> tuple[str, str]:
        token = make_token(token_name, components=["dag-processor"])
        body = {"name": agent_name, "queues": ["default"], "slots": 1, "components": ["dag-processor"]}
        reply = client.post("/agents", json={**body, **AGENT_VERSIONS}, headers=headers(token))
        assert reply.status_code == 200, reply.text
        return token, reply.json()["session_id"]

    return make


def _parsed(bundle: Path, name: str, source: str) -> dict:
    """What Airflow's own parser makes of ``bundle/name``, with the file's source, as the agent sends it."""
    path = bundle / name
    path.write_text(source)
    request = DagFileParseRequest(file=str(path), bundle_path=bundle, bundle_name="ours")
    result = _parse_file(request, structlog.get_logger())
    return {
        "relative_fileloc": name,
        "run_duration": 0.2,
        "result": result.model_dump(mode="json"),
        "sources": {str(path): source},
    }


def test_a_parsed_dag_lands_as_airflows_dag_processor_leaves_it(client, session, dag_processor, tmp_path):
    token, sid = dag_processor()
    base = f"/agents/{sid}/dag-processor/bundles"
    assert client.post(base, json={"names": ["ours"]}, headers=headers(token)).status_code == 204
    refreshed = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
    state = {"last_refreshed": refreshed.isoformat(), "version": "abc123"}
    assert client.put(f"{base}/ours/state", json=state, headers=headers(token)).status_code == 204
    assert client.get(f"{base}/ours/state", headers=headers(token)).json() == {
        "last_refreshed": "2026-11-27T12:00:00Z",
        "version": "abc123",
    }

    body = {**_parsed(tmp_path, "hello.py", DAG_SOURCE.format(dag_id="hello")), "bundle_version": "abc123"}
    reply = client.post(f"{base}/ours/parsing-results", json=body, headers=headers(token))
    assert reply.status_code == 204, reply.text

    dag = session.get(DagModel, "hello")
    assert (dag.bundle_name, dag.bundle_version, dag.relative_fileloc) == ("ours", "abc123", "hello.py")
    assert SerializedDagModel.get(dag_id="hello", session=session).dag_hash
    assert "EmptyOperator" in DagCode.code("hello", session=session)

    broken = _parsed(tmp_path, "broken.py", "from airflow.sdk import DAG\nimport not_a_module_anywhere\n")
    assert client.post(f"{base}/ours/parsing-results", json=broken, headers=headers(token)).status_code == 204
    error = session.scalar(select(ParseImportError).where(ParseImportError.bundle_name == "ours"))
    assert error.filename == "broken.py"
    assert "not_a_module_anywhere" in error.stacktrace


def test_the_source_comes_from_the_agent_never_from_the_orchestrators_disk(
    client, session, dag_processor, tmp_path
):
    token, sid = dag_processor()
    base = f"/agents/{sid}/dag-processor/bundles"
    client.post(base, json={"names": ["ours"]}, headers=headers(token))
    body = _parsed(tmp_path, "hello.py", DAG_SOURCE.format(dag_id="hello"))
    body["sources"] = {}  # the file exists on this disk, as /etc/passwd would: it must not be read
    reply = client.post(f"{base}/ours/parsing-results", json=body, headers=headers(token))
    assert reply.status_code == 204, reply.text
    assert not DagCode.has_dag("hello", session=session)
    error = session.scalar(select(ParseImportError).where(ParseImportError.bundle_name == "ours"))
    assert "did not send the source" in error.stacktrace


def test_a_bundle_of_another_token_cannot_be_claimed_read_or_written(
    client, session, dag_processor, tmp_path
):
    mine, my_sid = dag_processor("mine", "dp-mine")
    theirs, their_sid = dag_processor("theirs", "dp-theirs")
    assert client.post(f"/agents/{my_sid}/dag-processor/bundles", json={"names": ["ours"]},
                       headers=headers(mine)).status_code == 204  # fmt: skip
    base = f"/agents/{their_sid}/dag-processor/bundles"
    claim = client.post(base, json={"names": ["ours"]}, headers=headers(theirs))
    assert claim.status_code == 403
    assert "another token" in claim.json()["detail"]
    assert client.get(f"{base}/ours/state", headers=headers(theirs)).status_code == 403
    state = {"last_refreshed": "2026-11-27T12:00:00Z", "version": "evil"}
    assert client.put(f"{base}/ours/state", json=state, headers=headers(theirs)).status_code == 403
    body = _parsed(tmp_path, "hello.py", DAG_SOURCE.format(dag_id="hello"))
    assert client.post(f"{base}/ours/parsing-results", json=body, headers=headers(theirs)).status_code == 403
    assert session.get(DagModel, "hello") is None
    assert session.get(RemoteBundle, "ours").agent_name == "dp-mine"


def test_a_dag_id_of_another_tokens_bundle_cannot_be_taken_over(client, session, dag_processor, tmp_path):
    mine, my_sid = dag_processor("mine", "dp-mine")
    theirs, their_sid = dag_processor("theirs", "dp-theirs")
    client.post(f"/agents/{my_sid}/dag-processor/bundles", json={"names": ["ours"]}, headers=headers(mine))
    body = _parsed(tmp_path, "hello.py", DAG_SOURCE.format(dag_id="hello"))
    client.post(
        f"/agents/{my_sid}/dag-processor/bundles/ours/parsing-results", json=body, headers=headers(mine)
    )
    client.post(
        f"/agents/{their_sid}/dag-processor/bundles", json={"names": ["other"]}, headers=headers(theirs)
    )
    reply = client.post(
        f"/agents/{their_sid}/dag-processor/bundles/other/parsing-results", json=body, headers=headers(theirs)
    )
    assert reply.status_code == 409
    assert "hello" in reply.json()["detail"]
    assert session.get(DagModel, "hello").bundle_name == "ours"


@pytest.mark.parametrize(
    "data",
    [{}, {"dag": {}}, {"__version": 3, "dag": {"dag_id": 7}}, {"__version": 3, "dag": "hello"}],
    ids=["empty", "no dag_id", "dag_id not a string", "dag not an object"],
)
def test_a_malformed_serialized_dag_is_422_and_persists_nothing(
    client, session, dag_processor, tmp_path, data
):
    token, sid = dag_processor()
    base = f"/agents/{sid}/dag-processor/bundles"
    client.post(base, json={"names": ["ours"]}, headers=headers(token))
    body = _parsed(tmp_path, "hello.py", DAG_SOURCE.format(dag_id="hello"))
    body["result"]["serialized_dags"].append({"data": data})
    reply = client.post(f"{base}/ours/parsing-results", json=body, headers=headers(token))
    assert reply.status_code == 422, reply.text
    assert "serialized_dags[1]" in reply.json()["detail"]
    assert session.get(DagModel, "hello") is None


def test_an_oversized_result_is_413_and_persists_nothing(
    client, session, dag_processor, tmp_path, monkeypatch
):
    from airflow_remote_exec.api import dag_processing

    token, sid = dag_processor()
    base = f"/agents/{sid}/dag-processor/bundles"
    client.post(base, json={"names": ["ours"]}, headers=headers(token))
    monkeypatch.setattr(dag_processing, "MAX_PARSING_RESULT_BYTES", 1000)
    body = _parsed(tmp_path, "hello.py", DAG_SOURCE.format(dag_id="hello"))
    reply = client.post(f"{base}/ours/parsing-results", json=body, headers=headers(token))
    assert reply.status_code == 413
    assert "1000 bytes" in reply.json()["detail"]
    assert session.get(DagModel, "hello") is None


def test_a_worker_agent_cannot_use_the_dag_processor_routes(client, make_token, register):
    token = make_token()
    sid = register(token)
    reply = client.post(
        f"/agents/{sid}/dag-processor/bundles", json={"names": ["ours"]}, headers=headers(token)
    )
    assert reply.status_code == 403
    assert "not as a dag-processor" in reply.json()["detail"]
