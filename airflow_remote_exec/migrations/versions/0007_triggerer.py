"""Triggerer agents: the Airflow triggerer job of an agent's session, and its last applied event batch.

Revision ID: 0007_triggerer
Revises: 0006_remote_bundle
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_triggerer"
down_revision = "0006_remote_bundle"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("remote_agent") as batch:
        batch.add_column(sa.Column("triggerer_job_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("last_event_batch", sa.String(36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("remote_agent") as batch:
        batch.drop_column("last_event_batch")
        batch.drop_column("triggerer_job_id")
