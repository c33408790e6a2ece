"""Create the remote_token, remote_agent and remote_job tables.

Revision ID: 0001_remote_tables
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from airflow.utils.sqlalchemy import UtcDateTime
from alembic import op

revision = "0001_remote_tables"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "remote_token",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(250), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("queues", sa.String(2000), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("expires_at", UtcDateTime, nullable=True),
        sa.Column("revoked_at", UtcDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("remote_token_pkey")),
        sa.UniqueConstraint("name", name=op.f("remote_token_name_uq")),
        sa.UniqueConstraint("token_hash", name=op.f("remote_token_token_hash_uq")),
    )
    op.create_table(
        "remote_agent",
        sa.Column("name", sa.String(250), nullable=False),
        sa.Column("session_id", sa.String(36), nullable=False),
        sa.Column("token_id", sa.Integer, nullable=False),
        sa.Column("hostname", sa.String(250), nullable=False),
        sa.Column("version", sa.String(50), nullable=False),
        sa.Column("queues", sa.String(2000), nullable=False),
        sa.Column("slots", sa.Integer, nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("registered_at", UtcDateTime, nullable=False),
        sa.Column("last_heartbeat_at", UtcDateTime, nullable=False),
        sa.Column("state_changed_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("remote_agent_pkey")),
        sa.UniqueConstraint("session_id", name=op.f("remote_agent_session_id_uq")),
        sa.ForeignKeyConstraint(["token_id"], ["remote_token.id"], name=op.f("remote_agent_token_id_fkey")),
    )
    op.create_table(
        "remote_job",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), autoincrement=True),
        sa.Column("ti_id", sa.String(36), nullable=False),
        sa.Column("dag_id", sa.String(250), nullable=False),
        sa.Column("task_id", sa.String(250), nullable=False),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("map_index", sa.Integer, nullable=False),
        sa.Column("try_number", sa.Integer, nullable=False),
        sa.Column("queue", sa.String(256), nullable=False),
        sa.Column("priority_weight", sa.Integer, nullable=False),
        sa.Column("pool_slots", sa.Integer, nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("workload", sa.Text, nullable=False),
        sa.Column("agent_name", sa.String(250), nullable=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("detail", sa.String(1000), nullable=True),
        sa.Column("pending_sync", sa.Boolean, nullable=False),
        sa.Column("queued_at", UtcDateTime, nullable=False),
        sa.Column("claimed_at", UtcDateTime, nullable=True),
        sa.Column("started_at", UtcDateTime, nullable=True),
        sa.Column("finished_at", UtcDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("remote_job_pkey")),
        sa.UniqueConstraint(
            "dag_id", "task_id", "run_id", "map_index", "try_number", name="remote_job_ti_key"
        ),
    )
    op.create_index("idx_remote_job_claim", "remote_job", ["state", "queue", "priority_weight"])
    op.create_index("idx_remote_job_sync", "remote_job", ["pending_sync"])
    op.create_index("idx_remote_job_agent", "remote_job", ["agent_name"])


def downgrade() -> None:
    op.drop_table("remote_job")
    op.drop_table("remote_agent")
    op.drop_table("remote_token")
