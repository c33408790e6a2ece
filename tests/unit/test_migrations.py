"""The alembic chain must build exactly the schema the models declare."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, event, inspect, text

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


def test_downgrade_and_upgrade_again_keep_tokens_and_agents_on_sqlite_with_foreign_keys(
    tmp_path, monkeypatch
):
    """As Airflow's own SQLite engine does, foreign keys are enforced: a migration that recreated a
    table other rows point to would fail half-way."""
    from airflow import settings
    from alembic import command

    engine = create_engine(f"sqlite:///{tmp_path / 'migrated.db'}")
    event.listen(engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA foreign_keys=ON"))
    monkeypatch.setattr(settings, "engine", engine)
    monkeypatch.setattr(settings, "SQL_ALCHEMY_CONN", str(engine.url))

    def migrate(step, revision: str) -> None:
        with engine.begin() as connection:
            config = RemoteDBManager(session=None).get_alembic_config()
            config.attributes["connection"] = connection
            step(config, revision)

    migrate(command.upgrade, "0004_job_agent_state_index")
    with engine.begin() as connection:
        day = "2026-01-01"
        connection.execute(text(
            "INSERT INTO remote_token (id, name, token_hash, queues, created_at)"
            f" VALUES (1, 't', 'h', 'default', '{day}')"
        ))  # fmt: skip
        connection.execute(text(
            "INSERT INTO remote_agent (name, session_id, token_id, hostname, pid, version, queues, slots,"
            " state, registered_at, last_heartbeat_at, state_changed_at, drain_requested)"
            f" VALUES ('a', 's', 1, '', 0, '', 'default', 1, 'active', '{day}', '{day}', '{day}', 0)"
        ))  # fmt: skip
    migrate(command.upgrade, "heads")
    migrate(command.downgrade, "0004_job_agent_state_index")
    migrate(command.upgrade, "heads")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT components FROM remote_agent")).scalar() == "worker"
        assert connection.execute(text("SELECT components FROM remote_token")).scalar() == "worker"
