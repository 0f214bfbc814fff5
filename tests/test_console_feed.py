"""The console's feed and read model on SQLite and PostgreSQL: a cursor never skips a row
the adapter commits late, receipts and quarantine records are numbered once, and read marks
are per user."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import sqlalchemy as sa

from broker.database import inbox_table, outbox_table, quarantine_table, receipts_table
from console import readmodel
from console.readmodel import EventType, deliveries, events_since, mark_read, sync_feed

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _deliver(engine: sa.Engine, applied_at: datetime, kind: str = "return_request") -> str:
    envelope_id = str(uuid4())
    with engine.begin() as conn:
        conn.execute(
            inbox_table.insert().values(
                envelope_id=envelope_id,
                digest="ab" * 32,
                sender="iom-kz",
                case_ref="iom-kz.FEED-1",
                kind=kind,
                received_at=applied_at,
                applied_at=applied_at,
            )
        )
    return envelope_id


def test_a_row_committed_late_still_comes_after_the_cursor(engine) -> None:
    """A delivery whose applied_at is older than one already listed (committed later) gets a
    higher number, so a client resuming from its cursor sees it."""
    first = _deliver(engine, T0 + timedelta(seconds=10))
    page = deliveries(engine, 0)
    assert [d.envelope_id for d in page.deliveries] == [first]
    late = _deliver(engine, T0)
    after = deliveries(engine, page.cursor)
    assert [d.envelope_id for d in after.deliveries] == [late]
    assert after.cursor > page.cursor
    assert deliveries(engine, after.cursor).deliveries == []


def test_each_entry_is_numbered_once_and_receipts_are_not_deliveries(engine) -> None:
    """Syncing again adds nothing; a delivery receipt in the inbox is a receipt event (from
    the receipts table), not a delivery; quarantine records are events too."""
    ours = str(uuid4())
    with engine.begin() as conn:
        conn.execute(
            outbox_table.insert().values(
                envelope_id=ours,
                case_ref="iom-kz.FEED-2",
                kind="return_request",
                recipients="iom-uz",
                body=b"sealed",
                digest="cd" * 32,
                created_at=T0,
            )
        )
        conn.execute(
            receipts_table.insert().values(
                envelope_id=ours,
                recipient="iom-uz",
                receipt_envelope_id=str(uuid4()),
                received_at=T0 + timedelta(seconds=2),
            )
        )
        conn.execute(
            quarantine_table.insert().values(
                envelope_id=None,
                sender="iom-tj",
                reason="bad_signature",
                detail="d",
                received_at=T0 + timedelta(seconds=3),
                body=b"x",
            )
        )
    _deliver(engine, T0 + timedelta(seconds=1), kind="delivery_receipt")
    delivered = _deliver(engine, T0 + timedelta(seconds=4))
    sync_feed(engine)
    sync_feed(engine)
    events = events_since(engine, 0)
    assert [(e.event, e.envelope_id) for e in events] == [
        (EventType.RECEIPT, ours),
        (EventType.QUARANTINE, None),
        (EventType.DELIVERY, delivered),
    ]
    assert events[0].party == "iom-uz"
    assert events[0].case == "iom-kz.FEED-2"
    assert [e.seq for e in events] == sorted({e.seq for e in events})
    assert readmodel.latest_seq(engine) == events[-1].seq


def test_read_marks_are_per_user(engine) -> None:
    """What one user opened stays unread for another; marking twice changes nothing."""
    envelope_id = _deliver(engine, T0)
    mark_read(engine, "amina", envelope_id)
    mark_read(engine, "amina", envelope_id)
    assert [d.read for d in deliveries(engine, 0, reader="amina").deliveries] == [True]
    assert [d.read for d in deliveries(engine, 0, reader="oleg").deliveries] == [False]
    assert [d.read for d in deliveries(engine, 0).deliveries] == [None]


def test_a_quarantine_record_after_a_purge_is_announced_though_its_number_is_reused(engine):
    """`trm quarantine purge` empties the table and SQLite may number the next record 1 again:
    the feed still gives it a new entry."""

    def quarantined(at: datetime) -> None:
        with engine.begin() as conn:
            conn.execute(
                quarantine_table.insert().values(
                    sender="iom-tj", reason="bad_signature", detail="d", received_at=at, body=b"x"
                )
            )

    quarantined(T0)
    first = events_since(engine, 0)
    with engine.begin() as conn:
        conn.execute(quarantine_table.delete())
    quarantined(T0 + timedelta(minutes=5))
    later = events_since(engine, first[-1].seq)
    assert [(e.event, e.at) for e in later] == [(EventType.QUARANTINE, T0 + timedelta(minutes=5))]
