"""Alembic environment for the ``remote_*`` tables; run by ``RemoteDBManager``."""

from __future__ import annotations

import contextlib
from logging import getLogger
from logging.config import fileConfig

from airflow import settings
from alembic import context

from airflow_remote_exec.db import RemoteDBManager

config = context.config
target_metadata = RemoteDBManager.metadata
version_table = RemoteDBManager.version_table_name

if not getLogger().handlers and config.config_file_name:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def include_object(_, name, type_, *args):
    return not (type_ == "table" and name not in target_metadata.tables)


def run_migrations_offline():
    context.configure(
        url=settings.SQL_ALCHEMY_CONN,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        version_table=version_table,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    with contextlib.ExitStack() as stack:
        connection = config.attributes.get("connection", None)
        if not connection:
            connection = stack.enter_context(settings.engine.connect())
        context.configure(
            connection=connection,
            transaction_per_migration=True,
            target_metadata=target_metadata,
            include_object=include_object,
            render_as_batch=True,
            version_table=version_table,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
