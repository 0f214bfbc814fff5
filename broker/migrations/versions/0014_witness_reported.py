"""When a witness reported a conflict it keeps to the auditors.

``witness_conflicts.reported_at`` is set once RabbitMQ confirmed the fork
report to every auditor of the directory; a conflict without it is reported
again on the witness's next request or reconnection.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision: str | None = "0013"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``witness_conflicts.reported_at``."""
    with op.batch_alter_table("witness_conflicts") as batch:
        batch.add_column(sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drop ``witness_conflicts.reported_at``."""
    with op.batch_alter_table("witness_conflicts") as batch:
        batch.drop_column("reported_at")
