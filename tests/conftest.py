"""Shared fixtures: one throwaway PostgreSQL per session, one fresh database per Airflow orchestrator."""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dev.stack import Orchestrator, Postgres  # noqa: E402

OrchestratorFactory = Callable[..., Orchestrator]


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
) -> Orchestrator:
    """Create, migrate and start an Orchestrator whose AIRFLOW_HOME is ``tmp_path``; stop it if that fails."""
    orch = Orchestrator(
        home=tmp_path, db_url=db_url, dags_folder=dags_folder, executor=executor, extra_env=extra_env
    )
    orch.migrate()
    orch.start()  # stops whatever it started before re-raising
    return orch


@pytest.fixture
def orchestrator_factory(postgres: Postgres, tmp_path: Path) -> Iterator[OrchestratorFactory]:
    """``factory(executor, dags_folder, extra_env=None)`` -> a started Orchestrator on its own database.

    Every orchestrator gets a freshly created database on the shared server, so tests are independent;
    all of them are stopped (and checked for leftover processes) at teardown.
    """
    started: list[Orchestrator] = []

    def factory(executor: str, dags_folder: Path, extra_env: Mapping[str, str] | None = None) -> Orchestrator:
        db_url = postgres.create_database(f"airflow_{uuid.uuid4().hex[:12]}")
        orch = make_orchestrator(
            tmp_path / f"airflow{len(started)}", db_url, executor, dags_folder, extra_env
        )
        started.append(orch)
        return orch

    yield factory
    for orch in reversed(started):
        orch.stop()
