"""Variables and connections that DAG files (while they are parsed) and triggers read, answered as
Airflow's Execution API answers a task: the SDK client of Airflow's dag processor and triggerer calls
these paths. The token is enough (no session), and it must allow the component asking.

Each agent asks its own secrets backends and environment first; only what they do not hold comes here,
from the orchestrator's secrets backends and metadata DB.

Triggers also ask how other tasks and DAG runs are doing (Airflow's ``WorkflowTrigger`` and
``DagStateTrigger``, behind a deferrable ``ExternalTaskSensor``): those read-only questions, and only
those, are passed to Airflow's own Execution API in-process, as a stock triggerer asks it.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Annotated
from urllib.parse import quote

import httpx
from airflow.utils.session import create_session
from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi import Path as PathParam

from airflow_remote_exec.api.auth import SecretDep, authenticate
from airflow_remote_exec.api.datamodels import error_responses
from airflow_remote_exec.api.db_threads import PARSING, TRIGGERS, run_db
from airflow_remote_exec.models import Component

LookupKey = Annotated[str, PathParam(min_length=1, max_length=250)]


def _check_token(secret: str, component: str) -> None:
    with create_session(scoped=False) as session:
        token = authenticate(session, secret)
        if component not in token.component_list:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"Token {token.name!r} does not allow the {component} component."
            )


def _variable(secret: str, component: str, key: str) -> dict:
    from airflow.models.variable import Variable

    _check_token(secret, component)
    value = Variable.get_variable_from_secrets(key)
    if value is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"Variable {key!r} not found")
    return {"key": key, "value": value}


def _connection(secret: str, component: str, conn_id: str) -> dict:
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    _check_token(secret, component)
    try:
        conn = Connection.get_connection_from_secrets(conn_id)
    except AirflowNotFoundException:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"Connection {conn_id!r} not found") from None
    return {
        "conn_id": conn.conn_id,
        "conn_type": conn.conn_type,
        "host": conn.host,
        "schema": conn.schema,
        "login": conn.login,
        "password": conn.password,
        "port": conn.port,
        "extra": conn.extra,
    }


def lookup_router(component: str, lane: str) -> APIRouter:
    """``/{component}/variables/{key}`` and ``/{component}/connections/{conn_id}``, run on ``lane``."""
    router = APIRouter(
        prefix=f"/{component}", tags=[component], responses=error_responses(400, 401, 403, 404)
    )

    @router.get("/variables/{key}", summary=f"A variable the {component} reads")
    async def variable(key: LookupKey, secret: SecretDep) -> dict:
        return await run_db(_variable, secret, component, key, lane=lane)

    @router.get("/connections/{conn_id}", summary=f"A connection the {component} reads")
    async def connection(conn_id: LookupKey, secret: SecretDep) -> dict:
        return await run_db(_connection, secret, component, conn_id, lane=lane)

    return router


dag_processor_lookups = lookup_router(Component.DAG_PROCESSOR, PARSING)
triggerer_lookups = lookup_router(Component.TRIGGERER, TRIGGERS)

# The Execution API's read-only routes about other tasks and runs that Airflow's triggers call.
# A path segment: a DAG, task or run id (no "." or ".." segment, nothing a URL would read as a query,
# a fragment or an escape: the path is forwarded as it is checked).
_ID = r"(?!\.{1,2}/)(?!\.{1,2}$)[A-Za-z0-9_.:+~-]{1,250}"
_STATE_QUESTIONS = re.compile(
    rf"task-instances/(count|states|previous/{_ID}/{_ID})|dag-runs/(count|previous|{_ID}/{_ID}/state)"
)
_FORWARDED_HEADERS = ("airflow-api-version", "accept")


@cache
def _execution_api():
    """Airflow's Execution API in this process, as a stock triggerer uses it (no task token)."""
    from airflow.api_fastapi.execution_api.app import InProcessExecutionAPI

    return httpx.Client(transport=InProcessExecutionAPI().transport, base_url="http://in-process.invalid./")


def allowed_question(path: str) -> bool:
    """Whether a triggerer may ask this of the Execution API: one of its read-only state routes."""
    return _STATE_QUESTIONS.fullmatch(path) is not None


def _ask_execution_api(secret: str, path: str, query: str, headers: dict[str, str]) -> Response:
    _check_token(secret, Component.TRIGGERER)
    url = httpx.URL(
        path="/" + "/".join(quote(segment, safe="") for segment in path.split("/")), query=query.encode()
    )
    reply = _execution_api().get(url, headers=headers)
    return Response(reply.content, reply.status_code, media_type=reply.headers.get("content-type"))


state_questions = APIRouter(
    prefix=f"/{Component.TRIGGERER}", tags=[Component.TRIGGERER], responses=error_responses(401, 403, 404)
)


@state_questions.get(
    "/{path:path}", summary="How other tasks and DAG runs are doing, as Airflow's triggers ask it"
)
async def state_question(path: str, request: Request, secret: SecretDep) -> Response:
    if not allowed_question(path):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"Triggers cannot ask the orchestrator for {path!r}.")
    headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
    return await run_db(_ask_execution_api, secret, path, request.url.query, headers, lane=TRIGGERS)
