"""Indexes for claims and heartbeats that cost the same however many jobs are queued or retained.

Every heartbeat and claim looks up the jobs an agent holds. With an index on the agent name alone,
that look-up read every row the agent ever finished that is still retained. A claim sorted every
queued job of its queues to find the first few; the claim index is now in the claim's own order.

Revision ID: 0004_job_agent_state_index
Revises: 0003_callbacks_claim_ids
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_job_agent_state_index"
down_revision = "0003_callbacks_claim_ids"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("idx_remote_job_agent", table_name="remote_job")
    op.create_index("idx_remote_job_agent", "remote_job", ["agent_name", "state"])
    op.drop_index("idx_remote_job_claim", table_name="remote_job")
    op.create_index(
        "idx_remote_job_claim", "remote_job", ["state", "queue", sa.text("priority_weight DESC"), "id"]
    )


def downgrade() -> None:
    op.drop_index("idx_remote_job_claim", table_name="remote_job")
    op.create_index("idx_remote_job_claim", "remote_job", ["state", "queue", "priority_weight"])
    op.drop_index("idx_remote_job_agent", table_name="remote_job")
    op.create_index("idx_remote_job_agent", "remote_job", ["agent_name"])
