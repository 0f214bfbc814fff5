"""The quarantine as an operator works it: list, requeue once the cause is fixed, purge.

Refused messages are held in two places. The inbox records every envelope it
refuses in the local ``quarantine`` table and copies it to the broker's
``trm.quarantine.<id>`` with its reason (``x-trm-reason``). The broker itself
dead-letters there a message delivered `DELIVERY_LIMIT` times without an ack
(one that kills the consumer each time), and no row records that one: only
its ``x-death`` and ``x-first-death-reason`` headers say why. `entries` shows
both: every local row under its number, and every broker message whose bytes
no row holds under ``b-`` and the start of its SHA-256.

A requeue publishes the original bytes to the participant's own inbox through
the handoff exchange, as the participant: RabbitMQ validates that user id, so
nobody else can requeue into this inbox. The ``x-trm-requeued-from`` header
carries the AMQP user that first published the envelope (broker-validated
then, and recorded with the row), and the inbox checks it against the signed
sender exactly as on the first arrival (`as_first_published`): a requeue
never turns a forged origin into a trusted one. The inbox then applies the
envelope, or absorbs it as a duplicate if it was applied meanwhile. The
routing service sees the requeue too, published by the wrong user for that
sender: it logs the bytes as a duplicate when it had them, as refused if not.

The broker queue is read by taking every message without an ack and giving
them all back with one nack; a quorum queue counts that as a delivery
(``x-delivery-count``), and the quarantine queue has no delivery limit, so
reading loses nothing. A read returns only once the queue counts them ready
again, so that the read after it (a requeue after a listing) finds them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pika.exceptions
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from broker.database import quarantine_table, storage_errors
from broker.envelope import read_header
from broker.errors import ConfigError, EnvelopeError
from broker.topology import quarantine_queue
from broker.transport import AmqpSettings, Delivery, Publisher, open_connection, translate

REQUEUED_FROM = "x-trm-requeued-from"
"""Header of a requeue: the AMQP user that first published it ("" for none)."""
BROKER_PREFIX = "b-"
_DIGEST_SHOWN = 12
_GIVE_BACK = 10.0
"""Seconds a read waits for the messages it gives back to be counted ready again."""
_GIVE_BACK_POLL = 0.005


@dataclass(frozen=True)
class Held:
    """One message in the broker quarantine queue, as read."""

    body: bytes
    user_id: str | None
    headers: Mapping[str, Any]

    @property
    def digest(self) -> str:
        """SHA-256 of the exact bytes, hex."""
        return hashlib.sha256(self.body).hexdigest()

    @property
    def reason(self) -> str:
        """Why it is here: the inbox's reason, else the broker's dead-lettering reason."""
        reason = _text(self.headers.get("x-trm-reason"))
        if reason:
            return reason
        dead = _text(self.headers.get("x-first-death-reason"))
        if not dead:
            deaths = self.headers.get("x-death")
            if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
                dead = _text(deaths[0].get("reason"))
        return f"dead-lettered: {dead or 'unknown'}"


@dataclass(frozen=True)
class Entry:
    """One quarantined message: a local row (``id`` its number) or only in the broker."""

    id: str
    envelope_id: str | None
    sender: str | None
    reason: str
    received_at: datetime | None
    redeliveries: int
    requeued_at: datetime | None
    in_database: bool


class BrokerQuarantine:
    """A participant's ``trm.quarantine.<id>`` queue, read and emptied as the participant."""

    def __init__(self, settings: AmqpSettings, participant_id: str) -> None:
        self.settings = settings
        self.participant_id = participant_id
        self.queue = quarantine_queue(participant_id)

    def messages(self) -> list[Held]:
        """Every message now in the queue; all of them stay there."""
        return self._take(lambda _held: False)

    def remove(self, digests: Collection[str]) -> int:
        """Remove the messages whose bytes have one of `digests`; how many were removed."""
        removed = self._take(lambda held: held.digest in digests)
        return sum(1 for held in removed if held.digest in digests)

    def purge(self) -> int:
        """Empty the queue; how many messages it held."""
        frame = self._run("purging", lambda channel: channel.queue_purge(self.queue))
        return int(frame.method.message_count)

    def _take(self, ack: Callable[[Held], bool]) -> list[Held]:
        def read(channel: Any) -> list[Held]:
            count = self._ready(channel)
            found: list[Held] = []
            kept = 0
            for _ in range(count):
                method, properties, body = channel.basic_get(self.queue, auto_ack=False)
                if method is None:
                    break
                held = Held(body or b"", properties.user_id, dict(properties.headers or {}))
                found.append(held)
                if ack(held):
                    channel.basic_ack(method.delivery_tag)
                else:
                    kept += 1
            if kept:
                channel.basic_nack(0, multiple=True, requeue=True)
                self._await_ready(channel, count - (len(found) - kept))
            return found

        held: list[Held] = self._run("reading", read)
        return held

    def _ready(self, channel: Any) -> int:
        return int(channel.queue_declare(self.queue, passive=True).method.message_count)

    def _await_ready(self, channel: Any, expected: int) -> None:
        """Wait until the queue counts `expected` messages ready again, or `_GIVE_BACK` passed.

        A quorum queue takes back what a reader returns on its own time; the
        next read, a moment later, would find the queue short of them. Past
        the deadline they are still on their way back, never lost.
        """
        deadline = time.monotonic() + _GIVE_BACK
        while self._ready(channel) < expected and time.monotonic() < deadline:
            time.sleep(_GIVE_BACK_POLL)

    def _run(self, doing: str, work: Callable[[Any], Any]) -> Any:
        connection = open_connection(self.settings)
        try:
            return work(connection.channel())
        except (pika.exceptions.AMQPError, OSError) as e:
            raise translate(e, self.settings, f"{doing} {self.queue}") from e
        finally:
            if connection.is_open:
                connection.close()


_q = quarantine_table.c


def entries(engine: Engine, held: list[Held]) -> list[Entry]:
    """Every local row, then every held message whose bytes no row has, oldest first."""
    with storage_errors("reading the quarantine"), engine.connect() as conn:
        rows = conn.execute(sa.select(quarantine_table).order_by(_q.id)).all()
    found = [
        Entry(
            id=str(r.id),
            envelope_id=r.envelope_id,
            sender=r.sender,
            reason=r.reason,
            received_at=r.received_at,
            redeliveries=r.redeliveries,
            requeued_at=r.requeued_at,
            in_database=True,
        )
        for r in rows
    ]
    local = {hashlib.sha256(r.body).hexdigest() for r in rows}
    seen: set[str] = set()
    for message in held:
        if message.digest in local or message.digest in seen:
            continue
        seen.add(message.digest)
        envelope_id, claimed = _origin(message.body)
        found.append(
            Entry(
                id=BROKER_PREFIX + message.digest[:_DIGEST_SHOWN],
                envelope_id=envelope_id,
                sender=message.user_id or claimed,
                reason=message.reason,
                received_at=None,
                redeliveries=int(message.headers.get("x-delivery-count") or 0),
                requeued_at=None,
                in_database=False,
            )
        )
    return found


def requeue(
    engine: Engine,
    broker: BrokerQuarantine,
    entry_id: str,
    *,
    now: datetime | None = None,
) -> Entry:
    """Send quarantined `entry_id` back to the inbox with its original bytes; the entry.

    Its local row (if any) is marked requeued before the publish, so that the
    inbox refusing it again at once clears the mark rather than racing it; a
    failed publish clears it too. Its broker copies are removed once RabbitMQ
    confirmed the requeue.
    """
    held = broker.messages()
    body, published_by, entry = _find(engine, held, entry_id)
    at = now or datetime.now(UTC)
    _mark(engine, entry, at)
    publisher: Publisher | None = None
    try:
        publisher = Publisher(broker.settings, broker.participant_id)
        publisher.requeue(
            body,
            recipient=broker.participant_id,
            envelope_id=entry.envelope_id,
            headers={REQUEUED_FROM: published_by or ""},
        )
    except BaseException:
        _mark(engine, entry, None)
        raise
    finally:
        if publisher is not None:
            publisher.close()
    broker.remove({hashlib.sha256(body).hexdigest()})
    return replace(entry, requeued_at=at)


def _mark(engine: Engine, entry: Entry, at: datetime | None) -> None:
    if not entry.in_database:
        return
    with storage_errors("marking a quarantine record requeued"), engine.begin() as conn:
        conn.execute(quarantine_table.update().where(_q.id == int(entry.id)).values(requeued_at=at))


def _find(engine: Engine, held: list[Held], entry_id: str) -> tuple[bytes, str | None, Entry]:
    """The bytes, first publisher and entry of `entry_id`, or ConfigError naming the fix."""
    for entry in entries(engine, held):
        if entry.id != entry_id:
            continue
        if entry.in_database:
            with storage_errors("reading the quarantine"), engine.connect() as conn:
                body = conn.execute(sa.select(_q.body).where(_q.id == int(entry_id))).scalar_one()
            return body, entry.sender, entry
        message = next(m for m in held if entry_id == BROKER_PREFIX + m.digest[:_DIGEST_SHOWN])
        return message.body, message.user_id, entry
    raise ConfigError(f"no quarantine record {entry_id}: see `trm quarantine list`")


def purge(engine: Engine, broker: BrokerQuarantine) -> tuple[int, int]:
    """Drain the broker quarantine, then delete every local row; (rows, broker messages)."""
    drained = broker.purge()
    with storage_errors("purging the quarantine"), engine.begin() as conn:
        deleted = conn.execute(quarantine_table.delete()).rowcount
    return int(deleted or 0), drained


def as_first_published(delivery: Delivery, participant_id: str) -> Delivery:
    """`delivery` with the user that first published it, when it is our own requeue.

    Only the participant can publish as itself (RabbitMQ validates the user
    id), so the header is believed from it and from nobody else.
    """
    origin = delivery.headers.get(REQUEUED_FROM)
    if delivery.user_id != participant_id or origin is None:
        return delivery
    return replace(delivery, user_id=_text(origin) or None)


def _origin(body: bytes) -> tuple[str | None, str | None]:
    try:
        header = read_header(body)
    except EnvelopeError:
        return None, None
    return str(header.id), header.sender


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""
