"""What the console shows, read from the participant's database: one module for API and pages.

Everything here reads; nothing sends. The models are the API's response
bodies too, so the OpenAPI document and the pages describe the same
things. A delivered payload is read from the case folder the adapter wrote
it to (`adapters.casesystem.FileCaseSystem`); a home whose case system is
another one keeps no payload the console could show.

The feed (`sync_feed`) numbers each delivery, receipt and quarantine record
the first time the console sees it; that number is the cursor clients
resume from (`console.tables.feed_table`).
"""

from __future__ import annotations

import json
import threading
import weakref
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Connection, Engine

from adapters.casesystem import FileCaseSystem
from adapters.home import Home
from broker.database import (
    awaiting_receipts_table,
    erasures_table,
    inbox_table,
    outbox_table,
    quarantine_table,
    reading,
    receipts_table,
    storage_errors,
)
from broker.errors import StorageError
from console.errors import Gone, NotFound
from console.tables import feed_table, reads_table
from schemas.base import MessageKind

PAGE = 100
"""Rows per page unless the caller asks for fewer."""
MAX_PAGE = 1000

_SYNC = threading.Lock()
"""One feed numbering at a time in this process; another process is held by the database."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)


class EventType(StrEnum):
    """What a feed entry records."""

    DELIVERY = "delivery"
    """An envelope applied here (its payload is in the case folder)."""
    RECEIPT = "receipt"
    """A recipient's delivery receipt for one of our envelopes."""
    QUARANTINE = "quarantine"
    """An envelope refused on arrival."""


class Event(_Model):
    """One feed entry: metadata only."""

    seq: int
    """The cursor: resume after it."""
    event: EventType
    envelope_id: str | None
    """The delivered envelope, the envelope the receipt is for, or the quarantined one."""
    case: str | None
    kind: str | None
    party: str
    """The sender (delivery, quarantine) or the recipient that answered (receipt)."""
    at: datetime


class Delivery(_Model):
    """An envelope applied here."""

    seq: int
    envelope_id: str
    case: str
    kind: str
    sender: str
    received_at: datetime
    read: bool | None = None
    """Whether the user asking opened it; None when no user asked (an API token)."""


class DeliveryPage(_Model):
    """Deliveries after a cursor, oldest first, and the cursor to ask from next."""

    deliveries: list[Delivery]
    cursor: int


class Payload(_Model):
    """A delivered envelope's header fields and its decrypted payload."""

    envelope_id: str
    kind: str
    schema_version: int
    case: str
    sender: str
    recipients: list[str]
    sent_at: datetime
    seq: int
    reply_to: str | None
    payload: dict[str, Any]


class Direction(StrEnum):
    """Whether this participant sent or received an envelope."""

    SENT = "sent"
    RECEIVED = "received"


class TimelineEntry(_Model):
    """One message of a case as this participant saw it."""

    at: datetime
    direction: Direction
    envelope_id: str
    kind: str
    sender: str | None
    """None for our own messages."""
    recipients: list[str]
    published_at: datetime | None = None
    receipts_from: list[str] = []


class Erasure(_Model):
    """An erasure a consent withdrawal asked for."""

    withdrawal: str
    erased_payloads: int | None
    """None while it is pending."""
    confirmed_to: str | None
    attempts: int
    last_error: str | None


class CaseTimeline(_Model):
    """A case as this participant knows it, with its messages oldest first."""

    case: str
    owner: str
    stage: str | None
    parties: list[str]
    share_with: list[str] | None
    purposes: list[str] | None
    halted_by: str | None
    erasures: list[Erasure]
    timeline: list[TimelineEntry]


class RecipientStatus(_Model):
    """Where one recipient stands with one of our envelopes."""

    recipient: str
    receipt_at: datetime | None
    receipt_envelope_id: str | None
    tries: int | None
    """Publishes to it so far while its receipt is awaited; None once answered."""
    next_resend_at: datetime | None
    flagged_at: datetime | None


class QuarantineRecord(_Model):
    """One quarantined envelope: never its payload."""

    id: str
    envelope_id: str | None
    sender: str | None
    reason: str
    received_at: datetime | None
    redeliveries: int
    requeued_at: datetime | None
    in_database: bool


class EnvelopeState(StrEnum):
    """Where an envelope stands, as this participant knows it."""

    QUEUED = "queued"
    """In our outbox, not yet confirmed by the broker."""
    PUBLISHED = "published"
    """Confirmed by the broker; receipts awaited."""
    RESENT = "resent"
    """Published again to a recipient whose receipt did not come."""
    FLAGGED = "flagged"
    """No receipt from some recipient after every try."""
    RECEIVED = "received"
    """Every recipient's receipt is here."""
    DELIVERED = "delivered"
    """An envelope sent to us and applied here."""
    QUARANTINED = "quarantined"
    """An envelope sent to us and refused on arrival."""


class EnvelopeStatus(_Model):
    """An envelope's delivery status: ours going out, or one that came in."""

    envelope_id: str
    state: EnvelopeState
    case: str | None
    kind: str | None
    queued_at: datetime | None = None
    published_at: datetime | None = None
    attempts: int | None = None
    last_error: str | None = None
    recipients: list[RecipientStatus] = []
    received_at: datetime | None = None
    sender: str | None = None
    quarantine: list[QuarantineRecord] = []


class OutboxEntry(_Model):
    """One of our envelopes."""

    envelope_id: str
    case: str
    kind: str
    recipients: list[str]
    queued_at: datetime
    published_at: datetime | None
    attempts: int
    last_error: str | None
    receipts: int


# --- the feed -------------------------------------------------------------------------

_f = feed_table.c
_i = inbox_table.c
_r = receipts_table.c
_q = quarantine_table.c
_o = outbox_table.c


def _unseen(event: EventType, ref: Any, party: Any = None) -> Any:
    condition = sa.and_(_f.event == str(event), _f.ref == ref)
    if party is not None:
        condition = sa.and_(condition, _f.party == party)
    return ~sa.exists().where(condition)


_NEW_DELIVERIES = (
    sa.select(_i.envelope_id, _i.case_ref, _i.kind, _i.sender, _i.applied_at)
    .where(_unseen(EventType.DELIVERY, _i.envelope_id))
    .where(_i.kind != str(MessageKind.DELIVERY_RECEIPT))
)
_NEW_RECEIPTS = (
    sa.select(_r.envelope_id, _r.recipient, _r.received_at, _o.case_ref, _o.kind)
    .select_from(receipts_table.outerjoin(outbox_table, _o.envelope_id == _r.envelope_id))
    .where(_unseen(EventType.RECEIPT, _r.envelope_id, _r.recipient))
)
_QUARANTINE = sa.select(_q.id, _q.envelope_id, _q.sender, _q.received_at)
_NUMBERED_QUARANTINE = sa.select(_f.ref).where(_f.event == str(EventType.QUARANTINE))
_WATERMARK = sa.select(
    sa.select(sa.func.count()).select_from(inbox_table).scalar_subquery(),
    sa.select(sa.func.count()).select_from(receipts_table).scalar_subquery(),
    sa.select(sa.func.count()).select_from(quarantine_table).scalar_subquery(),
    sa.select(sa.func.max(_q.id)).scalar_subquery(),
    sa.select(sa.func.max(_q.received_at)).scalar_subquery(),
)
_watermarks: weakref.WeakKeyDictionary[Engine, tuple[Any, ...]] = weakref.WeakKeyDictionary()
"""Per database, what the feed's sources held at its last numbering in this process: the
inbox and receipts only grow; the quarantine may be purged, hence its newest id and time."""


def sync_feed(engine: Engine) -> None:
    """Number every delivery, receipt and quarantine record not yet in the feed.

    The sources' row counts are compared first (a millisecond on 50,000 deliveries, where
    looking for unnumbered rows takes a few hundred), so an idle event stream costs little.
    """
    with _SYNC:
        with storage_errors("reading the console feed"), reading(engine) as conn:
            mark = tuple(conn.execute(_WATERMARK).one())
        if _watermarks.get(engine) == mark:
            return
        try:
            with storage_errors("numbering the console feed"), engine.begin() as conn:
                _number_new(conn)
        except StorageError:
            # Another process numbered the same rows first: they are in the feed.
            with storage_errors("numbering the console feed"), engine.begin() as conn:
                _number_new(conn)
        _watermarks[engine] = mark


def _quarantine_ref(record_id: int, received_at: datetime) -> str:
    """A record's key in the feed: its number and time, as SQLite may reuse a purged number."""
    return f"{record_id}-{int(received_at.timestamp() * 1_000_000)}"


def _number_new(conn: Connection) -> None:
    rows: list[dict[str, Any]] = []
    for d in conn.execute(_NEW_DELIVERIES):
        rows.append(
            _entry(EventType.DELIVERY, d.envelope_id, d.sender, d.envelope_id, d.case_ref, d.kind)
            | {"at": d.applied_at}
        )
    for r in conn.execute(_NEW_RECEIPTS):
        rows.append(
            _entry(EventType.RECEIPT, r.envelope_id, r.recipient, r.envelope_id, r.case_ref, r.kind)
            | {"at": r.received_at}
        )
    numbered = set(conn.execute(_NUMBERED_QUARANTINE).scalars())
    for q in conn.execute(_QUARANTINE):
        ref = _quarantine_ref(q.id, q.received_at)
        if ref not in numbered:
            rows.append(
                _entry(EventType.QUARANTINE, ref, q.sender or "", q.envelope_id, None, None)
                | {"at": q.received_at}
            )
    if rows:
        rows.sort(key=lambda row: (row["at"], row["event"], row["ref"]))
        conn.execute(feed_table.insert(), rows)


def _entry(
    event: EventType, ref: str, party: str, envelope_id: str | None, case: str | None, kind: Any
) -> dict[str, Any]:
    return {
        "event": str(event),
        "ref": ref,
        "party": party,
        "envelope_id": envelope_id,
        "case_ref": case,
        "kind": None if kind is None else str(kind),
    }


def events_since(
    engine: Engine, after: int = 0, *, limit: int = PAGE, sync: bool = True
) -> list[Event]:
    """Feed entries after cursor `after`, oldest first."""
    if sync:
        sync_feed(engine)
    query = sa.select(feed_table).where(_f.seq > after).order_by(_f.seq).limit(_bounded(limit))
    with storage_errors("reading the console feed"), reading(engine) as conn:
        rows = conn.execute(query).all()
    return [
        Event(
            seq=r.seq,
            event=EventType(r.event),
            envelope_id=r.envelope_id,
            case=r.case_ref,
            kind=r.kind,
            party=r.party,
            at=r.at,
        )
        for r in rows
    ]


def latest_seq(engine: Engine) -> int:
    """The newest cursor (0 when the feed is empty)."""
    sync_feed(engine)
    with storage_errors("reading the console feed"), reading(engine) as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(_f.seq), 0))).scalar_one())


def _bounded(limit: int) -> int:
    return max(1, min(limit, MAX_PAGE))


# --- deliveries and payloads ---------------------------------------------------------


def deliveries(
    engine: Engine,
    after: int = 0,
    *,
    limit: int = PAGE,
    reader: str | None = None,
    case: str | None = None,
) -> DeliveryPage:
    """Deliveries after cursor `after`, oldest first; read or not by `reader` if given."""
    sync_feed(engine)
    query = (
        sa.select(_f.seq, _i.envelope_id, _i.case_ref, _i.kind, _i.sender, _i.received_at)
        .join(inbox_table, _i.envelope_id == _f.ref)
        .where(_f.event == str(EventType.DELIVERY), _f.seq > after)
        .order_by(_f.seq)
        .limit(_bounded(limit))
    )
    if case is not None:
        query = query.where(_i.case_ref == case)
    with storage_errors("reading the deliveries"), reading(engine) as conn:
        rows = conn.execute(query).all()
        opened = _opened(conn, reader, [r.envelope_id for r in rows])
    found = [
        Delivery(
            seq=r.seq,
            envelope_id=r.envelope_id,
            case=r.case_ref,
            kind=r.kind,
            sender=r.sender,
            received_at=r.received_at,
            read=None if reader is None else r.envelope_id in opened,
        )
        for r in rows
    ]
    return DeliveryPage(deliveries=found, cursor=found[-1].seq if found else after)


def _opened(conn: Connection, reader: str | None, envelope_ids: list[str]) -> set[str]:
    if reader is None or not envelope_ids:
        return set()
    t = reads_table.c
    rows = conn.execute(
        sa.select(t.envelope_id).where(t.username == reader, t.envelope_id.in_(envelope_ids))
    )
    return {r.envelope_id for r in rows}


def mark_read(
    engine: Engine, reader: str, envelope_id: str, *, now: datetime | None = None
) -> None:
    """Record that `reader` opened delivery `envelope_id` (once; again changes nothing)."""
    t = reads_table.c
    with storage_errors("recording a read"), engine.begin() as conn:
        seen = conn.execute(
            sa.select(t.envelope_id).where(t.username == reader, t.envelope_id == envelope_id)
        ).first()
        if seen is None:
            conn.execute(
                reads_table.insert().values(
                    username=reader, envelope_id=envelope_id, read_at=now or datetime.now(UTC)
                )
            )


def payload(home: Home, engine: Engine, envelope_id: str) -> Payload:
    """The delivered payload of `envelope_id`: NotFound, or Gone once erased."""
    with storage_errors("reading the inbox"), reading(engine) as conn:
        row = conn.execute(
            sa.select(_i.case_ref, _i.kind).where(_i.envelope_id == envelope_id)
        ).first()
        erased = (
            row is not None
            and conn.execute(
                sa.select(erasures_table.c.withdrawal_id).where(
                    erasures_table.c.case_ref == row.case_ref,
                    erasures_table.c.erased_at.is_not(None),
                )
            ).first()
            is not None
        )
    if row is None or row.kind == str(MessageKind.DELIVERY_RECEIPT):
        raise NotFound(f"no envelope {envelope_id} was delivered here")
    document = _case_file(home, envelope_id)
    if document is None:
        if erased:
            raise Gone(f"the payload of {envelope_id} was erased: consent was withdrawn")
        raise NotFound(
            f"the payload of {envelope_id} is not in the case folder: the case system "
            "holds it, or it asked erasure only"
        )
    return Payload.model_validate(document)


def _case_file(home: Home, envelope_id: str) -> dict[str, Any] | None:
    if home.case_system_spec is not None:
        return None
    # `envelope_id` was found in the inbox, so it is a stored id, never a path from a client.
    path = FileCaseSystem(home.case_dir).path(envelope_id)
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StorageError(f"cannot read the case file of {envelope_id}: {e}") from e
    return document if isinstance(document, dict) else None


# --- cases, envelopes, the outbox and the quarantine -------------------------------


def case_timeline(home: Home, engine: Engine, case: str) -> CaseTimeline:
    """Case `case` as this home knows it (`adapters.sending.case_summary`) and its messages."""
    from adapters.sending import case_summary
    from broker.errors import ConfigError

    try:
        summary = case_summary(home, case, engine=engine)
    except ConfigError as e:
        raise NotFound(str(e)) from e
    with storage_errors(f"reading case {case}"), reading(engine) as conn:
        received = conn.execute(
            sa.select(_i.envelope_id, _i.kind, _i.sender, _i.received_at).where(
                _i.case_ref == case, _i.kind != str(MessageKind.DELIVERY_RECEIPT)
            )
        ).all()
        sent = conn.execute(
            sa.select(_o.envelope_id, _o.kind, _o.recipients, _o.created_at, _o.sent_at).where(
                _o.case_ref == case, _o.kind != str(MessageKind.DELIVERY_RECEIPT)
            )
        ).all()
        answered = _receipts_of(conn, [r.envelope_id for r in sent])
    me = home.participant_id
    timeline = [
        TimelineEntry(
            at=r.received_at,
            direction=Direction.RECEIVED,
            envelope_id=r.envelope_id,
            kind=r.kind,
            sender=r.sender,
            recipients=[me],
        )
        for r in received
    ] + [
        TimelineEntry(
            at=r.created_at,
            direction=Direction.SENT,
            envelope_id=r.envelope_id,
            kind=r.kind,
            sender=None,
            recipients=r.recipients.split(),
            published_at=r.sent_at,
            receipts_from=sorted(answered.get(r.envelope_id, {})),
        )
        for r in sent
    ]
    timeline.sort(key=lambda entry: (entry.at, entry.envelope_id))
    return CaseTimeline(
        case=summary["case"],
        owner=summary["owner"],
        stage=summary["stage"],
        parties=summary["parties"],
        share_with=summary["share_with"],
        purposes=summary["purposes"],
        halted_by=summary["halted_by"],
        erasures=[Erasure.model_validate(e) for e in summary["erasures"]],
        timeline=timeline,
    )


def _receipts_of(conn: Connection, envelope_ids: list[str]) -> dict[str, dict[str, Any]]:
    """{our envelope: {recipient: receipt row}} for `envelope_ids`."""
    found: dict[str, dict[str, Any]] = {}
    if not envelope_ids:
        return found
    rows = conn.execute(sa.select(receipts_table).where(_r.envelope_id.in_(envelope_ids)))
    for row in rows:
        found.setdefault(row.envelope_id, {})[row.recipient] = row
    return found


_a = awaiting_receipts_table.c


def envelope_status(engine: Engine, envelope_id: str) -> EnvelopeStatus:
    """Where `envelope_id` stands: ours (queued, published, receipts, resent, flagged) or
    one sent to us (delivered or quarantined); NotFound if this home never saw it."""
    with storage_errors("reading an envelope's status"), reading(engine) as conn:
        ours = conn.execute(sa.select(outbox_table).where(_o.envelope_id == envelope_id)).first()
        if ours is not None:
            return _outgoing_status(conn, ours)
        came = conn.execute(sa.select(inbox_table).where(_i.envelope_id == envelope_id)).first()
        held = conn.execute(
            sa.select(quarantine_table).where(_q.envelope_id == envelope_id).order_by(_q.id)
        ).all()
    records = [_record(q) for q in held]
    if came is not None:
        return EnvelopeStatus(
            envelope_id=envelope_id,
            state=EnvelopeState.DELIVERED,
            case=came.case_ref,
            kind=came.kind,
            received_at=came.received_at,
            sender=came.sender,
            quarantine=records,
        )
    if records:
        return EnvelopeStatus(
            envelope_id=envelope_id,
            state=EnvelopeState.QUARANTINED,
            case=None,
            kind=None,
            received_at=records[0].received_at,
            sender=records[0].sender,
            quarantine=records,
        )
    raise NotFound(f"envelope {envelope_id} was neither sent nor received here")


def _outgoing_status(conn: Connection, row: Any) -> EnvelopeStatus:
    recipients = row.recipients.split()
    receipts = _receipts_of(conn, [row.envelope_id]).get(row.envelope_id, {})
    waits = {
        w.recipient: w
        for w in conn.execute(
            sa.select(awaiting_receipts_table).where(_a.envelope_id == row.envelope_id)
        )
    }
    statuses = []
    for recipient in recipients:
        receipt, wait = receipts.get(recipient), waits.get(recipient)
        statuses.append(
            RecipientStatus(
                recipient=recipient,
                receipt_at=None if receipt is None else receipt.received_at,
                receipt_envelope_id=None if receipt is None else receipt.receipt_envelope_id,
                tries=None if wait is None else wait.tries,
                next_resend_at=None if wait is None or wait.flagged_at else wait.next_resend_at,
                flagged_at=None if wait is None else wait.flagged_at,
            )
        )
    return EnvelopeStatus(
        envelope_id=row.envelope_id,
        state=_state(row, statuses),
        case=row.case_ref,
        kind=row.kind,
        queued_at=row.created_at,
        published_at=row.sent_at,
        attempts=row.attempts,
        last_error=row.last_error,
        recipients=statuses,
    )


def _state(row: Any, statuses: list[RecipientStatus]) -> EnvelopeState:
    if row.sent_at is None:
        return EnvelopeState.QUEUED
    if statuses and all(s.receipt_at is not None for s in statuses):
        return EnvelopeState.RECEIVED
    if any(s.flagged_at is not None for s in statuses):
        return EnvelopeState.FLAGGED
    if any((s.tries or 0) > 1 for s in statuses):
        return EnvelopeState.RESENT
    return EnvelopeState.PUBLISHED


def _record(q: Any) -> QuarantineRecord:
    return QuarantineRecord(
        id=str(q.id),
        envelope_id=q.envelope_id,
        sender=q.sender,
        reason=q.reason,
        received_at=q.received_at,
        redeliveries=q.redeliveries,
        requeued_at=q.requeued_at,
        in_database=True,
    )


def outbox(engine: Engine, *, limit: int = PAGE, pending_only: bool = False) -> list[OutboxEntry]:
    """Our envelopes, newest first (receipts excluded), with how many receipts came back."""
    receipts = (
        sa.select(sa.func.count())
        .select_from(receipts_table)
        .where(_r.envelope_id == _o.envelope_id)
        .scalar_subquery()
    )
    query = (
        sa.select(outbox_table, receipts.label("receipts"))
        .where(_o.kind != str(MessageKind.DELIVERY_RECEIPT))
        .order_by(_o.created_at.desc(), _o.envelope_id.desc())
        .limit(_bounded(limit))
    )
    if pending_only:
        query = query.where(_o.sent_at.is_(None))
    with storage_errors("reading the outbox"), reading(engine) as conn:
        rows = conn.execute(query).all()
    return [
        OutboxEntry(
            envelope_id=r.envelope_id,
            case=r.case_ref,
            kind=r.kind,
            recipients=r.recipients.split(),
            queued_at=r.created_at,
            published_at=r.sent_at,
            attempts=r.attempts,
            last_error=r.last_error,
            receipts=int(r.receipts),
        )
        for r in rows
    ]


def outbox_count(engine: Engine) -> int:
    """Every row of the outbox, receipts included: what a refused send must leave unchanged."""
    with storage_errors("reading the outbox"), reading(engine) as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(outbox_table)).scalar_one())


def quarantine(home: Home, engine: Engine) -> list[QuarantineRecord]:
    """Every quarantined envelope, here and in the broker's quarantine (`trm quarantine list`)."""
    from broker.quarantine import BrokerQuarantine, entries

    held = BrokerQuarantine(home.amqp_settings(), home.participant_id).messages()
    return [
        QuarantineRecord(
            id=e.id,
            envelope_id=e.envelope_id,
            sender=e.sender,
            reason=e.reason,
            received_at=e.received_at,
            redeliveries=e.redeliveries,
            requeued_at=e.requeued_at,
            in_database=e.in_database,
        )
        for e in entries(engine, held)
    ]


class CaseEntry(_Model):
    """A case known here, as listed."""

    case: str
    owner: str
    stage: str | None
    halted: bool
    updated_at: datetime


def cases(engine: Engine, *, limit: int = PAGE) -> list[CaseEntry]:
    """The cases this participant sent or received a message on, latest change first."""
    from broker.database import case_views_table

    c = case_views_table.c
    query = sa.select(case_views_table).order_by(c.updated_at.desc(), c.case_ref)
    with storage_errors("reading the cases"), reading(engine) as conn:
        rows = conn.execute(query.limit(_bounded(limit))).all()
    return [
        CaseEntry(
            case=r.case_ref,
            owner=r.owner,
            stage=r.stage,
            halted=r.halted_by is not None,
            updated_at=r.updated_at,
        )
        for r in rows
    ]


class Deadline(_Model):
    """The deadline of a routed case's current stage."""

    stage: str
    owed_by: str | None
    warn_at: datetime
    due: datetime
    status: str
    """``ok``, ``warning`` or ``overdue``."""
    about_envelope: str | None


class RoutedCase(_Model):
    """A case the routing service tracks (`trm cases list`)."""

    case: str
    stage: str | None
    since: datetime | None
    updated_at: datetime
    deadline: Deadline | None
    owed_by: str | None
    anomalies: int


_URGENCY = {"overdue": 0, "warning": 1, "ok": 2}


def routed_cases(engine: Engine, *, at: datetime | None = None) -> list[RoutedCase]:
    """Every case of a routing operator's home, overdue first, then by due time.

    Empty on a home that runs no routing service.
    """
    from services.casestore import CaseStore
    from services.deadlines import DEFAULT_POLICIES
    from trm.commands.routing import case_summary

    now = at or datetime.now(UTC)
    found = [
        RoutedCase.model_validate(case_summary(s, DEFAULT_POLICIES, now))
        for s in CaseStore(engine).states()
    ]

    def urgency(case: RoutedCase) -> tuple[int, datetime, str]:
        if case.deadline is None:
            return (3, case.updated_at, case.case)
        return (_URGENCY.get(case.deadline.status, 3), case.deadline.due, case.case)

    return sorted(found, key=urgency)
