"""The agent's backend flags become Airflow's own settings, and its start-up checks name the setting at
fault in one line (the services themselves are exercised in tests/e2e/test_backends.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from airflow_remote_exec.agent import checks, main
from airflow_remote_exec.agent.backends import SECRETS_BACKENDS, XCOM_BACKEND

AGENT_BIN = Path(sys.executable).with_name("airflow-remote-agent")
BACKEND_SETTINGS = (
    "AIRFLOW__CORE__XCOM_BACKEND",
    "AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_PATH",
    "AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_THRESHOLD",
    "AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_COMPRESSION",
    "AIRFLOW__WORKERS__SECRETS_BACKEND",
    "AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS",
)


class HangingBackend:
    """A secrets backend that never answers."""

    def __init__(self, **kwargs):
        pass

    def get_conn_value(self, conn_id):
        time.sleep(60)

    def get_variable(self, key):
        time.sleep(60)


@pytest.fixture(autouse=True)
def clean_settings():
    """The flags write to os.environ, as in the agent: each test starts and ends without them."""
    from airflow.sdk import configuration

    # Airflow 3.3 keeps the backends it built; 3.2 builds them at every look-up.
    clear_cache = getattr(configuration, "clear_secrets_backends_cache", lambda: None)

    def clean():
        for name in BACKEND_SETTINGS:
            os.environ.pop(name, None)
        clear_cache()

    clean()
    yield
    clean()


def _check(*flags: str) -> list[checks.Finding]:
    settings = main.settings_from_args(["check", "--name", "probe", *flags])
    assert isinstance(settings, main.CheckSettings)
    return checks.run_checks(settings.name, timeout=3)


def test_flags_set_airflows_own_settings(tmp_path):
    main.settings_from_args(
        [
            "check",
            "--xcom-path",
            f"file://{tmp_path}/xcom",
            "--xcom-compression",
            "gzip",
            "--secrets-backend",
            "vault",
            "--secrets-backend-kwargs",
            '{"url": "https://vault:8200"}',
        ]
    )
    assert os.environ["AIRFLOW__CORE__XCOM_BACKEND"] == XCOM_BACKEND
    assert os.environ["AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_PATH"] == f"file://{tmp_path}/xcom"
    assert os.environ["AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_THRESHOLD"] == "0"  # every value in the store
    assert os.environ["AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_COMPRESSION"] == "gzip"
    assert os.environ["AIRFLOW__WORKERS__SECRETS_BACKEND"] == SECRETS_BACKENDS["vault"]
    assert json.loads(os.environ["AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS"]) == {"url": "https://vault:8200"}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--xcom-path", "bucket/xcom"], "--xcom-path must be an object-store URL"),
        (["--secrets-backend-kwargs", "{url"], "--secrets-backend-kwargs is not JSON"),
        (["--secrets-backend-kwargs", "[]"], "must be a JSON object"),
    ],
)
def test_malformed_flags_are_one_clear_error(flags, message, capsys):
    with pytest.raises(SystemExit):
        main.settings_from_args(["check", *flags])
    assert message in capsys.readouterr().err


def test_a_local_store_and_file_backend_pass(tmp_path):
    variables = tmp_path / "variables.json"
    variables.write_text(json.dumps({"some": "value"}))
    findings = _check(
        "--xcom-path",
        f"file://{tmp_path}/xcom",
        "--secrets-backend",
        "local-file",
        "--secrets-backend-kwargs",
        json.dumps({"variables_file_path": str(variables)}),
    )
    assert [f.ok for f in findings] == [True, True], findings
    assert not list((tmp_path / "xcom" / checks.PROBE_FOLDER).iterdir())  # the probe object was deleted


@pytest.mark.parametrize(
    "flags, setting, reason",
    [
        (
            ["--secrets-backend", "no.such.Backend"],
            "[workers] secrets_backend no.such.Backend",
            "cannot be imported",
        ),
        (
            ["--secrets-backend", "vault", "--secrets-backend-kwargs", '{"no_such_argument": 1}'],
            "[workers] secrets_backend",
            "cannot be set up",
        ),
        (
            [
                "--secrets-backend",
                "local-file",
                "--secrets-backend-kwargs",
                '{"variables_file_path": "/nope.json"}',
            ],
            "[workers] secrets_backend",
            "/nope.json",
        ),
        (
            ["--secrets-backend", f"{__name__}.HangingBackend"],
            "[workers] secrets_backend",
            "no answer within 3 s",
        ),
    ],
)
def test_a_secrets_backend_at_fault_is_named(flags, setting, reason):
    finding = _check(*flags)[0]
    assert not finding.ok
    assert setting in finding.text and reason in finding.text
    assert "\n" not in finding.text


def test_an_xcom_store_at_fault_is_named(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the store's folder should be")
    finding = _check("--xcom-path", f"file://{blocked}/xcom")[1]
    assert not finding.ok and "[common.io] xcom_objectstorage_path" in finding.text
    monkeypatch.setenv("AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_COMPRESSION", "no-such-codec")
    finding = _check("--xcom-path", f"file://{tmp_path}/xcom")[1]
    assert not finding.ok and "[common.io] xcom_objectstorage_compression" in finding.text


def test_the_check_command_prints_a_report_and_fails_on_a_fault(tmp_path):
    result = subprocess.run(
        [str(AGENT_BIN), "check", "--xcom-path", f"file://{tmp_path}/xcom", "--secrets-backend", "nope.Nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(
        "FAIL  secrets backend: [workers] secrets_backend nope.Nope cannot be imported"
    )
    assert lines[1].startswith("ok    XCom store: file://")
    assert "Traceback" not in result.stderr


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "backend, kwargs, reasons",
    [
        # No emulator exists for these two services: their configuration is checked, and a store that
        # cannot answer fails the check with the setting named.
        ("azure-key-vault", {"vault_url": f"https://127.0.0.1:{_closed_port()}/"}, ("refused", "no answer")),
        ("azure-key-vault", {"vault_url": "http://vault.example"}, ("not permitted for non-TLS",)),
        ("azure-key-vault", {"no_such_argument": 1}, ("vault_url must be the URL",)),
        ("gcp-secret-manager", {"project_id": "p"}, ("Unable to load credentials for GCP Secret Manager",)),
        ("gcp-secret-manager", {"no_such_argument": 1}, ("cannot be set up",)),
    ],
)
def test_cloud_secrets_backends_without_an_emulator_are_checked(backend, kwargs, reasons, tmp_path):
    """Through the command, as users run it: what these backends log goes through its own output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "AZURE_"))}
    result = subprocess.run(
        [
            str(AGENT_BIN),
            "check",
            "--secrets-backend",
            backend,
            "--secrets-backend-kwargs",
            json.dumps(kwargs),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 1
    line = result.stdout.splitlines()[0]
    assert line.startswith(f"FAIL  secrets backend: [workers] secrets_backend {SECRETS_BACKENDS[backend]}")
    assert any(reason in line for reason in reasons), line
    assert "Traceback" not in result.stdout + result.stderr


class ErrorLoggingBackend:
    """A backend that logs an error and answers "none", as a wrong Vault mount does."""

    def __init__(self, **kwargs):
        pass

    def get_conn_value(self, conn_id):
        import structlog

        structlog.get_logger("airflow.providers.fake").error("Permission denied on secret %s", conn_id)

    def get_variable(self, key):
        return None


def test_a_backend_that_logs_an_error_and_answers_none_is_a_warning():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [str(AGENT_BIN), "check", "--secrets-backend", "tests.unit.test_agent_checks.ErrorLoggingBackend"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    line = result.stdout.splitlines()[0]
    assert (
        line.startswith("warn  secrets backend:") and "but it logged an error: Permission denied on" in line
    )


def test_an_xcom_backend_that_is_not_a_class_is_no_crash(monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__XCOM_BACKEND", "os.path.join")
    finding = checks.run_checks("probe", timeout=3)[1]
    assert finding.ok and "os.path.join" in finding.text


class DenyingBackend(HangingBackend):
    """A backend whose policy names each secret: the probe's made-up key is refused (Vault's 403)."""

    def get_conn_value(self, conn_id):
        raise PermissionError("403 permission denied")


def test_a_backend_that_denies_the_probe_key_is_a_warning_and_an_unreachable_one_a_stop():
    finding = _check("--secrets-backend", f"{__name__}.DenyingBackend")[0]
    assert (finding.ok, finding.warning) == (True, True)
    assert "denied the probe's made-up key" in finding.text
    closed = _check("--secrets-backend", "vault", "--secrets-backend-kwargs", json.dumps(
        {"url": f"http://127.0.0.1:{_closed_port()}", "token": "t", "timeout": 2}))[0]  # fmt: skip
    assert not closed.ok
