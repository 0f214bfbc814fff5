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
quarantine and acks.
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

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from broker import reception
from broker.casegate import CaseGate
from broker.database import (
    inbox_table,
    quarantine_table,
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
    seal,
)
from broker.errors import (
    CaseSystemError,
    EnvelopeError,
    ProtocolViolation,
    ReplayedEnvelope,
    StorageError,
    TrmError,
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
    .values(redeliveries=_q.redeliveries + 1)
)
_INSERT_QUARANTINE = quarantine_table.insert()


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

    def handle(self, body: bytes, amqp_user_id: str | None, redelivered: bool = False) -> Result:
        """Open and apply one delivered envelope exactly once; the caller acks afterwards.

        Raises `StorageError` or `CaseSystemError` (or, if our own keys cannot
        seal the receipt, that `TrmError`) with nothing applied: the caller
        must then reject the delivery for redelivery, not ack it.
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
        storm costs a lookup, not a signature check and a decryption.
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

    def _apply_all(
        self, conn: Connection, work: Sequence[_Work], received_at: datetime
    ) -> list[Result]:
        """Apply, deduplicate or quarantine each of `work`, in order, in `conn`'s transaction.

        The inbox is read once for all ids and the rows, receipts and answers
        are written together at the end, a few statements for the whole
        batch instead of several per envelope.
        """
        opened_all = [opened for opened, _, _ in work if isinstance(opened, OpenedEnvelope)]
        ids = [str(opened.header.id) for opened in opened_all]
        writes = _Writes(known=dict(_select_in(conn, _DIGESTS, ids)))
        gate = CaseGate(conn, self.recipient.participant, self.directory(), opened_all)
        results = [
            self._place(conn, writes, gate, opened, body, user_id, received_at)
            for opened, body, user_id in work
        ]
        gate.write(conn, received_at)
        self._asked_erasure = self._asked_erasure or bool(gate.erasures)
        if writes.recounts:
            conn.execute(_COUNT, writes.recounts)
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
            envelope_id, claimed = _unverified_origin(body)
            # The broker-validated user id is the one origin we can trust here.
            sender = user_id or claimed
            self._record_quarantine(conn, body, opened, envelope_id, sender, received_at)
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

        The sequence numbers of all receipts are taken with one upsert, a run
        of consecutive numbers per case.
        """
        me = self.sender()
        directory = self.directory()
        counts = Counter(opened.header.case for opened, _, _ in answers)
        following = self.outbox.reserve_seqs(conn, me.participant, counts)
        sealed: list[tuple[SealedEnvelope, datetime]] = []
        for opened, received_at, applied_at in answers:
            case = opened.header.case
            seq, following[case] = following[case], following[case] + 1
            receipt = _receipt(opened, me, directory, seq, received_at, applied_at)
            sealed.append((receipt, applied_at))
        self.outbox.add_many(conn, sealed)

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
        """Record an envelope that failed opening; the caller moves it to the quarantine."""
        envelope_id, claimed = _unverified_origin(body)
        # The broker-validated user id is the one origin we can trust here.
        sender = amqp_user_id or claimed
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
    opened: OpenedEnvelope,
    me: Sender,
    directory: Directory,
    seq: int,
    received_at: datetime,
    applied_at: datetime,
) -> SealedEnvelope:
    """`me`'s signed delivery receipt for `opened`, sealed for its sender with number `seq`."""
    header = opened.header
    return seal(
        DeliveryReceipt(
            envelope_id=header.id,
            digest=opened.digest,
            received_at=received_at,
            applied_at=applied_at,
        ),
        case=header.case,
        sender=me,
        recipients=(header.sender,),
        directory=directory,
        seq=seq,
        reply_to=header.id,
        now=applied_at,
    )


def _asks_erasure(opened: OpenedEnvelope) -> bool:
    """A withdrawal asking deletion is recorded, never written where it would be erased.

    So that it is taken even when the case folder cannot be written, and the
    erasure it asks for is what waits and is retried.
    """
    message = opened.message
    return isinstance(message, ConsentWithdrawn) and message.delete_data


def _unverified_origin(body: bytes) -> tuple[str | None, str | None]:
    """The id and claimed sender of an envelope that failed opening, if its frame parses."""
    try:
        header = read_header(body)
    except EnvelopeError:
        return None, None
    return str(header.id), header.sender


def _detail(error: EnvelopeError) -> str:
    return str(error)[:DETAIL_MAX]


def _select_in(
    conn: Connection, statement: sa.Select[str, str], ids: Sequence[str]
) -> list[tuple[str, str]]:
    """The rows of `statement` for `ids` (its expanding ``b_ids``), as pairs."""
    return [(row[0], row[1]) for row in select_in(conn, statement, ids)]
