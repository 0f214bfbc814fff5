"""What a participant may send on a case now, and who owes the case's next step.

The answers come from the modules that decide them, never from a copy of
their rules: each kind a person sends is put to the case policy
(`broker.casepolicy.check_outgoing`, what `trm send` checks) against the
case as this home knows it, and the deadline is the routing service's
policy (`services.deadlines.deadline_for`) applied to the case replayed
from the headers this home holds (`services.cases.replay`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from adapters.home import Home
from broker.casepolicy import RULES, CaseMessage, CaseView, check_outgoing
from broker.caseviews import read_view
from broker.database import inbox_table, outbox_table, reading, storage_errors
from broker.directory import Role
from broker.envelope import read_header
from broker.errors import TrmError, UnknownParticipant
from schemas.base import MessageKind
from services.cases import Event, replay
from services.deadlines import DEFAULT_POLICIES, deadline_for

AUTOMATIC = frozenset(
    {MessageKind.DELIVERY_RECEIPT, MessageKind.REMINDER, MessageKind.ERASURE_CONFIRMED}
)
"""Kinds the adapter and the routing service send by themselves, never a person."""


def role_of(home: Home, participant: str) -> Role | None:
    """`participant`'s role in the installed directory, None if it is not listed."""
    try:
        return home.directory().participant(participant).role
    except UnknownParticipant:
        return None


def opening_kinds(role: Role | None) -> list[MessageKind]:
    """The kinds that open a case which a participant of `role` may send."""
    return [k for k, rule in RULES.items() if rule.opens and role in rule.roles]


def case_view(engine: Engine, case: str) -> CaseView | None:
    """The case as this home knows it, None if unknown here."""
    with storage_errors(f"reading case {case}"), reading(engine) as conn:
        return read_view(conn, case)


def others(home: Home, view: CaseView) -> list[str]:
    """The case's other parties that the directory still lists."""
    return sorted(p for p in view.parties - {home.participant_id} if role_of(home, p))


def allowed_kinds(home: Home, view: CaseView) -> list[MessageKind]:
    """Every kind a person here may send on the case now, sent to its other parties.

    The policy refuses what breaks roles, ownership, parties and consent;
    of the rest, a handoff is offered only where the policy's own
    transitions (`Rule.follows`) lead on from the case's stage, so a return
    case offers no referral's answers.
    """
    me = home.participant_id
    role = role_of(home, me)
    to = tuple(others(home, view))
    allowed = []
    for kind, rule in RULES.items():
        if kind in AUTOMATIC or rule.opens:
            continue
        if not rule.bookkeeping and view.stage is not None and view.stage not in rule.follows:
            continue
        if check_outgoing(view, CaseMessage("", kind, view.case, me, to), role) is None:
            allowed.append(kind)
    return allowed


@dataclass(frozen=True)
class NextStep:
    """Who owes the case's next step, and by when."""

    stage: str
    owed_by: str | None
    due: datetime
    warn_at: datetime


def next_step(home: Home, engine: Engine, case: str) -> NextStep | None:
    """The deadline of the case's stage as replayed from this home's headers, if it has one.

    Received envelopes count from when this adapter took them, sent ones
    from when they were queued: the clocks this home has.
    """
    events = _events(home, engine, case)
    if not events:
        return None
    directory = home.directory()
    roles = {p.id: str(p.role) for p in directory.body.participants}
    state = replay(events, roles).get(case)
    deadline = None if state is None else deadline_for(state, DEFAULT_POLICIES)
    if deadline is None:
        return None
    return NextStep(str(deadline.stage), deadline.owed_by, deadline.due, deadline.warn_at)


def _events(home: Home, engine: Engine, case: str) -> list[Event]:
    """The case's headers this home holds: its own envelopes in full, others' as received."""
    i, o = inbox_table.c, outbox_table.c
    with storage_errors(f"reading case {case}"), reading(engine) as conn:
        sent = conn.execute(sa.select(o.body, o.created_at).where(o.case_ref == case)).all()
        taken = conn.execute(
            sa.select(i.envelope_id, i.kind, i.sender, i.received_at).where(i.case_ref == case)
        ).all()
    events = []
    for mine in sent:
        try:
            events.append(Event.from_header(read_header(mine.body), mine.created_at))
        except TrmError:
            continue  # a body this home sealed itself; unreadable only if the store is damaged
    counted: dict[str, int] = {}
    for row in taken:
        counted[row.sender] = counted.get(row.sender, 0) + 1
        events.append(_received(home, engine, row, case, counted[row.sender]))
    events.sort(key=lambda e: (e.received_at, e.envelope_id))
    return events


def _received(home: Home, engine: Engine, row: Any, case: str, nth: int) -> Event:
    """A received envelope's event: its header as the case folder keeps it, else the inbox row.

    Without the header (erased, or another case system), the sender's
    messages are numbered in the order they came, which is their order.
    """
    from console.readmodel import payload

    recipients: tuple[str, ...] = (home.participant_id,)
    sent_at = row.received_at
    try:
        found = payload(home, engine, row.envelope_id)
        recipients, sent_at = tuple(found.recipients), found.sent_at
    except TrmError:
        pass
    return Event(
        envelope_id=row.envelope_id,
        kind=MessageKind(row.kind),
        case=case,
        sender=row.sender,
        recipients=recipients,
        sent_at=sent_at,
        received_at=row.received_at,
        seq=nth,
    )
