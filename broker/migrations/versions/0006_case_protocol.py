"""What each participant knows of its cases, and the erasures consent withdrawals asked for.

``case_views`` keeps, per case, what the case protocol needs to judge the
next message (owner, stage, parties, the opening request's addressees and
consent scope, the withdrawal that halted it); ``erasures`` the payload
erasures still to do or done, each with the withdrawal that asked for it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``case_views`` and ``erasures``."""
    op.create_table(
        "case_views",
        sa.Column("case_ref", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(63), nullable=False),
        sa.Column("stage", sa.String(40), nullable=True),
        sa.Column("parties", sa.Text(), nullable=False),
        sa.Column("addressees", sa.Text(), nullable=True),
        sa.Column("share_with", sa.Text(), nullable=True),
        sa.Column("purposes", sa.Text(), nullable=True),
        sa.Column("halted_by", sa.String(36), nullable=True),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("case_ref", name="pk_case_views"),
    )
    op.create_table(
        "erasures",
        sa.Column("withdrawal_id", sa.String(36), nullable=False),
        sa.Column("case_ref", sa.String(64), nullable=False),
        sa.Column("confirm_to", sa.String(63), nullable=True),
        sa.Column("requested_at", _TIME, nullable=False),
        sa.Column("erased_at", _TIME, nullable=True),
        sa.Column("erased_payloads", sa.Integer(), nullable=True),
        sa.Column("confirmation_id", sa.String(36), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("withdrawal_id", name="pk_erasures"),
    )
    op.create_index("ix_erasures_case_ref", "erasures", ["case_ref"])


def downgrade() -> None:
    """Drop both tables."""
    op.drop_index("ix_erasures_case_ref", table_name="erasures")
    op.drop_table("erasures")
    op.drop_table("case_views")
