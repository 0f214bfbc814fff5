"""Reception awareness: the receipts each of our envelopes still waits for.

``awaiting_receipts`` holds one row per envelope the broker confirmed and
recipient whose delivery receipt has not come back: how many times it was
published to that recipient, when it is resent next, and when it was
flagged for giving up.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

_TIME = sa.DateTime(timezone=True)
_INDEX = "ix_awaiting_receipts_flagged_at_next_resend_at"


def upgrade() -> None:
    """Create ``awaiting_receipts``."""
    op.create_table(
        "awaiting_receipts",
        sa.Column("envelope_id", sa.String(36), nullable=False),
        sa.Column("recipient", sa.String(63), nullable=False),
        sa.Column("tries", sa.Integer(), nullable=False),
        sa.Column("next_resend_at", _TIME, nullable=False),
        sa.Column("flagged_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("envelope_id", "recipient", name="pk_awaiting_receipts"),
    )
    op.create_index(_INDEX, "awaiting_receipts", ["flagged_at", "next_resend_at"])


def downgrade() -> None:
    """Drop ``awaiting_receipts``."""
    op.drop_index(_INDEX, table_name="awaiting_receipts")
    op.drop_table("awaiting_receipts")
