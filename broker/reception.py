"""Reception awareness: which of our envelopes still wait for a recipient's receipt.

As in AS4's reception awareness, a publisher confirm says only that the
broker took an envelope; it is delivered once the recipient's signed
delivery receipt comes back. When the broker confirms an envelope, one
``awaiting_receipts`` row per recipient records the wait, in the relay's
transaction that marks it sent; the inbox deletes the row in the transaction
that records the receipt. The relay resends the same bytes, under the same
envelope id, to the recipients whose receipt is due and missing (the
others, already answered, are not sent it again), waiting `ReceptionPolicy.after`
seconds after the first try and twice as long after each further one. After
`ReceptionPolicy.tries` tries the row is flagged: logged, listed by
``trm outbox status``, no longer resent, and still cleared by a late receipt.

Delivery receipts are never answered, so they wait for nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from broker.database import (
    awaiting_receipts_table,
    outbox_table,
    reading,
    receipts_table,
    select_in,
    storage_errors,
)
from broker.errors import ConfigError
from broker.metrics import FLAGGED, RESENDS
from broker.transport import Outgoing
from schemas.base import MessageKind

log = structlog.get_logger(__name__)

RESEND_AFTER = 300.0
"""Default seconds between the first publish and the first resend."""
RESEND_TRIES = 5
"""Default publishes to a recipient, the first included, before the wait is flagged."""
LONGEST_WAIT = timedelta(days=1)
"""The backoff stops doubling here."""
UNANSWERED = frozenset({str(MessageKind.DELIVERY_RECEIPT)})
"""Kinds no recipient answers with a receipt."""

_a = awaiting_receipts_table.c
_r = receipts_table.c
_o = outbox_table.c
ANSWERED = (
    sa.exists().where(_r.envelope_id == _a.envelope_id, _r.recipient == _a.recipient)
).correlate(awaiting_receipts_table)
"""Whether the receipt an ``awaiting_receipts`` row waits for is recorded."""
_SENT = sa.select(_o.envelope_id, _o.kind, _o.recipients).where(
    _o.envelope_id.in_(sa.bindparam("b_ids", expanding=True))
)
_RECEIPTS_OF = sa.select(_r.envelope_id, _r.recipient).where(
    _r.envelope_id.in_(sa.bindparam("b_ids", expanding=True))
)
_DUE = (
    sa.select(
        _a.envelope_id,
        _a.recipient,
        _a.tries,
        _o.recipients,
        _o.body,
        ANSWERED.label("answered"),
    )
    .join(outbox_table, _o.envelope_id == _a.envelope_id)
    .where(_a.flagged_at.is_(None), _a.next_resend_at <= sa.bindparam("b_now"))
    .order_by(_a.next_resend_at, _a.envelope_id, _a.recipient)
    .limit(sa.bindparam("b_limit"))
)
_ONE = (_a.envelope_id == sa.bindparam("b_id"), _a.recipient == sa.bindparam("b_to"))
_RESENT = (
    awaiting_receipts_table.update()
    .where(*_ONE, _a.flagged_at.is_(None))
    .values(tries=sa.bindparam("b_tries"), next_resend_at=sa.bindparam("b_next"))
)
_FLAG = (
    awaiting_receipts_table.update()
    .where(*_ONE, _a.flagged_at.is_(None))
    .values(flagged_at=sa.bindparam("b_at"))
)
_CLEAR = awaiting_receipts_table.delete().where(*_ONE)
_LIST = (
    sa.select(
        _a.envelope_id,
        _a.recipient,
        _a.tries,
        _a.next_resend_at,
        _a.flagged_at,
        _o.case_ref,
        _o.kind,
        _o.sent_at,
    )
    .join(outbox_table, _o.envelope_id == _a.envelope_id)
    .where(~ANSWERED)
    .order_by(_o.created_at, _a.envelope_id, _a.recipient)
)


@functools.cache
def _insert_statement(dialect: str) -> sa.Insert:
    """Insert awaiting rows, leaving those already there (a publish confirmed twice)."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(awaiting_receipts_table).on_conflict_do_nothing(
        index_elements=[_a.envelope_id, _a.recipient]
    )


@dataclass(frozen=True)
class ReceptionPolicy:
    """When to resend an envelope whose receipt has not come back, and when to give up."""

    after: float = RESEND_AFTER
    """Seconds after the first publish before the first resend; doubled after each resend."""
    tries: int = RESEND_TRIES
    """Publishes to one recipient, the first included, before its wait is flagged."""

    def __post_init__(self) -> None:
        """Refuse a wait that is not positive or fewer than one try."""
        if not self.after > 0 or self.tries < 1:
            raise ConfigError(
                "reception awareness needs --resend-after > 0 seconds and --resend-tries >= 1 "
                "(TRM_RESEND_AFTER_SECONDS, TRM_RESEND_TRIES)"
            )

    def wait(self, tries: int) -> timedelta:
        """How long after the `tries`-th publish the next one is due."""
        doublings = min(tries - 1, 32)
        return min(timedelta(seconds=self.after * 2**doublings), LONGEST_WAIT)


@dataclass(frozen=True)
class Awaiting:
    """One recipient's receipt that one of our envelopes still waits for."""

    envelope_id: str
    recipient: str
    case: str
    kind: str
    sent_at: datetime | None
    """When the broker first confirmed the envelope."""
    tries: int
    """Publishes to this recipient so far, the first included."""
    next_resend_at: datetime | None
    """When it is resent next; None once flagged."""
    flagged_at: datetime | None
    """When the relay gave up resending; a late receipt still clears it."""


@dataclass
class Due:
    """What one resend scan found: envelopes to resend and waits to flag or clear."""

    resends: list[Outgoing] = field(default_factory=list)
    """Each envelope once, addressed to its recipients still awaiting, in header order."""
    tries: dict[tuple[str, str], int] = field(default_factory=dict)
    """Publishes so far of each (envelope, recipient) being resent."""
    flagged: list[tuple[str, str, int]] = field(default_factory=list)
    """(envelope, recipient, tries) that reached the policy's tries."""
    answered: list[tuple[str, str]] = field(default_factory=list)
    """(envelope, recipient) whose receipt came back while the wait was being recorded."""

    def __len__(self) -> int:
        """How many waits this scan handles."""
        return len(self.tries) + len(self.flagged) + len(self.answered)


class AwaitingReceipts:
    """The relay's side of reception awareness on one local database."""

    def __init__(
        self,
        engine: Engine,
        policy: ReceptionPolicy,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """Track receipts in the database behind `engine`, resending by `policy`."""
        self.engine = engine
        self.policy = policy
        self.clock = clock or (lambda: datetime.now(UTC))

    def record(self, conn: Connection, envelope_ids: Sequence[str], at: datetime) -> None:
        """Await each recipient's receipt for these envelopes, confirmed `at`, in `conn`.

        A receipt that came back before the confirm was recorded (the
        recipient was quick) is not awaited.
        """
        sent = select_in(conn, _SENT, list(envelope_ids))
        answered = {(r[0], r[1]) for r in select_in(conn, _RECEIPTS_OF, list(envelope_ids))}
        due = at + self.policy.wait(1)
        rows = [
            {"envelope_id": row.envelope_id, "recipient": recipient, "tries": 1}
            | {"next_resend_at": due, "flagged_at": None}
            for row in sent
            if row.kind not in UNANSWERED
            for recipient in row.recipients.split()
            if (row.envelope_id, recipient) not in answered
        ]
        if rows:
            conn.execute(_insert_statement(conn.dialect.name), rows)

    def due(self, limit: int) -> Due:
        """Up to `limit` waits due now, sorted into resends, flags and waits already answered."""
        with storage_errors("reading the receipts awaited"), reading(self.engine) as conn:
            rows = conn.execute(_DUE, {"b_now": self.clock(), "b_limit": limit}).all()
        found = Due()
        waiting: dict[str, tuple[tuple[str, ...], bytes, set[str]]] = {}
        for row in rows:
            pair = (row.envelope_id, row.recipient)
            if row.answered:
                found.answered.append(pair)
            elif row.tries >= self.policy.tries:
                found.flagged.append((*pair, row.tries))
            else:
                found.tries[pair] = row.tries
                entry = waiting.setdefault(
                    row.envelope_id, (tuple(row.recipients.split()), row.body, set())
                )
                entry[2].add(row.recipient)
        for envelope_id, (recipients, body, left) in waiting.items():
            to = tuple(r for r in recipients if r in left)
            found.resends.append(Outgoing(envelope_id=envelope_id, recipients=to, body=body))
        return found

    def settle(self, due: Due) -> None:
        """Record that `due.resends` were confirmed; flag and clear the rest, in one transaction."""
        now = self.clock()
        resent = [
            {"b_id": envelope_id, "b_to": to, "b_tries": tries + 1}
            | {"b_next": now + self.policy.wait(tries + 1)}
            for (envelope_id, to), tries in due.tries.items()
        ]
        flagged = [{"b_id": e, "b_to": to, "b_at": now} for e, to, _ in due.flagged]
        with storage_errors("recording resends"), self.engine.begin() as conn:
            if resent:
                conn.execute(_RESENT, resent)
            if flagged:
                conn.execute(_FLAG, flagged)
            clear(conn, due.answered)
        for _envelope_id, to in due.tries:
            RESENDS.labels(recipient=to).inc()
        for _, to, _ in due.flagged:
            FLAGGED.labels(recipient=to).inc()
        for message in due.resends:
            log.info(
                "relay.resent",
                envelope_id=message.envelope_id,
                recipients=list(message.recipients),
                tries=max(due.tries[(message.envelope_id, to)] for to in message.recipients) + 1,
            )
        for envelope_id, to, tries in due.flagged:
            log.warning(
                "relay.flagged",
                envelope_id=envelope_id,
                participant=to,
                tries=tries,
                detail="no delivery receipt after every try; see trm outbox status",
            )


def clear(conn: Connection, pairs: Sequence[tuple[str, str]]) -> None:
    """Stop awaiting these (envelope, recipient) receipts, in `conn`'s transaction."""
    if pairs:
        conn.execute(_CLEAR, [{"b_id": envelope_id, "b_to": to} for envelope_id, to in pairs])


def awaiting(engine: Engine) -> list[Awaiting]:
    """Every receipt our envelopes still wait for, oldest envelope first, by recipient."""
    with storage_errors("reading the receipts awaited"), reading(engine) as conn:
        rows = conn.execute(_LIST).all()
    return [
        Awaiting(
            envelope_id=row.envelope_id,
            recipient=row.recipient,
            case=row.case_ref,
            kind=row.kind,
            sent_at=row.sent_at,
            tries=int(row.tries),
            next_resend_at=None if row.flagged_at is not None else row.next_resend_at,
            flagged_at=row.flagged_at,
        )
        for row in rows
    ]
