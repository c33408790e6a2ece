"""The alembic chain must build exactly the schema the models declare."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from airflow_remote_exec.db import RemoteDBManager
from airflow_remote_exec.models import metadata


def test_migrations_match_models(tmp_path, monkeypatch):
    from airflow import settings
    from alembic import command

    engine = create_engine(f"sqlite:///{tmp_path / 'migrated.db'}")
    monkeypatch.setattr(settings, "engine", engine)
    monkeypatch.setattr(settings, "SQL_ALCHEMY_CONN", str(engine.url))
    with engine.begin() as connection:
        manager = RemoteDBManager(session=None)
        config = manager.get_alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "heads")
    assert {"remote_token", "remote_agent", "remote_job"} <= set(inspect(engine).get_table_names())
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "include_object": _not_version_table}
        )
        assert compare_metadata(context, metadata) == []


def _not_version_table(obj, name, type_, reflected, compare_to) -> bool:
    return not (type_ == "table" and name.startswith("alembic_version"))
