"""The agent's own log lines name the agent, its component and the job, as text or JSON."""

from __future__ import annotations

import json
import logging

import pytest

from airflow_remote_exec.agent import log_format
from airflow_remote_exec.agent.main import build_parser


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_agent_component_and_job(capsys, restore_logging):
    log_format.configure("INFO", "edge-7", "worker", "json")
    logging.getLogger("airflow_remote_exec.agent.worker").info(
        "Started task job %s", 42, **log_format.job(42)
    )
    logging.getLogger("airflow_remote_exec.agent.heartbeat").warning("Heartbeat failed")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["agent"] == "edge-7" and first["component"] == "worker" and first["job_id"] == 42
    assert first["event"] == "Started task job 42" and first["level"] == "info"
    assert second["agent"] == "edge-7" and "job_id" not in second


def test_text_lines_carry_them_too(capsys, restore_logging):
    log_format.configure("INFO", "edge-7", "triggerer")
    logging.getLogger("x").error("boom", **log_format.job(3))
    line = capsys.readouterr().err
    assert "ERROR [x] edge-7 triggerer job=3: boom" in line


def test_every_component_takes_the_log_format_flag():
    parser = build_parser()
    for command in ("worker", "dag-processor", "triggerer"):
        assert parser.parse_args([command, "--log-format", "json"]).log_format == "json"
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--log-format", "xml"])
