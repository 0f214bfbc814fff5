"""``/api/v1``: the JSON API for the participant's case management system.

Each route is thin: it checks the token's scope (`console.auth`), calls
the same functions as the command line (`adapters.sending`,
`broker.quarantine`) or reads through `console.readmodel`, and records the
action in the trail. Ids in paths are typed (UUIDs, case references with
the envelope header's pattern, quarantine record ids), so a value such as
``..%2f..%2fkeys`` is refused before any handler runs. A send is checked
exactly as ``trm send`` checks it: a payload that fails its schema gets 422
with the field paths and nothing is queued; the case protocol's refusal
gets 409 with its reason.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import anyio
import structlog
from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.erasure import Erasures
from broker.envelope import SealedEnvelope
from broker.errors import ConfigError, SchemaViolation, TrmError
from console import readmodel, trail
from console.auth import console_of, require_scope
from console.errors import NotFound
from console.metrics import STREAMS
from console.readmodel import (
    CaseEntry,
    CaseTimeline,
    DeliveryPage,
    EnvelopeStatus,
    Erasure,
    OutboxEntry,
    Payload,
    QuarantineRecord,
    RoutedCase,
)
from console.tokens import ApiToken, Scope
from schemas.base import CaseRef, MessageKind, ParticipantId
from schemas.registry import MESSAGE_TYPES, decode_payload, model_for
from schemas.vocabulary import ConsentPurpose


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class _Response(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)


class FieldError(_Response):
    """One field a payload's schema refused: where and what, never the value."""

    loc: list[str | int]
    type: str
    msg: str


class RefusalDetail(_Response):
    """Why a request was refused."""

    reason: str
    """Stable and machine-readable: ``not_signed_in``, ``forbidden``, ``not_found``,
    ``schema_violation``, a case protocol reason, ``too_large``, ``storage``..."""
    message: str
    errors: list[FieldError] | None = None


class Refusal(_Response):
    """The body of every refusal the console itself makes."""

    detail: RefusalDetail


def _refusal(description: str) -> dict[str, Any]:
    return {"model": Refusal, "description": description}


log = structlog.get_logger(__name__)

router = APIRouter(
    prefix="/api/v1",
    tags=["api"],
    responses={
        400: _refusal("The Host header is not one the console is served as."),
        401: _refusal("No token, or an unknown or revoked one."),
        403: _refusal("The token lacks the scope this operation needs."),
        413: _refusal("The body is over 1 MiB."),
        422: _refusal(
            "The request is not valid (`invalid_request`), or a payload failed its schema "
            "(`schema_violation`): `errors` gives each field's path, never its value."
        ),
        503: _refusal("The database, the broker or the case system is unavailable."),
    },
)

CASE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{2,63}$"
"""`schemas.base.CaseRef`'s pattern, for case references in paths."""
RECORD_PATTERN = r"^([0-9]{1,10}|b-[0-9a-f]{12})$"
"""A quarantine record: a local row number or ``b-`` and a digest prefix (`trm quarantine list`)."""
POLL_SECONDS = 0.5
"""How often an event stream looks for new feed entries."""
KEEPALIVE_SECONDS = 15.0

EnvelopeId = Annotated[UUID, Path(description="An envelope id (a UUID).")]
CasePath = Annotated[
    str,
    Path(pattern=CASE_PATTERN, max_length=64, description="A case reference."),
]
MAX_CURSOR = 2**31 - 1
"""The largest cursor or trail id: the columns are 32-bit integers on PostgreSQL."""
After = Annotated[int, Query(ge=0, le=MAX_CURSOR, description="The cursor: only entries after it.")]
Limit = Annotated[int, Query(ge=1, le=readmodel.MAX_PAGE, description="Rows at most.")]

READ = Depends(require_scope(Scope.READ))
SEND = Depends(require_scope(Scope.SEND))
RECEIPTS = Depends(require_scope(Scope.RECEIPTS))
CONSENT = Depends(require_scope(Scope.CONSENT))
QUARANTINE = Depends(require_scope(Scope.QUARANTINE))
EVENTS = Depends(require_scope(Scope.EVENTS))


class SendRequest(_Request):
    """A message of any kind to send on a case."""

    kind: MessageKind
    to: list[ParticipantId] = Field(min_length=1, max_length=64)
    case: CaseRef
    payload: dict[str, Any] = Field(
        description="The message, valid against its kind's JSON schema (`trm schemas export`)."
    )
    reply_to: UUID | None = None
    allow_classical: bool = Field(
        default=False,
        description="Seal for hybrid and X25519-only recipients together (as `trm send`).",
    )


class ReceptionRequest(_Request):
    """A reception confirmation: the returnee has been received."""

    place: str | None = Field(default=None, max_length=200)
    note: str | None = Field(default=None, max_length=4000)
    staff_role: str = Field(default="reception officer", min_length=1, max_length=100)
    received_at: datetime | None = None


class WithdrawalRequest(_Request):
    """The person withdrew consent; with `delete_data` every party erases the case's payloads."""

    delete_data: bool
    purposes: list[ConsentPurpose] = Field(default=[], max_length=len(ConsentPurpose))
    staff_role: str = Field(default="case manager", min_length=1, max_length=100)
    note: str | None = Field(default=None, max_length=4000)


class SentEnvelope(_Response):
    """An envelope sealed and queued in the outbox; the adapter publishes it."""

    envelope_id: UUID
    kind: MessageKind
    case: str
    recipients: list[str]
    seq: int
    sent_at: datetime
    reply_to: UUID | None


class WithdrawalResult(_Response):
    """The withdrawal sent, and the erasure it caused here (None when data is kept)."""

    envelope: SentEnvelope
    erasure: Erasure | None


class TrailEntry(_Response):
    """One recorded action (never what a payload said)."""

    id: int
    at: datetime
    actor: str
    action: str
    envelope_id: str | None
    case: str | None


def _sent(sealed: SealedEnvelope) -> SentEnvelope:
    header = sealed.header
    return SentEnvelope(
        envelope_id=header.id,
        kind=header.kind,
        case=header.case,
        recipients=list(header.recipients),
        seq=header.seq,
        sent_at=header.sent_at,
        reply_to=header.reply_to,
    )


def _known_case(request: Request, case: str) -> None:
    """NotFound unless this home knows `case`."""
    from adapters.sending import case_parties

    console = console_of(request)
    try:
        case_parties(console.home, console.engine, case)
    except ConfigError as e:
        raise NotFound(str(e)) from e


# --- reading -------------------------------------------------------------------------


@router.get("/deliveries", response_model=DeliveryPage, summary="Deliveries since a cursor")
def list_deliveries(
    request: Request,
    after: After = 0,
    limit: Limit = readmodel.PAGE,
    token: ApiToken = READ,
) -> DeliveryPage:
    """Envelopes applied here after cursor `after`, oldest first; resume from `cursor`."""
    return readmodel.deliveries(console_of(request).engine, after, limit=limit)


@router.get(
    "/deliveries/{envelope_id}",
    response_model=Payload,
    summary="One delivered payload",
    responses={
        404: _refusal("Not delivered here, or its payload is not in the case folder."),
        410: _refusal("The payload was erased: consent was withdrawn."),
    },
)
def get_payload(request: Request, envelope_id: EnvelopeId, token: ApiToken = READ) -> Payload:
    """The decrypted payload of a delivered envelope, with its header fields (410 once erased)."""
    console = console_of(request)
    found = readmodel.payload(console.home, console.engine, str(envelope_id))
    trail.record(
        console.engine,
        trail.token_actor(token.name),
        trail.Action.READ_PAYLOAD,
        envelope_id=found.envelope_id,
        case=found.case,
    )
    return found


@router.get("/cases", response_model=list[CaseEntry], summary="Cases known here")
def list_cases(
    request: Request, limit: Limit = readmodel.PAGE, token: ApiToken = READ
) -> list[CaseEntry]:
    """The cases this participant sent or received a message on, latest change first."""
    return readmodel.cases(console_of(request).engine, limit=limit)


@router.get(
    "/cases/{case}",
    response_model=CaseTimeline,
    summary="A case and its timeline",
    responses={404: _refusal("No message on this case was sent or received here.")},
)
def get_case(request: Request, case: CasePath, token: ApiToken = READ) -> CaseTimeline:
    """The case as this participant knows it, with every message sent and received on it."""
    console = console_of(request)
    return readmodel.case_timeline(console.home, console.engine, case)


@router.get(
    "/routing/cases", response_model=list[RoutedCase], summary="Routed cases, overdue first"
)
def list_routed_cases(request: Request, token: ApiToken = READ) -> list[RoutedCase]:
    """On a routing operator's home: every case it tracks, overdue first (else empty)."""
    return readmodel.routed_cases(console_of(request).engine)


@router.get(
    "/envelopes/{envelope_id}",
    response_model=EnvelopeStatus,
    summary="An envelope's status",
    responses={404: _refusal("This home neither sent nor received the envelope.")},
)
def get_envelope(
    request: Request, envelope_id: EnvelopeId, token: ApiToken = READ
) -> EnvelopeStatus:
    """Queued, published, each recipient's receipt, resent or flagged; or delivered or
    quarantined for an envelope sent to us."""
    return readmodel.envelope_status(console_of(request).engine, str(envelope_id))


@router.get("/outbox", response_model=list[OutboxEntry], summary="Our envelopes")
def list_outbox(
    request: Request,
    limit: Limit = readmodel.PAGE,
    pending: bool = False,
    token: ApiToken = READ,
) -> list[OutboxEntry]:
    """Our envelopes, newest first (only those not yet published with `pending`)."""
    return readmodel.outbox(console_of(request).engine, limit=limit, pending_only=pending)


@router.get("/trail", response_model=list[TrailEntry], summary="Who did what")
def list_trail(
    request: Request,
    limit: Limit = readmodel.PAGE,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_CURSOR, description="Only entries older than this id.")
    ] = None,
    token: ApiToken = READ,
) -> list[TrailEntry]:
    """The console's record of actions, newest first."""
    return [
        TrailEntry(
            id=e.id, at=e.at, actor=e.actor, action=e.action, envelope_id=e.envelope_id, case=e.case
        )
        for e in trail.entries(console_of(request).engine, limit=limit, before=before)
    ]


# --- sending -------------------------------------------------------------------------


@router.post(
    "/messages",
    response_model=SentEnvelope,
    status_code=201,
    summary="Send a message",
    responses={409: _refusal("The case protocol refuses this message; `reason` says why.")},
)
def send(request: Request, body: SendRequest, token: ApiToken = SEND) -> SentEnvelope:
    """Seal a message of any kind and queue it, checked exactly as `trm send` checks it."""
    from adapters.sending import send_message

    console = console_of(request)
    message = _payload(body.kind, body.payload)
    sealed = send_message(
        console.home,
        message,
        to=body.to,
        case=body.case,
        reply_to=body.reply_to,
        engine=console.engine,
        allow_classical=body.allow_classical,
    )
    _done(request, token, trail.Action.SEND, sealed)
    return _sent(sealed)


class PayloadInvalid(SchemaViolation):
    """A payload refused by its schema, with each failing field's path (never its value)."""

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        """`message` as `trm send` says it; `errors` as [{loc, type, msg}]."""
        super().__init__(message)
        self.errors = errors


def _payload(kind: MessageKind, payload: dict[str, Any]) -> Any:
    data = json.dumps(payload, ensure_ascii=False).encode()
    version = MESSAGE_TYPES[kind].VERSION
    try:
        return decode_payload(kind, version, data)
    except SchemaViolation as e:
        raise PayloadInvalid(str(e), _field_errors(kind, version, data)) from e


def _field_errors(kind: MessageKind, version: int, data: bytes) -> list[dict[str, Any]]:
    try:
        model_for(kind, version).model_validate_json(data)
    except ValidationError as e:
        return [
            {"loc": ["payload", *p["loc"]], "type": p["type"], "msg": p["msg"]}
            for p in e.errors(include_url=False, include_input=False, include_context=False)
        ]
    return []


def _done(request: Request, token: ApiToken, action: trail.Action, sealed: SealedEnvelope) -> None:
    trail.record(
        console_of(request).engine,
        trail.token_actor(token.name),
        action,
        envelope_id=str(sealed.id),
        case=sealed.header.case,
    )


@router.post(
    "/cases/{case}/reception",
    response_model=SentEnvelope,
    status_code=201,
    summary="Confirm reception",
    responses={
        404: _refusal("The case is unknown here."),
        409: _refusal("The case protocol refuses it (e.g. the case is halted)."),
    },
)
def confirm(
    request: Request, case: CasePath, body: ReceptionRequest, token: ApiToken = RECEIPTS
) -> SentEnvelope:
    """Send a signed reception confirmation to every mission that is a party to the case."""
    from adapters.sending import confirm_reception

    _known_case(request, case)
    console = console_of(request)
    sealed = confirm_reception(
        console.home,
        case,
        place=body.place,
        note=body.note,
        staff_role=body.staff_role,
        received_at=body.received_at,
        engine=console.engine,
    )
    _done(request, token, trail.Action.CONFIRM_RECEPTION, sealed)
    return _sent(sealed)


@router.post(
    "/cases/{case}/consent-withdrawal",
    response_model=WithdrawalResult,
    status_code=201,
    summary="Withdraw consent",
    responses={
        404: _refusal("The case is unknown here."),
        409: _refusal("The case protocol refuses it (e.g. already withdrawn)."),
    },
)
def withdraw(
    request: Request, case: CasePath, body: WithdrawalRequest, token: ApiToken = CONSENT
) -> WithdrawalResult:
    """Record the withdrawal, send it to every other party and halt the case; with
    `delete_data` the case's payloads here are erased now, and the response says how many."""
    from adapters.sending import withdraw_consent

    _known_case(request, case)
    console = console_of(request)
    sealed = withdraw_consent(
        console.home,
        case,
        delete_data=body.delete_data,
        purposes=[str(p) for p in body.purposes],
        staff_role=body.staff_role,
        note=body.note,
        engine=console.engine,
    )
    _done(request, token, trail.Action.WITHDRAW_CONSENT, sealed)
    erasure = None
    if body.delete_data:
        home = console.home
        statuses = Erasures(
            console.engine, home.case_system(), sender=home.sender, directory=home.directory
        ).status(case)
        erasure = next(
            (
                Erasure(
                    withdrawal=s.withdrawal_id,
                    erased_payloads=s.erased_payloads,
                    confirmed_to=s.confirmed_to,
                    attempts=s.attempts,
                    last_error=s.last_error,
                )
                for s in statuses
                if s.withdrawal_id == str(sealed.id)
            ),
            None,
        )
    return WithdrawalResult(envelope=_sent(sealed), erasure=erasure)


# --- the quarantine ------------------------------------------------------------------


@router.get("/quarantine", response_model=list[QuarantineRecord], summary="The quarantine")
def list_quarantine(request: Request, token: ApiToken = QUARANTINE) -> list[QuarantineRecord]:
    """Every envelope refused on arrival, here and in the broker's quarantine; no payload."""
    console = console_of(request)
    return readmodel.quarantine(console.home, console.engine)


@router.post(
    "/quarantine/{record_id}/requeue",
    response_model=QuarantineRecord,
    summary="Requeue a quarantined envelope",
    responses={404: _refusal("No such quarantine record.")},
)
def requeue(
    request: Request,
    record_id: Annotated[str, Path(pattern=RECORD_PATTERN, max_length=20)],
    token: ApiToken = QUARANTINE,
) -> QuarantineRecord:
    """Send the record's original bytes back to this inbox, once its cause is fixed."""
    from broker.quarantine import BrokerQuarantine
    from broker.quarantine import requeue as requeue_record

    console = console_of(request)
    home = console.home
    broker = BrokerQuarantine(home.amqp_settings(), home.participant_id)
    try:
        entry = requeue_record(console.engine, broker, record_id)
    except ConfigError as e:
        raise NotFound(str(e)) from e
    trail.record(
        console.engine,
        trail.token_actor(token.name),
        trail.Action.REQUEUE,
        envelope_id=entry.envelope_id,
    )
    return QuarantineRecord(
        id=entry.id,
        envelope_id=entry.envelope_id,
        sender=entry.sender,
        reason=entry.reason,
        received_at=entry.received_at,
        redeliveries=entry.redeliveries,
        requeued_at=entry.requeued_at,
        in_database=entry.in_database,
    )


# --- events --------------------------------------------------------------------------


@router.get(
    "/events",
    summary="A stream of new events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-sent events: `id:` the cursor, `event:` delivery, receipt "
            "or quarantine, `data:` the event as JSON.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def events(
    request: Request,
    after: Annotated[
        int | None,
        Query(ge=0, le=MAX_CURSOR, description="Resume after this cursor (default: now)."),
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            pattern=r"^[0-9]{1,10}$",
            description="Sent by a reconnecting EventSource: resume after it.",
        ),
    ] = None,
    token: ApiToken = EVENTS,
) -> StreamingResponse:
    """New deliveries, receipts and quarantine records as server-sent events."""
    console = console_of(request)
    if last_event_id is not None:
        cursor = min(int(last_event_id), MAX_CURSOR)
    elif after is not None:
        cursor = after
    else:
        cursor = await anyio.to_thread.run_sync(readmodel.latest_seq, console.engine)
    return StreamingResponse(
        _stream(request, cursor, console.stream_seconds), media_type="text/event-stream"
    )


async def _stream(request: Request, cursor: int, seconds: float) -> Any:
    STREAMS.inc()
    try:
        async for chunk in _events(request, cursor, seconds):
            yield chunk
    finally:
        STREAMS.dec()


async def _events(request: Request, cursor: int, seconds: float) -> Any:
    engine = console_of(request).engine
    clock = anyio.current_time
    end = clock() + seconds
    quiet_since = clock()
    yield "retry: 2000\n\n"
    while clock() < end and not await request.is_disconnected():
        try:
            found = await anyio.to_thread.run_sync(readmodel.events_since, engine, cursor)
        except TrmError as e:
            # The headers are sent: end the stream; the client resumes from its last id.
            log.warning("console.stream_ended", reason=e.reason, cursor=cursor)
            return
        for event in found:
            yield f"id: {event.seq}\nevent: {event.event}\ndata: {event.model_dump_json()}\n\n"
            cursor = event.seq
        if found:
            quiet_since = clock()
            continue
        if clock() - quiet_since > KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            quiet_since = clock()
        await anyio.sleep(min(POLL_SECONDS, max(0.0, end - clock())))
