"""A version number per stored case, so the routing service can keep states in memory.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``cases.version``, 0 for the cases stored before it."""
    with op.batch_alter_table("cases") as batch:
        batch.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    """Drop ``cases.version``."""
    with op.batch_alter_table("cases") as batch:
        batch.drop_column("version")
