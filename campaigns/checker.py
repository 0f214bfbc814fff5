"""Classify every message of a campaign as ok, lost, duplicated or unexpected.

Written apart from the code under test: it reads the senders' outbox tables,
the receivers' inbox tables, the delivered files and the routing service's
``log_entries`` with plain SQL and a directory listing, and parses envelope
headers with its own few lines (magic, length, JSON). It never imports
``broker.inbox`` or ``broker.outbox``.

A message is an envelope in some participant's outbox. For each of its
recipients it is

- **ok** when the recipient's inbox holds its id once, a delivered file exists
  (for kinds that reach the case system) and at most one delivery receipt
  answers it;
- **lost** when the recipient has no inbox row or no delivered file for it;
- **duplicated** when its effect happened twice: more than one delivery
  receipt from the recipient answers it, or the routing log holds it twice.

**Unexpected** are inbox rows, delivered files and log entries whose id no
outbox holds: effects nobody sent.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa

RECEIPT_KIND = "delivery_receipt"
"""The kind of the delivery receipts an inbox answers with; they reach no case system."""
_MAGIC = b"TRM1"


class Status(StrEnum):
    """The verdict on one message."""

    OK = "ok"
    LOST = "lost"
    DUPLICATED = "duplicated"


@dataclass(frozen=True)
class Party:
    """Where one participant keeps its records: its database and delivered files."""

    participant: str
    database_url: str
    files: Path | None = None
    """The folder of delivered files (``HOME/inbox``); None if it has no case system."""


@dataclass(frozen=True)
class _Sent:
    envelope_id: str
    sender: str
    kind: str
    recipients: tuple[str, ...]
    reply_to: str | None
    attempts: int
    pending: bool


@dataclass
class Verdict:
    """The classification of every message, and the figures found on the way."""

    statuses: dict[str, Status] = field(default_factory=dict)
    """Each message (envelope id) with its worst status over its recipients."""
    kinds: dict[str, str] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    """Ids of effects (inbox rows, files, log entries) that no outbox holds."""
    redeliveries: int = 0
    """Deliveries the inboxes recognised as duplicates (the inbox ``redeliveries`` sums)."""
    resent: int = 0
    """Outbox rows with more than one recorded publish attempt."""
    pending: int = 0
    """Outbox rows not yet confirmed by the broker."""
    inbox_rows: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    log_entries: int = 0

    def count(self, status: Status, *, receipts: bool = False) -> int:
        """How many messages (receipts, or everything else) have `status`."""
        return sum(
            1
            for envelope_id, found in self.statuses.items()
            if found is status and (self.kinds[envelope_id] == RECEIPT_KIND) == receipts
        )

    def messages(self, *, receipts: bool = False) -> int:
        """How many messages (receipts, or everything else) were classified."""
        return sum(1 for kind in self.kinds.values() if (kind == RECEIPT_KIND) == receipts)


def header_of(body: bytes) -> dict[str, object]:
    """The clear header of an envelope, parsed from its frame; {} if it does not parse."""
    if len(body) < 8 or body[:4] != _MAGIC:
        return {}
    (length,) = struct.unpack(">I", body[4:8])
    try:
        parsed = json.loads(body[8 : 8 + length])
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _rows(url: str, query: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            table = query.split(" FROM ", 1)[1].split()[0]
            if table not in tables:
                return []
            return [tuple(r) for r in conn.execute(sa.text(query)).all()]
    finally:
        engine.dispose()


def _sent(party: Party) -> list[_Sent]:
    found = []
    query = "SELECT envelope_id, kind, recipients, body, attempts, sent_at FROM outbox"
    for row in _rows(party.database_url, query):
        envelope_id, kind, recipients, body, attempts, sent_at = row
        reply_to = header_of(bytes(body)).get("reply_to")
        found.append(
            _Sent(
                envelope_id=str(envelope_id),
                sender=party.participant,
                kind=str(kind),
                recipients=tuple(str(recipients).split()),
                reply_to=str(reply_to) if reply_to else None,
                attempts=int(str(attempts)),
                pending=sent_at is None,
            )
        )
    return found


def _delivered_files(folder: Path | None) -> set[str]:
    if folder is None or not folder.is_dir():
        return set()
    return {p.stem for p in folder.iterdir() if p.suffix == ".json" and not p.name.startswith(".")}


def check(
    parties: Sequence[Party],
    *,
    routing_url: str | None = None,
    routing_participant: str | None = None,
    ignore_recipients: Collection[str] = (),
) -> Verdict:
    """Classify every envelope in every party's outbox against every party's records.

    Recipients in `ignore_recipients` (and `routing_participant`, whose effect
    is the log entry, not an inbox row) are not expected to hold inbox rows.
    """
    verdict = Verdict()
    sent = [s for party in parties for s in _sent(party)]
    known = {s.envelope_id for s in sent}
    inbox: dict[str, set[str]] = {}
    files: dict[str, set[str]] = {}
    for party in parties:
        rows = _rows(party.database_url, "SELECT envelope_id, redeliveries FROM inbox")
        inbox[party.participant] = {str(r[0]) for r in rows}
        verdict.redeliveries += sum(int(str(r[1])) for r in rows)
        verdict.inbox_rows[party.participant] = len(rows)
        files[party.participant] = _delivered_files(party.files)
        verdict.files[party.participant] = len(files[party.participant])
        verdict.unexpected += sorted((inbox[party.participant] | files[party.participant]) - known)
    logged: Counter[str] = Counter()
    if routing_url is not None:
        for (envelope_id,) in _rows(routing_url, "SELECT envelope_id FROM log_entries"):
            logged[str(envelope_id)] += 1
        verdict.log_entries = sum(logged.values())
        verdict.unexpected += sorted(set(logged) - known)
    receipts: Counter[tuple[str, str]] = Counter(
        (s.reply_to, s.sender) for s in sent if s.kind == RECEIPT_KIND and s.reply_to
    )
    with_files = {party.participant for party in parties if party.files is not None}
    skip = set(ignore_recipients) | ({routing_participant} if routing_participant else set())
    for message in sent:
        verdict.kinds[message.envelope_id] = message.kind
        verdict.resent += message.attempts > 1
        verdict.pending += message.pending
        status = Status.OK
        if routing_url is not None and logged[message.envelope_id] > 1:
            status = Status.DUPLICATED
        for recipient in message.recipients:
            if recipient in skip or recipient not in inbox:
                continue
            needs_file = message.kind != RECEIPT_KIND and recipient in with_files
            if message.envelope_id not in inbox[recipient] or (
                needs_file and message.envelope_id not in files[recipient]
            ):
                status = Status.LOST
                break
            if receipts[(message.envelope_id, recipient)] > 1:
                status = Status.DUPLICATED
        verdict.statuses[message.envelope_id] = status
    return verdict


@dataclass(frozen=True)
class QuarantineRow:
    """One row of a participant's quarantine table."""

    envelope_id: str | None
    reason: str
    redeliveries: int
    digest: str
    """Hex SHA-256 of the body as received."""


def quarantine_rows(url: str) -> list[QuarantineRow]:
    """Every quarantine row of a database."""
    query = "SELECT envelope_id, reason, redeliveries, body FROM quarantine"
    return [
        QuarantineRow(
            None if r[0] is None else str(r[0]),
            str(r[1]),
            int(str(r[2])),
            hashlib.sha256(bytes(r[3])).hexdigest(),
        )
        for r in _rows(url, query)
    ]


def inbox_ids(url: str) -> set[str]:
    """The envelope ids in a database's inbox table."""
    return {str(r[0]) for r in _rows(url, "SELECT envelope_id FROM inbox")}


def outbox_count(url: str, kind: str | None = None) -> int:
    """How many envelopes (of `kind`, if given) a database's outbox holds."""
    rows = _rows(url, "SELECT kind FROM outbox")
    return sum(1 for (found,) in rows if kind is None or str(found) == kind)
