"""The routing service's case tracking: case states, anomalies and reminders sent.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create cases, anomalies and reminders; header metadata only, never payload contents."""
    op.create_table(
        "cases",
        sa.Column("case_ref", sa.String(64), nullable=False),
        sa.Column("stage", sa.String(32), nullable=True),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("case_ref", name="pk_cases"),
    )
    op.create_index("ix_cases_stage", "cases", ["stage"])
    op.create_table(
        "anomalies",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("case_ref", sa.String(64), nullable=False),
        sa.Column("envelope_id", sa.String(36), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("recorded_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_anomalies"),
    )
    op.create_index("ix_anomalies_case_ref", "anomalies", ["case_ref"])
    op.create_table(
        "reminders",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("case_ref", sa.String(64), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("owed_by", sa.String(63), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("due", _TIME, nullable=False),
        sa.Column("sent_at", _TIME, nullable=False),
        sa.Column("envelope_id", sa.String(36), nullable=True),
        sa.PrimaryKeyConstraint("key", name="pk_reminders"),
    )
    op.create_index("ix_reminders_case_ref", "reminders", ["case_ref"])


def downgrade() -> None:
    """Drop the case tracking tables."""
    op.drop_index("ix_reminders_case_ref", table_name="reminders")
    op.drop_table("reminders")
    op.drop_index("ix_anomalies_case_ref", table_name="anomalies")
    op.drop_table("anomalies")
    op.drop_index("ix_cases_stage", table_name="cases")
    op.drop_table("cases")
