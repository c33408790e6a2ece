"""Sentinel health: the last aggregate health report of a sentinel agent.

Revision ID: 0009_sentinel_health
Revises: 0008_task_logs
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from airflow.utils.sqlalchemy import UtcDateTime
from alembic import op

revision = "0009_sentinel_health"
down_revision = "0008_task_logs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("remote_agent") as batch:
        batch.add_column(sa.Column("health", sa.Text(), nullable=True))
        batch.add_column(sa.Column("health_reported_at", UtcDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("remote_agent") as batch:
        batch.drop_column("health_reported_at")
        batch.drop_column("health")
