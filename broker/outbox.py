"""The outbox: sealed envelopes stored with the change that caused them, and the relay.

Sending never talks to RabbitMQ directly. The sealed envelope is written to the
local database in the same transaction as the sender's own state change (the
per-case sequence number at least), so either both happen or neither does.
The `Relay` then publishes pending rows with publisher confirms and marks them
sent only once the broker has confirmed them. If the broker is down, or a
publish is not confirmed, the rows stay pending and the same bytes, under the
same envelope ids, go out later; receivers deduplicate by id.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from broker.database import (
    awaiting_receipts_table,
    case_sequence_table,
    outbox_table,
    reading,
    receipts_table,
    storage_errors,
)
from broker.errors import ConfigError, StorageError, TransportError
from broker.faults import fault_point
from broker.reception import ANSWERED, AwaitingReceipts, ReceptionPolicy
from broker.transport import Outgoing
from schemas.base import MessageKind

if TYPE_CHECKING:
    from broker.envelope import SealedEnvelope

log = structlog.get_logger(__name__)

IDLE_POLL = 0.2
"""Seconds between full scans of the outbox when idle and nothing else woke the relay."""
WATCH_TICK = 0.005
"""Seconds between cheap checks, while idle, for a commit by another process (`CommitWatch`)."""
NOTIFY_CHANNEL = "trm_outbox"
"""The PostgreSQL channel `Outbox.add` notifies in the sender's transaction."""
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


_t = outbox_table.c
_INSERT = outbox_table.insert()
"""Executed with one parameter dict per envelope (`_outbox_row`)."""
_NOTIFY = sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, ""))
_PENDING = (
    sa.select(_t.envelope_id, _t.recipients, _t.body)
    .where(_t.sent_at.is_(None))
    .order_by(_t.created_at, _t.envelope_id)
    .limit(sa.bindparam("b_limit"))
)
_MARK_SENT = (
    outbox_table.update()
    .where(_t.envelope_id == sa.bindparam("b_id"), _t.sent_at.is_(None))
    .values(sent_at=sa.bindparam("b_at"), attempts=_t.attempts + 1)
)
_RECORD_FAILURE = (
    outbox_table.update()
    .where(_t.envelope_id == sa.bindparam("b_id"), _t.sent_at.is_(None))
    .values(attempts=_t.attempts + 1, last_error=sa.bindparam("b_error"))
)
_RECEIPT_AGAIN = (
    outbox_table.update()
    .where(
        _t.reply_to == sa.bindparam("b_id"),
        _t.kind == str(MessageKind.DELIVERY_RECEIPT),
        _t.sent_at.is_not(None),
    )
    .values(sent_at=None)
)


_AWAITING_COUNTS = sa.select(
    sa.func.count(), sa.func.count(awaiting_receipts_table.c.flagged_at)
).where(~ANSWERED)


@functools.cache
def _reserve_statement(dialect: str) -> sa.Insert:
    """The sequence upsert for `dialect`, built once so SQLAlchemy reuses its compiled form.

    Parameters ``b_sender``, ``b_case``, ``b_count``; adds ``b_count`` to the
    last number (or starts at it) and returns the new last number per case.
    """
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    c = case_sequence_table.c
    statement = insert(case_sequence_table).values(
        sender=sa.bindparam("b_sender"),
        case_ref=sa.bindparam("b_case"),
        last_seq=sa.bindparam("b_count"),
    )
    return statement.on_conflict_do_update(
        index_elements=[c.sender, c.case_ref],
        set_={"last_seq": c.last_seq + statement.excluded.last_seq},
    ).returning(c.case_ref, c.last_seq)


def _outbox_row(sealed: SealedEnvelope, at: datetime) -> dict[str, object]:
    header = sealed.header
    return {
        "envelope_id": str(header.id),
        "case_ref": header.case,
        "kind": str(header.kind),
        "recipients": " ".join(header.recipients),
        "reply_to": None if header.reply_to is None else str(header.reply_to),
        "body": sealed.raw,
        "digest": sealed.digest,
        "created_at": at,
        "attempts": 0,
    }


class Publisher(Protocol):
    """What the relay needs from a transport: confirmed publishes and a quarantine."""

    def publish(self, messages: Sequence[Outgoing], timeout: float = 30) -> None:
        """Publish all `messages`; return once all are confirmed, else raise TransportError."""

    def publish_quarantine(
        self, body: bytes, *, participant_id: str, reason: str, detail: str
    ) -> None:
        """Put a refused envelope in `participant_id`'s quarantine, with the reason."""


@dataclass(frozen=True)
class OutboxStatus:
    """How far the outbox has drained."""

    pending: int
    sent: int
    oldest_pending: datetime | None
    """When the oldest envelope still waiting for a confirm was written."""
    last_error: str | None
    """The latest publish error of the oldest pending envelope, if any."""
    receipts: int
    """Delivery receipts received for our envelopes."""
    awaiting: int = 0
    """Receipts, one per envelope and recipient, still awaited (`broker.reception`)."""
    flagged: int = 0
    """Of those, the ones the relay stopped resending after every try."""


class Outbox:
    """The outbox table of one local database."""

    def __init__(self, engine: Engine) -> None:
        """Use the (already migrated) database behind `engine`."""
        self.engine = engine

    def next_seq(self, conn: Connection, sender: str, case: str) -> int:
        """The next sequence number of `sender` on `case`, inside the caller's transaction.

        An atomic upsert, so that two processes sending on the same case at
        once never get the same number.
        """
        return self.reserve_seqs(conn, sender, {case: 1})[case]

    def reserve_seqs(
        self, conn: Connection, sender: str, counts: Mapping[str, int]
    ) -> dict[str, int]:
        """Take `counts[case]` consecutive numbers of `sender` on each case; return each first.

        One atomic upsert statement for all cases (the inbox answers a batch
        of envelopes with it), so that two processes never get the same
        number, as with `next_seq`. Cases are taken in sorted order, so that
        two transactions locking several counters on PostgreSQL lock them in
        the same order and cannot deadlock.
        """
        params = [
            {"b_sender": sender, "b_case": case, "b_count": counts[case]} for case in sorted(counts)
        ]
        if not params:
            return {}
        with storage_errors("taking the next sequence numbers"):
            rows = conn.execute(_reserve_statement(conn.dialect.name), params).all()
        last = {row.case_ref: int(row.last_seq) for row in rows}
        return {case: last[case] - count + 1 for case, count in counts.items()}

    def add(self, conn: Connection, sealed: SealedEnvelope, now: datetime | None = None) -> None:
        """Store `sealed` for the relay, inside the caller's transaction."""
        self.add_many(conn, [(sealed, now or datetime.now(UTC))])

    def add_many(self, conn: Connection, items: Sequence[tuple[SealedEnvelope, datetime]]) -> None:
        """Store each sealed envelope, written at its time, in one statement of the caller's."""
        if not items:
            return
        rows = [_outbox_row(sealed, at) for sealed, at in items]
        action = f"storing envelope {items[0][0].header.id} in the outbox"
        if len(items) > 1:
            action = f"storing {len(items)} envelopes in the outbox"
        with storage_errors(action):
            conn.execute(_INSERT, rows)
            if conn.dialect.name == "postgresql":
                # Delivered to the relay's LISTEN at commit, never before.
                conn.execute(_NOTIFY)

    def receipts_again(self, conn: Connection, envelope_ids: Sequence[str]) -> None:
        """Publish again, same bytes, the receipts we sent for these envelopes, in `conn`.

        The inbox calls this for an envelope it applied before and now
        receives again: its sender is resending because our receipt has
        not reached it (reception awareness), so the receipt may have been
        lost. A receipt that did arrive is absorbed there as a duplicate.
        """
        if not envelope_ids:
            return
        with storage_errors("queueing receipts again"):
            conn.execute(_RECEIPT_AGAIN, [{"b_id": envelope_id} for envelope_id in envelope_ids])
            if conn.dialect.name == "postgresql":
                conn.execute(_NOTIFY)

    def send(
        self, seal_fn: Callable[[int], SealedEnvelope], *, sender: str, case: str
    ) -> SealedEnvelope:
        """Take the next sequence number, seal with it and store, in one transaction."""
        with storage_errors("writing to the outbox"), self.engine.begin() as conn:
            sealed = seal_fn(self.next_seq(conn, sender, case))
            self.add(conn, sealed)
        log.info(
            "outbox.added",
            envelope_id=str(sealed.id),
            case=case,
            participant=sender,
            kind=str(sealed.header.kind),
        )
        return sealed

    def pending(self, limit: int = 500) -> list[Outgoing]:
        """Up to `limit` envelopes not yet confirmed by the broker, oldest first."""
        with storage_errors("reading the outbox"), reading(self.engine) as conn:
            rows = conn.execute(_PENDING, {"b_limit": limit}).all()
        return [
            Outgoing(envelope_id=r.envelope_id, recipients=tuple(r.recipients.split()), body=r.body)
            for r in rows
        ]

    def mark_sent(
        self,
        envelope_ids: Sequence[str],
        at: datetime | None = None,
        awaiting: AwaitingReceipts | None = None,
    ) -> None:
        """Record that the broker confirmed these envelopes (one executemany for all).

        With `awaiting`, each recipient's receipt is awaited from now on, in
        the same transaction.
        """
        if not envelope_ids:
            return
        moment = at or datetime.now(UTC)
        params = [{"b_id": envelope_id, "b_at": moment} for envelope_id in envelope_ids]
        with storage_errors("marking envelopes sent"), self.engine.begin() as conn:
            conn.execute(_MARK_SENT, params)
            if awaiting is not None:
                awaiting.record(conn, envelope_ids, moment)

    def record_failure(self, envelope_ids: Sequence[str], error: str) -> None:
        """Count a failed publish of these envelopes; they stay pending."""
        if not envelope_ids:
            return
        params = [{"b_id": envelope_id, "b_error": error[:1000]} for envelope_id in envelope_ids]
        with storage_errors("recording a publish failure"), self.engine.begin() as conn:
            conn.execute(_RECORD_FAILURE, params)

    def status(self) -> OutboxStatus:
        """Pending and sent counts, the oldest pending envelope's age and error, receipts."""
        t = outbox_table.c
        count = sa.func.count()
        with storage_errors("reading the outbox status"), reading(self.engine) as conn:
            pending = conn.execute(sa.select(count).where(t.sent_at.is_(None))).scalar_one()
            sent = conn.execute(sa.select(count).where(t.sent_at.is_not(None))).scalar_one()
            oldest = conn.execute(
                sa.select(t.created_at, t.last_error)
                .where(t.sent_at.is_(None))
                .order_by(t.created_at, t.envelope_id)
                .limit(1)
            ).first()
            receipts = conn.execute(sa.select(count).select_from(receipts_table)).scalar_one()
            awaiting, flagged = conn.execute(_AWAITING_COUNTS).one()
        return OutboxStatus(
            pending=int(pending),
            sent=int(sent),
            oldest_pending=oldest.created_at if oldest else None,
            last_error=oldest.last_error if oldest else None,
            receipts=int(receipts),
            awaiting=int(awaiting),
            flagged=int(flagged or 0),
        )


class Relay:
    """Publishes the outbox with confirms; marks rows sent only once confirmed.

    With a `ReceptionPolicy` it also awaits every recipient's delivery
    receipt and resends to those whose receipt is overdue
    (`broker.reception`).
    """

    def __init__(
        self,
        outbox: Outbox,
        publisher: Publisher,
        *,
        batch: int = 500,
        retry_delay: float = BACKOFF_FIRST,
        max_retry_delay: float = BACKOFF_MAX,
        reception: ReceptionPolicy | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """Relay `outbox` through `publisher`, `batch` envelopes per confirmed publish.

        After a failure the relay waits `retry_delay` seconds, doubling up to
        `max_retry_delay` while failures continue. Without `reception` no
        receipt is awaited: the routing service records none.
        """
        if batch < 1 or retry_delay <= 0 or max_retry_delay < retry_delay:
            raise ConfigError("the relay needs batch >= 1 and 0 < retry_delay <= max_retry_delay")
        self.outbox = outbox
        self.publisher = publisher
        self.batch = batch
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.clock = clock or (lambda: datetime.now(UTC))
        self.awaiting = (
            None if reception is None else AwaitingReceipts(outbox.engine, reception, self.clock)
        )
        self._next_scan = 0.0

    def run_once(self) -> int:
        """Publish one batch of pending envelopes; return how many the broker confirmed.

        On a transport failure the batch stays pending, its attempt is counted
        and the error is raised; the next call sends the same envelopes again.
        """
        batch = self.outbox.pending(self.batch)
        if not batch:
            return 0
        ids = [m.envelope_id for m in batch]
        try:
            self.publisher.publish(batch)
        except TransportError as e:
            self.outbox.record_failure(ids, f"{e.reason}: {e}")
            raise
        fault_point("relay.after_confirm")
        self.outbox.mark_sent(ids, self.clock(), self.awaiting)
        log.debug("relay.sent", count=len(ids), first_envelope_id=ids[0])
        return len(ids)

    def resend_once(self) -> int:
        """Resend one batch of envelopes whose receipts are overdue; return the waits handled.

        Each goes, same bytes and id, only to its recipients still awaiting a
        receipt; waits past the policy's tries are flagged instead. On a
        transport failure nothing is recorded and the error is raised: the
        same waits are due at the next call.
        """
        if self.awaiting is None:
            return 0
        due = self.awaiting.due(self.batch)
        if due.resends:
            self.publisher.publish(due.resends)
        if len(due):
            self.awaiting.settle(due)
        return len(due)

    def _resend_when_due(self) -> int:
        """`resend_once` at most every `IDLE_POLL` seconds, at once again after a full batch."""
        if self.awaiting is None or time.monotonic() < self._next_scan:
            return 0
        handled = self.resend_once()
        self._next_scan = 0.0 if handled >= self.batch else time.monotonic() + IDLE_POLL
        return handled

    def run(self, stop: threading.Event, wake: threading.Event | None = None) -> None:
        """Relay until `stop` is set, backing off while the broker or database fails.

        When idle it waits for `wake` (set by senders in this process), for a
        commit by another process (`CommitWatch`, checked every `WATCH_TICK`)
        or at most `IDLE_POLL` before scanning the outbox again.
        """
        backoff = self.retry_delay
        watch = CommitWatch(self.outbox.engine)
        try:
            while not stop.is_set():
                try:
                    busy = self.run_once() + self._resend_when_due()
                    backoff = self.retry_delay
                    if busy:
                        continue
                    self._idle(stop, wake, watch)
                except (TransportError, StorageError) as e:
                    log.warning("relay.retrying", reason=e.reason, error=str(e), delay=backoff)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, self.max_retry_delay)
        finally:
            watch.close()

    @staticmethod
    def _idle(stop: threading.Event, wake: threading.Event | None, watch: CommitWatch) -> None:
        """Return on `stop`, on `wake`, on a commit `watch` saw, or after `IDLE_POLL`."""
        deadline = time.monotonic() + IDLE_POLL
        signal = stop if wake is None else wake
        while not stop.is_set() and time.monotonic() < deadline:
            if signal.wait(WATCH_TICK):
                if wake is not None:
                    wake.clear()
                return
            if watch.changed():
                return


class CommitWatch:
    """Tells, cheaply, whether another connection committed since the last look.

    An idle relay asks every `WATCH_TICK`, so that an envelope written by
    another process (``trm send``) goes out within milliseconds instead of at
    the next full scan. On SQLite it reads ``PRAGMA data_version`` on a
    connection of its own: the number changes when any other connection
    commits and reading it touches only the shared-memory header. On
    PostgreSQL it ``LISTEN``s on `NOTIFY_CHANNEL`, which `Outbox.add`
    notifies in the sender's transaction; polling for a notification is a
    non-blocking read of the socket. A change may concern another table: the
    relay then scans and finds nothing, which costs one indexed query. A
    failure closes the connection and raises `StorageError`; the next call
    opens a new one.
    """

    def __init__(self, engine: Engine) -> None:
        """Watch the database behind `engine` (connects on first use)."""
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._errors: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._raw: Any = None
        self._version: object = None

    def changed(self) -> bool:
        """Whether another connection committed (to the outbox on PostgreSQL) since last asked.

        The first call after connecting says True, so that nothing committed
        before the watch began is missed.
        """
        try:
            if self._raw is None:
                with storage_errors("connecting to watch the outbox"):
                    self._open()
                return True
            return self._poll()
        except StorageError:
            self.close()
            raise
        except self._errors as e:
            self.close()
            raise StorageError(
                f"watching the outbox for new envelopes failed ({type(e).__name__}); "
                "the relay retries"
            ) from e

    def _open(self) -> None:
        raw = self.engine.raw_connection()
        self._raw = raw
        driver: Any = raw.driver_connection
        if self._postgres:
            driver.autocommit = True
            driver.execute(f"LISTEN {NOTIFY_CHANNEL}")
        else:
            self._version = self._data_version()

    def _poll(self) -> bool:
        if self._postgres:
            return bool(list(self._raw.driver_connection.notifies(timeout=0)))
        version = self._data_version()
        if version == self._version:
            return False
        self._version = version
        return True

    def _data_version(self) -> object:
        cursor = self._raw.driver_connection.execute("PRAGMA data_version")
        try:
            return cursor.fetchone()[0]
        finally:
            cursor.close()

    def close(self) -> None:
        """Drop the watch's connection (never returned to the pool: LISTEN and autocommit)."""
        raw, self._raw = self._raw, None
        if raw is not None:
            raw.invalidate()  # closes the driver's connection, quietly if already broken
