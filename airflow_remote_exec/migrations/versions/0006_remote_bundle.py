"""Bundles parsed by agent dag processors, each owned by one token.

Revision ID: 0006_remote_bundle
Revises: 0005_components
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from airflow.utils.sqlalchemy import UtcDateTime
from alembic import op

revision = "0006_remote_bundle"
down_revision = "0005_components"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "remote_bundle",
        sa.Column("name", sa.String(250), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("agent_name", sa.String(250), nullable=False),
        sa.Column("claimed_at", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["token_id"], ["remote_token.id"], name=op.f("remote_bundle_token_id_fkey")),
        sa.PrimaryKeyConstraint("name", name=op.f("remote_bundle_pkey")),
    )


def downgrade() -> None:
    op.drop_table("remote_bundle")
