"""Each log entry's body digest, so that checking for a redelivery never reads a body back.

The routing service told a redelivery from another envelope under the same
id by comparing bodies, reading every earlier body logged under that id on
every batch. From here each entry keeps the SHA-256 of its body, indexed,
and (envelope_id, verification) is indexed so that the verified entry of an
id is found among any number of refused ones.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None

_ENTRIES = sa.table(
    "log_entries",
    sa.column("idx", sa.BigInteger()),
    sa.column("body", sa.LargeBinary()),
    sa.column("body_sha256", sa.LargeBinary()),
)
_PAGE = 500


def upgrade() -> None:
    """Add ``body_sha256``, fill it for every entry logged, then require it and index it."""
    op.add_column("log_entries", sa.Column("body_sha256", sa.LargeBinary(32), nullable=True))
    conn = op.get_bind()
    after = -1
    while True:
        query = sa.select(_ENTRIES.c.idx, _ENTRIES.c.body).where(_ENTRIES.c.idx > after)
        page = conn.execute(query.order_by(_ENTRIES.c.idx).limit(_PAGE)).all()
        if not page:
            break
        for idx, body in page:
            digest = hashlib.sha256(bytes(body)).digest()
            conn.execute(_ENTRIES.update().where(_ENTRIES.c.idx == idx).values(body_sha256=digest))
        after = page[-1][0]
    with op.batch_alter_table("log_entries") as batch:
        batch.alter_column("body_sha256", existing_type=sa.LargeBinary(32), nullable=False)
        batch.drop_index("ix_log_entries_envelope_id")
        batch.create_index(
            "ix_log_entries_envelope_id_verification", ["envelope_id", "verification"]
        )
        batch.create_index("ix_log_entries_body_sha256", ["body_sha256"])


def downgrade() -> None:
    """Drop ``body_sha256`` and its index; index the envelope id alone again."""
    with op.batch_alter_table("log_entries") as batch:
        batch.drop_index("ix_log_entries_body_sha256")
        batch.drop_index("ix_log_entries_envelope_id_verification")
        batch.create_index("ix_log_entries_envelope_id", ["envelope_id"])
        batch.drop_column("body_sha256")
