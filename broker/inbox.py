"""The inbox: open, deduplicate, apply and acknowledge, in one transaction.

`Inbox.handle` opens an envelope (verify, decrypt, validate), then in one
database transaction records its id, hands it to the case system and puts a
signed delivery receipt for its sender in the outbox. The caller acks the
broker delivery only after `handle` returns, so a crash anywhere before the
commit leaves nothing behind and the redelivery applies it; a crash after the
commit makes the redelivery a duplicate, with no second effect and no second
receipt.

Envelopes that cannot be accepted are recorded in the ``quarantine`` table
with the failing check's reason; the caller then moves them to the broker's
quarantine and acks. A delivery without an AMQP user id is one of them
(``no_user_id``): no participant login published it.

Each envelope is applied or refused on its own: a receipt that cannot be
sealed because the envelope's sender has no valid encryption key (revoked, or
its window ended) does not fail the batch. The envelope is applied, its
receipt recorded in ``pending_receipts`` and sealed by `Inbox.retry_receipts`
once a directory lists a key for the sender.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING
from uuid import UUID

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from broker import reception
from broker.casegate import CaseGate
from broker.database import (
    inbox_table,
    pending_receipts_table,
    quarantine_table,
    reading,
    receipts_table,
    select_in,
    storage_errors,
)
from broker.envelope import (
    OpenedEnvelope,
    Recipient,
    SealedEnvelope,
    open_envelope,
    read_header,
    sign,
)
from broker.errors import (
    CaseSystemError,
    EnvelopeError,
    ProtocolViolation,
    ReplayedEnvelope,
    StorageError,
    TrmError,
    UnknownParticipant,
)
from broker.faults import fault_point
from broker.outbox import Outbox
from broker.transport import Delivery
from schemas.control import ConsentWithdrawn, DeliveryReceipt

if TYPE_CHECKING:
    from adapters.casesystem import CaseSystem
    from broker.directory import Directory
    from broker.keys import Sender

log = structlog.get_logger(__name__)

DETAIL_MAX = 2000
"""Longest operator detail kept for a quarantined envelope."""
RECEIPT_CHUNK = 200
"""Pending receipts sealed and queued per transaction by `Inbox.retry_receipts`."""


class Outcome(StrEnum):
    """What `Inbox.handle` did with a delivery; every outcome is acked."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"


@dataclass(frozen=True)
class Result:
    """The outcome of one delivery, with the reason and operator detail if quarantined."""

    outcome: Outcome
    envelope_id: str | None
    reason: str | None
    detail: str | None = None


_Work = tuple[OpenedEnvelope | EnvelopeError, bytes, str | None]
"""An envelope to apply (or the error that refused it), its bytes and broker-validated user."""

# Statements built once, so that SQLAlchemy reuses their cache keys and
# compiled forms; executed with parameter dicts (lists of them: executemany).
_i = inbox_table.c
_q = quarantine_table.c
_DIGESTS = sa.select(_i.envelope_id, _i.digest).where(
    _i.envelope_id.in_(sa.bindparam("b_ids", expanding=True))
)
_COUNT = (
    inbox_table.update()
    .where(_i.envelope_id == sa.bindparam("b_id"))
    .values(redeliveries=_i.redeliveries + 1)
)
_COUNT_IF_SAME = (
    inbox_table.update()
    .where(_i.envelope_id == sa.bindparam("b_id"), _i.digest == sa.bindparam("b_digest"))
    .values(redeliveries=_i.redeliveries + 1)
)
_INSERT_INBOX = inbox_table.insert()
_RECEIPTS_OF = sa.select(receipts_table.c.envelope_id, receipts_table.c.recipient).where(
    receipts_table.c.envelope_id.in_(sa.bindparam("b_ids", expanding=True))
)
_INSERT_RECEIPT = receipts_table.insert()
_QUARANTINED_AS = (
    sa.select(_q.id)
    .where(
        _q.envelope_id == sa.bindparam("b_id"),
        _q.reason == sa.bindparam("b_reason"),
        _q.body == sa.bindparam("b_body"),
    )
    .limit(1)
)
_QUARANTINED_WITHOUT_ID = (
    sa.select(_q.id)
    .where(
        _q.envelope_id.is_(None),
        _q.reason == sa.bindparam("b_reason"),
        _q.body == sa.bindparam("b_body"),
    )
    .limit(1)
)
_COUNT_QUARANTINED = (
    quarantine_table.update()
    .where(_q.id == sa.bindparam("b_row"))
    # Refused again after a requeue: it is back in the quarantine.
    .values(redeliveries=_q.redeliveries + 1, requeued_at=None)
)
_INSERT_QUARANTINE = quarantine_table.insert()
_p = pending_receipts_table.c
_INSERT_PENDING = pending_receipts_table.insert()
_PENDING = (
    sa.select(pending_receipts_table)
    .where(_p.queued_at.is_(None))
    .order_by(_p.applied_at, _p.envelope_id)
)
_STILL_PENDING = (
    pending_receipts_table.update()
    .where(_p.envelope_id == sa.bindparam("b_id"), _p.queued_at.is_(None))
    .values(
        attempts=_p.attempts + 1,
        reason=sa.bindparam("b_reason"),
        last_error=sa.bindparam("b_error"),
    )
)
_CLAIM_PENDING = (
    pending_receipts_table.update()
    .where(_p.envelope_id == sa.bindparam("b_id"), _p.queued_at.is_(None))
    .values(attempts=_p.attempts + 1, queued_at=sa.bindparam("b_at"))
)
_PENDING_QUEUED_AS = (
    pending_receipts_table.update()
    .where(_p.envelope_id == sa.bindparam("b_id"))
    .values(receipt_id=sa.bindparam("b_receipt"))
)


@dataclass(frozen=True)
class _Answer:
    """What one delivery receipt says and to whom: an envelope applied here."""

    envelope_id: UUID
    digest: str
    case: str
    recipient: str
    """The envelope's sender, to whom the receipt goes."""
    received_at: datetime
    applied_at: datetime

    @classmethod
    def of(cls, opened: OpenedEnvelope, received_at: datetime, applied_at: datetime) -> _Answer:
        """The receipt owed for `opened`."""
        header = opened.header
        return cls(header.id, opened.digest, header.case, header.sender, received_at, applied_at)

    def pending_row(self, missing: TrmError) -> dict[str, object]:
        """Its ``pending_receipts`` row: why the receipt cannot be sealed yet."""
        return {
            "envelope_id": str(self.envelope_id),
            "case_ref": self.case,
            "recipient": self.recipient,
            "digest": self.digest,
            "received_at": self.received_at,
            "applied_at": self.applied_at,
            "reason": missing.reason,
            "last_error": _detail(missing),
            "attempts": 0,
        }


@dataclass
class _Writes:
    """What one transaction's envelopes add to the database, written together at its end."""

    known: dict[str, str]
    """Digest by envelope id of everything recorded, before or earlier in this transaction."""
    rows: dict[str, dict[str, object]] = field(default_factory=dict)
    """New inbox rows by envelope id."""
    repeats: Counter[str] = field(default_factory=Counter)
    """Copies of a new envelope that arrived again in the same batch."""
    recounts: list[dict[str, object]] = field(default_factory=list)
    """One parameter dict per redelivery of an envelope recorded before."""
    receipts: list[tuple[OpenedEnvelope, DeliveryReceipt, datetime]] = field(default_factory=list)
    """Receipts received for our envelopes, with when they arrived."""
    answers: list[tuple[OpenedEnvelope, datetime, datetime]] = field(default_factory=list)
    """Envelopes applied here that get a receipt: received and applied times."""

    def add_row(self, opened: OpenedEnvelope, received_at: datetime, applied_at: datetime) -> None:
        """Record `opened` as applied; a copy later in the batch is then a duplicate."""
        header = opened.header
        envelope_id = str(header.id)
        self.known[envelope_id] = opened.digest
        self.rows[envelope_id] = {
            "envelope_id": envelope_id,
            "digest": opened.digest,
            "sender": header.sender,
            "case_ref": header.case,
            "kind": str(header.kind),
            "received_at": received_at,
            "applied_at": applied_at,
        }

    def count_redelivery(self, envelope_id: str) -> None:
        """Count one more delivery of an envelope already recorded."""
        if envelope_id in self.rows:
            self.repeats[envelope_id] += 1
        else:
            self.recounts.append({"b_id": envelope_id})

    def inbox_rows(self) -> list[dict[str, object]]:
        """The new inbox rows, with the copies that arrived in the same batch counted."""
        return [{**row, "redeliveries": self.repeats[key]} for key, row in self.rows.items()]


class Inbox:
    """A participant's inbox on its local database."""

    def __init__(
        self,
        engine: Engine,
        *,
        recipient: Recipient,
        sender: Callable[[], Sender],
        directory: Callable[[], Directory],
        case_system: CaseSystem,
        outbox: Outbox,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """Open envelopes for `recipient`, answer with receipts signed by `sender()`.

        `sender` and `directory` are called per delivery so that key rotation
        and directory updates take effect without a restart.
        """
        self.engine = engine
        self.recipient = recipient
        self.sender = sender
        self.directory = directory
        self.case_system = case_system
        self.outbox = outbox
        self.clock = clock or (lambda: datetime.now(UTC))
        self.erasure_wanted = threading.Event()
        """Set once a committed consent withdrawal asked for an erasure."""
        self._asked_erasure = False
        self._receipts_waiting: list[tuple[_Answer, TrmError]] = []
        """Receipts the transaction in progress records as pending, logged once it commits."""

    def handle(self, body: bytes, amqp_user_id: str | None, redelivered: bool = False) -> Result:
        """Open and apply one delivered envelope exactly once; the caller acks afterwards.

        Raises `StorageError` or `CaseSystemError` (or, if our own keys cannot
        sign the receipt, that `TrmError`) with nothing applied: the caller
        must then retry the delivery later, not ack it. A sender the
        directory no longer lists is no such failure: its receipt waits
        (`retry_receipts`).
        """
        received_at = self.clock()
        known = self._known_duplicate(body)
        if known is not None:
            return known
        try:
            opened = open_envelope(
                body,
                recipient=self.recipient,
                directory=self.directory(),
                now=received_at,
                amqp_user_id=amqp_user_id,
                require_user_id=True,
            )
        except EnvelopeError as e:
            return self._refuse(body, e, amqp_user_id, received_at)
        try:
            return self._apply(opened, received_at)
        except StorageError as e:
            if not isinstance(e.__cause__, IntegrityError):
                raise
            # Another consumer recorded the same id between our check and our
            # insert; its transaction won, ours left nothing behind.
            return self._apply(opened, received_at)

    def _known_duplicate(self, body: bytes) -> Result | None:
        """DUPLICATE if these exact bytes were applied before, without opening them again.

        Identical bytes were verified when first applied, so a redelivery
        storm costs a lookup, not a signature check and a decryption. Our
        receipt for it goes out again, in case the sender resent it because
        the receipt was lost.
        """
        try:
            header = read_header(body)
        except EnvelopeError:
            return None
        envelope_id = str(header.id)
        digest = hashlib.sha256(body).hexdigest()
        with storage_errors(f"checking envelope {envelope_id}"), self.engine.begin() as conn:
            counted = conn.execute(
                _COUNT_IF_SAME, {"b_id": envelope_id, "b_digest": digest}
            ).rowcount
            if counted:
                self.outbox.receipts_again(conn, [envelope_id])
        if not counted:
            return None
        log.info(
            "inbox.duplicate",
            envelope_id=envelope_id,
            case=header.case,
            participant=self.recipient.participant,
            sender=header.sender,
            kind=str(header.kind),
        )
        return Result(Outcome.DUPLICATE, envelope_id, None)

    def handle_batch(self, deliveries: Sequence[Delivery]) -> list[Result]:
        """`handle` for several deliveries in one transaction; results in the same order.

        Each envelope is opened first (outside the transaction), then every
        one is deduplicated, applied or recorded as quarantined, and every
        receipt queued, in a single transaction: one commit (and, with
        `FileCaseSystem`, one folder sync) for the whole batch. The caller
        acks the batch after this returns. A concurrent consumer that
        recorded one of the ids first makes the batch fall back to `handle`
        one delivery at a time, which is idempotent. Raises as `handle` does,
        with nothing of the batch applied.
        """
        if len(deliveries) == 1:
            only = deliveries[0]
            return [self.handle(only.body, only.user_id, only.redelivered)]
        received_at = self.clock()
        directory = self.directory()
        results: list[Result | None] = [None] * len(deliveries)
        indexes: list[int] = []
        work: list[_Work] = []
        for index, item in enumerate(deliveries):
            # Only a redelivery can be a known duplicate worth skipping the open for.
            known = self._known_duplicate(item.body) if item.redelivered else None
            if known is not None:
                results[index] = known
                continue
            try:
                opened: OpenedEnvelope | EnvelopeError = open_envelope(
                    item.body,
                    recipient=self.recipient,
                    directory=directory,
                    now=received_at,
                    amqp_user_id=item.user_id,
                    require_user_id=True,
                )
            except EnvelopeError as e:
                opened = e
            indexes.append(index)
            work.append((opened, item.body, item.user_id))
        try:
            with storage_errors("applying a batch of envelopes"), self.engine.begin() as conn:
                with batched(self.case_system):
                    applied = self._apply_all(conn, work, received_at)
                fault_point("inbox.before_commit")
        except StorageError as e:
            if not isinstance(e.__cause__, IntegrityError):
                raise
            return [self.handle(d.body, d.user_id, d.redelivered) for d in deliveries]
        fault_point("inbox.after_commit")
        self._committed()
        for index, result in zip(indexes, applied, strict=True):
            results[index] = result
        done = [r for r in results if r is not None]
        for result in done:
            log.info(
                f"inbox.{result.outcome}",
                envelope_id=result.envelope_id,
                participant=self.recipient.participant,
                reason=result.reason,
            )
        return done

    def _apply(self, opened: OpenedEnvelope, received_at: datetime) -> Result:
        header = opened.header
        envelope_id = str(header.id)
        with storage_errors(f"applying envelope {envelope_id}"), self.engine.begin() as conn:
            [result] = self._apply_all(conn, [(opened, opened.raw, None)], received_at)
            fault_point("inbox.before_commit")
        fault_point("inbox.after_commit")
        self._committed()
        log.info(
            f"inbox.{result.outcome}",
            envelope_id=envelope_id,
            case=header.case,
            participant=self.recipient.participant,
            sender=header.sender,
            kind=str(header.kind),
            reason=result.reason,
        )
        return result

    def _committed(self) -> None:
        """Wake the erasures once the withdrawals that ask for them are committed."""
        if self._asked_erasure:
            self._asked_erasure = False
            self.erasure_wanted.set()
        waiting, self._receipts_waiting = self._receipts_waiting, []
        for answer, missing in waiting:
            log.warning(
                "inbox.receipt_pending",
                envelope_id=str(answer.envelope_id),
                case=answer.case,
                participant=answer.recipient,
                reason=missing.reason,
                error=str(missing),
            )

    def _apply_all(
        self, conn: Connection, work: Sequence[_Work], received_at: datetime
    ) -> list[Result]:
        """Apply, deduplicate or quarantine each of `work`, in order, in `conn`'s transaction.

        The inbox is read once for all ids and the rows, receipts and answers
        are written together at the end, a few statements for the whole
        batch instead of several per envelope.
        """
        self._receipts_waiting = []
        opened_all = [opened for opened, _, _ in work if isinstance(opened, OpenedEnvelope)]
        ids = [str(opened.header.id) for opened in opened_all]
        # The case views first (locked on PostgreSQL), then the inbox: under read
        # committed a copy applied by another consumer meanwhile is then seen in both,
        # a duplicate, never judged against a view that already holds it.
        gate = CaseGate(conn, self.recipient.participant, self.directory(), opened_all)
        writes = _Writes(known=dict(_select_in(conn, _DIGESTS, ids)))
        results = [
            self._place(conn, writes, gate, opened, body, user_id, received_at)
            for opened, body, user_id in work
        ]
        gate.write(conn, received_at)
        self._asked_erasure = self._asked_erasure or bool(gate.erasures)
        if writes.recounts:
            conn.execute(_COUNT, writes.recounts)
            self.outbox.receipts_again(conn, [str(r["b_id"]) for r in writes.recounts])
        if writes.rows:
            conn.execute(_INSERT_INBOX, writes.inbox_rows())
        if writes.receipts:
            self._record_receipts(conn, writes.receipts)
        if writes.answers:
            self._answer(conn, writes.answers)
        return results

    def _place(
        self,
        conn: Connection,
        writes: _Writes,
        gate: CaseGate,
        opened: OpenedEnvelope | EnvelopeError,
        body: bytes,
        user_id: str | None,
        received_at: datetime,
    ) -> Result:
        """Decide one envelope's outcome; apply it to the case system if it is new."""
        if not isinstance(opened, OpenedEnvelope):
            # The broker-validated user id is the one origin we can trust here;
            # without one the sender is unknown, whatever the envelope claims.
            envelope_id = _unverified_id(body)
            self._record_quarantine(conn, body, opened, envelope_id, user_id, received_at)
            return Result(Outcome.QUARANTINED, envelope_id, opened.reason, _detail(opened))
        header = opened.header
        envelope_id = str(header.id)
        seen = writes.known.get(envelope_id)
        if seen == opened.digest:
            writes.count_redelivery(envelope_id)
            return Result(Outcome.DUPLICATE, envelope_id, None)
        if seen is not None:
            error = ReplayedEnvelope(
                f"envelope id {envelope_id} was applied before with other bytes "
                f"(digest {seen[:16]}..., now {opened.digest[:16]}...)"
            )
            self._record_quarantine(
                conn, opened.raw, error, envelope_id, header.sender, received_at
            )
            return Result(Outcome.QUARANTINED, envelope_id, error.reason, str(error))
        refusal = gate.admit(opened)
        if refusal is not None:
            violation = ProtocolViolation(refusal.reason, refusal.detail)
            self._record_quarantine(
                conn, opened.raw, violation, envelope_id, header.sender, received_at
            )
            return Result(Outcome.QUARANTINED, envelope_id, violation.reason, str(violation))
        writes.add_row(opened, received_at, self._take(writes, opened, received_at))
        gate.take(opened, received_at)
        return Result(Outcome.APPLIED, envelope_id, None)

    def _take(self, writes: _Writes, opened: OpenedEnvelope, received_at: datetime) -> datetime:
        """Apply a new envelope (its receipt is queued in `writes`); return when it was applied."""
        if isinstance(opened.message, DeliveryReceipt):
            writes.receipts.append((opened, opened.message, received_at))
            return received_at
        try:
            if not _asks_erasure(opened):
                self.case_system.deliver(opened)
        except TrmError:
            raise
        except Exception as e:
            raise CaseSystemError(
                f"the case system refused envelope {opened.header.id}: {type(e).__name__}: {e}"
            ) from e
        applied_at = max(self.clock(), received_at)
        writes.answers.append((opened, received_at, applied_at))
        return applied_at

    def _answer(
        self, conn: Connection, answers: Sequence[tuple[OpenedEnvelope, datetime, datetime]]
    ) -> None:
        """Put a signed delivery receipt for each applied envelope's sender in the outbox.

        A receipt is signed, not sealed, so it needs no key of the sender's.
        A sender the directory no longer lists cannot be answered now: its
        receipt is recorded in ``pending_receipts``, for `retry_receipts`,
        and the batch goes on.
        """
        directory = self.directory()
        ready: list[_Answer] = []
        waiting: list[dict[str, object]] = []
        for opened, received_at, applied_at in answers:
            answer = _Answer.of(opened, received_at, applied_at)
            missing = _unlisted(directory, answer.recipient)
            if missing is None:
                ready.append(answer)
                continue
            waiting.append(answer.pending_row(missing))
            self._receipts_waiting.append((answer, missing))
        if waiting:
            conn.execute(_INSERT_PENDING, waiting)
        self._queue_receipts(conn, directory, ready)

    def _queue_receipts(
        self,
        conn: Connection,
        directory: Directory,
        answers: Sequence[_Answer],
        now: datetime | None = None,
    ) -> list[SealedEnvelope]:
        """Sign and queue a receipt for each of `answers`, sent at `now` (default: when applied).

        The sequence numbers of all receipts are taken with one upsert, a run
        of consecutive numbers per case.
        """
        if not answers:
            return []
        me = self.sender()
        counts = Counter(answer.case for answer in answers)
        following = self.outbox.reserve_seqs(conn, me.participant, counts)
        sealed: list[tuple[SealedEnvelope, datetime]] = []
        for answer in answers:
            seq, following[answer.case] = following[answer.case], following[answer.case] + 1
            at = now or answer.applied_at
            sealed.append((_receipt(answer, me, directory, seq, at), at))
        self.outbox.add_many(conn, sealed)
        return [receipt for receipt, _ in sealed]

    def retry_receipts(self) -> int:
        """Sign and queue the receipts that wait; return how many were queued.

        The adapter calls this when the installed directory changes and every
        so often. A receipt whose recipient the directory still does not list
        stays pending with its attempt counted (those an older version left
        waiting for the recipient's encryption key go out now); one that
        another process queued meanwhile is skipped. Raises `StorageError`, or
        the `TrmError` of our own keys, with nothing queued by the failing
        transaction.
        """
        with storage_errors("reading the pending receipts"), reading(self.engine) as conn:
            rows = conn.execute(_PENDING).all()
        if not rows:
            return 0
        now = self.clock()
        directory = self.directory()
        missing: dict[str, TrmError | None] = {}
        ready: list[_Answer] = []
        still: list[dict[str, object]] = []
        for row in rows:
            if row.recipient not in missing:
                missing[row.recipient] = _unlisted(directory, row.recipient)
            error = missing[row.recipient]
            if error is not None:
                still.append(
                    {"b_id": row.envelope_id, "b_reason": error.reason, "b_error": _detail(error)}
                )
                continue
            ready.append(
                _Answer(
                    UUID(row.envelope_id),
                    row.digest,
                    row.case_ref,
                    row.recipient,
                    row.received_at,
                    row.applied_at,
                )
            )
        if still:
            with storage_errors("counting the pending receipts"), self.engine.begin() as conn:
                conn.execute(_STILL_PENDING, still)
        queued = 0
        for start in range(0, len(ready), RECEIPT_CHUNK):
            queued += self._queue_pending(directory, ready[start : start + RECEIPT_CHUNK], now)
        log.info("inbox.receipts_retried", queued=queued, pending=len(rows) - queued)
        return queued

    def _queue_pending(
        self, directory: Directory, answers: Sequence[_Answer], now: datetime
    ) -> int:
        """Claim, sign and queue these pending receipts in one transaction; how many."""
        with storage_errors("queueing the pending receipts"), self.engine.begin() as conn:
            claimed = [
                answer
                for answer in answers
                if conn.execute(
                    _CLAIM_PENDING, {"b_id": str(answer.envelope_id), "b_at": now}
                ).rowcount
            ]
            receipts = self._queue_receipts(conn, directory, claimed, now)
            if receipts:
                conn.execute(
                    _PENDING_QUEUED_AS,
                    [
                        {"b_id": str(answer.envelope_id), "b_receipt": str(receipt.id)}
                        for answer, receipt in zip(claimed, receipts, strict=True)
                    ],
                )
        for answer, receipt in zip(claimed, receipts, strict=True):
            log.info(
                "inbox.receipt_queued",
                envelope_id=str(answer.envelope_id),
                case=answer.case,
                participant=answer.recipient,
                receipt_id=str(receipt.id),
            )
        return len(claimed)

    def _record_receipts(
        self,
        conn: Connection,
        receipts: Sequence[tuple[OpenedEnvelope, DeliveryReceipt, datetime]],
    ) -> None:
        """Record receipts for our envelopes, once per (envelope, recipient); never answered.

        The gate has refused every receipt from a participant that was not a
        recipient of the envelope, or with another digest. Each receipt ends
        the relay's wait for it (`broker.reception`), in the same transaction.
        """
        ours = list({str(receipt.envelope_id) for _, receipt, _ in receipts})
        recorded = set(_select_in(conn, _RECEIPTS_OF, ours))
        rows: list[dict[str, object]] = []
        for opened, receipt, received_at in receipts:
            envelope_id = str(receipt.envelope_id)
            recipient = opened.header.sender
            if (envelope_id, recipient) in recorded:
                continue
            recorded.add((envelope_id, recipient))
            rows.append(
                {
                    "envelope_id": envelope_id,
                    "recipient": recipient,
                    "receipt_envelope_id": str(opened.header.id),
                    "received_at": received_at,
                }
            )
        if rows:
            conn.execute(_INSERT_RECEIPT, rows)
            answered = [(str(row["envelope_id"]), str(row["recipient"])) for row in rows]
            reception.clear(conn, answered)

    def _refuse(
        self, body: bytes, error: EnvelopeError, amqp_user_id: str | None, at: datetime
    ) -> Result:
        """Record an envelope that failed opening; the caller moves it to the quarantine.

        Its sender is recorded as the broker-validated user id, None when the
        delivery had none: never the sender the unverified envelope claims.
        """
        envelope_id = _unverified_id(body)
        sender = amqp_user_id
        with storage_errors("recording a quarantined envelope"), self.engine.begin() as conn:
            self._record_quarantine(conn, body, error, envelope_id, sender, at)
        log.warning(
            "inbox.quarantined",
            envelope_id=envelope_id,
            participant=self.recipient.participant,
            sender=sender,
            reason=error.reason,
        )
        return Result(Outcome.QUARANTINED, envelope_id, error.reason, _detail(error))

    def _record_quarantine(
        self,
        conn: Connection,
        body: bytes,
        error: EnvelopeError,
        envelope_id: str | None,
        sender: str | None,
        at: datetime,
    ) -> None:
        """Insert a quarantine row, or count a redelivery of one already recorded."""
        find = _QUARANTINED_WITHOUT_ID if envelope_id is None else _QUARANTINED_AS
        existing = conn.execute(
            find, {"b_id": envelope_id, "b_reason": error.reason, "b_body": body}
        ).first()
        if existing is not None:
            conn.execute(_COUNT_QUARANTINED, {"b_row": existing.id})
            return
        conn.execute(
            _INSERT_QUARANTINE,
            {
                "envelope_id": envelope_id,
                "sender": sender,
                "reason": error.reason,
                "detail": _detail(error),
                "received_at": at,
                "body": body,
                "redeliveries": 0,
            },
        )


@contextmanager
def batched(case_system: CaseSystem) -> Iterator[None]:
    """The case system's own batch context (one folder sync per batch), if it has one."""
    start = getattr(case_system, "batch", None)
    if not callable(start):
        yield
        return
    with start():
        yield


def _receipt(
    answer: _Answer, me: Sender, directory: Directory, seq: int, now: datetime
) -> SealedEnvelope:
    """`me`'s delivery receipt for `answer`, signed for its recipient with number `seq`.

    Signed, not sealed: it holds no personal data, and its recipient's
    encryption key plays no part (docs/envelope.md, "The signed form").
    """
    return sign(
        DeliveryReceipt(
            envelope_id=answer.envelope_id,
            digest=answer.digest,
            received_at=answer.received_at,
            applied_at=answer.applied_at,
        ),
        case=answer.case,
        sender=me,
        recipients=(answer.recipient,),
        directory=directory,
        seq=seq,
        reply_to=answer.envelope_id,
        now=now,
    )


def _unlisted(directory: Directory, recipient: str) -> TrmError | None:
    """Why a receipt for `recipient` cannot be signed now, or None if it can.

    `sign` refuses a recipient the directory does not list; such a receipt
    waits for a directory that does instead of failing the batch.
    """
    try:
        directory.participant(recipient)
    except UnknownParticipant as e:
        return e
    return None


def _asks_erasure(opened: OpenedEnvelope) -> bool:
    """A withdrawal asking deletion is recorded, never written where it would be erased.

    So that it is taken even when the case folder cannot be written, and the
    erasure it asks for is what waits and is retried.
    """
    message = opened.message
    return isinstance(message, ConsentWithdrawn) and message.delete_data


def _unverified_id(body: bytes) -> str | None:
    """The id an envelope that failed opening claims, if its frame parses."""
    try:
        header = read_header(body)
    except EnvelopeError:
        return None
    return str(header.id)


def _detail(error: TrmError) -> str:
    return str(error)[:DETAIL_MAX]


def _select_in(
    conn: Connection, statement: sa.Select[str, str], ids: Sequence[str]
) -> list[tuple[str, str]]:
    """The rows of `statement` for `ids` (its expanding ``b_ids``), as pairs."""
    return [(row[0], row[1]) for row in select_in(conn, statement, ids)]
