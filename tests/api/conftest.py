"""The agent API in-process (FastAPI TestClient) on the unit-test DB."""

from __future__ import annotations

from collections.abc import Callable

import airflow
import pytest
from airflow.sdk import __version__ as task_sdk_version
from fastapi.testclient import TestClient

from airflow_remote_exec.api.app import create_app
from airflow_remote_exec.api.datamodels import API_VERSION, API_VERSION_HEADER
from airflow_remote_exec.tokens import create_token

# What a real agent sends about itself: the same Airflow and Task SDK as the orchestrator.
AGENT_VERSIONS = {"airflow_version": airflow.__version__, "task_sdk_version": task_sdk_version}


@pytest.fixture
def client(session) -> TestClient:
    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def make_token(session) -> Callable[..., str]:
    def make(name: str = "tok", queues: tuple[str, ...] = ("default",), **kwargs) -> str:
        _, secret = create_token(session, name, list(queues), **kwargs)
        session.commit()
        return secret

    return make


def headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", API_VERSION_HEADER: API_VERSION}


@pytest.fixture
def register(client) -> Callable[..., str]:
    """Register an agent; return its session id."""

    def do(token: str, name: str = "agent-1", queues: tuple[str, ...] = ("default",), slots: int = 4) -> str:
        reply = client.post(
            "/agents",
            json={"name": name, "queues": list(queues), "slots": slots, **AGENT_VERSIONS},
            headers=headers(token),
        )
        assert reply.status_code == 200, reply.text
        return reply.json()["session_id"]

    return do
