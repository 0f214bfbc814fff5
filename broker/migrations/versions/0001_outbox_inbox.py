"""The adapter's tables: outbox, per-case sequence numbers, inbox, quarantine, receipts.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the adapter's tables; only metadata and sealed bodies, no clear payloads."""
    op.create_table(
        "outbox",
        sa.Column("envelope_id", sa.String(36), nullable=False),
        sa.Column("case_ref", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("recipients", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("sent_at", _TIME, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("envelope_id", name="pk_outbox"),
    )
    op.create_index("ix_outbox_sent_at_created_at", "outbox", ["sent_at", "created_at"])
    op.create_table(
        "case_sequence",
        sa.Column("sender", sa.String(63), nullable=False),
        sa.Column("case_ref", sa.String(64), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("sender", "case_ref", name="pk_case_sequence"),
    )
    op.create_table(
        "inbox",
        sa.Column("envelope_id", sa.String(36), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("sender", sa.String(63), nullable=False),
        sa.Column("case_ref", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("received_at", _TIME, nullable=False),
        sa.Column("applied_at", _TIME, nullable=False),
        sa.Column("redeliveries", sa.Integer(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("envelope_id", name="pk_inbox"),
    )
    op.create_table(
        "quarantine",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("envelope_id", sa.String(36), nullable=True),
        sa.Column("sender", sa.String(63), nullable=True),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("received_at", _TIME, nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("redeliveries", sa.Integer(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("id", name="pk_quarantine"),
    )
    op.create_index("ix_quarantine_envelope_id", "quarantine", ["envelope_id"])
    op.create_table(
        "receipts",
        sa.Column("envelope_id", sa.String(36), nullable=False),
        sa.Column("recipient", sa.String(63), nullable=False),
        sa.Column("receipt_envelope_id", sa.String(36), nullable=False),
        sa.Column("received_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("envelope_id", "recipient", name="pk_receipts"),
    )


def downgrade() -> None:
    """Drop the adapter's tables."""
    op.drop_table("receipts")
    op.drop_index("ix_quarantine_envelope_id", table_name="quarantine")
    op.drop_table("quarantine")
    op.drop_table("inbox")
    op.drop_table("case_sequence")
    op.drop_index("ix_outbox_sent_at_created_at", table_name="outbox")
    op.drop_table("outbox")
