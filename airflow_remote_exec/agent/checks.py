"""Start-up checks of the agent's XCom store and secrets backend.

A wrong bucket or secrets URL is one clear line when the agent starts, naming the Airflow setting at
fault, rather than a failure in some task an hour later. ``airflow-remote-agent check`` prints the same
checks as a report. Each check is bounded in time: a store that never answers fails the check.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

CHECK_TIMEOUT_SECONDS = 30.0
PROBE_KEY = "airflow_remote_agent_check"  # a key no one uses: a lookup of it must answer "none"
PROBE_FOLDER = ".airflow-remote-agent-check"
LOCAL_SCHEMES = ("file", "local")
# An error line as Airflow's structured logs or the standard library's print it.
_ERROR_LINE = re.compile(
    r"(?:\[(?:error|critical)\s*\]|\b(?:ERROR|CRITICAL)\b)\s*(?:\[[\w.]+\]\s*)?"
    r"(?P<event>.+?)(?:\s+\[[\w.]+\]\s+loc=.*)?$"
)
# Client libraries that log each retry of a failing call: the check's own line says it once.
RETRY_LOGGERS = ("urllib3", "botocore", "azure", "google", "hvac")


@dataclass(frozen=True)
class Finding:
    subject: str
    ok: bool
    text: str
    warning: bool = False  # passed, with something the operator should look at

    def line(self) -> str:
        status = "FAIL" if not self.ok else "warn" if self.warning else "ok  "
        return f"{status}  {self.subject}: {self.text}"


class CheckFailed(Exception):
    """A setting at fault; the message names it."""


class CheckWarning(Exception):
    """Worth a look, not a stop; the message says what."""


# A refusal to read the probe's made-up key: how a backend whose policy names each secret answers
# (Vault's 403, AWS's AccessDeniedException). Airflow's own look-ups skip such a backend and go on.
_DENIED = re.compile(r"403|denied|forbidden|permission|not authori[sz]ed", re.IGNORECASE)


def describe(err: BaseException) -> str:
    """``Type: first line of the message``: one line, however long the exception's text."""
    text = str(err).strip().splitlines()
    message = f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    return message if len(message) <= 300 else message[:299] + "…"


def _import(setting: str, path: str) -> type:
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except Exception as err:  # noqa: BLE001 - any import failure is the setting's fault
        raise CheckFailed(f"{setting} {path} cannot be imported: {describe(err)}") from None


@contextlib.contextmanager
def _held_output() -> Iterator[Callable[[], str | None]]:
    """Hold back what is printed during a check, and quiet client retries. Some backends log an error
    with its traceback and carry on (Google's without credentials): the check's line quotes that error
    instead. Held at the file-descriptor level, since Airflow's loggers write to the streams they hold."""
    quiet = [logging.getLogger(name) for name in RETRY_LOGGERS]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 1)
        os.dup2(held.fileno(), 2)

        def first_error() -> str | None:
            sys.stdout.flush()
            sys.stderr.flush()
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines():
                if match := _ERROR_LINE.search(line):
                    return match.group("event").strip()[:300]
            return None

        try:
            yield first_error
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
            for logger, level in zip(quiet, levels, strict=True):
                logger.setLevel(level)


def _bounded(action: Callable[[], str], what: str, timeout: float) -> str:
    """Run ``action`` in a thread and wait at most ``timeout``: a store that hangs fails the check (the
    daemon thread is left behind; the agent exits or goes on without it)."""
    result: dict[str, str | BaseException] = {}

    def run() -> None:
        try:
            result["ok"] = action()
        except BaseException as err:  # noqa: BLE001 - reported as the check's failure
            result["error"] = err

    thread = threading.Thread(target=run, name=f"check {what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise CheckFailed(f"{what}: no answer within {timeout:.0f} s")
    if "error" in result:
        error = result["error"]
        raise error if isinstance(error, CheckFailed) else CheckFailed(f"{what}: {describe(error)}")
    return str(result["ok"])


def _xcom_store(agent_name: str, timeout: float) -> str:
    from airflow.configuration import conf
    from airflow.providers.common.io.xcom.backend import XComObjectStorageBackend, _get_compression_suffix

    backend = conf.get("core", "xcom_backend", fallback="")
    backend_class = _import("[core] xcom_backend", backend) if backend else None
    if not isinstance(backend_class, type) or not issubclass(backend_class, XComObjectStorageBackend):
        return (
            f"XCom values go to the orchestrator's database ([core] xcom_backend {backend or 'default'}); "
            "--xcom-path keeps them in your object store"
        )
    path = conf.get("common.io", "xcom_objectstorage_path", fallback="")
    if not path:
        raise CheckFailed("[common.io] xcom_objectstorage_path is not set")
    threshold_text = conf.get("common.io", "xcom_objectstorage_threshold", fallback="-1")
    try:
        threshold = int(threshold_text)
    except ValueError:
        raise CheckFailed(
            f"[common.io] xcom_objectstorage_threshold {threshold_text!r} is not an integer"
        ) from None
    compression = conf.get("common.io", "xcom_objectstorage_compression", fallback="") or None
    if compression:
        try:
            _get_compression_suffix(compression)
        except ValueError as err:
            raise CheckFailed(f"[common.io] xcom_objectstorage_compression: {err}") from None
    _bounded(lambda: _write_probe(path, agent_name), f"[common.io] xcom_objectstorage_path {path}", timeout)
    where = (
        "every XCom value stays in the orchestrator's database (threshold -1)"
        if threshold < 0
        else f"values of {threshold} bytes or more are stored there"
    )
    return f"{path}: wrote, read and deleted a probe object; {where}"


def _write_probe(path: str, agent_name: str) -> str:
    """Write, read back and delete one small object. A missing bucket must fail here: nothing is
    created in an object store (only a local folder is)."""
    from airflow.sdk import ObjectStoragePath

    base = ObjectStoragePath(path)
    probe = base / PROBE_FOLDER / f"{agent_name}-{uuid.uuid4().hex}"
    if base.protocol in LOCAL_SCHEMES or not base.protocol:
        probe.parent.mkdir(parents=True, exist_ok=True)
    payload = uuid.uuid4().bytes
    probe.write_bytes(payload)
    try:
        if probe.read_bytes() != payload:
            raise CheckFailed("read back something else than it wrote")
    finally:
        probe.unlink()
    return "ok"


def _secrets_backend(timeout: float) -> str:
    from airflow.configuration import conf

    section, key, kwargs_key = "workers", "secrets_backend", "secrets_backend_kwargs"
    if not conf.get(section, key, fallback=""):
        section, key, kwargs_key = "secrets", "backend", "backend_kwargs"  # Airflow's own fallback
    backend = conf.get(section, key, fallback="")
    if not backend:
        return (
            "none set: connections and variables come from the agent's environment (AIRFLOW_CONN_*, "
            "AIRFLOW_VAR_*), then from the orchestrator"
        )
    kwargs_text = conf.get(section, kwargs_key, fallback="") or "{}"
    try:
        kwargs = json.loads(kwargs_text)
    except ValueError as err:
        raise CheckFailed(f"[{section}] {kwargs_key} is not JSON: {err}") from None
    if not isinstance(kwargs, dict):
        raise CheckFailed(f"[{section}] {kwargs_key} must be a JSON object")
    from airflow.sdk.configuration import get_custom_secret_backend

    _import(f"[{section}] {key}", backend)
    try:
        instance = get_custom_secret_backend(worker_mode=True)
    except Exception as err:  # noqa: BLE001 - the class or its arguments are at fault
        raise CheckFailed(f"[{section}] {key} {backend} cannot be set up: {describe(err)}") from None

    def ask() -> str:
        try:
            instance.get_conn_value(PROBE_KEY)
        except NotImplementedError:  # a backend that builds connections itself (the local file one)
            instance.get_connection(PROBE_KEY)
        instance.get_variable(PROBE_KEY)
        return "ok"

    setting = f"[{section}] {key} {backend}"
    try:
        _bounded(ask, setting, timeout)
    except CheckFailed as err:
        if _DENIED.search(str(err)):
            raise CheckWarning(
                f"{err} (reached, but denied the probe's made-up key: check its policy)"
            ) from None
        raise
    return f"{backend} answered a connection and a variable look-up"


def _finding(subject: str, check: Callable[[], str]) -> Finding:
    with _held_output() as first_error:
        try:
            text = check()
        except CheckFailed as err:
            logged = first_error()
            return Finding(subject, False, str(err) if logged is None else f"{err} (it logged: {logged})")
        except CheckWarning as err:
            return Finding(subject, True, str(err), warning=True)
        except Exception as err:  # noqa: BLE001 - a setting Airflow cannot use at all (not a class, say)
            return Finding(subject, False, describe(err))
        # Some backends log an error and answer "none": a denied secret (which may also be how a
        # least-privilege account sees the probe's missing one), a wrong path. Worth a look, not a stop.
        if (logged := first_error()) is not None:
            return Finding(subject, True, f"{text}, but it logged an error: {logged}", warning=True)
        return Finding(subject, True, text)


def run_checks(
    agent_name: str, *, xcom: bool = True, timeout: float = CHECK_TIMEOUT_SECONDS
) -> list[Finding]:
    """The secrets backend always; the XCom store where tasks run (``xcom``)."""
    findings = [_finding("secrets backend", lambda: _secrets_backend(timeout))]
    if xcom:
        findings.append(_finding("XCom store", lambda: _xcom_store(agent_name, timeout)))
    return findings
