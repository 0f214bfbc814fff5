"""Where a participant keeps its cases as the case protocol sees them (`CaseView`).

One row per case in ``case_views``, read for a batch of messages at once and
written in the transaction that applies or sends them, so the view never
disagrees with what was applied. A transaction that will write a view reads
it locked (``FOR UPDATE`` on PostgreSQL; SQLite's write lock is taken at
``BEGIN``), so that the inbox applying a receipt and `trm send` adding a
party or halting the case never overwrite each other's change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from broker.casepolicy import CaseView, Consent, Stage
from broker.database import case_views_table, select_in

_c = case_views_table.c
_READ = sa.select(case_views_table).where(_c.case_ref.in_(sa.bindparam("b_ids", expanding=True)))
# Rows locked in one order everywhere, so that two batches never deadlock.
_READ_LOCKED = _READ.order_by(_c.case_ref).with_for_update()
_UPDATE = (
    case_views_table.update()
    .where(_c.case_ref == sa.bindparam("b_case"))
    .values(
        {
            name: sa.bindparam(f"b_{name}")
            for name in (
                "owner",
                "stage",
                "parties",
                "addressees",
                "share_with",
                "purposes",
                "halted_by",
                "updated_at",
            )
        }
    )
)


def _words(text: str | None) -> frozenset[str] | None:
    return None if text is None else frozenset(text.split())


def _text(values: Iterable[str] | None) -> str | None:
    return None if values is None else " ".join(sorted(values))


def _view(row: Any) -> CaseView:
    share_with, purposes = _words(row.share_with), _words(row.purposes)
    consent = None if share_with is None or purposes is None else Consent(share_with, purposes)
    return CaseView(
        case=row.case_ref,
        owner=row.owner,
        stage=None if row.stage is None else Stage(row.stage),
        parties=frozenset(row.parties.split()),
        addressees=_words(row.addressees),
        consent=consent,
        halted_by=row.halted_by,
    )


def _row(view: CaseView, at: datetime) -> dict[str, object]:
    consent = view.consent
    return {
        "owner": view.owner,
        "stage": None if view.stage is None else str(view.stage),
        "parties": _text(view.parties),
        "addressees": _text(view.addressees),
        "share_with": None if consent is None else _text(consent.share_with),
        "purposes": None if consent is None else _text(consent.purposes),
        "halted_by": view.halted_by,
        "updated_at": at,
    }


def read_views(
    conn: Connection, cases: Sequence[str], *, lock: bool = False
) -> dict[str, CaseView]:
    """The stored views of `cases` (those known here), by case reference; with `lock`, held
    until the transaction ends, for a caller that will write them."""
    statement, wanted = (_READ_LOCKED, sorted(set(cases))) if lock else (_READ, list(cases))
    return {row.case_ref: _view(row) for row in select_in(conn, statement, wanted)}


def read_view(conn: Connection, case: str, *, lock: bool = False) -> CaseView | None:
    """The stored view of one case, or None if it is not known here (`lock` as `read_views`)."""
    return read_views(conn, [case], lock=lock).get(case)


def write_views(
    conn: Connection, views: Mapping[str, CaseView], known: Iterable[str], at: datetime
) -> None:
    """Store `views`: update the cases in `known` (read before), insert the others."""
    stored = set(known)
    updates = [
        {f"b_{k}": v for k, v in _row(view, at).items()} | {"b_case": case}
        for case, view in views.items()
        if case in stored
    ]
    inserts = [
        _row(view, at) | {"case_ref": case} for case, view in views.items() if case not in stored
    ]
    if updates:
        conn.execute(_UPDATE, updates)
    if inserts:
        conn.execute(case_views_table.insert(), inserts)
