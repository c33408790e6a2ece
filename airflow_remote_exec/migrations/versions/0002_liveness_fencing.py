"""Agent events, api-server presence, operator drain, reroute fencing and a purge index.

Revision ID: 0002_liveness_fencing
Revises: 0001_remote_tables
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from airflow.utils.sqlalchemy import UtcDateTime
from alembic import op

revision = "0002_liveness_fencing"
down_revision = "0001_remote_tables"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "remote_agent_event",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), autoincrement=True),
        sa.Column("agent_name", sa.String(250), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("at", UtcDateTime, nullable=False),
        sa.Column("reason", sa.String(1000), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("remote_agent_event_pkey")),
    )
    op.create_index("idx_remote_agent_event_agent", "remote_agent_event", ["agent_name", "at"])
    op.create_table(
        "remote_api_server",
        sa.Column("name", sa.String(250), nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=False),
        sa.Column("last_seen_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("remote_api_server_pkey")),
    )
    with op.batch_alter_table("remote_agent") as batch:
        batch.add_column(sa.Column("drain_requested", sa.Boolean, nullable=False, server_default=sa.false()))
    with op.batch_alter_table("remote_job") as batch:
        batch.add_column(sa.Column("fenced_until", UtcDateTime, nullable=True))
        batch.add_column(sa.Column("not_before", UtcDateTime, nullable=True))
    op.create_index("idx_remote_job_finished", "remote_job", ["finished_at"])


def downgrade() -> None:
    op.drop_index("idx_remote_job_finished", table_name="remote_job")
    with op.batch_alter_table("remote_job") as batch:
        batch.drop_column("not_before")
        batch.drop_column("fenced_until")
    with op.batch_alter_table("remote_agent") as batch:
        batch.drop_column("drain_requested")
    op.drop_table("remote_api_server")
    op.drop_table("remote_agent_event")
