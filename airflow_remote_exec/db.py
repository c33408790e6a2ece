"""DB manager so ``airflow db migrate`` creates and upgrades the ``remote_*`` tables."""

from __future__ import annotations

from pathlib import Path

from airflow.utils.db_manager import BaseDBManager

from airflow_remote_exec.models import metadata

PACKAGE_DIR = Path(__file__).parent


class RemoteDBManager(BaseDBManager):
    """Runs this package's own alembic chain, kept apart from Airflow's in ``alembic_version_remote``."""

    metadata = metadata
    version_table_name = "alembic_version_remote"
    migration_dir = (PACKAGE_DIR / "migrations").as_posix()
    alembic_file = (PACKAGE_DIR / "alembic.ini").as_posix()
    supports_table_dropping = True
    revision_heads_map = {"0.1.0": "0010_agent_airflow_version"}
