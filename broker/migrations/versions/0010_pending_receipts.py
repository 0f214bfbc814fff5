"""Delivery receipts waiting for their recipient's encryption key.

An envelope whose sender has no valid encryption key (revoked, or its window
ended) is applied like any other; its receipt cannot be sealed yet, so it is
recorded in ``pending_receipts`` and sealed and queued once a directory lists
a valid key, instead of failing the batch it arrived in.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision: str | None = "0009"
branch_labels: str | None = None
depends_on: str | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``pending_receipts``."""
    op.create_table(
        "pending_receipts",
        sa.Column("envelope_id", sa.String(36), nullable=False),
        sa.Column("case_ref", sa.String(64), nullable=False),
        sa.Column("recipient", sa.String(63), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("received_at", _TIME, nullable=False),
        sa.Column("applied_at", _TIME, nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("queued_at", _TIME, nullable=True),
        sa.Column("receipt_id", sa.String(36), nullable=True),
        sa.PrimaryKeyConstraint("envelope_id", name="pk_pending_receipts"),
    )
    op.create_index("ix_pending_receipts_queued_at", "pending_receipts", ["queued_at"])


def downgrade() -> None:
    """Drop ``pending_receipts``."""
    op.drop_index("ix_pending_receipts_queued_at", table_name="pending_receipts")
    op.drop_table("pending_receipts")
