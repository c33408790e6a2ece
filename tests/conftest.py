"""Shared fixtures: one throwaway PostgreSQL per session, one fresh database per Airflow orchestrator."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Unit and API tests use Airflow in-process against a throwaway SQLite DB. This must be set before
# anything imports airflow; processes started by dev.stack get their own, clean environment.
_UNIT_HOME = Path(tempfile.mkdtemp(prefix="airflow-remote-exec-unit-"))
for _name in [n for n in os.environ if n.startswith("AIRFLOW")]:
    del os.environ[_name]
os.environ.update(
    {
        "AIRFLOW_HOME": str(_UNIT_HOME),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_UNIT_HOME / 'airflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "airflow_remote_exec.executor.RemoteExecutor",
        "AIRFLOW__API_AUTH__JWT_SECRET": "unit-test-secret-" + "x" * 64,
        "AIRFLOW__CORE__FERNET_KEY": "dW5pdC10ZXN0LWZlcm5ldC1rZXktMzItYnl0ZXMhISE=",  # 32 bytes, base64
        "AIRFLOW__REMOTE_EXEC__WAKEUP_POLL_INTERVAL": "0.05",
    }
)

from dev.stack import DEFAULT_COMPONENTS, Orchestrator, Postgres  # noqa: E402
from tests.versions import not_collected  # noqa: E402

collect_ignore = not_collected()


@pytest.fixture(scope="session")
def airflow_db() -> Iterator[None]:
    """Airflow's full schema (with the remote_* tables) in the unit-test SQLite DB, built once."""
    from airflow.utils.db import initdb

    initdb()
    yield
    shutil.rmtree(_UNIT_HOME, ignore_errors=True)


@pytest.fixture
def session(airflow_db):
    """A session on the unit-test DB; the remote_* tables are emptied after each test."""
    from airflow.utils.session import create_session

    from airflow_remote_exec.models import (
        RemoteAgent,
        RemoteAgentEvent,
        RemoteApiServer,
        RemoteBundle,
        RemoteJob,
        RemoteLogChunk,
        RemoteLogStream,
        RemoteToken,
    )

    with create_session(scoped=False) as session:
        yield session
        session.rollback()
        for model in (
            RemoteLogChunk,
            RemoteLogStream,
            RemoteJob,
            RemoteAgentEvent,
            RemoteApiServer,
            RemoteBundle,
            RemoteAgent,
            RemoteToken,
        ):
            session.query(model).delete()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL 15 server for the whole session.

    It lives under /tmp rather than pytest's tmp dir because the server runs as user ``postgres``, which
    cannot traverse pytest's 0700 ``/tmp/pytest-of-root`` directory.
    """
    workdir = Path(tempfile.mkdtemp(prefix="airflow-remote-exec-pg-"))
    workdir.chmod(0o755)
    pg = Postgres(workdir)
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def make_orchestrator(
    tmp_path: Path,
    db_url: str,
    executor: str,
    dags_folder: Path,
    extra_env: Mapping[str, str] | None = None,
    components: Sequence[str] = DEFAULT_COMPONENTS,
) -> Orchestrator:
    """Create, migrate and start an Orchestrator whose AIRFLOW_HOME is ``tmp_path``; stop it if that fails."""
    orch = Orchestrator(
        home=tmp_path,
        db_url=db_url,
        dags_folder=dags_folder,
        executor=executor,
        extra_env=extra_env,
        components=components,
    )
    orch.migrate()
    orch.start()  # stops whatever it started before re-raising
    return orch
