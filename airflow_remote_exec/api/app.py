"""The agent-facing FastAPI app, mounted by the plugin at ``/remote/v1`` in ``airflow api-server``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from airflow_remote_exec import __version__
from airflow_remote_exec.api import agents, jobs
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


def create_app() -> FastAPI:
    app = FastAPI(
        lifespan=_lifespan,
        title="Airflow Remote Execution agent API",
        version=__version__,
        description="Agents register, heartbeat, claim jobs and report their state. "
        "Every call needs an agent token (`Authorization: Bearer ...`) and the "
        "`Remote-Exec-Api-Version` header.",
    )
    app.include_router(agents.router)
    app.include_router(jobs.router)

    @app.get("/health", tags=["health"], summary="Liveness of the agent API (no auth)")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    return app


def create_standalone_app() -> FastAPI:
    """The agent API alone, at the same ``/remote/v1`` path, without the Airflow UI and its middleware:
    what ``airflow remote-exec api-server`` serves, behind the same URL as ``airflow api-server``."""
    root = FastAPI(lifespan=_lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    root.mount(URL_PREFIX, create_app())
    return root
