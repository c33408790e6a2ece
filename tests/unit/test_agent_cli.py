"""``airflow-remote-agent`` command line: bad input is refused with one clear line, and the token
never reaches the processes the agent starts."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from airflow_remote_exec import compat
from airflow_remote_exec.agent import health, main

AGENT_BIN = Path(sys.executable).with_name("airflow-remote-agent")


def _token_file(tmp_path: Path, mode: int = 0o400) -> str:
    path = tmp_path / "token"
    path.write_text("rex_secret\n")
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080", "https://airflow.example.com"],
)
def test_https_or_loopback_urls_are_accepted(tmp_path, url):
    settings = main.settings_from_args(["worker", "--api-url", url, "--token-file", _token_file(tmp_path)])
    assert settings.api_url == url and settings.token == "rex_secret"


def test_plain_http_to_another_host_is_refused_unless_allowed(tmp_path, capsys):
    args = ["worker", "--api-url", "http://airflow.example.com", "--token-file", _token_file(tmp_path)]
    with pytest.raises(SystemExit) as exited:
        main.settings_from_args(args)
    assert exited.value.code == 2
    assert "https://" in capsys.readouterr().err
    assert main.settings_from_args([*args, "--allow-insecure-http"]).api_url == "http://airflow.example.com"


def test_plain_http_refusal_from_the_real_command(tmp_path):
    """The installed entry point exits 2 with one line naming the fix, and no traceback."""
    result = subprocess.run(
        [
            str(AGENT_BIN),
            "worker",
            "--api-url",
            "http://10.1.2.3:8080",
            "--token-file",
            _token_file(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_REMOTE_AGENT_")},
    )
    assert result.returncode == 2, result
    assert "--allow-insecure-http" in result.stderr and "Traceback" not in result.stderr


def test_token_from_the_environment_is_removed_from_it(monkeypatch):
    monkeypatch.setenv(main.TOKEN_ENV, "rex_from_env")
    settings = main.settings_from_args(["worker", "--api-url", "https://airflow.example.com"])
    assert settings.token == "rex_from_env"
    assert main.TOKEN_ENV not in os.environ  # so no runner or task process inherits it


def test_token_file_readable_by_others_is_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        main.settings_from_args(
            ["worker", "--api-url", "https://a.example.com", "--token-file", _token_file(tmp_path, 0o644)]
        )
    assert "make it 0400" in caplog.text


def test_healthz_drops_a_client_that_sends_nothing(monkeypatch):
    monkeypatch.setattr(health, "SOCKET_TIMEOUT_SECONDS", 0.3)
    server = health.serve_health("127.0.0.1", 0, lambda: (True, {}))
    try:
        with socket.create_connection(server.server_address, timeout=10) as silent:
            began = time.monotonic()
            assert silent.recv(1) == b""  # closed by the server, not by our own 10 s timeout
            assert time.monotonic() - began < 5
    finally:
        server.shutdown()
        server.server_close()


def test_triggerer_takes_queues_and_a_capacity_and_refuses_a_bad_one(tmp_path, capsys):
    args = ["triggerer", "--api-url", "https://airflow.example.com", "--token-file", _token_file(tmp_path)]
    settings = main.settings_from_args([*args, "--queues", "etl, default,etl", "--capacity", "50"])
    assert (settings.component, settings.queues, settings.capacity) == ("triggerer", ["default", "etl"], 50)
    assert settings.name.endswith("-triggerer")
    for bad in ("0", "10001"):
        with pytest.raises(SystemExit) as exit_info:
            main.settings_from_args([*args, "--capacity", bad])
        assert exit_info.value.code == 2
        assert "--capacity must be between 1 and 10000" in capsys.readouterr().err


def test_worker_log_settings_become_its_settings_and_a_bad_backlog_is_refused(tmp_path, capsys):
    args = ["worker", "--api-url", "https://airflow.example.com", "--token-file", _token_file(tmp_path)]
    settings = main.settings_from_args([*args, "--log-backlog-mb", "64", "--log-format", "json"])
    assert (settings.log_backlog_bytes, settings.log_format) == (64 * 1024 * 1024, "json")
    assert settings.ship_task_logs
    assert not main.settings_from_args([*args, "--task-logs", "keep"]).ship_task_logs
    with pytest.raises(SystemExit) as exit_info:
        main.settings_from_args([*args, "--log-backlog-mb", "0"])
    assert exit_info.value.code == 2
    assert "--log-backlog-mb must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("component", ["worker", "dag-processor", "triggerer"])
def test_every_component_takes_a_health_port_and_host(tmp_path, monkeypatch, component):
    args = [component, "--api-url", "https://airflow.example.com", "--token-file", _token_file(tmp_path)]
    settings = main.settings_from_args(args)
    assert (settings.health_host, settings.health_port) == ("0.0.0.0", None)  # off unless asked
    settings = main.settings_from_args([*args, "--health-port", "9102", "--health-host", "127.0.0.1"])
    assert (settings.health_host, settings.health_port) == ("127.0.0.1", 9102)
    monkeypatch.setenv(main.ENV_PREFIX + "HEALTH_PORT", "9103")
    monkeypatch.setenv(main.ENV_PREFIX + "HEALTH_HOST", "::1")
    settings = main.settings_from_args(args)
    assert (settings.health_host, settings.health_port) == ("::1", 9103)


def test_health_port_help_names_both_endpoints(capsys):
    for component in ("worker", "dag-processor", "triggerer"):
        with pytest.raises(SystemExit):
            main.settings_from_args([component, "--help"])
        assert "Serve /healthz and /metrics" in " ".join(capsys.readouterr().out.split())


def test_sentinel_takes_what_it_watches_from_flags_or_the_environment(tmp_path, monkeypatch, capsys):
    args = ["sentinel", "--api-url", "https://airflow.example.com", "--token-file", _token_file(tmp_path)]
    settings = main.settings_from_args(
        [*args, "--watch", "worker-etl=http://w:8080/healthz", "--watch", "triggerer=http://t:8080/healthz"]
    )
    assert settings.component == "sentinel"
    assert settings.watch == {"worker-etl": "http://w:8080/healthz", "triggerer": "http://t:8080/healthz"}
    monkeypatch.setenv("AIRFLOW_REMOTE_AGENT_WATCH", "a=http://a:1/healthz,b=http://b:1/healthz")
    assert list(main.settings_from_args(args).watch) == ["a", "b"]
    with pytest.raises(SystemExit) as exit_info:
        main.settings_from_args([*args, "--watch", "worker-etl"])
    assert exit_info.value.code == 2
    assert "--watch 'worker-etl': expected NAME=http(s)://HOST:PORT/healthz" in capsys.readouterr().err
    monkeypatch.delenv("AIRFLOW_REMOTE_AGENT_WATCH")
    with pytest.raises(SystemExit):
        main.settings_from_args(args)
    assert "--watch needs at least one NAME=URL" in capsys.readouterr().err


@pytest.mark.parametrize("component", ["dag-processor", "triggerer"])
def test_the_dag_processor_and_triggerer_refuse_an_airflow_without_their_seams(
    tmp_path, monkeypatch, component
):
    """On Airflow 3.2 they stop at start with one line naming the version they need, before any
    backend check or registration."""
    monkeypatch.setattr(compat, "AIRFLOW_MINOR", (3, 2))
    monkeypatch.setattr(compat, "AIRFLOW_VERSION", "3.2.2")
    monkeypatch.setattr(main, "_hide_process_memory", lambda: None)
    monkeypatch.setattr(main.log_format, "configure", lambda *args: None)
    monkeypatch.setattr(main, "_exit_unless_backends_work", lambda settings: pytest.fail("checked backends"))
    args = [component, "--api-url", "http://127.0.0.1:9", "--token-file", _token_file(tmp_path)]
    with pytest.raises(SystemExit) as exited:
        main.main(args)
    message = str(exited.value.code)
    assert "\n" not in message
    assert f"agent {component} needs Airflow 3.3 or newer, and this is Airflow 3.2.2" in message
