"""Components: which parts of an agent (worker, dag-processor, triggerer, sentinel) a token allows, and
which ones each agent runs. Existing tokens and agents are workers, which is all they could be.

Revision ID: 0005_components
Revises: 0004_job_agent_state_index
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_components"
down_revision = "0004_job_agent_state_index"
branch_labels = None
depends_on = None

TABLES = ("remote_token", "remote_agent")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("components", sa.String(200), nullable=False, server_default="worker"))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("components")
