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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from broker.database import (
    inbox_table,
    outbox_table,
    quarantine_table,
    receipts_table,
    storage_errors,
)
from broker.envelope import OpenedEnvelope, Recipient, open_envelope, read_header, seal
from broker.errors import (
    CaseSystemError,
    EnvelopeError,
    ReplayedEnvelope,
    StorageError,
    TrmError,
)
from broker.faults import fault_point
from broker.outbox import Outbox
from broker.transport import Delivery
from schemas.control import DeliveryReceipt

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
        t = inbox_table.c
        with storage_errors(f"checking envelope {envelope_id}"), self.engine.begin() as conn:
            counted = conn.execute(
                inbox_table.update()
                .where(t.envelope_id == envelope_id, t.digest == digest)
                .values(redeliveries=t.redeliveries + 1)
            ).rowcount
        if not counted:
            return None
        log.info(
            "inbox.duplicate",
            envelope_id=envelope_id,
            case=header.case,
            participant=header.sender,
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
        work: list[tuple[int, OpenedEnvelope | EnvelopeError, Delivery]] = []
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
            work.append((index, opened, item))
        try:
            with storage_errors("applying a batch of envelopes"), self.engine.begin() as conn:
                with batched(self.case_system):
                    for index, opened, item in work:
                        results[index] = self._record(conn, opened, item, received_at)
                fault_point("inbox.before_commit")
        except StorageError as e:
            if not isinstance(e.__cause__, IntegrityError):
                raise
            return [self.handle(d.body, d.user_id, d.redelivered) for d in deliveries]
        fault_point("inbox.after_commit")
        done = [r for r in results if r is not None]
        for result in done:
            log.info(
                f"inbox.{result.outcome}", envelope_id=result.envelope_id, reason=result.reason
            )
        return done

    def _record(
        self,
        conn: Connection,
        opened: OpenedEnvelope | EnvelopeError,
        item: Delivery,
        received_at: datetime,
    ) -> Result:
        """Apply an opened envelope, or record a refused one, inside `conn`'s transaction."""
        if isinstance(opened, OpenedEnvelope):
            return self._apply_in(conn, opened, received_at)
        envelope_id, claimed = _unverified_origin(item.body)
        sender = item.user_id or claimed
        self._record_quarantine(conn, item.body, opened, envelope_id, sender, received_at)
        return Result(Outcome.QUARANTINED, envelope_id, opened.reason, _detail(opened))

    def _apply(self, opened: OpenedEnvelope, received_at: datetime) -> Result:
        header = opened.header
        envelope_id = str(header.id)
        with storage_errors(f"applying envelope {envelope_id}"), self.engine.begin() as conn:
            result = self._apply_in(conn, opened, received_at)
            fault_point("inbox.before_commit")
        fault_point("inbox.after_commit")
        log.info(
            f"inbox.{result.outcome}",
            envelope_id=envelope_id,
            case=header.case,
            participant=header.sender,
            kind=str(header.kind),
            reason=result.reason,
        )
        return result

    def _apply_in(self, conn: Connection, opened: OpenedEnvelope, received_at: datetime) -> Result:
        """Deduplicate and apply `opened` inside `conn`'s transaction."""
        header = opened.header
        envelope_id = str(header.id)
        seen = conn.execute(
            sa.select(inbox_table.c.digest).where(inbox_table.c.envelope_id == envelope_id)
        ).first()
        if seen is not None and seen.digest == opened.digest:
            conn.execute(
                inbox_table.update()
                .where(inbox_table.c.envelope_id == envelope_id)
                .values(redeliveries=inbox_table.c.redeliveries + 1)
            )
            result = Result(Outcome.DUPLICATE, envelope_id, None)
        elif seen is not None:
            error = ReplayedEnvelope(
                f"envelope id {envelope_id} was applied before with other bytes "
                f"(digest {seen.digest[:16]}..., now {opened.digest[:16]}...)"
            )
            self._record_quarantine(
                conn, opened.raw, error, envelope_id, header.sender, received_at
            )
            result = Result(Outcome.QUARANTINED, envelope_id, error.reason, str(error))
        else:
            applied_at = self._take(conn, opened, received_at)
            conn.execute(
                inbox_table.insert().values(
                    envelope_id=envelope_id,
                    digest=opened.digest,
                    sender=header.sender,
                    case_ref=header.case,
                    kind=str(header.kind),
                    received_at=received_at,
                    applied_at=applied_at,
                    redeliveries=0,
                )
            )
            result = Result(Outcome.APPLIED, envelope_id, None)
        return result

    def _take(self, conn: Connection, opened: OpenedEnvelope, received_at: datetime) -> datetime:
        """Apply a new envelope inside `conn`'s transaction; return when it was applied."""
        if isinstance(opened.message, DeliveryReceipt):
            self._record_receipt(conn, opened, opened.message, received_at)
            return received_at
        try:
            self.case_system.deliver(opened)
        except TrmError:
            raise
        except Exception as e:
            raise CaseSystemError(
                f"the case system refused envelope {opened.header.id}: {type(e).__name__}: {e}"
            ) from e
        applied_at = max(self.clock(), received_at)
        self._answer(conn, opened, received_at, applied_at)
        return applied_at

    def _answer(
        self, conn: Connection, opened: OpenedEnvelope, received_at: datetime, applied_at: datetime
    ) -> None:
        """Put a signed delivery receipt for the envelope's sender in the outbox."""
        header = opened.header
        me = self.sender()
        receipt = DeliveryReceipt(
            envelope_id=header.id,
            digest=opened.digest,
            received_at=received_at,
            applied_at=applied_at,
        )
        sealed = seal(
            receipt,
            case=header.case,
            sender=me,
            recipients=(header.sender,),
            directory=self.directory(),
            seq=self.outbox.next_seq(conn, me.participant, header.case),
            reply_to=header.id,
            now=applied_at,
        )
        self.outbox.add(conn, sealed, now=applied_at)

    def _record_receipt(
        self,
        conn: Connection,
        opened: OpenedEnvelope,
        receipt: DeliveryReceipt,
        received_at: datetime,
    ) -> None:
        """Record a receipt for one of our envelopes; receipts are never answered."""
        ours = str(receipt.envelope_id)
        sent = conn.execute(
            sa.select(outbox_table.c.digest).where(outbox_table.c.envelope_id == ours)
        ).first()
        if sent is None or sent.digest != receipt.digest:
            log.warning(
                "inbox.receipt_mismatch",
                envelope_id=str(opened.header.id),
                acknowledges=ours,
                participant=opened.header.sender,
                known=sent is not None,
            )
        exists = conn.execute(
            sa.select(receipts_table.c.envelope_id).where(
                receipts_table.c.envelope_id == ours,
                receipts_table.c.recipient == opened.header.sender,
            )
        ).first()
        if exists is None:
            conn.execute(
                receipts_table.insert().values(
                    envelope_id=ours,
                    recipient=opened.header.sender,
                    receipt_envelope_id=str(opened.header.id),
                    received_at=received_at,
                )
            )

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
            participant=sender,
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
        q = quarantine_table.c
        same_id = q.envelope_id.is_(None) if envelope_id is None else q.envelope_id == envelope_id
        existing = conn.execute(
            sa.select(q.id).where(same_id, q.reason == error.reason, q.body == body).limit(1)
        ).first()
        if existing is not None:
            conn.execute(
                quarantine_table.update()
                .where(q.id == existing.id)
                .values(redeliveries=q.redeliveries + 1)
            )
            return
        conn.execute(
            quarantine_table.insert().values(
                envelope_id=envelope_id,
                sender=sender,
                reason=error.reason,
                detail=_detail(error),
                received_at=at,
                body=body,
                redeliveries=0,
            )
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


def _unverified_origin(body: bytes) -> tuple[str | None, str | None]:
    """The id and claimed sender of an envelope that failed opening, if its frame parses."""
    try:
        header = read_header(body)
    except EnvelopeError:
        return None, None
    return str(header.id), header.sender


def _detail(error: EnvelopeError) -> str:
    return str(error)[:DETAIL_MAX]
