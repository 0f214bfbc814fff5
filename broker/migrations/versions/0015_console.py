"""The participant console's tables: accounts, sessions, login failures, tokens, trail, feed.

Only hashes, ids, kinds, case references and times (`console.tables`).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision: str | None = "0014"
branch_labels: str | None = None
depends_on: str | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the console's tables."""
    op.create_table(
        "console_users",
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("language", sa.String(2), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("disabled_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("username", name="pk_console_users"),
    )
    op.create_table(
        "console_sessions",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("last_seen_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name="pk_console_sessions"),
    )
    op.create_index("ix_console_sessions_username", "console_sessions", ["username"])
    op.create_table(
        "console_login_failures",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("client", sa.String(63), nullable=False),
        sa.Column("at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_console_login_failures"),
    )
    op.create_index(
        "ix_console_login_failures_username_at", "console_login_failures", ["username", "at"]
    )
    op.create_index(
        "ix_console_login_failures_client_at", "console_login_failures", ["client", "at"]
    )
    op.create_table(
        "console_tokens",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("revoked_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_console_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_console_tokens_token_hash"),
    )
    op.create_table(
        "console_trail",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("actor", sa.String(72), nullable=False),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("envelope_id", sa.String(36), nullable=True),
        sa.Column("case_ref", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_console_trail"),
    )
    op.create_index("ix_console_trail_at", "console_trail", ["at"])
    op.create_table(
        "console_feed",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("ref", sa.String(36), nullable=False),
        sa.Column("party", sa.String(63), nullable=False),
        sa.Column("envelope_id", sa.String(36), nullable=True),
        sa.Column("case_ref", sa.String(64), nullable=True),
        sa.Column("kind", sa.String(40), nullable=True),
        sa.Column("at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_console_feed"),
        sa.UniqueConstraint("event", "ref", "party", name="uq_console_feed_event_ref_party"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "console_reads",
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("envelope_id", sa.String(36), nullable=False),
        sa.Column("read_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("username", "envelope_id", name="pk_console_reads"),
    )


def downgrade() -> None:
    """Drop the console's tables."""
    for table in (
        "console_reads",
        "console_feed",
        "console_trail",
        "console_tokens",
        "console_login_failures",
        "console_sessions",
        "console_users",
    ):
        op.drop_table(table)
