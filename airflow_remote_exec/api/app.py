"""The agent-facing FastAPI app, mounted by the plugin at ``/remote/v1`` in ``airflow api-server``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from airflow_remote_exec import __version__
from airflow_remote_exec.api import agents, dag_processing, jobs, logs, lookups, queues, sentinel, triggers
from airflow_remote_exec.api.body_limit import DEFAULT_LIMIT, BodyLimit
from airflow_remote_exec.api.datamodels import error_responses
from airflow_remote_exec.api.presence import ensure_presence, stop_presence

URL_PREFIX = "/remote/v1"


@asynccontextmanager
async def _lifespan(_app: FastAPI) -> AsyncIterator[None]:
    """Record presence from the moment the api-server serves, not from the first agent request."""
    ensure_presence()
    try:
        yield
    finally:
        stop_presence()


def _body_limit(path: str) -> int:
    return dag_processing.body_limit(path) or DEFAULT_LIMIT


def create_app(prefix: str = "") -> FastAPI:
    """The agent API with its routes under ``prefix``: none when ``airflow api-server`` mounts it."""
    app = FastAPI(
        lifespan=_lifespan,
        title="Airflow Remote Execution agent API",
        version=__version__,
        description="Agents register, heartbeat, claim jobs, report their state and ship task logs. "
        "Every call needs an agent token (`Authorization: Bearer ...`) and the "
        "`Remote-Exec-Api-Version` header.",
        openapi_url=f"{prefix}/openapi.json",
        docs_url=f"{prefix}/docs",
        redoc_url=None,
        # Any path the server cannot route is a 404, before any route runs: Airflow 3.2's api-server,
        # for one, routes no path holding a newline.
        responses=error_responses(404),
    )
    app.include_router(agents.router, prefix=prefix)
    app.include_router(jobs.router, prefix=prefix)
    app.include_router(logs.router, prefix=prefix)
    app.include_router(queues.router, prefix=prefix)
    app.include_router(sentinel.router, prefix=prefix)
    app.include_router(dag_processing.router, prefix=prefix)
    app.include_router(lookups.dag_processor_lookups, prefix=prefix)
    app.include_router(triggers.router, prefix=prefix)
    app.include_router(lookups.triggerer_lookups, prefix=prefix)
    app.include_router(lookups.state_questions, prefix=prefix)  # after the look-ups it must not shadow
    app.add_middleware(BodyLimit, limit_for=_body_limit, admit=dag_processing.admit_upload)

    @app.get(f"{prefix}/health", tags=["health"], summary="Liveness of the agent API (no auth)")
    async def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    return app


def create_standalone_app() -> FastAPI:
    """The agent API alone, at the same ``/remote/v1`` path, without the Airflow UI and its middleware:
    what ``airflow remote-exec api-server`` serves, behind the same URL as ``airflow api-server``. Its
    routes carry the prefix themselves: a mounted sub-app would run a second middleware stack."""
    return create_app(prefix=URL_PREFIX)
