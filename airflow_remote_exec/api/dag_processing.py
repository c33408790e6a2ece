"""The dag processor's side of the agent API: an agent parses DAG files in its own network and the
orchestrator persists what it found with Airflow's own dag-processor code, so serialized DAGs, import
errors, DAG warnings and DAG code end up as a stock ``airflow dag-processor`` leaves them.

A bundle belongs to the token whose agent first claimed it (``RemoteBundle``); only agents of that
token may read or change its state or publish its DAGs, and a DAG id another bundle defines cannot be
taken over. The DAG code shown in the UI is the source the agent sent: the orchestrator never reads a
path an agent names from its own disk.
"""

from __future__ import annotations

import contextvars
from functools import cache
from typing import Annotated

import jsonschema
from airflow.dag_processing.manager import DagFileProcessorManager
from airflow.models.dag import DagModel
from airflow.models.dagbundle import DagBundleModel
from airflow.models.dagcode import DagCode
from airflow.serialization.serialized_objects import DagSerialization
from airflow.utils.session import create_session
from fastapi import APIRouter, HTTPException, Path, Request, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from airflow_remote_exec.api.auth import AgentOfRequest, SecretDep, SessionIdPath, authorize_agent
from airflow_remote_exec.api.datamodels import (
    BUNDLE_NAME,
    MAX_PARSING_RESULT_BYTES,
    BundlesClaim,
    BundleState,
    BundleStateUpdate,
    ParsingResult,
    error_responses,
)
from airflow_remote_exec.api.db_threads import run_db
from airflow_remote_exec.clock import db_now
from airflow_remote_exec.models import Component, RemoteBundle
from airflow_remote_exec.tokens import owned_by_another_live_token

router = APIRouter(
    prefix="/agents/{session_id}/dag-processor",
    tags=["dag-processor"],
    responses=error_responses(400, 401, 403, 410),
)
BundlePath = Annotated[str, Path(pattern=BUNDLE_NAME)]


# -- DAG code from the agent, never from the orchestrator's disk -------------------------------------

_agent_sources: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "remote_exec_agent_sources", default=None
)
_code_from_file = DagCode.get_code_from_file


def _code_from_agent_or_file(fileloc: str) -> str:
    """Airflow reads a DAG's source from ``fileloc`` when it persists the DAG. While an agent's result
    is persisted that path is on the agent: use the source it sent, and never read the path here."""
    sources = _agent_sources.get()
    if sources is None:
        return _code_from_file(fileloc)
    if fileloc not in sources:
        raise FileNotFoundError(f"The agent did not send the source of {fileloc}")
    return sources[fileloc]


DagCode.get_code_from_file = staticmethod(_code_from_agent_or_file)


@cache
def _airflow_dag_processor() -> DagFileProcessorManager:
    """Airflow's own manager, used only for its persistence methods (they need a session, no state)."""
    return DagFileProcessorManager(max_runs=1)


# -- ownership --------------------------------------------------------------------------------------


def _dag_processor(session: Session, secret: str, session_id: str) -> AgentOfRequest:
    return authorize_agent(session, secret, session_id, component=Component.DAG_PROCESSOR)


def _own_bundle(session: Session, agent: AgentOfRequest, name: str, lock: bool = False) -> RemoteBundle:
    """The bundle, if the agent's token owns it; 403 otherwise (the same answer whether it exists)."""
    bundle = session.get(RemoteBundle, name, with_for_update=lock)
    if bundle is None or bundle.token_id != agent.token_id:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"Bundle {name!r} is not claimed by this agent's token; claim it first (POST .../bundles).",
        )
    return bundle


def _claim_bundles(secret: str, session_id: str, names: list[str]) -> None:
    with create_session(scoped=False) as session:
        agent = _dag_processor(session, secret, session_id)
        now = db_now(session)
        for name in sorted(set(names)):  # in name order: two claims lock rows in the same order
            bundle = session.get(RemoteBundle, name, with_for_update=True)
            if bundle is None:
                bundle = RemoteBundle(
                    name=name, token_id=agent.token_id, agent_name=agent.name, claimed_at=now
                )
                session.add(bundle)
            elif owned_by_another_live_token(session, bundle.token_id, agent.token_id):
                raise HTTPException(
                    status.HTTP_403_FORBIDDEN,
                    f"Bundle {name!r} is parsed by the agents of another token; give this bundle "
                    "another name in [dag_processor] dag_bundle_config_list.",
                )
            bundle.token_id, bundle.agent_name, bundle.claimed_at = agent.token_id, agent.name, now
            airflow_bundle = session.get(DagBundleModel, name)
            if airflow_bundle is None:
                airflow_bundle = DagBundleModel(name=name)
                session.add(airflow_bundle)
            airflow_bundle.active = True


def _foreign_dag_ids(session: Session, agent: AgentOfRequest, bundle: str, dag_ids: list[str]) -> list[str]:
    """DAG ids of ``dag_ids`` that a bundle not owned by the agent's token defines."""
    rows = session.execute(
        select(DagModel.dag_id, DagModel.bundle_name, RemoteBundle.token_id)
        .outerjoin(RemoteBundle, RemoteBundle.name == DagModel.bundle_name)
        .where(DagModel.dag_id.in_(dag_ids), DagModel.bundle_name != bundle, DagModel.is_stale.is_(False))
    ).all()
    return sorted(row.dag_id for row in rows if row.token_id != agent.token_id)


def _refuse_malformed_dags(body: ParsingResult) -> None:
    """422 for a serialized DAG that does not match the schema of this orchestrator's Airflow, which
    would otherwise fail deep inside persistence."""
    for index, dag in enumerate(body.result.serialized_dags):
        try:
            DagSerialization.validate_schema(dag.data)
        except jsonschema.ValidationError as err:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"result.serialized_dags[{index}] is not a serialized DAG this orchestrator reads: "
                f"{err.message[:300]}",
            ) from None


def _persist(secret: str, session_id: str, name: str, body: ParsingResult) -> None:
    with create_session(scoped=False) as session:
        agent = _dag_processor(session, secret, session_id)
        _own_bundle(session, agent, name)
        _refuse_malformed_dags(body)
        foreign = _foreign_dag_ids(session, agent, name, [d.dag_id for d in body.result.serialized_dags])
        if foreign:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"DAG id(s) {foreign} are defined by another bundle; rename them in bundle {name!r}.",
            )
        token = _agent_sources.set(body.sources)
        try:
            _airflow_dag_processor().persist_parsing_result(
                bundle_name=name,
                bundle_version=body.bundle_version,
                version_data=body.version_data,
                parsing_result=body.result,
                run_duration=body.run_duration,
                relative_fileloc=body.relative_fileloc,
                session=session,
            )
        finally:
            _agent_sources.reset(token)


def _get_state(secret: str, session_id: str, name: str) -> BundleState:
    with create_session(scoped=False) as session:
        _own_bundle(session, _dag_processor(session, secret, session_id), name)
        state = _airflow_dag_processor().get_bundle_state(name, session=session)
        return BundleState() if state is None else BundleState(**state._asdict())


def _put_state(secret: str, session_id: str, name: str, body: BundleStateUpdate) -> None:
    with create_session(scoped=False) as session:
        _own_bundle(session, _dag_processor(session, secret, session_id), name)
        _airflow_dag_processor().update_bundle_state(
            name, last_refreshed=body.last_refreshed, version=body.version, session=session
        )


# -- routes -------------------------------------------------------------------------------------------


@router.post("/bundles", status_code=status.HTTP_204_NO_CONTENT, summary="Claim bundles to parse")
async def claim_bundles(session_id: SessionIdPath, body: BundlesClaim, secret: SecretDep) -> None:
    await run_db(_claim_bundles, secret, session_id, body.names)


@router.get("/bundles/{bundle_name}/state", response_model=BundleState, summary="A bundle's refresh state")
async def bundle_state(session_id: SessionIdPath, bundle_name: BundlePath, secret: SecretDep) -> BundleState:
    return await run_db(_get_state, secret, session_id, bundle_name)


@router.put(
    "/bundles/{bundle_name}/state", status_code=status.HTTP_204_NO_CONTENT, summary="Record a bundle refresh"
)
async def update_bundle_state(
    session_id: SessionIdPath, bundle_name: BundlePath, body: BundleStateUpdate, secret: SecretDep
) -> None:
    await run_db(_put_state, secret, session_id, bundle_name, body)


@router.post(
    "/bundles/{bundle_name}/parsing-results",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Persist the DAGs, import errors and warnings of one parsed file",
    responses=error_responses(409, 413),
)
async def parsing_result(
    session_id: SessionIdPath,
    bundle_name: BundlePath,
    body: ParsingResult,
    secret: SecretDep,
    request: Request,
) -> None:
    # Read from the request, not declared as a parameter: a client does not choose this header.
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_PARSING_RESULT_BYTES:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"A parsing result may be at most {MAX_PARSING_RESULT_BYTES} bytes; split the file's DAGs.",
        )
    await run_db(_persist, secret, session_id, bundle_name, body)
