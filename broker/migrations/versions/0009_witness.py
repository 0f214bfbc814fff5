"""Witnesses: the checkpoint each one last cosigned, its fork evidence, and cosignatures.

On a witness's database, ``witness_checkpoints`` holds, per log origin, the
newest checkpoint the witness cosigned (never moved backwards), and
``witness_conflicts`` every validly signed checkpoint it refused because it
contradicts that one, beside it, as evidence. On the routing service's
database, ``log_cosignatures`` holds each cosignature a witness returned
(the line is also appended to the checkpoint's note).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``witness_checkpoints``, ``witness_conflicts`` and ``log_cosignatures``."""
    op.create_table(
        "witness_checkpoints",
        sa.Column("origin", sa.String(200), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("root", sa.LargeBinary(32), nullable=False),
        sa.Column("time", _TIME, nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("cosigned_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("origin", name="pk_witness_checkpoints"),
    )
    op.create_table(
        "witness_conflicts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("origin", sa.String(200), nullable=False),
        sa.Column("detected_at", _TIME, nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("cosigned_note", sa.Text(), nullable=False),
        sa.Column("offered_note", sa.Text(), nullable=False),
        sa.Column("offered_sha256", sa.LargeBinary(32), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_witness_conflicts"),
        sa.UniqueConstraint(
            "origin", "offered_sha256", name="uq_witness_conflicts_origin_offered_sha256"
        ),
    )
    op.create_table(
        "log_cosignatures",
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("witness", sa.String(63), nullable=False),
        sa.Column("cosigned_at", _TIME, nullable=False),
        sa.Column("line", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("size", "witness", name="pk_log_cosignatures"),
    )


def downgrade() -> None:
    """Drop the three tables."""
    op.drop_table("log_cosignatures")
    op.drop_table("witness_conflicts")
    op.drop_table("witness_checkpoints")
