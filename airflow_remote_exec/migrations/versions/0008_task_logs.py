"""Task logs shipped by agents: one stream per job attempt, stored in chunks.

Revision ID: 0008_task_logs
Revises: 0007_triggerer
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from airflow.utils.sqlalchemy import UtcDateTime
from alembic import op
from sqlalchemy.dialects.mysql import LONGBLOB

revision = "0008_task_logs"
down_revision = "0007_triggerer"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "remote_log_stream",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("job_id", _ID, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("ti_id", sa.String(36), nullable=False),
        sa.Column("dag_id", sa.String(250), nullable=False),
        sa.Column("task_id", sa.String(250), nullable=False),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("map_index", sa.Integer(), nullable=False),
        sa.Column("try_number", sa.Integer(), nullable=False),
        sa.Column("agent_name", sa.String(250), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("last_written_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("remote_log_stream_pkey")),
    )
    op.create_index(
        "idx_remote_log_stream_try",
        "remote_log_stream",
        ["dag_id", "run_id", "task_id", "map_index", "try_number"],
    )
    op.create_index("idx_remote_log_stream_job", "remote_log_stream", ["job_id", "attempt"])
    op.create_index("idx_remote_log_stream_written", "remote_log_stream", ["last_written_at"])
    op.create_table(
        "remote_log_chunk",
        sa.Column("stream_id", _ID, nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary().with_variant(LONGBLOB(), "mysql"), nullable=False),
        sa.ForeignKeyConstraint(
            ["stream_id"],
            ["remote_log_stream.id"],
            name=op.f("remote_log_chunk_stream_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("stream_id", "offset", name=op.f("remote_log_chunk_pkey")),
    )


def downgrade() -> None:
    op.drop_table("remote_log_chunk")
    op.drop_index("idx_remote_log_stream_written", table_name="remote_log_stream")
    op.drop_index("idx_remote_log_stream_job", table_name="remote_log_stream")
    op.drop_index("idx_remote_log_stream_try", table_name="remote_log_stream")
    op.drop_table("remote_log_stream")
