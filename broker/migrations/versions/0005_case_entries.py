"""Each case's entries in rows of their own, so that storing a case costs the same at any length.

The ``cases.state`` JSON kept every entry of its case, so each write of a case
rewrote all of them. From here the row keeps `CaseState.summary_dict` and
``case_entries`` one row per entry, appended as the case grows.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

_CASES = sa.table("cases", sa.column("case_ref", sa.String()), sa.column("state", sa.JSON()))
_ENTRIES = sa.table(
    "case_entries",
    sa.column("case_ref", sa.String()),
    sa.column("position", sa.Integer()),
    sa.column("entry", sa.JSON()),
)
_PAGE = 500


def upgrade() -> None:
    """Create ``case_entries`` and move every stored state's entries into it."""
    op.create_table(
        "case_entries",
        sa.Column("case_ref", sa.String(64), nullable=False),
        sa.Column("position", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("entry", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("case_ref", "position", name="pk_case_entries"),
    )
    conn = op.get_bind()
    for ref, state in _states(conn):
        if not isinstance(state, dict) or not isinstance(state.get("entries"), list):
            continue  # not a state trm wrote: reading it says to rebuild it with the replay
        entries = enumerate(state["entries"])
        rows = [{"case_ref": ref, "position": i, "entry": e} for i, e in entries]
        if rows:
            conn.execute(_ENTRIES.insert(), rows)
        summary = {k: v for k, v in state.items() if k != "entries"}
        conn.execute(_CASES.update().where(_CASES.c.case_ref == ref).values(state=summary))


def downgrade() -> None:
    """Put every case's entries back into its state and drop ``case_entries``."""
    conn = op.get_bind()
    for ref, state in _states(conn):
        if not isinstance(state, dict):
            continue
        query = sa.select(_ENTRIES.c.entry).where(_ENTRIES.c.case_ref == ref)
        entries = conn.execute(query.order_by(_ENTRIES.c.position)).scalars().all()
        state = {**state, "entries": list(entries)}
        conn.execute(_CASES.update().where(_CASES.c.case_ref == ref).values(state=state))
    op.drop_table("case_entries")


def _states(conn: sa.Connection) -> Iterator[tuple[str, Any]]:
    """Every case's reference and stored state, read a page at a time (each page whole)."""
    after = ""
    while True:
        query = sa.select(_CASES.c.case_ref, _CASES.c.state).where(_CASES.c.case_ref > after)
        page = conn.execute(query.order_by(_CASES.c.case_ref).limit(_PAGE)).all()
        if not page:
            return
        yield from [(ref, state) for ref, state in page]
        after = page[-1][0]
