"""``airflow remote-exec api-server``: the agent API alone, at the same path, in several processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from dev.stack import free_port, wait_until
from tests.api.conftest import AGENT_VERSIONS, headers

AIRFLOW_BIN = Path(sys.executable).with_name("airflow")


@pytest.fixture
def standalone(session, tmp_path):
    """The command on the unit-test DB with two workers; stopped by its process group."""
    port = free_port()
    log = (tmp_path / "api-server.log").open("w")
    process = subprocess.Popen(
        [
            str(AIRFLOW_BIN),
            "remote-exec",
            "api-server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            if process.poll() is not None:
                output = (tmp_path / "api-server.log").read_text()[-2000:]
                raise RuntimeError(f"api-server exited {process.returncode}: {output}")
            try:
                return httpx.get(f"{url}/remote/v1/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_until(healthy, 120, what="the standalone agent API")
        except TimeoutError:
            print((tmp_path / "api-server.log").read_text()[-3000:])
            raise
        yield url, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        log.close()


def test_standalone_api_serves_agents_at_the_same_path_in_two_processes(standalone, make_token):
    url, process = standalone
    token = make_token()
    body = {"name": "standalone-1", "queues": ["default"], "slots": 2, **AGENT_VERSIONS}
    reply = httpx.post(f"{url}/remote/v1/agents", json=body, headers=headers(token), timeout=30)
    assert reply.status_code == 200, reply.text
    assert (
        httpx.get(f"{url}/remote/v1/openapi.json", timeout=10).json()["info"]["title"].startswith("Airflow")
    )
    assert httpx.get(f"{url}/api/v2/version", timeout=10).status_code == 404  # no Airflow UI or REST API
    workers = [
        p for p in psutil.Process(process.pid).children(recursive=True) if "python" in p.name().lower()
    ]
    assert len(workers) >= 2, [p.cmdline() for p in workers]


def test_standalone_api_refuses_a_bad_port_in_one_line():
    result = subprocess.run(
        [str(AIRFLOW_BIN), "remote-exec", "api-server", "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: --port must be between 1 and 65535, not 70000."
    assert "Traceback" not in result.stderr
