"""Case summaries without their pending receipts: the entries say which are owed.

``cases.state`` kept every envelope still owed a delivery receipt, a map
that grows while recipients send none and was rewritten with each write of
its case. From here (`STATE_FORMAT` 2) the receipts owed are worked out from
the case's entries, which ``case_entries`` already keeps; downgrading works
them out again the same way and writes them back into each summary.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision: str | None = "0012"
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
_RECEIPT = "delivery_receipt"
_NOT_REFUSING = (None, "sequence_gap")
"""The anomaly reasons of a receipt that still settles what it answers."""


def upgrade() -> None:
    """Drop ``pending_receipts`` from every format-1 summary and mark it format 2."""
    conn = op.get_bind()
    for ref, state in _states(conn):
        if not isinstance(state, dict) or state.get("format") != 1:
            continue  # not a summary trm wrote: reading it says to rebuild it with the replay
        summary = {k: v for k, v in state.items() if k != "pending_receipts"}
        _write(conn, ref, {**summary, "format": 2})


def downgrade() -> None:
    """Write each format-2 summary's pending receipts back, worked out from its entries."""
    conn = op.get_bind()
    for ref, state in _states(conn):
        if not isinstance(state, dict) or state.get("format") != 2:
            continue
        query = sa.select(_ENTRIES.c.entry).where(_ENTRIES.c.case_ref == ref)
        entries = conn.execute(query.order_by(_ENTRIES.c.position)).scalars().all()
        _write(conn, ref, {**state, "format": 1, "pending_receipts": _pending(entries)})


def _pending(entries: Sequence[Any]) -> dict[str, list[str]]:
    """Envelope id -> recipients owing a receipt after `entries`, as format 1 stored it."""
    pending: dict[str, set[str]] = {}
    for entry in entries:
        event, anomaly = entry["event"], entry["anomaly"]
        if event["kind"] != _RECEIPT:
            pending[event["envelope_id"]] = set(event["recipients"])
            continue
        reason = None if anomaly is None else anomaly["reason"]
        answered = event["reply_to"]
        if reason in _NOT_REFUSING and answered is not None:
            left = pending.get(answered, set()) - {event["sender"]}
            if left:
                pending[answered] = left
            else:
                pending.pop(answered, None)
    return {k: sorted(v) for k, v in sorted(pending.items())}


def _write(conn: sa.Connection, ref: str, state: dict[str, Any]) -> None:
    conn.execute(_CASES.update().where(_CASES.c.case_ref == ref).values(state=state))


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
