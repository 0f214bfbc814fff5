"""The envelope each outbox row answers, so that a receipt can be sent again.

``outbox.reply_to`` (indexed) lets the inbox find the receipt it sent for
an envelope that arrives again and publish it once more: the sender
resends when our receipt did not reach it. Rows written before this
revision have none.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision: str | None = "0011"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``outbox.reply_to`` and its index."""
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("reply_to", sa.String(36), nullable=True))
        batch.create_index("ix_outbox_reply_to", ["reply_to"])


def downgrade() -> None:
    """Drop ``outbox.reply_to``."""
    with op.batch_alter_table("outbox") as batch:
        batch.drop_index("ix_outbox_reply_to")
        batch.drop_column("reply_to")
