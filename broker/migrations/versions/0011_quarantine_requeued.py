"""When a quarantined envelope was sent back to the inbox (`trm quarantine requeue`).

``quarantine.requeued_at`` is set once RabbitMQ confirmed the requeue, and
cleared when the envelope is refused again for the same reason.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision: str | None = "0010"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``quarantine.requeued_at``."""
    with op.batch_alter_table("quarantine") as batch:
        batch.add_column(sa.Column("requeued_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drop ``quarantine.requeued_at``."""
    with op.batch_alter_table("quarantine") as batch:
        batch.drop_column("requeued_at")
