"""Sending from a participant's home: seal a message and queue it in the outbox.

Nothing here talks to RabbitMQ: `send_message` seals and writes the envelope to
the outbox in one local transaction, and the adapter's relay publishes it
(now, or when the broker is back). Every check that can fail (the kind, the
payload against its schema, the recipients against the directory) runs before
anything is written, so a refused send leaves nothing queued.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine

from adapters.home import Home
from broker.database import inbox_table, storage_errors
from broker.directory import Role
from broker.envelope import SealedEnvelope, seal
from broker.errors import ConfigError, SchemaViolation, UnknownParticipant
from broker.outbox import Outbox
from schemas.base import Message, MessageKind
from schemas.person import StaffMember
from schemas.registry import MESSAGE_TYPES, decode_payload
from schemas.returns import ReceptionConfirmed

log = structlog.get_logger(__name__)

RETURN_KINDS = frozenset(
    {
        MessageKind.RETURN_REQUEST,
        MessageKind.RETURN_ACCEPTED,
        MessageKind.TRAVEL_ARRANGED,
        MessageKind.DEPARTED,
    }
)
"""The messages of a return that a reception confirmation answers."""


def message_kind(kind: str) -> MessageKind:
    """The kind named `kind`, or SchemaViolation listing the kinds there are."""
    try:
        return MessageKind(kind)
    except ValueError as e:
        raise SchemaViolation(
            f"unknown message kind {kind!r}; expected one of: "
            + ", ".join(k.value for k in MessageKind)
        ) from e


def load_payload(kind: MessageKind | str, path: Path) -> Message:
    """The payload in the JSON file at `path`, validated against `kind`'s schema."""
    chosen = message_kind(str(kind))
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read --payload {path}: {e.strerror}") from e
    try:
        return decode_payload(chosen, MESSAGE_TYPES[chosen].VERSION, data)
    except SchemaViolation as e:
        raise SchemaViolation(f"--payload {path} is not a valid {chosen.value}: {e}") from e


def check_recipients(home: Home, recipients: Sequence[str]) -> tuple[str, ...]:
    """The recipients, each listed in the directory, none twice, not the sender."""
    chosen = tuple(dict.fromkeys(r.strip() for r in recipients if r.strip()))
    if not chosen:
        raise ConfigError("--to names no recipient: give one or more participant ids")
    directory = home.directory()
    for recipient in chosen:
        if recipient == home.participant_id:
            raise ConfigError(f"--to names the sender {recipient!r} itself")
        try:
            directory.participant(recipient)
        except UnknownParticipant as e:
            raise UnknownParticipant(
                f"recipient {recipient!r} is not in the directory (serial {directory.serial}): "
                "check the id with `trm directory show`"
            ) from e
    return chosen


def send_message(
    home: Home,
    message: Message,
    *,
    to: Sequence[str],
    case: str,
    reply_to: UUID | str | None = None,
    engine: Engine | None = None,
) -> SealedEnvelope:
    """Seal `message` for `to` on `case` and queue it in the outbox, in one transaction.

    `engine` is the home's database if already open (else it is opened and
    closed here).
    """
    recipients = check_recipients(home, to)
    answer = UUID(str(reply_to)) if reply_to is not None else None
    sender = home.sender()
    directory = home.directory()
    own_engine = engine is None
    db = home.open_database() if engine is None else engine
    try:
        sealed = Outbox(db).send(
            lambda seq: seal(
                message,
                case=case,
                sender=sender,
                recipients=recipients,
                directory=directory,
                seq=seq,
                reply_to=answer,
            ),
            sender=sender.participant,
            case=case,
        )
    finally:
        if own_engine:
            db.dispose()
    return sealed


@dataclass(frozen=True)
class CaseContacts:
    """What the local inbox knows about a case: missions in it, the latest return message."""

    missions: tuple[str, ...]
    latest_return: str | None


def case_contacts(home: Home, engine: Engine, case: str) -> CaseContacts:
    """Missions that took part in `case` per our inbox, and the latest return message's id.

    Taking part means having sent us a message on the case, or having been
    another recipient of one (read from the case folder when the file case
    system keeps the recipients); the participant's own parent mission
    always takes part in its returns.
    """
    t = inbox_table.c
    with storage_errors(f"reading the inbox for case {case}"), engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.envelope_id, t.sender, t.kind)
            .where(t.case_ref == case)
            .order_by(t.received_at, t.envelope_id)
        ).all()
    if not rows:
        raise ConfigError(
            f"case {case!r} is unknown here: no message on it was received by "
            f"{home.participant_id} (check the case reference with the sending mission)"
        )
    directory = home.directory()
    me = home.participant_id
    involved: dict[str, None] = {}
    for row in rows:
        involved[row.sender] = None
        for other in _recorded_recipients(home, row.envelope_id):
            involved[other] = None
    parent = directory.participant(me).parent
    if parent:
        involved[parent] = None
    missions = tuple(p for p in involved if p != me and _is_mission(home, p))
    returns = [row.envelope_id for row in rows if row.kind in RETURN_KINDS]
    return CaseContacts(missions, returns[-1] if returns else None)


def _is_mission(home: Home, participant_id: str) -> bool:
    try:
        return home.directory().participant(participant_id).role is Role.MISSION
    except UnknownParticipant:
        return False


def _recorded_recipients(home: Home, envelope_id: str) -> list[str]:
    """Recipients of a delivered envelope as the file case system recorded them, if it did."""
    path = home.case_dir / f"{envelope_id}.json"
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return []
    found = document.get("recipients") if isinstance(document, dict) else None
    return [str(r) for r in found] if isinstance(found, list) else []


def confirm_reception(
    home: Home,
    case: str,
    *,
    place: str | None = None,
    note: str | None = None,
    staff_role: str = "reception officer",
    received_at: datetime | None = None,
    engine: Engine | None = None,
) -> SealedEnvelope:
    """Send a signed reception confirmation on `case` to every mission taking part in it."""
    own_engine = engine is None
    db = home.open_database() if engine is None else engine
    try:
        contacts = case_contacts(home, db, case)
        if not contacts.missions:
            raise ConfigError(f"no mission takes part in case {case!r} according to this inbox")
        message = _reception(place, note, staff_role, received_at)
        sealed = send_message(
            home,
            message,
            to=contacts.missions,
            case=case,
            reply_to=contacts.latest_return,
            engine=db,
        )
    finally:
        if own_engine:
            db.dispose()
    log.info(
        "reception.confirmed",
        envelope_id=str(sealed.id),
        case=case,
        participant=home.participant_id,
        recipients=list(contacts.missions),
    )
    return sealed


def _reception(
    place: str | None, note: str | None, staff_role: str, received_at: datetime | None
) -> ReceptionConfirmed:
    from pydantic import ValidationError

    try:
        return ReceptionConfirmed(
            received_at=received_at or datetime.now(UTC),
            place=place or "not stated",
            received_by=StaffMember(role=staff_role),
            condition_notes=note,
        )
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise SchemaViolation(f"the reception confirmation is not valid: {problems}") from e
