"""The pages of a mission's, NGO's or state service's home, and the routing operator's.

The inbox, a case (its timeline with this participant's decrypted payloads
and only the actions the case policy allows, `console.actions`), a form for
every kind generated from its schema (`console.forms`) with a preview
before sealing, reception confirmed in two clicks, a consent withdrawal
stating its erasure, the outbox with receipts, the quarantine; and the
routing operator's cases, overdue first. Sending goes through
`adapters.sending`, exactly as ``trm send`` and ``trm ack`` do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, Response

from adapters.sending import (
    confirm_reception,
    latest_of,
    send_message,
    withdraw_consent,
)
from broker.casepolicy import CaseView
from broker.database import inbox_table, reading, storage_errors
from broker.directory import Role as ParticipantRole
from broker.errors import TrmError
from console import actions, forms, readmodel, trail
from console.accounts import Role, Session
from console.auth import console_of
from console.errors import Forbidden, Gone, NotFound
from console.i18n import (
    translator,
)
from console.pages import (
    CASE_PARTIES,
    CASE_REF,
    CasePath,
    KindPath,
    Reader,
    Supervisor,
    Writer,
    back_to,
    can_act,
    case_url,
    form_text,
    headers_page,
    participant_role,
    render,
)
from schemas.base import MessageKind

FORM_ONLY = ("csrf_token", "step")
"""Fields of a message form that are not part of the message."""

router = APIRouter(include_in_schema=False)


@dataclass
class _CaseGroup:
    case: str
    stage: str | None
    deliveries: list[readmodel.Delivery]

    @property
    def unread(self) -> int:
        return sum(1 for d in self.deliveries if not d.read)


def inbox(request: Request, session: Session) -> HTMLResponse:
    """The inbox: deliveries grouped by case, cases with unread ones first."""
    console = console_of(request)
    found = _all_deliveries(console.engine, session.user.username)
    stages = {c.case: c.stage for c in readmodel.cases(console.engine, limit=readmodel.MAX_PAGE)}
    groups: dict[str, _CaseGroup] = {}
    for delivery in sorted(found, key=lambda d: (d.read, -d.seq)):
        group = groups.setdefault(
            delivery.case, _CaseGroup(delivery.case, stages.get(delivery.case), [])
        )
        group.deliveries.append(delivery)
    ordered = sorted(
        groups.values(),
        key=lambda g: (g.unread == 0, -max(d.seq for d in g.deliveries)),
    )
    return render(request, session, "inbox.html", groups=ordered)


def _all_deliveries(engine: Any, reader: str) -> list[readmodel.Delivery]:
    found: list[readmodel.Delivery] = []
    after = 0
    while True:
        page = readmodel.deliveries(engine, after, limit=readmodel.MAX_PAGE, reader=reader)
        found += [d for d in page.deliveries if d.kind not in _UNLISTED]
        if len(page.deliveries) < readmodel.MAX_PAGE:
            return found
        after = page.cursor


_UNLISTED = frozenset({str(MessageKind.DELIVERY_RECEIPT)})


def routed_cases(request: Request, session: Session) -> HTMLResponse:
    """The routing operator's start page: every case tracked, overdue first."""
    found = readmodel.routed_cases(console_of(request).engine)
    rows: list[dict[str, Any]] = [
        {
            "case": c.case,
            "stage": c.stage,
            "deadline": None if c.deadline is None else c.deadline.due,
            "overdue": c.deadline is not None and c.deadline.status == "overdue",
            "owed_by": c.owed_by,
        }
        for c in found
    ]
    return render(request, session, "cases.html", cases=rows)


# --- a case ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Action:
    kind: str
    href: str
    label: str
    primary: bool = False
    danger: bool = False


@router.get("/cases/{case}", response_class=HTMLResponse)
def case_page(request: Request, case: CasePath, session: Reader) -> HTMLResponse:
    """A case: parties, stage, deadline, the timeline with payloads, the allowed actions."""
    if participant_role(request) is ParticipantRole.ROUTING:
        return _routed_case(request, session, case)
    console = console_of(request)
    home, engine = console.home, console.engine
    try:
        timeline = readmodel.case_timeline(home, engine, case)
    except NotFound:
        t = translator(str(session.user.language))
        return render(
            request,
            session,
            "error.html",
            status=404,
            title=t("error.not_found"),
            message=t("case.unknown"),
        )
    view = actions.case_view(engine, case)
    step = actions.next_step(home, engine, case)
    entries = [_entry(request, session, case, e) for e in timeline.timeline]
    facts = {
        "case": timeline.case,
        "owner": timeline.owner,
        "stage": timeline.stage,
        "parties": timeline.parties,
        "halted_by": timeline.halted_by,
        "deadline": None if step is None else step.due,
        "overdue": step is not None and step.due <= datetime.now(step.due.tzinfo),
        "owed_by": None if step is None else step.owed_by,
    }
    allowed = _case_actions(request, session, view) if view is not None else []
    return render(
        request,
        session,
        "case.html",
        case=facts,
        timeline=entries,
        actions=allowed,
        notice=_notice(request, session),
    )


def _entry(
    request: Request, session: Session, case: str, entry: readmodel.TimelineEntry
) -> dict[str, Any]:
    console = console_of(request)
    payload: dict[str, Any] | None = None
    erased = False
    sender = entry.sender or console.home.participant_id
    recipients = entry.recipients
    if entry.direction is readmodel.Direction.RECEIVED:
        try:
            delivered = readmodel.payload(console.home, console.engine, entry.envelope_id)
        except NotFound:
            pass
        except Gone:
            erased = True
        else:
            payload, recipients = delivered.payload, delivered.recipients
            readmodel.mark_read(console.engine, session.user.username, entry.envelope_id)
            trail.record(
                console.engine,
                trail.user_actor(session.user.username),
                trail.Action.READ_PAYLOAD,
                envelope_id=entry.envelope_id,
                case=case,
            )
    return {
        "envelope_id": entry.envelope_id,
        "kind": entry.kind,
        "sender": sender,
        "recipients": recipients,
        "at": entry.at,
        "direction": str(entry.direction),
        "receipts": [{"recipient": r} for r in entry.receipts_from],
        "payload": payload,
        "erased": erased,
        "open": entry.direction is readmodel.Direction.RECEIVED,
    }


def _case_actions(request: Request, session: Session, view: CaseView) -> list[_Action]:
    if not can_act(session):
        return []
    home = console_of(request).home
    t = translator(str(session.user.language))
    found = []
    base = case_url(view.case)
    for kind in actions.allowed_kinds(home, view):
        if kind is MessageKind.RECEPTION_CONFIRMED:
            found.append(
                _Action(kind, f"{base}/confirm", "action.reception_confirmed", primary=True)
            )
        elif kind is MessageKind.CONSENT_WITHDRAWN:
            found.append(_Action(kind, f"{base}/withdraw", "action.consent_withdrawn", danger=True))
        else:
            label = t("action.send", kind=t(f"kind.{kind}"))
            found.append(_Action(kind, f"{base}/send/{kind}", label))
    found.sort(key=lambda a: (not a.primary, a.danger))
    return found


def _notice(request: Request, session: Session) -> str | None:
    t = translator(str(session.user.language))
    sent, kind = request.query_params.get("sent"), request.query_params.get("kind", "")
    if sent and re.fullmatch(r"[0-9a-f-]{36}", sent):
        if kind == MessageKind.RECEPTION_CONFIRMED:
            return t("reception.notice", envelope=sent)
        if kind == MessageKind.CONSENT_WITHDRAWN:
            return t("withdraw.notice", envelope=sent)
        if kind in set(MessageKind):
            return t("sent.notice", kind=t(f"kind.{kind}"), envelope=sent)
    return None


def _routed_case(request: Request, session: Session, case: str) -> HTMLResponse:
    from services.casestore import CaseStore

    state = CaseStore(console_of(request).engine).get(case)
    if state is None:
        raise NotFound(f"the routing service tracks no case {case}")
    return headers_page(request, session, case, state, back="/")


# --- message forms -------------------------------------------------------------------


def _form(request: Request, kind: MessageKind) -> forms.Form:
    return forms.form_for(kind, {"participants": _recipient_choices(request)})


def _recipient_choices(request: Request) -> list[str]:
    """The directory's case parties other than this one: who a message may name."""
    home = console_of(request).home
    return sorted(
        p.id
        for p in home.directory().participants()
        if p.role in CASE_PARTIES and p.id != home.participant_id
    )


def _writable_kind(
    request: Request, session: Session, kind: MessageKind, view: CaseView | None
) -> None:
    """Forbidden unless the user may write and the policy lets this home send `kind` now."""
    if not can_act(session):
        raise Forbidden(f"a {session.user.role} account cannot send")
    home = console_of(request).home
    if view is None:
        allowed = actions.opening_kinds(actions.role_of(home, home.participant_id))
    else:
        allowed = actions.allowed_kinds(home, view)
    if kind not in allowed or kind in actions.AUTOMATIC:
        raise Forbidden(f"{kind} cannot be sent from here now (the case policy)")


@router.get("/new/{kind}", response_class=HTMLResponse)
def new_case_form(request: Request, kind: KindPath, session: Reader) -> HTMLResponse:
    """The form of a kind that opens a case."""
    _writable_kind(request, session, kind, None)
    return _message_form(request, session, kind, None, {}, {})


@router.post("/new/{kind}", response_class=HTMLResponse)
async def new_case_post(request: Request, kind: KindPath, session: Writer) -> Response:
    """Check, preview, edit or send a case-opening message."""
    _writable_kind(request, session, kind, None)
    return await _message_post(request, session, kind, None)


@router.get("/cases/{case}/send/{kind}", response_class=HTMLResponse)
def case_message_form(
    request: Request, case: CasePath, kind: KindPath, session: Reader
) -> HTMLResponse:
    """The form of a kind the policy lets this home send on the case now."""
    view = _known_view(request, case)
    _writable_kind(request, session, kind, view)
    parties = actions.others(console_of(request).home, view)
    return _message_form(request, session, kind, case, {"_to": parties}, {})


@router.post("/cases/{case}/send/{kind}", response_class=HTMLResponse)
async def case_message_post(
    request: Request, case: CasePath, kind: KindPath, session: Writer
) -> Response:
    """Check, preview, edit or send a message on the case."""
    view = _known_view(request, case)
    _writable_kind(request, session, kind, view)
    return await _message_post(request, session, kind, case)


def _known_view(request: Request, case: str) -> CaseView:
    view = actions.case_view(console_of(request).engine, case)
    if view is None:
        raise NotFound(f"case {case} is not known here")
    return view


def _message_form(
    request: Request,
    session: Session,
    kind: MessageKind,
    case: str | None,
    values: Mapping[str, Sequence[str]],
    errors: Mapping[str, Sequence[str]],
    *,
    status: int = 200,
) -> HTMLResponse:
    form = _form(request, kind)
    return render(
        request,
        session,
        "message_form.html",
        status=status,
        form=form,
        case=case,
        opens=case is None,
        action=f"/new/{kind}" if case is None else f"{case_url(case)}/send/{kind}",
        recipients=_recipient_choices(request),
        values=dict(values),
        errors=dict(errors),
        entered=lambda item: forms.entered(item, values),
    )


async def _message_post(
    request: Request, session: Session, kind: MessageKind, case: str | None
) -> Response:
    t = translator(str(session.user.language))
    form_data = await request.form()
    step = form_text(form_data, "step") or "preview"
    values = {
        key: [v for v in form_data.getlist(key) if isinstance(v, str)]
        for key in form_data
        if key not in FORM_ONLY
    }
    if step == "edit":
        return _message_form(request, session, kind, case, values, {})
    form = _form(request, kind)
    checked = forms.check_payload(form, values)
    errors = dict(checked.errors)
    chosen_case = case or _opened_case(request, values, errors, t)
    to = [v for v in values.get("_to", []) if v]
    if not to:
        errors["_to"] = [t("form.recipients_missing")]
    if errors or checked.payload is None or chosen_case is None:
        return _message_form(request, session, kind, case, values, errors, status=422)
    if step != "send":
        return render(
            request,
            session,
            "preview.html",
            kind=kind,
            case=chosen_case,
            to=to,
            payload=checked.payload.model_dump(mode="json", exclude_defaults=True),
            values=values,
            action=str(request.url.path),
        )
    console = console_of(request)
    try:
        sealed = send_message(
            console.home,
            checked.payload,
            to=to,
            case=chosen_case,
            reply_to=None if case is None else latest_of(console.engine, case, _ANSWERED),
            engine=console.engine,
        )
    except TrmError as e:
        refused = {forms.FORM_ERROR: [f"{e.reason}: {e}"]}
        return _message_form(request, session, kind, case, values, refused, status=409)
    _record(request, session, trail.Action.SEND, str(sealed.id), chosen_case)
    return back_to(case_url(chosen_case), sent=str(sealed.id), kind=str(kind))


_ANSWERED = frozenset(MessageKind) - actions.AUTOMATIC
"""Kinds a reply on a case answers (the latest such message received)."""


def _opened_case(
    request: Request,
    values: dict[str, list[str]],
    errors: dict[str, list[str]],
    t: Any,
) -> str | None:
    """The new case's reference, ``<participant>.<local>``, or None with the error placed."""
    local = (values.get("_case") or [""])[0].strip()
    chosen = f"{console_of(request).home.participant_id}.{local}"
    if not local or not CASE_REF.fullmatch(chosen) or len(chosen) > 64:
        errors["_case"] = [t("form.case_ref_invalid")]
        return None
    return chosen


def _record(
    request: Request, session: Session, action: trail.Action, envelope_id: str, case: str
) -> None:
    trail.record(
        console_of(request).engine,
        trail.user_actor(session.user.username),
        action,
        envelope_id=envelope_id,
        case=case,
    )


# --- confirm reception, withdraw consent -----------------------------------------------


@router.get("/cases/{case}/confirm", response_class=HTMLResponse)
def confirm_page(request: Request, case: CasePath, session: Reader) -> HTMLResponse:
    """The second click of a reception confirmation: what it sends, to whom."""
    view = _known_view(request, case)
    _writable_kind(request, session, MessageKind.RECEPTION_CONFIRMED, view)
    return _confirm_form(request, session, view)


def _confirm_form(
    request: Request, session: Session, view: CaseView, error: str | None = None
) -> HTMLResponse:
    home = console_of(request).home
    missions = [
        p for p in actions.others(home, view) if actions.role_of(home, p) is ParticipantRole.MISSION
    ]
    return render(
        request,
        session,
        "confirm_reception.html",
        status=409 if error else 200,
        case=view.case,
        missions=missions,
        error=error,
        action=f"{case_url(view.case)}/confirm",
    )


@router.post("/cases/{case}/confirm")
async def confirm_post(request: Request, case: CasePath, session: Writer) -> Response:
    """Send the signed reception confirmation to every mission of the case."""
    view = _known_view(request, case)
    _writable_kind(request, session, MessageKind.RECEPTION_CONFIRMED, view)
    form = await request.form()
    console = console_of(request)
    try:
        sealed = confirm_reception(
            console.home,
            case,
            place=(form_text(form, "place") or "").strip() or None,
            note=(form_text(form, "note") or "").strip() or None,
            engine=console.engine,
        )
    except TrmError as e:
        return _confirm_form(request, session, view, f"{e.reason}: {e}")
    _record(request, session, trail.Action.CONFIRM_RECEPTION, str(sealed.id), case)
    return back_to(case_url(case), sent=str(sealed.id), kind=MessageKind.RECEPTION_CONFIRMED)


@router.get("/cases/{case}/withdraw", response_class=HTMLResponse)
def withdraw_page(request: Request, case: CasePath, session: Reader) -> HTMLResponse:
    """A consent withdrawal, with what it halts and erases stated before it is sent."""
    view = _known_view(request, case)
    _writable_kind(request, session, MessageKind.CONSENT_WITHDRAWN, view)
    return _withdraw_form(request, session, view)


def _withdraw_form(
    request: Request, session: Session, view: CaseView, error: str | None = None
) -> HTMLResponse:
    console = console_of(request)
    from schemas.vocabulary import ConsentPurpose

    purposes = sorted(view.consent.purposes) if view.consent else [p.value for p in ConsentPurpose]
    return render(
        request,
        session,
        "withdraw.html",
        status=409 if error else 200,
        case=view.case,
        parties=actions.others(console.home, view),
        held=_held_payloads(console.engine, view.case),
        purposes=purposes,
        error=error,
        action=f"{case_url(view.case)}/withdraw",
    )


def _held_payloads(engine: Any, case: str) -> int:
    """How many delivered payloads of `case` this home holds (what deletion erases here)."""
    import sqlalchemy as sa

    t = inbox_table.c
    query = (
        sa.select(sa.func.count())
        .select_from(inbox_table)
        .where(t.case_ref == case, t.kind != str(MessageKind.DELIVERY_RECEIPT))
    )
    with storage_errors(f"counting case {case}'s deliveries"), reading(engine) as conn:
        return int(conn.execute(query).scalar_one())


@router.post("/cases/{case}/withdraw")
async def withdraw_post(request: Request, case: CasePath, session: Writer) -> Response:
    """Record the withdrawal and send it to every other party; erase here if asked."""
    view = _known_view(request, case)
    _writable_kind(request, session, MessageKind.CONSENT_WITHDRAWN, view)
    form = await request.form()
    console = console_of(request)
    purposes = [p for p in form.getlist("purposes") if isinstance(p, str)]
    try:
        sealed = withdraw_consent(
            console.home,
            case,
            delete_data=form_text(form, "delete_data") is not None,
            purposes=purposes,
            note=(form_text(form, "note") or "").strip() or None,
            engine=console.engine,
        )
    except TrmError as e:
        return _withdraw_form(request, session, view, f"{e.reason}: {e}")
    _record(request, session, trail.Action.WITHDRAW_CONSENT, str(sealed.id), case)
    return back_to(case_url(case), sent=str(sealed.id), kind=MessageKind.CONSENT_WITHDRAWN)


# --- outbox and quarantine -------------------------------------------------------------


@router.get("/outbox", response_class=HTMLResponse)
def outbox_page(request: Request, session: Reader) -> HTMLResponse:
    """Our envelopes with each recipient's receipt."""
    engine = console_of(request).engine
    rows = []
    for entry in readmodel.outbox(engine):
        status = readmodel.envelope_status(engine, entry.envelope_id)
        rows.append(
            {
                "envelope_id": entry.envelope_id,
                "kind": entry.kind,
                "case": entry.case,
                "published": entry.published_at is not None,
                "at": entry.queued_at,
                "recipients": [
                    {"recipient": r.recipient, "received": r.receipt_at is not None}
                    for r in status.recipients
                ],
            }
        )
    return render(request, session, "outbox.html", envelopes=rows)


@router.get("/quarantine", response_class=HTMLResponse)
def quarantine_page(request: Request, session: Reader) -> HTMLResponse:
    """Envelopes refused on arrival, with their reasons; a supervisor may requeue one."""
    console = console_of(request)
    held = readmodel.quarantine(console.home, console.engine)
    rows = [
        {"id": q.id, "reason": q.reason, "detail": q.envelope_id or "—", "at": q.received_at}
        for q in held
        if q.requeued_at is None
    ]
    t = translator(str(session.user.language))
    requeued = request.query_params.get("requeued")
    return render(
        request,
        session,
        "quarantine.html",
        entries=rows,
        can_act=session.user.role is Role.SUPERVISOR,
        notice=t("quarantine.notice", entry=requeued) if requeued else None,
    )


RecordPath = Annotated[str, PathParam(pattern=r"^([0-9]{1,18}|b-[0-9a-f]{12})$", max_length=20)]


@router.post("/quarantine/{record_id}/requeue")
def requeue_post(request: Request, record_id: RecordPath, session: Supervisor) -> Response:
    """Send a quarantined envelope's original bytes back to this inbox."""
    from broker.errors import ConfigError
    from broker.quarantine import BrokerQuarantine, requeue

    console = console_of(request)
    home = console.home
    broker = BrokerQuarantine(home.amqp_settings(), home.participant_id)
    try:
        entry = requeue(console.engine, broker, record_id)
    except ConfigError as e:
        raise NotFound(str(e)) from e
    trail.record(
        console.engine,
        trail.user_actor(session.user.username),
        trail.Action.REQUEUE,
        envelope_id=entry.envelope_id,
    )
    return back_to("/quarantine", requeued=record_id)
