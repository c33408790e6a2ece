"""The Airflow version each agent session registered with, so a session opened before the orchestrator
moved to another Airflow minor is ended at its next request.

Revision ID: 0010_agent_airflow_version
Revises: 0009_sentinel_health
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_agent_airflow_version"
down_revision = "0009_sentinel_health"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("remote_agent") as batch:
        batch.add_column(sa.Column("airflow_version", sa.String(50), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("remote_agent") as batch:
        batch.drop_column("airflow_version")
