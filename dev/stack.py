"""Process harness for a throwaway local Airflow stack (PostgreSQL, api-server, scheduler, dag-processor).

Used by the demo, the end-to-end tests and the benchmarks, so it knows nothing about any particular
executor: the executor is just a string put into the environment.  Everything runs as real OS processes
(no Docker), every wait is bounded, and every process is stopped by PID.

Stopping by process group alone is not enough: Airflow's task supervisor moves each task process into
its own process group, so after the scheduler dies its task processes would survive.  Instead every
process we start carries a unique marker variable in its environment, which all its descendants inherit;
``stop()`` finds them through ``/proc/<pid>/environ`` (Linux) and SIGKILLs whatever is left.

Dependencies: stdlib, httpx and SQLAlchemy only.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx
import sqlalchemy as sa

REPO_ROOT = Path(__file__).resolve().parent.parent
# Not resolved: the venv's python is a symlink, and its *unresolved* directory holds the venv scripts.
VENV_BIN = Path(sys.executable).parent
AIRFLOW_BIN = str(VENV_BIN / "airflow")


def _find_pg_bin() -> Path:
    """Newest Debian-packaged PostgreSQL server binaries, unless PG_BIN says otherwise."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    return found[-1] if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _find_pg_bin()

_TAG_VAR = "DEV_STACK_PROCESS_TAG"
DEFAULT_COMPONENTS = ("api-server", "scheduler", "dag-processor")
TERMINAL_RUN_STATES = frozenset({"success", "failed"})


# --------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (small race, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "") -> None:
    """Poll ``predicate`` until it returns truthy; raise ``TimeoutError`` naming ``what`` after ``timeout``.

    Exceptions raised by the predicate propagate, so a predicate can abort the wait early (e.g. when the
    process it waits for has died).
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what or predicate!r}")
        time.sleep(interval)


def _become_subreaper() -> None:
    """Adopt orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``) so that we can reap them.

    When a component dies before its children, they are re-parented to the nearest subreaper, else to
    PID 1; a container's PID 1 often never reaps, which leaves ``<defunct>`` entries around forever.
    Orphans are only reaped by ``_leftovers`` for sessions we started.  No-op where unsupported.
    """
    global _subreaper_enabled
    if not _subreaper_enabled:
        _subreaper_enabled = True
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # 36 = PR_SET_CHILD_SUBREAPER


_subreaper_enabled = False


def _leftovers(tag: str, sessions: Collection[int], reap_leaders: bool = False) -> list[int]:
    """PIDs carrying ``tag`` in their environment or in one of ``sessions`` that are not gone yet.

    Zombies of those sessions that were re-parented to us are reaped on the way; those not yet
    re-parented still count, those stuck under a non-reaping PID 1 are beyond help and ignored.
    Session leaders are left alone unless ``reap_leaders``: they are our ``Popen`` children, whose
    exit status ``Popen.poll()`` must collect itself.  Returns [] on systems without /proc.
    """
    needle = f"{_TAG_VAR}={tag}".encode()
    me = os.getpid()
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                state, ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
                if state == "Z":
                    if int(session) not in sessions or (pid == int(session) and not reap_leaders):
                        continue
                    if int(ppid) == me:
                        with contextlib.suppress(ChildProcessError):
                            os.waitpid(pid, os.WNOHANG)
                    elif int(ppid) != 1:  # its parent is exiting and will hand it to us: still pending
                        found.append(pid)
                    continue
                if int(session) in sessions:
                    found.append(pid)
                    continue
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(pid)
            except (OSError, ValueError):
                continue  # exited meanwhile, or not ours to read
    return found


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<{path} does not exist>"
    return "\n".join(text.splitlines()[-lines:])


def _run(argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None, **kw: Any):
    """Run a command to completion; on failure raise with its output, which is what you need to debug."""
    try:
        proc = subprocess.run(
            list(argv), env=env, capture_output=True, text=True, timeout=timeout, check=False, **kw
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(
            f"{' '.join(argv)} timed out after {timeout}s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}"
        ) from e
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


# ------------------------------------------------------------------------------------- ManagedProcess


class ManagedProcess:
    """One long-running command in its own session, logging to a file, that can always be cleaned up.

    ``stop()`` sends SIGTERM to the leader, waits (bounded), then SIGKILLs every process left in its
    session or carrying this instance's environment tag, and verifies none is left.  The tag is fixed
    for the lifetime of the object, so leftovers from an earlier incarnation are also cleaned up.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.tag = f"{name}-{uuid.uuid4().hex}"
        self.env = {**env, _TAG_VAR: self.tag}
        self.log_path = Path(log_path)
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._term_sent = False
        self._sessions: set[int] = set()  # one per incarnation: the leader's PID

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} alive={self.alive}>"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def tree_pids(self) -> list[int]:
        """All live processes started by this object (leader and descendants, whatever their group)."""
        pids = set(_leftovers(self.tag, self._sessions))
        if self.alive:
            pids.add(self._proc.pid)  # type: ignore[union-attr]
        return sorted(pids)

    def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self._close_log()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self._log.write(f"\n===== {time.strftime('%H:%M:%S')} starting: {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self._term_sent = False
        _become_subreaper()
        self._proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._sessions.add(self._proc.pid)

    def terminate(self) -> None:
        """Ask the leader to shut down gracefully (SIGTERM) without waiting; see ``stop()``."""
        if self.alive and not self._term_sent:
            _signal_pids([self._proc.pid], signal.SIGTERM)  # type: ignore[union-attr]
            self._term_sent = True

    def kill(self, sig: int = signal.SIGKILL, tree: bool = True) -> None:
        """Send ``sig`` to the whole process tree (default) or only the leader (``tree=False``).

        With SIGKILL this returns once the leader (and with ``tree``, every descendant) is gone, so a
        test can rely on the crash having happened.
        """
        if self._proc is None:
            return
        _signal_pids(self.tree_pids() if tree else [self._proc.pid], sig)
        if sig == signal.SIGKILL:
            self._proc.wait(timeout=10)
            if tree:
                wait_until(lambda: not self.tree_pids(), timeout=10, what=f"killed {self.name} tree to exit")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL everything left; raise if anything survives."""
        if self._proc is None:
            return
        self.terminate()
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Only while the leader is unreaped is its PID (= our group id) guaranteed not to be reused.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        _signal_pids(self.tree_pids(), signal.SIGKILL)
        self._proc.wait(timeout=10)
        try:
            wait_until(lambda: not self.tree_pids(), timeout=10, what=f"{self.name} processes to exit")
            self._sessions.clear()  # all gone: never signal those (reusable) session ids again
        finally:
            self._close_log()

    def log_tail(self, lines: int = 50) -> str:
        return _tail(self.log_path, lines)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


# ------------------------------------------------------------------------------------------- Postgres


class Postgres:
    """A throwaway PostgreSQL server on 127.0.0.1 with trust auth and fsync off (fast, not durable).

    initdb refuses to run as root, so as root the server binaries run as user ``postgres``, which must be
    able to reach ``workdir`` (pytest's own tmp dirs are mode 0700: use a directory under /tmp instead).
    """

    def __init__(
        self, workdir: Path, port: int | None = None, settings: Mapping[str, str] | None = None
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.settings = dict(settings or {})  # further server settings, e.g. shared_preload_libraries
        self.port = port or free_port()
        self.datadir = self.workdir / "data"
        self.sockdir = self.workdir / "sock"
        self.logfile = self.workdir / "postgres.log"
        self._tag = f"postgres-{uuid.uuid4().hex}"
        self._postmaster_pid: int | None = None  # pg_ctl runs it in its own session, adopted by us
        self.url = self.url_for("airflow")

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def _cmd(self, binary: str, *args: str) -> list[str]:
        argv = [str(PG_BIN / binary), *args]
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def _pg(self, binary: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, _TAG_VAR: self._tag, "LC_ALL": "C"}
        return _run(self._cmd(binary, *args), timeout=timeout, env=env, cwd="/")

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sockdir.mkdir(exist_ok=True)
        _become_subreaper()
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
            for path in self.workdir.rglob("*"):
                shutil.chown(path, "postgres", "postgres")
        if not (self.datadir / "PG_VERSION").exists():
            self._pg("initdb", "-D", str(self.datadir), "-U", "postgres", "-A", "trust", "--no-sync",
                     "-E", "UTF8", "--no-locale", timeout=120)  # fmt: skip
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300 "
            f"-c full_page_writes=off -c synchronous_commit=off -k {self.sockdir}"
        )
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        try:
            # -w -t: pg_ctl itself waits (bounded) until the server accepts connections.
            self._pg("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-o", options,
                     "-w", "-t", "60", "start", timeout=90)  # fmt: skip
        except RuntimeError as e:
            raise RuntimeError(f"{e}\npostgres.log:\n{_tail(self.logfile, 30)}") from e
        self._postmaster_pid = self._read_postmaster_pid()
        self.create_database("airflow", exist_ok=True)

    def create_database(self, name: str, exist_ok: bool = False) -> str:
        """CREATE DATABASE ``name`` and return its SQLAlchemy URL (used for one database per test)."""
        engine = sa.create_engine(
            self.url_for("postgres"), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
        )
        try:
            with engine.connect() as conn:
                exists = conn.scalar(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
                if exists and not exist_ok:
                    raise RuntimeError(f"database {name!r} already exists")
                if not exists:
                    conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url_for(name)

    def dump(self, database: str) -> str:
        """The database's rows as ``pg_dump --data-only`` prints them: for scans of what it holds."""
        return self._pg(
            "pg_dump", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "--data-only", database
        ).stdout

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            # Failure is tolerated: a stale pid file, or a server that ignores "fast" shutdown, which the
            # SIGKILL below handles (never the pid file's PID itself: it may have been reused).
            with contextlib.suppress(RuntimeError):
                self._pg(
                    "pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "-t", "30", "stop", timeout=45
                )
        # Anything still carrying our tag or in the postmaster's session is killed by PID, then reaped.
        sessions = {self._postmaster_pid} if self._postmaster_pid else set()
        _signal_pids(_leftovers(self._tag, sessions), signal.SIGKILL)
        wait_until(
            lambda: not _leftovers(self._tag, sessions, reap_leaders=True),
            timeout=10,
            what="postgres processes to exit",
        )
        self._postmaster_pid = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _read_postmaster_pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None


# -------------------------------------------------------------------------------------- AirflowClient


class AirflowClient:
    """Thin client for Airflow's public REST API (/api/v2) with simple-auth-manager JWT login.

    ``external_executor_id`` is not part of the REST task-instance model, so when ``db_url`` is given it
    is read from the metadata database and merged into ``task_instances()``; otherwise it is None.
    """

    def __init__(
        self,
        base_url: str,
        username: str = "admin",
        password: str = "admin",
        db_url: str | None = None,
        timeout: float = 30,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.db_url = db_url
        self._credentials = {"username": username, "password": password}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._token: str | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AirflowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing

    def _login(self) -> str:
        resp = self._http.post("/auth/token", json=self._credentials)
        _raise_for_status(resp)
        return resp.json()["access_token"]

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Authenticated request to ``/api/v2{path}``; re-logs in once on 401; returns decoded JSON."""
        extra_headers = kwargs.pop("headers", {})
        for attempt in range(2):
            if self._token is None:
                self._token = self._login()
            headers = {**extra_headers, "Authorization": f"Bearer {self._token}"}
            resp = self._http.request(method, f"/api/v2{path}", headers=headers, **kwargs)
            if resp.status_code == 401 and attempt == 0:
                self._token = None
                continue
            _raise_for_status(resp)
            return resp.json() if resp.content else None
        raise AssertionError("unreachable")

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def test_connection(self, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        """Enqueue a connection test (as the UI's "Test" button does) and wait for its result."""
        queued = self.request("POST", "/connections/enqueue-test", json=body)
        headers = {"Airflow-Connection-Test-Token": queued["token"]}
        result: dict[str, Any] = {}

        def finished() -> bool:
            result.update(self.request("GET", "/connections/enqueue-test", headers=headers))
            return result["state"] in ("success", "failed")

        wait_until(finished, timeout=timeout, interval=0.5, what="the connection test to finish")
        return result

    # -- dags and runs

    def task_log(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        try_number: int = 1,
        map_index: int = -1,
        missing_ok: bool = False,
    ) -> list[str]:
        """The events of one try's log, as the REST API serves it (the UI's source too); with
        ``missing_ok``, none while the try does not exist yet (404)."""
        try:
            doc = self.request(
                "GET",
                f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                params={"full_content": "true", "map_index": map_index},
                headers={"Accept": "application/json"},
            )
        except httpx.HTTPStatusError as err:
            if missing_ok and err.response.status_code == 404:
                return []
            raise
        items = doc["content"]
        return [str(item.get("event", "")) if isinstance(item, dict) else str(item) for item in items]

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> None:
        """Wait until the dag processor has parsed and serialized ``dag_id``."""

        def parsed() -> bool:
            try:
                self.get(f"/dags/{dag_id}")
            except httpx.HTTPStatusError as e:
                if e.response.status_code == 404:
                    return False
                raise
            return True

        wait_until(parsed, timeout, interval=0.5, what=f"dag {dag_id!r} to be parsed")

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """Unpause ``dag_id`` and create a manual run (no logical date); return its ``dag_run_id``."""
        self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
        run = self.request("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}")

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300) -> str:
        """Poll until the run is success or failed and return that state; TimeoutError shows task states."""
        state: list[str] = []

        def finished() -> bool:
            state[:] = [self.dag_run(dag_id, run_id)["state"]]
            return state[0] in TERMINAL_RUN_STATES

        try:
            wait_until(finished, timeout, interval=0.5, what=f"dag run {dag_id}/{run_id} to finish")
        except TimeoutError as e:
            tis = {(t["task_id"], t["map_index"]): t["state"] for t in self.task_instances(dag_id, run_id)}
            raise TimeoutError(f"{e}; run state={state[0] if state else None}, task states={tis}") from e
        return state[0]

    # -- task instances

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """All task instances of a run, mapped ones included, across pages."""
        tis: list[dict[str, Any]] = []
        while True:
            page = self.get(
                f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=100, offset=len(tis), order_by="id"
            )
            tis.extend(page["task_instances"])
            if not page["task_instances"] or len(tis) >= page["total_entries"]:
                break
        ext_ids = self._external_executor_ids(dag_id, run_id)
        for ti in tis:
            ti["external_executor_id"] = ext_ids.get((ti["task_id"], ti["map_index"]))
        return tis

    def task_tries(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[dict[str, Any]]:
        """Every try of one task instance (task instance history plus the current try)."""
        suffix = f"/{map_index}" if map_index >= 0 else ""
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}{suffix}/tries"
        return self.get(path)["task_instances"]

    def wait_for_executor_ids(
        self, dag_id: str, run_id: str, allowed: Collection[str], timeout: float
    ) -> None:
        """Wait until the executor has reported every task instance of a run as running on one of
        ``allowed`` (its ``external_executor_id``)."""

        def reported() -> bool:
            return {ti["external_executor_id"] for ti in self.task_instances(dag_id, run_id)} <= set(allowed)

        wait_until(
            reported, timeout, interval=0.5, what=f"{dag_id} task instances to name their executor ids"
        )

    def _external_executor_ids(self, dag_id: str, run_id: str) -> dict[tuple[str, int], str | None]:
        if not self.db_url:
            return {}
        query = sa.text(
            "SELECT task_id, map_index, external_executor_id FROM task_instance"
            " WHERE dag_id = :dag_id AND run_id = :run_id"
        )
        with _engine(self.db_url) as engine, engine.connect() as conn:
            rows = conn.execute(query, {"dag_id": dag_id, "run_id": run_id})
            return {(r.task_id, r.map_index): r.external_executor_id for r in rows}


def _answers_200(url: str, proc: ManagedProcess) -> bool:
    if proc.returncode is not None:
        raise RuntimeError(f"{proc.name} exited with {proc.returncode}:\n{proc.log_tail(40)}")
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _raise_for_status(resp: httpx.Response) -> None:
    """Like ``raise_for_status`` but with the response body in the message (Airflow explains 4xx there)."""
    if resp.is_error:
        raise httpx.HTTPStatusError(
            f"{resp.request.method} {resp.request.url} -> {resp.status_code}: {resp.text[:2000]}",
            request=resp.request,
            response=resp,
        )


@contextlib.contextmanager
def _engine(db_url: str):
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def query(db_url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    """Rows of one statement against a stack's metadata DB, as dicts; committed (it may write)."""
    with _engine(db_url) as engine, engine.begin() as conn:
        return [dict(row._mapping) for row in conn.execute(sa.text(sql), params)]


def remote_jobs(db_url: str, dag_id: str, run_id: str | None = None) -> list[dict[str, Any]]:
    """The ``remote_job`` rows of a DAG (or of one run), ordered by task, map index and try."""
    where = "dag_id = :d" + (" AND run_id = :r" if run_id else "")
    return query(
        db_url,
        f"SELECT * FROM remote_job WHERE {where} ORDER BY run_id, task_id, map_index, try_number",
        d=dag_id,
        r=run_id,
    )


def queued_to_start_latencies(db_url: str, dag_id: str, run_id: str) -> list[float]:
    """Seconds from ``queued_dttm`` to ``start_date`` for each task instance of a run (skips unset ones).

    This is the executor's pickup latency, the number the executor benchmarks compare.
    """
    query = sa.text(
        "SELECT queued_dttm, start_date FROM task_instance"
        " WHERE dag_id = :dag_id AND run_id = :run_id AND queued_dttm IS NOT NULL AND start_date IS NOT NULL"
        " ORDER BY queued_dttm"
    )
    with _engine(db_url) as engine, engine.connect() as conn:
        rows = conn.execute(query, {"dag_id": dag_id, "run_id": run_id}).all()
    return [(_as_datetime(start) - _as_datetime(queued)).total_seconds() for queued, start in rows]


def _as_datetime(value: datetime | str) -> datetime:
    # SQLite hands back text for a raw query; PostgreSQL hands back (aware) datetimes.
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


# --------------------------------------------------------------------------------------- Orchestrator


class Orchestrator:
    """Stock Airflow control plane (api-server, scheduler, dag-processor) as separate real processes.

    All processes share ``env``: one AIRFLOW_HOME, one database and one JWT secret (the scheduler signs
    task tokens that the api-server's execution API must accept).  Airflow 3 only parses DAGs in the
    separate ``airflow dag-processor`` command; the scheduler never does.
    """

    def __init__(
        self,
        home: Path,
        db_url: str,
        dags_folder: Path,
        executor: str,
        port: int | None = None,
        extra_env: Mapping[str, str] | None = None,
        components: Sequence[str] = DEFAULT_COMPONENTS,
        agent_api_workers: int = 1,
    ) -> None:
        self.home = Path(home).resolve()
        self.db_url = db_url
        self.dags_folder = Path(dags_folder).resolve()
        self.executor = executor
        self.port = port or free_port()
        self.api_url = f"http://127.0.0.1:{self.port}"
        self.components = tuple(components)
        # "agent-api": the agent API alone (``airflow remote-exec api-server``) on a port of its own.
        self.agent_api_workers = agent_api_workers
        self.agent_api_url = f"http://127.0.0.1:{free_port()}"
        self.extra_api_urls: dict[str, str] = {}  # "api-server-2": its URL
        self.logs_dir = self.home / "logs"
        self.home.mkdir(parents=True, exist_ok=True)
        self.passwords_file = self.home / "simple_auth_manager_passwords.json"
        self.passwords_file.write_text(json.dumps({"admin": "admin"}))
        self.env = self._build_env(extra_env or {})
        self.processes: dict[str, ManagedProcess] = {}

    def _build_env(self, extra_env: Mapping[str, str]) -> dict[str, str]:
        # Inherited AIRFLOW* settings would make the stack depend on the caller's shell; drop them.
        base = {k: v for k, v in os.environ.items() if not k.lstrip("_").startswith("AIRFLOW")}
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {
            **base,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": pythonpath,  # work-tree packages (e.g. this repo's executor) importable
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.db_url,
            "AIRFLOW__CORE__EXECUTOR": self.executor,
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
            # Airflow 3 moved these from [scheduler] to [dag_processor].
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(self.home / "bundles"),
            # The scheduler (and triggerer) serve task logs on fixed default ports 8793/8794, which would
            # collide between two stacks on one machine.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        }
        env.update(extra_env)
        return env

    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- CLI

    def airflow(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``airflow <args>`` with this stack's environment; raise with stdout/stderr on failure."""
        return _run([AIRFLOW_BIN, *args], timeout=timeout, env=self.env, cwd=self.home)

    def migrate(self) -> None:
        self.airflow("db", "migrate", timeout=600)

    # -- processes

    def _argv(self, name: str) -> list[str]:
        if name == "api-server":
            return [
                AIRFLOW_BIN,
                "api-server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ]
        if name.startswith("api-server-"):  # a further api-server on a port of its own: "api-server-2"
            port = self.extra_api_urls.setdefault(name, f"http://127.0.0.1:{free_port()}").rsplit(":", 1)[1]
            return [AIRFLOW_BIN, "api-server", "--host", "127.0.0.1", "--port", port, "--workers", "1"]
        if name == "agent-api":
            port = self.agent_api_url.rsplit(":", 1)[1]
            workers = str(self.agent_api_workers)
            return [AIRFLOW_BIN, "remote-exec", "api-server", "--host", "127.0.0.1", "--port", port,
                    "--workers", workers]  # fmt: skip
        if name in ("scheduler", "dag-processor", "triggerer"):
            return [AIRFLOW_BIN, name]
        if name.startswith("scheduler-"):  # a further scheduler of an HA pair: "scheduler-2"
            return [AIRFLOW_BIN, "scheduler"]
        raise ValueError(f"unknown component {name!r}")

    def _process_env(self, name: str) -> dict[str, str]:
        env = dict(self.env)
        if self.db_url.startswith("postgresql"):  # a test can tell each component's connections apart
            separator = "&" if "?" in self.db_url else "?"
            env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"{self.db_url}{separator}application_name={name}"
        if name.startswith("scheduler-"):  # each scheduler serves task logs on its own port
            env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(free_port())
        return env

    def _launch(self, name: str) -> ManagedProcess:
        proc = self.processes.get(name)
        if proc is None:
            proc = ManagedProcess(
                name, self._argv(name), self._process_env(name), self.logs_dir / f"{name}.log", cwd=self.home
            )
            self.processes[name] = proc
        elif proc.alive:
            raise RuntimeError(f"{name} is already running (pid {proc.pid})")
        proc.stop(timeout=0)  # reap an earlier incarnation and any orphans it left (no-op if none)
        proc.start()
        return proc

    def start_process(self, name: str) -> ManagedProcess:
        """(Re)start one component; for the api-server also wait until it answers health checks."""
        proc = self._launch(name)
        if name == "api-server":
            self._wait_healthy(timeout=120, need=())
        elif name.startswith("api-server-"):
            url = f"{self.extra_api_urls[name]}/api/v2/monitor/health"
            wait_until(lambda: _answers_200(url, proc), 120, interval=0.5, what=f"{name} at {url}")
        return proc

    def start(self, timeout: float = 120) -> None:
        """Start all components together and wait until the api-server reports them healthy."""
        try:
            for name in self.components:
                if not (name in self.processes and self.processes[name].alive):
                    self._launch(name)
            need = tuple(n for n in ("scheduler", "dag-processor", "triggerer") if n in self.components)
            if "api-server" in self.components:
                self._wait_healthy(timeout, need)
            if "agent-api" in self.components:
                self._wait_agent_api(timeout)
        except BaseException:
            self.stop()
            raise

    def health(self) -> dict[str, Any] | None:
        """The /api/v2/monitor/health document, or None while the api-server does not answer 200."""
        try:
            resp = httpx.get(f"{self.api_url}/api/v2/monitor/health", timeout=5)
        except httpx.HTTPError:
            return None
        return resp.json() if resp.status_code == 200 else None

    def _wait_healthy(self, timeout: float, need: Sequence[str]) -> None:
        def healthy() -> bool:
            for name in ("api-server", *need):
                proc = self.processes.get(name)
                if proc is not None and proc.returncode is not None:
                    raise RuntimeError(
                        f"{proc.name} exited with {proc.returncode} during startup:\n{proc.log_tail(40)}"
                    )
            doc = self.health()
            if doc is None:
                return False
            return all((doc.get(n.replace("-", "_")) or {}).get("status") == "healthy" for n in need)

        try:
            wait_until(
                healthy, timeout, interval=0.5, what=f"airflow at {self.api_url} to be healthy ({need})"
            )
        except TimeoutError as e:
            logs = "\n".join(f"--- {n}:\n{p.log_tail(20)}" for n, p in self.processes.items())
            raise TimeoutError(f"{e}; last health={self.health()}\n{logs}") from e

    def _wait_agent_api(self, timeout: float) -> None:
        def healthy() -> bool:
            proc = self.processes["agent-api"]
            if proc.returncode is not None:
                raise RuntimeError(f"agent-api exited with {proc.returncode}:\n{proc.log_tail(40)}")
            try:
                return httpx.get(f"{self.agent_api_url}/remote/v1/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout, interval=0.5, what=f"the agent API at {self.agent_api_url}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one component's whole process tree (SIGKILL simulates a crash)."""
        self.processes[name].kill(sig)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM all components at once, then stop each (bounded, SIGKILL fallback, leftovers checked)."""
        # Scheduler first so that it stops launching work while the api-server can still serve it.
        order = sorted(self.processes.values(), key=lambda p: p.name == "api-server")
        for proc in order:
            proc.terminate()
        errors = []
        for proc in order:
            try:
                proc.stop(timeout)
            except Exception as e:  # keep stopping the others
                errors.append(e)
        if errors:
            raise RuntimeError(f"failed to stop cleanly: {errors}")

    def client(self) -> AirflowClient:
        return AirflowClient(self.api_url, db_url=self.db_url)

    def log_tail(self, name: str, lines: int = 50) -> str:
        return _tail(self.logs_dir / f"{name}.log", lines)

    def logs(self, lines: int = 40) -> str:
        """Tails of every component log, for assertion messages."""
        return "\n".join(f"--- {n}.log:\n{self.log_tail(n, lines)}" for n in self.processes)


# ------------------------------------------------------------------------------------------ remote agent


def create_agent_token(
    orch: Orchestrator,
    name: str,
    queues: Sequence[str],
    expires: str | None = None,
    components: Sequence[str] = ("worker",),
) -> str:
    """``airflow remote-exec tokens create``; the token is the last line it prints on stdout."""
    args = ["remote-exec", "tokens", "create", "--name", name, "--queues", ",".join(queues)]
    args += ["--components", ",".join(components)]
    if expires:
        args += ["--expires", expires]
    return orch.airflow(*args).stdout.strip().splitlines()[-1]


def agent_env(home: Path, dags_folder: Path, extra_env: Mapping[str, str] | None) -> dict[str, str]:
    """An agent's environment: no inherited AIRFLOW* settings (so no database URL, no JWT secret), its
    own AIRFLOW_HOME and DAGs folder, as on a separate machine."""
    base = {k: v for k, v in os.environ.items() if not k.lstrip("_").startswith("AIRFLOW")}
    return {
        **base,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(Path(dags_folder).resolve()),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(Path(home) / "bundles"),
        **(extra_env or {}),
    }


def local_bundles(**folders: Path) -> str:
    """``[dag_processor] dag_bundle_config_list`` for LocalDagBundles named by the keywords."""
    return json.dumps(
        [
            {
                "name": name,
                "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
                "kwargs": {"path": str(Path(path).resolve()), "refresh_interval": 2},
            }
            for name, path in folders.items()
        ]
    )


class Agent:
    """An ``airflow-remote-agent worker`` process: it gets the orchestrator's URL and a token, nothing else.

    Its environment carries no database URL and no JWT secret (inherited AIRFLOW* variables are dropped);
    it has its own AIRFLOW_HOME and its own copy of the DAGs folder path, as on a separate machine.
    """

    def __init__(
        self,
        api_url: str,
        home: Path,
        dags_folder: Path,
        token: str,
        name: str,
        queues: Sequence[str] = ("default",),
        slots: int = 4,
        extra_env: Mapping[str, str] | None = None,
        python: Path | None = None,
        args: Sequence[str] = (),
    ) -> None:
        """``python``: run the agent with this interpreter instead of this venv's ``airflow-remote-agent``
        script (a task run as another user is re-executed with the agent's interpreter). ``args``: more
        flags (its XCom store or secrets backend, say)."""
        self.name = name
        self.home = Path(home).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.token_file = self.home / "token"
        self.token_file.write_text(token)
        self.health_port = free_port()
        env = agent_env(self.home, dags_folder, extra_env)
        command = (
            [str(python), "-m", "airflow_remote_exec.agent.main"]
            if python
            else [str(VENV_BIN / "airflow-remote-agent")]
        )
        argv = [
            *command,
            "worker",
            "--api-url",
            api_url,
            "--token-file",
            str(self.token_file),
            "--queues",
            ",".join(queues),
            "--slots",
            str(slots),
            "--name",
            name,
            "--health-port",
            str(self.health_port),
            "--health-host",
            "127.0.0.1",
            *args,
        ]
        self.process = ManagedProcess(f"agent-{name}", argv, env, self.home / "agent.log", cwd=self.home)

    def start(self, timeout: float = 60) -> None:
        """Start and wait until /healthz reports the agent registered and ready; stop it if it never is."""
        self.process.start()

        def ready() -> bool:
            if self.process.returncode is not None:
                raise RuntimeError(f"agent {self.name} exited early:\n{self.process.log_tail(30)}")
            return (self.healthz() or {}).get("healthy") is True

        try:
            wait_until(ready, timeout, what=f"agent {self.name} to be healthy")
        except BaseException:
            with contextlib.suppress(Exception):  # the reason it never got healthy is what matters
                self.process.stop()
            raise

    def healthz(self) -> dict[str, Any] | None:
        try:
            return httpx.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return None

    def stop(self, timeout: float = 60) -> None:
        self.process.stop(timeout)

    def log_tail(self, lines: int = 50) -> str:
        return self.process.log_tail(lines)


class _ComponentAgent:
    """An ``airflow-remote-agent <component>`` process; ``start`` waits for ``ready_line`` in its log."""

    component = ""
    ready_line = b""

    def __init__(
        self,
        api_url: str,
        home: Path,
        token: str,
        name: str,
        args: Sequence[str],
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """Its own AIRFLOW_HOME, with no DAG files: what it needs comes from the orchestrator."""
        env = agent_env(Path(home).resolve(), Path(home).resolve() / "no-dags", extra_env)
        self.name = name
        self.home = Path(home).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.token_file = self.home / "token"
        self.token_file.write_text(token)
        self.token_file.chmod(0o400)
        argv = [
            str(VENV_BIN / "airflow-remote-agent"),
            self.component,
            "--api-url",
            api_url,
            "--token-file",
            str(self.token_file),
            "--name",
            name,
            *args,
        ]
        self.log_file = self.home / f"{self.component}.log"
        self.process = ManagedProcess(
            f"{self.component}-{name}", argv, dict(env), self.log_file, cwd=self.home
        )

    def start(self, timeout: float = 90) -> None:
        """Start and wait until it says it is at work; stop it if it never does."""
        earlier = self.log_file.stat().st_size if self.log_file.exists() else 0
        self.process.start()

        def ready() -> bool:
            if self.process.returncode is not None:
                raise RuntimeError(f"{self.component} {self.name} exited early:\n{self.process.log_tail(30)}")
            with self.log_file.open("rb") as log:
                log.seek(earlier)
                return self.ready_line in log.read()

        try:
            wait_until(ready, timeout, what=f"{self.component} {self.name} to start")
        except BaseException:
            with contextlib.suppress(Exception):
                self.process.stop()
            raise

    def stop(self, timeout: float = 60) -> None:
        self.process.stop(timeout)

    def log_tail(self, lines: int = 50) -> str:
        return self.process.log_tail(lines)


class DagProcessorAgent(_ComponentAgent):
    """An ``airflow-remote-agent dag-processor`` process parsing ``bundles`` (a
    ``dag_bundle_config_list`` JSON) for the orchestrator at ``api_url``."""

    component = "dag-processor"
    ready_line = b"Parsing bundles"

    def __init__(
        self,
        api_url: str,
        home: Path,
        token: str,
        name: str,
        bundles: str,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(api_url, home, token, name, ["--dag-bundle-config-list", bundles], extra_env)


class TriggererAgent(_ComponentAgent):
    """An ``airflow-remote-agent triggerer`` process running the triggers of ``queues``."""

    component = "triggerer"
    ready_line = b"Running up to"

    def __init__(
        self,
        api_url: str,
        home: Path,
        token: str,
        name: str,
        queues: Sequence[str] = ("default",),
        capacity: int = 1000,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        args = ["--queues", ",".join(queues), "--capacity", str(capacity)]
        super().__init__(api_url, home, token, name, args, extra_env)


class SentinelAgent(_ComponentAgent):
    """An ``airflow-remote-agent sentinel`` process probing ``watch`` (name -> /healthz URL)."""

    component = "sentinel"
    ready_line = b"Watching "

    def __init__(
        self,
        api_url: str,
        home: Path,
        token: str,
        name: str,
        watch: Mapping[str, str],
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        args = [arg for item, url in watch.items() for arg in ("--watch", f"{item}={url}")]
        super().__init__(api_url, home, token, name, args, extra_env)
