"""The routing service's audit log: entries and signed checkpoints.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create log_entries and log_checkpoints; sealed envelopes only, no clear payloads."""
    op.create_table(
        "log_entries",
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("envelope_id", sa.String(36), nullable=True),
        sa.Column("received_at", _TIME, nullable=False),
        sa.Column("verification", sa.String(80), nullable=False),
        sa.Column("prev_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("idx", name="pk_log_entries"),
    )
    op.create_index("ix_log_entries_envelope_id", "log_entries", ["envelope_id"])
    op.create_table(
        "log_checkpoints",
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root", sa.LargeBinary(32), nullable=False),
        sa.Column("time", _TIME, nullable=False),
        sa.Column("key_name", sa.String(160), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("size", name="pk_log_checkpoints"),
    )


def downgrade() -> None:
    """Drop the audit log tables."""
    op.drop_table("log_checkpoints")
    op.drop_index("ix_log_entries_envelope_id", table_name="log_entries")
    op.drop_table("log_entries")
