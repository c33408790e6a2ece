"""Callback jobs, idempotent claims, the queuing scheduler, and the agent's process id.

Revision ID: 0003_callbacks_claim_ids
Revises: 0002_liveness_fencing
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_callbacks_claim_ids"
down_revision = "0002_liveness_fencing"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("remote_job") as batch:
        batch.add_column(sa.Column("kind", sa.String(20), nullable=False, server_default="task"))
        batch.add_column(sa.Column("claim_request_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("queued_by_job_id", sa.Integer, nullable=True))
    with op.batch_alter_table("remote_agent") as batch:
        batch.add_column(sa.Column("pid", sa.Integer, nullable=False, server_default="0"))
    op.create_index("idx_remote_agent_event_at", "remote_agent_event", ["at"])


def downgrade() -> None:
    op.drop_index("idx_remote_agent_event_at", table_name="remote_agent_event")
    with op.batch_alter_table("remote_agent") as batch:
        batch.drop_column("pid")
    with op.batch_alter_table("remote_job") as batch:
        batch.drop_column("queued_by_job_id")
        batch.drop_column("claim_request_id")
        batch.drop_column("kind")
