"""The dag processor's side of the agent API: an agent parses DAG files in its own network and the
orchestrator persists what it found with Airflow's own dag-processor code, so serialized DAGs, import
errors, DAG warnings and DAG code end up as a stock ``airflow dag-processor`` leaves them.

A bundle belongs to the token whose agent first claimed it (``RemoteBundle``); only agents of that
token may read or change its state, publish its DAGs or receive its callbacks. The orchestrator's own
bundles, and bundles whose DAGs came from a dag processor of the orchestrator, cannot be claimed, and a
DAG id another bundle defines cannot be taken over. What a result may contain is checked in
``parsed_dags.py``. The DAG code shown in the UI is the source the agent sent: the orchestrator never
reads a path an agent names from its own disk.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Annotated, TypeVar

from airflow.configuration import conf
from airflow.dag_processing.bundles.manager import DagBundlesManager
from airflow.dag_processing.manager import DagFileProcessorManager
from airflow.models.asset import remove_references_to_deleted_dags
from airflow.models.dag import DagModel
from airflow.models.dagbag import DagPriorityParsingRequest
from airflow.models.dagbundle import DagBundleModel
from airflow.models.dagcode import DagCode
from airflow.models.db_callback_request import DbCallbackRequest
from airflow.models.errors import ParseImportError
from airflow.utils.session import create_session
from fastapi import APIRouter, HTTPException, status
from fastapi import Path as PathParam
from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from airflow_remote_exec.api.auth import (
    AgentOfRequest,
    SecretDep,
    SessionIdPath,
    authorize_agent,
)
from airflow_remote_exec.api.datamodels import (
    BUNDLE_NAME,
    BundleNames,
    BundlesClaim,
    BundleState,
    BundleStateUpdate,
    CallbacksResponse,
    ParsedFiles,
    ParsingResult,
    PresentFiles,
    PriorityFilesResponse,
    error_responses,
)
from airflow_remote_exec.api.db_threads import PARSING, run_db
from airflow_remote_exec.api.parsed_dags import checked_result
from airflow_remote_exec.api.triggers import watchers_owned_by
from airflow_remote_exec.clock import db_now
from airflow_remote_exec.models import Component, RemoteBundle, RemoteToken
from airflow_remote_exec.tokens import find_valid_token, token_is_live

router = APIRouter(
    prefix="/agents/{session_id}/dag-processor",
    tags=["dag-processor"],
    responses=error_responses(400, 401, 403, 404, 410),
)
BundlePath = Annotated[str, PathParam(pattern=BUNDLE_NAME)]
MAX_PARSING_RESULT_BYTES = 16 * 1024 * 1024
MAX_CALLBACKS = 100
_T = TypeVar("_T")


def body_limit(path: str) -> int | None:
    """The body limit of a dag-processor route, or None for another route."""
    if "/dag-processor/" not in path:
        return None
    return MAX_PARSING_RESULT_BYTES if path.endswith("/parsing-results") else 4 * 1024 * 1024


async def admit_upload(headers: dict[bytes, bytes]) -> tuple[int, str, dict[str, str]] | None:
    """A dag-processor route's large body is read only for a live token with the dag-processor
    component: 401 or 403 before the first byte of it otherwise."""
    scheme, _, secret = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return (
            401,
            "Missing agent token: send 'Authorization: Bearer <token>'.",
            {"WWW-Authenticate": "Bearer"},
        )
    return await _on_parsing_threads(_upload_refusal, secret.strip())


def _upload_refusal(secret: str) -> tuple[int, str, dict[str, str]] | None:
    with create_session(scoped=False) as session:
        token = find_valid_token(session, secret)
        if token is None:
            return 401, "Agent token is unknown, expired or revoked.", {"WWW-Authenticate": "Bearer"}
        if Component.DAG_PROCESSOR not in token.component_list:
            return 403, f"Token {token.name!r} does not allow the dag-processor component.", {}
    return None


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
    return sources[fileloc]  # parsed_dags checked that every DAG's file came with its source


DagCode.get_code_from_file = staticmethod(_code_from_agent_or_file)


@cache
def _airflow_dag_processor() -> DagFileProcessorManager:
    """Airflow's own manager, used for its persistence methods only (they need a session, no state)."""
    return DagFileProcessorManager(max_runs=1)


# -- ownership --------------------------------------------------------------------------------------


def _dag_processor(session: Session, secret: str, session_id: str) -> AgentOfRequest:
    return authorize_agent(session, secret, session_id, component=Component.DAG_PROCESSOR)


def _forbidden(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_403_FORBIDDEN, detail)


def _own_bundle(session: Session, agent: AgentOfRequest, name: str) -> None:
    """403 unless the agent's token owns the bundle (the same answer whether it exists or not), and the
    orchestrator has not been configured with a bundle of that name since it was claimed."""
    owner = session.scalar(select(RemoteBundle.token_id).where(RemoteBundle.name == name))
    if owner != agent.token_id or name in _orchestrator_bundles():
        raise _forbidden(f"Bundle {name!r} is not claimed by this agent's token; claim it first.")


def _own_bundle_names(session: Session, agent: AgentOfRequest, asked: list[str]) -> list[str]:
    """Of the bundles the agent asks about, those its token owns."""
    owned = select(RemoteBundle.name).where(
        RemoteBundle.token_id == agent.token_id, RemoteBundle.name.in_(asked)
    )
    return list(session.scalars(owned))


@cache
def _orchestrator_bundles() -> frozenset[str]:
    """The bundles configured on this orchestrator: its own dag processor parses them."""
    return frozenset(DagBundlesManager().get_all_bundle_names())


def _claim_one(session: Session, agent: AgentOfRequest, name: str, now) -> None:
    if name in _orchestrator_bundles():
        raise _forbidden(
            f"Bundle {name!r} is one of the orchestrator's own bundles ([dag_processor] "
            "dag_bundle_config_list there); give the agent's bundle another name."
        )
    bundle = session.get(RemoteBundle, name, with_for_update=True)
    if bundle is None:
        if session.scalar(select(DagModel.dag_id).where(DagModel.bundle_name == name).limit(1)):
            raise _forbidden(
                f"Bundle {name!r} holds DAGs parsed on the orchestrator; give the agent's bundle another "
                "name."
            )
        bundle = RemoteBundle(name=name, token_id=agent.token_id, agent_name=agent.name, claimed_at=now)
        session.add(bundle)
    elif bundle.token_id != agent.token_id:
        owner = session.get(RemoteToken, bundle.token_id)
        if owner is not None and token_is_live(owner):
            raise _forbidden(
                f"Bundle {name!r} is parsed by the agents of another token; give this bundle another "
                "name in [dag_processor] dag_bundle_config_list."
            )
    bundle.token_id, bundle.agent_name, bundle.claimed_at = agent.token_id, agent.name, now
    airflow_bundle = session.get(DagBundleModel, name)
    if airflow_bundle is None:
        session.add(DagBundleModel(name=name))
    else:
        airflow_bundle.active = True


def _claim_bundles(secret: str, session_id: str, names: list[str]) -> None:
    for tries_left in (1, 0):
        try:
            with create_session(scoped=False) as session:
                agent = _dag_processor(session, secret, session_id)
                now = db_now(session)
                for name in sorted(set(names)):  # in name order: two claims lock rows in the same order
                    _claim_one(session, agent, name, now)
            return
        except IntegrityError:  # another agent created the same bundle meanwhile: look again
            if not tries_left:
                raise HTTPException(status.HTTP_409_CONFLICT, "Bundles claimed meanwhile; retry.") from None


def _foreign_dag_ids(session: Session, agent: AgentOfRequest, bundle: str, dag_ids: list[str]) -> list[str]:
    """DAG ids of ``dag_ids`` that a bundle the agent's token does not own defines (or defined: a stale
    DAG stays its bundle's)."""
    rows = session.execute(
        select(DagModel.dag_id, RemoteBundle.token_id)
        .outerjoin(RemoteBundle, RemoteBundle.name == DagModel.bundle_name)
        .where(
            DagModel.dag_id.in_(dag_ids), or_(DagModel.bundle_name != bundle, DagModel.bundle_name.is_(None))
        )
    ).all()
    return sorted(row.dag_id for row in rows if row.token_id != agent.token_id)


# -- work done on the database threads ----------------------------------------------------------------


def _persist(secret: str, session_id: str, name: str, body: ParsingResult) -> None:
    try:
        _persist_once(secret, session_id, name, body)
    except IntegrityError:
        # Two agents of the bundle's token wrote the same file's DAGs at once (a DAG version, say):
        # a retry finds the other's rows, as a stock dag processor's next parse would.
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "Another agent wrote these DAGs at the same moment; retry.",
            headers={"Retry-After": "1"},
        ) from None


def _persist_once(secret: str, session_id: str, name: str, body: ParsingResult) -> None:
    with create_session(scoped=False) as session:
        agent = _dag_processor(session, secret, session_id)
        _own_bundle(session, agent, name)
        token = session.get(RemoteToken, agent.token_id)
        result, sources = checked_result(body, token.queue_list)
        foreign = _foreign_dag_ids(session, agent, name, [dag.dag_id for dag in result.serialized_dags])
        if foreign:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"DAG id(s) {foreign} are defined by another bundle; rename them in bundle {name!r}.",
            )
        sources_set = _agent_sources.set(sources)
        try:
            with watchers_owned_by(session, agent.token_id):
                _airflow_dag_processor().persist_parsing_result(
                    bundle_name=name,
                    bundle_version=body.bundle_version,
                    version_data=body.version_data,
                    parsing_result=result,
                    run_duration=body.run_duration,
                    relative_fileloc=body.relative_fileloc,
                    session=session,
                )
        finally:
            _agent_sources.reset(sources_set)


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
        # A stock dag processor of the orchestrator that starts without --bundle-name deactivates the
        # bundles it is not configured with; the agent's next refresh activates its own again.
        session.execute(update(DagBundleModel).where(DagBundleModel.name == name).values(active=True))


def _present_files(secret: str, session_id: str, name: str, body: PresentFiles) -> None:
    """What Airflow's ``deactivate_deleted_dags`` and ``clear_orphaned_import_errors`` do after a
    refresh, for this bundle only."""
    observed = set(body.observed_filelocs)
    with create_session(scoped=False) as session:
        _own_bundle(session, _dag_processor(session, secret, session_id), name)
        if DagModel.deactivate_deleted_dags(bundle_name=name, rel_filelocs=observed, session=session):
            remove_references_to_deleted_dags(session=session)
        session.execute(
            delete(ParseImportError).where(
                ParseImportError.bundle_name == name, ParseImportError.filename.not_in(observed)
            )
        )


def _deactivate_stale(secret: str, session_id: str, name: str, body: ParsedFiles) -> list[str]:
    """Airflow's time-based stale check (``deactivate_stale_dags``) for this bundle's DAGs: a DAG whose
    file was parsed ``stale_dag_threshold`` after the DAG itself was last seen is gone from the file.
    The parse times are the agent's ages read against this host's clock, which is the clock Airflow's
    persistence stamps a DAG's ``last_parsed_time`` with (never the agent's)."""
    threshold = timedelta(seconds=conf.getint("dag_processor", "stale_dag_threshold"))
    with create_session(scoped=False) as session:
        _own_bundle(session, _dag_processor(session, secret, session_id), name)
        now = datetime.now(UTC)
        finished = {path: now - timedelta(seconds=age) for path, age in body.seconds_since_parsed.items()}
        rows = session.execute(
            select(DagModel.dag_id, DagModel.relative_fileloc, DagModel.last_parsed_time).where(
                DagModel.bundle_name == name, ~DagModel.is_stale
            )
        ).all()
        stale = []
        for dag_id, relative_fileloc, last_parsed_time in rows:
            if relative_fileloc is None or last_parsed_time is None:
                continue
            # A DAG of a zip file is keyed by the archive.
            parsed = finished.get(relative_fileloc) or finished.get(str(Path(relative_fileloc).parent))
            if parsed and last_parsed_time + threshold < parsed:
                stale.append(dag_id)
        if stale:
            session.execute(update(DagModel).where(DagModel.dag_id.in_(stale)).values(is_stale=True))
        return stale


def _fetch_callbacks(secret: str, session_id: str, asked: BundleNames) -> CallbacksResponse:
    """Airflow's ``_fetch_callbacks_from_db`` for the token's bundles: each callback is handed out once
    (a stock dag processor deletes them as it fetches them too)."""
    with create_session(scoped=False) as session:
        bundles = _own_bundle_names(session, _dag_processor(session, secret, session_id), asked.bundles)
        rows: Sequence[DbCallbackRequest] = session.scalars(
            select(DbCallbackRequest)
            .where(DbCallbackRequest.bundle_name.in_(bundles))
            .order_by(DbCallbackRequest.priority_weight.desc())
            .limit(MAX_CALLBACKS)
            .with_for_update(skip_locked=True)
        ).all()
        callbacks = []
        for row in rows:
            callbacks.append(row.get_callback_request().model_dump(mode="json"))
            session.delete(row)
        return CallbacksResponse(callbacks=callbacks)


def _claim_priority_files(secret: str, session_id: str, asked: BundleNames) -> PriorityFilesResponse:
    with create_session(scoped=False) as session:
        bundles = _own_bundle_names(session, _dag_processor(session, secret, session_id), asked.bundles)
        rows = session.scalars(
            select(DagPriorityParsingRequest)
            .where(DagPriorityParsingRequest.bundle_name.in_(bundles))
            .with_for_update(skip_locked=True)
        ).all()
        files = [{"bundle_name": r.bundle_name, "relative_fileloc": r.relative_fileloc} for r in rows]
        for row in rows:
            session.delete(row)
        return PriorityFilesResponse(files=files)


# -- routes -------------------------------------------------------------------------------------------


async def _on_parsing_threads(function: Callable[..., _T], *args: object) -> _T:
    """Dag-processor work runs on threads of its own: a slow persist never holds up claims."""
    return await run_db(function, *args, lane=PARSING)


@router.post(
    "/bundles",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Claim bundles to parse, for this agent's token",
    responses=error_responses(409),
)
async def claim_bundles(session_id: SessionIdPath, body: BundlesClaim, secret: SecretDep) -> None:
    await _on_parsing_threads(_claim_bundles, secret, session_id, body.names)


@router.get("/bundles/{bundle_name}/state", response_model=BundleState, summary="A bundle's refresh state")
async def bundle_state(session_id: SessionIdPath, bundle_name: BundlePath, secret: SecretDep) -> BundleState:
    return await _on_parsing_threads(_get_state, secret, session_id, bundle_name)


@router.post(
    "/bundles/{bundle_name}/refreshed",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Record a bundle refresh",
)
async def update_bundle_state(
    session_id: SessionIdPath, bundle_name: BundlePath, body: BundleStateUpdate, secret: SecretDep
) -> None:
    await _on_parsing_threads(_put_state, secret, session_id, bundle_name, body)


@router.put(
    "/bundles/{bundle_name}/files",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="The bundle's files after a refresh: DAGs and import errors of other files are removed",
    responses=error_responses(413),
)
async def present_files(
    session_id: SessionIdPath, bundle_name: BundlePath, body: PresentFiles, secret: SecretDep
) -> None:
    await _on_parsing_threads(_present_files, secret, session_id, bundle_name, body)


@router.post(
    "/bundles/{bundle_name}/stale-check",
    response_model=list[str],
    summary="When each file was last parsed: deactivates the bundle's DAGs gone from their file",
    responses=error_responses(413),
)
async def stale_check(
    session_id: SessionIdPath, bundle_name: BundlePath, body: ParsedFiles, secret: SecretDep
) -> list[str]:
    return await _on_parsing_threads(_deactivate_stale, secret, session_id, bundle_name, body)


@router.post(
    "/bundles/{bundle_name}/parsing-results",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Persist the DAGs, import errors and warnings of one parsed file",
    responses=error_responses(409, 413),
)
async def parsing_result(
    session_id: SessionIdPath, bundle_name: BundlePath, body: ParsingResult, secret: SecretDep
) -> None:
    await _on_parsing_threads(_persist, secret, session_id, bundle_name, body)


@router.post(
    "/callbacks", response_model=CallbacksResponse, summary="Take the callbacks of the token's bundles"
)
async def callbacks(session_id: SessionIdPath, body: BundleNames, secret: SecretDep) -> CallbacksResponse:
    return await _on_parsing_threads(_fetch_callbacks, secret, session_id, body)


@router.post(
    "/priority-files",
    response_model=PriorityFilesResponse,
    summary="Take the files users asked to reparse, in the token's bundles",
)
async def priority_files(
    session_id: SessionIdPath, body: BundleNames, secret: SecretDep
) -> PriorityFilesResponse:
    return await _on_parsing_threads(_claim_priority_files, secret, session_id, body)
