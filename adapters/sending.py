"""Sending from a participant's home: seal a message and queue it in the outbox.

Nothing here talks to RabbitMQ: `send_message` seals and writes the envelope to
the outbox in one local transaction, and the adapter's relay publishes it
(now, or when the broker is back). Every check that can fail (the kind, the
payload against its schema, the recipients against the directory, the case
protocol against the case as this home knows it, consent included) runs
before anything is written, so a refused send leaves nothing queued.

Replies to a case (`trm ack`, a consent withdrawal's fan-out, a service
update) go to the case's verified parties (`send_to_parties`), never to
whoever happened to write.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from adapters.home import Home
from broker.casegate import consent_of, erasure_row
from broker.casepolicy import CaseMessage as Said
from broker.casepolicy import CaseView, Consent, advance, check_outgoing
from broker.caseviews import read_view, write_views
from broker.database import erasures_table, inbox_table, storage_errors
from broker.directory import Role
from broker.envelope import SealedEnvelope, seal
from broker.errors import ConfigError, ProtocolViolation, SchemaViolation, UnknownParticipant
from broker.outbox import Outbox
from schemas.base import Message, MessageKind
from schemas.control import ConsentWithdrawn
from schemas.person import StaffMember
from schemas.referrals import ServiceCompleted, ServiceStarted
from schemas.registry import MESSAGE_TYPES, decode_payload
from schemas.returns import ReceptionConfirmed
from schemas.vocabulary import ConsentPurpose, ReferralService, ServiceNotDoneReason

log = structlog.get_logger(__name__)
M = TypeVar("M", bound=Message)

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
    allow_classical: bool = False,
) -> SealedEnvelope:
    """Seal `message` for `to` on `case` and queue it in the outbox, in one transaction.

    The case protocol is checked first, against the case as this home knows
    it: a refusal raises `ProtocolViolation` with nothing queued. The case's
    view is updated in the transaction that queues the envelope. `engine` is
    the home's database if already open (else it is opened and closed here).
    `allow_classical` is `seal`'s: hybrid and classical-only recipients together.
    """
    recipients = check_recipients(home, to)
    answer = UUID(str(reply_to)) if reply_to is not None else None
    sender = home.sender()
    directory = home.directory()
    role = directory.participant(sender.participant).role
    consent = consent_of(message)
    own_engine = engine is None
    db = home.open_database() if engine is None else engine
    outbox = Outbox(db)
    try:
        with storage_errors("writing to the outbox"), db.begin() as conn:
            view = read_view(conn, case, lock=True)
            said = Said("", message.KIND, case, sender.participant, recipients)
            refusal = check_outgoing(view, said, role, consent)
            if refusal is not None:
                raise ProtocolViolation(refusal.reason, refusal.detail)
            sealed = seal(
                message,
                case=case,
                sender=sender,
                recipients=recipients,
                directory=directory,
                seq=outbox.next_seq(conn, sender.participant, case),
                reply_to=answer,
                allow_classical=allow_classical,
            )
            outbox.add(conn, sealed)
            _record_sent(conn, view, replace(said, envelope_id=str(sealed.id)), message, consent)
    finally:
        if own_engine:
            db.dispose()
    log.info(
        "outbox.added",
        envelope_id=str(sealed.id),
        case=case,
        participant=sender.participant,
        kind=str(message.KIND),
    )
    return sealed


def _record_sent(
    conn: Connection, view: CaseView | None, said: Said, message: Message, consent: Consent | None
) -> None:
    """The case's view after our own message; a withdrawal asking deletion erases here too."""
    after = advance(view, said, consent)
    now = datetime.now(UTC)
    if after is not None:
        write_views(conn, {said.case: after}, [said.case] if view is not None else [], now)
    if isinstance(message, ConsentWithdrawn) and message.delete_data:
        conn.execute(erasures_table.insert(), [erasure_row(said.envelope_id, said.case, None, now)])


def case_parties(home: Home, engine: Engine, case: str) -> CaseView:
    """The case as this home knows it, or ConfigError saying it is unknown here."""
    with storage_errors(f"reading case {case}"), engine.connect() as conn:
        view = read_view(conn, case)
    if view is None:
        raise ConfigError(
            f"case {case!r} is unknown here: no message on it was sent or received by "
            f"{home.participant_id} (check the case reference with the participant that opened it)"
        )
    return view


def send_to_parties(
    home: Home,
    message: Message,
    case: str,
    *,
    only: Role | None = None,
    reply_to: UUID | str | None = None,
    engine: Engine | None = None,
    allow_classical: bool = False,
) -> SealedEnvelope:
    """Send `message` on `case` to every other verified party (of role `only`, if given).

    `allow_classical` is `send_message`'s.
    """
    own_engine = engine is None
    db = home.open_database() if engine is None else engine
    try:
        view = case_parties(home, db, case)
        recipients = _parties(home, view, only)
        if not recipients:
            kind = "party" if only is None else str(only)
            raise ConfigError(f"no other {kind} takes part in case {case!r} as known here")
        return send_message(
            home,
            message,
            to=recipients,
            case=case,
            reply_to=reply_to,
            engine=db,
            allow_classical=allow_classical,
        )
    finally:
        if own_engine:
            db.dispose()


def _parties(home: Home, view: CaseView, only: Role | None) -> tuple[str, ...]:
    directory = home.directory()
    chosen = []
    for party in sorted(view.parties - {home.participant_id}):
        try:
            role = directory.participant(party).role
        except UnknownParticipant:
            continue  # left the directory: nothing can be sealed for it
        if only is None or role is only:
            chosen.append(party)
    return tuple(chosen)


def latest_of(engine: Engine, case: str, kinds: frozenset[MessageKind]) -> str | None:
    """The id of the latest message of `kinds` received on `case`, if any."""
    t = inbox_table.c
    with storage_errors(f"reading the inbox for case {case}"), engine.connect() as conn:
        row = conn.execute(
            sa.select(t.envelope_id)
            .where(t.case_ref == case, t.kind.in_([str(k) for k in kinds]))
            .order_by(t.received_at.desc(), t.envelope_id.desc())
            .limit(1)
        ).first()
    return None if row is None else str(row.envelope_id)


def confirm_reception(
    home: Home,
    case: str,
    *,
    place: str | None = None,
    note: str | None = None,
    staff_role: str = "reception officer",
    received_at: datetime | None = None,
    engine: Engine | None = None,
    allow_classical: bool = False,
) -> SealedEnvelope:
    """Send a signed reception confirmation on `case` to every mission that is a party to it."""
    own_engine = engine is None
    db = home.open_database() if engine is None else engine
    try:
        sealed = send_to_parties(
            home,
            _reception(place, note, staff_role, received_at),
            case,
            only=Role.MISSION,
            reply_to=latest_of(db, case, RETURN_KINDS),
            engine=db,
            allow_classical=allow_classical,
        )
    finally:
        if own_engine:
            db.dispose()
    log.info(
        "reception.confirmed",
        envelope_id=str(sealed.id),
        case=case,
        participant=home.participant_id,
        recipients=list(sealed.header.recipients),
    )
    return sealed


def _reception(
    place: str | None, note: str | None, staff_role: str, received_at: datetime | None
) -> ReceptionConfirmed:
    return _validated(
        "the reception confirmation",
        lambda: ReceptionConfirmed(
            received_at=received_at or datetime.now(UTC),
            place=place or "not stated",
            received_by=StaffMember(role=staff_role),
            condition_notes=note,
        ),
    )


def withdraw_consent(
    home: Home,
    case: str,
    *,
    delete_data: bool,
    purposes: Sequence[str] = (),
    staff_role: str = "case manager",
    note: str | None = None,
    engine: Engine | None = None,
    allow_classical: bool = False,
) -> SealedEnvelope:
    """Record the person's withdrawal of consent and send it to every other party of `case`.

    `purposes` default to every purpose the case's consent covered (all
    purposes where this home never saw the consent). The case is halted
    here in the same transaction; with `delete_data` its payloads here are
    erased too, and every recipient erases its own and confirms.
    """
    own_engine = engine is None
    db = home.open_database() if engine is None else engine
    try:
        view = case_parties(home, db, case)
        chosen = tuple(purposes) or _purposes_of(view)
        message = _validated(
            "the consent withdrawal",
            lambda: ConsentWithdrawn(
                withdrawn_at=datetime.now(UTC),
                recorded_by=StaffMember(role=staff_role),
                purposes=tuple(ConsentPurpose(p) for p in chosen),
                delete_data=delete_data,
                notes=note,
            ),
        )
        sealed = send_to_parties(home, message, case, engine=db, allow_classical=allow_classical)
        if delete_data:
            _erase_here(home, db, sealed)
        return sealed
    finally:
        if own_engine:
            db.dispose()


def _erase_here(home: Home, engine: Engine, withdrawal: SealedEnvelope) -> None:
    """Erase the case's payloads in this home now; if that fails the adapter retries it."""
    from adapters.erasure import Erasures

    erasures = Erasures(engine, home.case_system(), sender=home.sender, directory=home.directory)
    erasures.erase(str(withdrawal.id), withdrawal.header.case)


def _purposes_of(view: CaseView) -> tuple[str, ...]:
    if view.consent is not None:
        return tuple(sorted(view.consent.purposes))
    return tuple(p.value for p in ConsentPurpose)


def report_service(
    home: Home,
    case: str,
    *,
    completed: bool,
    services: Sequence[str] = (),
    not_done_reason: str | None = None,
    note: str | None = None,
    engine: Engine | None = None,
    allow_classical: bool = False,
) -> SealedEnvelope:
    """Tell every other party of a referral that its services started, or ended (done or not)."""
    now = datetime.now(UTC)
    message: Message
    if completed:
        message = _validated(
            "the service completion",
            lambda: ServiceCompleted(
                completed_at=now,
                done=not_done_reason is None,
                not_done_reason=None
                if not_done_reason is None
                else ServiceNotDoneReason(not_done_reason),
                notes=note,
            ),
        )
    else:
        message = _validated(
            "the service start",
            lambda: ServiceStarted(
                started_at=now, services=tuple(ReferralService(s) for s in services), notes=note
            ),
        )
    return send_to_parties(home, message, case, engine=engine, allow_classical=allow_classical)


def _validated(what: str, build: Callable[[], M]) -> M:
    """`build()`, with a model's or vocabulary's refusal as SchemaViolation naming the fields."""
    from pydantic import ValidationError

    try:
        return build()
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise SchemaViolation(f"{what} is not valid: {problems}") from e
    except ValueError as e:
        raise SchemaViolation(f"{what} is not valid: {e}") from e


def case_summary(home: Home, case: str, *, engine: Engine | None = None) -> dict[str, Any]:
    """The case as this home knows it, for `trm case show`: metadata only, no payload.

    `engine` is the home's database if already open (else it is opened and closed here).
    """
    from adapters.erasure import Erasures

    db = home.open_database() if engine is None else engine
    try:
        view = case_parties(home, db, case)
        erasures = Erasures(
            db, home.case_system(), sender=home.sender, directory=home.directory
        ).status(case)
    finally:
        if engine is None:
            db.dispose()
    consent = view.consent
    return {
        "case": view.case,
        "owner": view.owner,
        "stage": None if view.stage is None else str(view.stage),
        "parties": sorted(view.parties),
        "share_with": None if consent is None else sorted(consent.share_with),
        "purposes": None if consent is None else sorted(consent.purposes),
        "halted_by": view.halted_by,
        "erasures": [
            {
                "withdrawal": e.withdrawal_id,
                "erased_payloads": e.erased_payloads,
                "confirmed_to": e.confirmed_to,
                "attempts": e.attempts,
                "last_error": e.last_error,
            }
            for e in erasures
        ],
    }
