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


# Plain ALTER TABLE, not batch mode: recreating remote_token on SQLite would break remote_agent's
# foreign key to it (SQLite has had DROP COLUMN since 3.35).


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("components", sa.String(200), nullable=False, server_default="worker"))


def downgrade() -> None:
    for table in TABLES:
        op.drop_column(table, "components")
