"""The case handoff state machine: stages, transitions and anomalies.

The routing service cannot read payloads, so a case's state is derived from
verified envelope headers alone (kind, case, sender, recipients, sent-at,
sequence number, reply-to, id), the time the routing service received each
envelope, and the directory roles of the participants.

Everything here is a pure function over values that never change once made:
`apply` folds one `Event` into a `CaseState`, `replay` folds a whole log. A
state and the states grown from it share their entries (each sees its own
length of them), so applying an event costs the same at any case length. An odd but legal input
never raises: an impossible or early transition leaves the stage as it was,
the event is still recorded in the case's history, and an `Anomaly` says
what was wrong. Applying an envelope id already applied changes nothing.

The rules themselves (who may send which kind, on whose case, what follows
what, what consent allows) are the case protocol's, `broker.casepolicy`,
which every adapter and `trm send` enforce too; here they are applied to the
routing service's view, which sees every envelope but no payload (so no
consent scope).

Return case::

    requested -> accepted | declined
    accepted -> travel_arranged (-> travel_arranged when travel is re-arranged)
    travel_arranged -> departed -> received (an NGO or state service confirms reception)
    received -> reintegration (-> reintegration for each further update) -> closed

Referral case::

    referral_requested -> referral_accepted | referral_declined
    referral_accepted -> service_started -> service_completed (done or not)
    referral_accepted | service_completed -> reintegration -> closed

At any open stage ``consent_withdrawn`` halts the case; before departure
``request_withdrawn`` withdraws it; ``case_closed`` closes a received case,
a case in reintegration, an accepted, started, completed or declined
referral, and (as an administrative close) a declined, halted or withdrawn
case. Delivery receipts, reminders and erasure confirmations never change
the stage; a receipt marks the envelope it answers as delivered to the
receipt's sender.

Anomaly reasons, in the order they are checked (the first one found is
reported): first the case protocol's (``wrong_role``; ``not_the_owner``, a
request opening a case whose reference names another participant, or an
owner's kind from someone else; ``unknown_case``, the first event of a case
does not open it; ``consent_withdrawn``, a handoff on a halted case;
``after_close``; ``not_a_party``), then ``sequence_repeat``, ``out_of_order``
(the event belongs to a later stage than the case has reached),
``impossible_transition``, ``unmatched_receipt``, and ``sequence_gap``. All
but ``sequence_gap`` leave the stage unchanged; a gap is reported and the
event still applied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from itertools import islice
from types import MappingProxyType
from typing import Any, overload

from broker import casepolicy
from broker.casepolicy import BOOKKEEPING_KINDS, PATHS, RULES
from broker.casepolicy import Reason as Reason
from broker.casepolicy import Stage as Stage
from broker.errors import CaseError, CaseStateInvalid
from schemas.base import MessageKind
from schemas.header import EnvelopeHeader

STATE_FORMAT = 2
"""Version of the `CaseState.to_dict` layout (2: pending receipts derived from the entries)."""


Roles = Mapping[str, str] | Callable[[str], str | None]
"""A participant id's directory role (mission, ngo, routing, auditor), or None if unknown."""

K = MessageKind
S = Stage

TRANSITIONS: Mapping[MessageKind, Mapping[Stage | None, Stage]] = MappingProxyType(
    {kind: rule.follows for kind, rule in RULES.items() if rule.follows}
)
"""kind -> (stage before -> stage after), from the case policy; bookkeeping kinds never move."""


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise CaseError(f"{name} must be a timezone-aware UTC datetime, got naive {value!r}")
    return value.astimezone(UTC)


@dataclass(frozen=True)
class Event:
    """One envelope header as the routing service saw it, with its receive time."""

    envelope_id: str
    kind: MessageKind
    case: str
    sender: str
    recipients: tuple[str, ...]
    sent_at: datetime
    received_at: datetime
    """The routing service's clock, the one trusted for stage times and deadlines."""
    seq: int
    reply_to: str | None = None

    def __post_init__(self) -> None:
        # Normalised here so that a naive datetime fails at construction,
        # never later as a TypeError inside a comparison.
        if self.kind not in MessageKind.__members__.values():
            raise CaseError(f"{self.kind!r} is not a message kind")
        object.__setattr__(self, "kind", MessageKind(self.kind))
        object.__setattr__(self, "recipients", tuple(self.recipients))
        object.__setattr__(self, "sent_at", _aware(self.sent_at, "sent_at"))
        object.__setattr__(self, "received_at", _aware(self.received_at, "received_at"))

    @classmethod
    def from_header(cls, header: EnvelopeHeader, received_at: datetime) -> Event:
        """The event for a verified header received by the routing service at `received_at`."""
        return cls(
            envelope_id=str(header.id),
            kind=header.kind,
            case=header.case,
            sender=header.sender,
            recipients=tuple(header.recipients),
            sent_at=header.sent_at,
            received_at=received_at,
            seq=header.seq,
            reply_to=None if header.reply_to is None else str(header.reply_to),
        )

    def same_envelope(self, other: Event) -> bool:
        """Whether `other` carries the same header (a redelivery differs only in receive time)."""
        return self == _with_received(other, self.received_at)


def _with_received(event: Event, received_at: datetime) -> Event:
    return Event(
        envelope_id=event.envelope_id,
        kind=event.kind,
        case=event.case,
        sender=event.sender,
        recipients=event.recipients,
        sent_at=event.sent_at,
        received_at=received_at,
        seq=event.seq,
        reply_to=event.reply_to,
    )


@dataclass(frozen=True)
class Anomaly:
    """Why an event did not fit the case; `reason` is a `Reason` code."""

    envelope_id: str
    reason: str
    detail: str


@dataclass(frozen=True)
class Entry:
    """One recorded event, the stage after it, and its anomaly if any."""

    event: Event
    stage_after: Stage | None
    anomaly: Anomaly | None = None


@dataclass(frozen=True)
class CaseState:
    """Everything the headers tell about one case, comparable with ``==``."""

    case: str
    stage: Stage | None
    """None until an event opens the case."""
    origin: str | None
    """The participant that opened the case (the requesting mission or NGO)."""
    parties: frozenset[str]
    """Senders and recipients of the handoffs that were applied."""
    party_roles: Mapping[str, str]
    """Directory roles of the parties, as they were when each joined."""
    last_seq: Mapping[str, int]
    """Highest sequence number seen per sender."""
    entries: Sequence[Entry]
    """Every distinct envelope of the case, in the order the routing service received them.

    A tuple, or (for states `apply` and `from_dict` make) a view of the
    entries its case's states share; either compares equal to a tuple of the
    same entries."""
    updated_at: datetime
    stage_entered_at: datetime | None
    stage_envelope: str | None
    """The envelope that moved the case into its current stage."""

    @property
    def events(self) -> tuple[Event, ...]:
        """The recorded events in arrival order."""
        return tuple(entry.event for entry in self.entries)

    @property
    def anomalies(self) -> tuple[Anomaly, ...]:
        """Every anomaly recorded on the case, in arrival order."""
        return tuple(entry.anomaly for entry in self.entries if entry.anomaly is not None)

    def entry(self, envelope_id: str) -> Entry | None:
        """The recorded entry of an envelope id, or None."""
        return self._lineage.find(len(self.entries), envelope_id)

    @property
    def opening(self) -> Event | None:
        """The event that opened the case (the first opening kind that moved it), or None."""
        return self._lineage.opening_of(len(self.entries))

    @cached_property
    def pending_receipts(self) -> Mapping[str, frozenset[str]]:
        """Envelope id -> recipients whose delivery receipt has not arrived.

        Every envelope but a receipt awaits one from each recipient; a receipt
        that was not refused settles its sender's. A function of the entries,
        so neither compared nor stored apart from them.
        """
        return _Pending(self._lineage, len(self.entries))

    @cached_property
    def _lineage(self) -> _Lineage:
        # Not a field: never compared, never serialised; `apply` hands the next
        # state its predecessor's lineage, grown, so no event rescans the entries.
        if isinstance(self.entries, _Entries):
            return self.entries.lineage
        return _Lineage(self.entries)

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-ready dict; `from_dict` gives back an equal state."""
        return {**self.summary_dict(), "entries": [entry_to_dict(e) for e in self.entries]}

    def summary_dict(self) -> dict[str, Any]:
        """`to_dict` without the entries: what the case store keeps in the case's own row."""
        return {
            "format": STATE_FORMAT,
            "case": self.case,
            "stage": None if self.stage is None else str(self.stage),
            "origin": self.origin,
            "parties": sorted(self.parties),
            "party_roles": dict(sorted(self.party_roles.items())),
            "last_seq": dict(sorted(self.last_seq.items())),
            "updated_at": self.updated_at.isoformat(),
            "stage_entered_at": _iso(self.stage_entered_at),
            "stage_envelope": self.stage_envelope,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaseState:
        """The state `to_dict` wrote; raises CaseStateInvalid on any other shape."""
        try:
            return _state_from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError, CaseError) as e:
            raise CaseStateInvalid(
                f"not a serialised case state (format {STATE_FORMAT}): {e!r}; "
                "rebuild it from the audit log with `trm audit replay`"
            ) from e

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any], entries: Sequence[Any]) -> CaseState:
        """A state from its `summary_dict` and its `entry_to_dict`s, checked as `from_dict` does."""
        if not isinstance(summary, Mapping) or "entries" in summary:
            raise CaseStateInvalid(
                "not a stored case summary; rebuild it from the audit log with `trm audit replay`"
            )
        return cls.from_dict({**summary, "entries": list(entries)})


class _Lineage:
    """A case's entries, where each id and the opening lie in them, and the receipts owed.

    One lineage serves a state and every state `apply` grows from it by one
    entry, each state seeing only its own length of it: an event appends one
    entry and settles one envelope's receipts, the same work at any case
    length. A second state grown from the same one (a branch) starts a
    lineage of its own.
    """

    def __init__(self, entries: Iterable[Entry]) -> None:
        self.entries: list[Entry] = []
        self.positions: dict[str, int] = {}
        self.opening: int | None = None
        self.pending: dict[str, frozenset[str]] = {}
        """The receipts owed after all of `entries`: only the newest state reads it as is."""
        for entry in entries:
            self.add(entry)

    @property
    def size(self) -> int:
        """How many entries the lineage holds."""
        return len(self.entries)

    def add(self, entry: Entry) -> None:
        """Append `entry`: index it and settle the receipts it awaits or brings."""
        position = len(self.entries)
        self.entries.append(entry)
        self.positions.setdefault(entry.event.envelope_id, position)
        if self.opening is None and _opens(entry):
            self.opening = position
        _settle(self.pending, entry)

    def after(self, entries: Sequence[Entry], entry: Entry) -> _Lineage:
        """The lineage of `entries` and then `entry`: this one grown, if it holds just `entries`."""
        # Another state grown from the same one already took this lineage: a branch.
        lineage = self if self.size == len(entries) else _Lineage(entries)
        lineage.add(entry)
        return lineage

    def find(self, size: int, envelope_id: str) -> Entry | None:
        """The entry of `envelope_id` among the first `size`, or None."""
        position = self.positions.get(envelope_id)
        return None if position is None or position >= size else self.entries[position]

    def opening_of(self, size: int) -> Event | None:
        """The opening event among the first `size` entries, or None."""
        position = self.opening
        return None if position is None or position >= size else self.entries[position].event


def _settle(pending: dict[str, frozenset[str]], entry: Entry) -> None:
    """Update `pending` (envelope id -> recipients owing a receipt) for one more entry."""
    event = entry.event
    if event.kind is not K.DELIVERY_RECEIPT:
        pending[event.envelope_id] = frozenset(event.recipients)
        return
    refused = entry.anomaly is not None and entry.anomaly.reason != Reason.SEQUENCE_GAP
    if refused or event.reply_to is None:
        return
    left = pending.get(event.reply_to, frozenset()) - {event.sender}
    if left:
        pending[event.reply_to] = left
    else:
        pending.pop(event.reply_to, None)


class _Entries(Sequence[Entry]):
    """The first `size` entries of a lineage: a state's entries, shared with later states."""

    __slots__ = ("lineage", "size")

    def __init__(self, lineage: _Lineage, size: int) -> None:
        self.lineage = lineage
        self.size = size

    def __len__(self) -> int:
        return self.size

    @overload
    def __getitem__(self, index: int) -> Entry: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Entry, ...]: ...
    def __getitem__(self, index: int | slice) -> Entry | tuple[Entry, ...]:
        entries = self.lineage.entries
        if isinstance(index, slice):
            return tuple(entries[i] for i in range(self.size)[index])
        return entries[range(self.size)[index]]

    def __iter__(self) -> Iterator[Entry]:
        return islice(self.lineage.entries, self.size)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Entries) and other.lineage is self.lineage:
            return other.size == self.size
        if not isinstance(other, _Entries | tuple):
            return NotImplemented
        return len(other) == self.size and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(tuple(self))


class _Pending(Mapping[str, frozenset[str]]):
    """The receipts owed after the first `size` entries of a lineage."""

    __slots__ = ("_lineage", "_own", "_size")

    def __init__(self, lineage: _Lineage, size: int) -> None:
        self._lineage = lineage
        self._size = size
        self._own: dict[str, frozenset[str]] | None = None

    def _map(self) -> Mapping[str, frozenset[str]]:
        if self._own is not None:
            return self._own
        if self._lineage.size == self._size:
            return self._lineage.pending
        # The lineage has grown past this state: its own receipts, worked out once.
        self._own = _Lineage(self._lineage.entries[: self._size]).pending
        return self._own

    def __getitem__(self, envelope_id: str) -> frozenset[str]:
        return self._map()[envelope_id]

    def __iter__(self) -> Iterator[str]:
        return iter(dict(self._map()))

    def __len__(self) -> int:
        return len(self._map())

    def __repr__(self) -> str:
        return repr(dict(self._map()))


def _opens(entry: Entry) -> bool:
    return entry.event.kind in casepolicy.OPENING_KINDS and entry.stage_after is not None


# --- applying events -------------------------------------------------------------


def apply(state: CaseState | None, event: Event, roles: Roles) -> tuple[CaseState, Anomaly | None]:
    """Fold one event into a case's state; returns the new state and the anomaly, if any.

    `state` is None for a case not seen before. The event is recorded in every
    case except one: an id already recorded. The same header again returns the
    state unchanged and no anomaly; a different header under a recorded id
    returns the state unchanged and a ``conflicting_duplicate`` anomaly.
    Raises CaseError only when `state` belongs to another case than `event`.
    """
    if state is not None and state.case != event.case:
        raise CaseError(
            f"event {event.envelope_id} is about case {event.case!r}, "
            f"not {state.case!r}: apply it to its own case's state"
        )
    if state is not None:
        prior = state.entry(event.envelope_id)
        if prior is not None:
            if prior.event.same_envelope(event):
                return state, None
            return state, Anomaly(
                event.envelope_id,
                Reason.CONFLICTING_DUPLICATE,
                "an envelope with this id and a different header was already recorded",
            )
    role_of = _role_lookup(roles)
    base = state if state is not None else _blank(event)
    anomaly = _first_anomaly(base, event, role_of(event.sender))
    blocked = anomaly is not None and anomaly.reason != Reason.SEQUENCE_GAP
    target = None if blocked else TRANSITIONS.get(event.kind, {}).get(base.stage)
    return _record(base, event, role_of, target, anomaly, blocked), anomaly


def replay(events: Iterable[Event], roles: Roles) -> dict[str, CaseState]:
    """Fold events, in the order the routing service received them, into states keyed by case.

    Cases are independent: interleaving cases differently gives the same
    result as long as each case's own events keep their order.
    """
    states: dict[str, CaseState] = {}
    for event in events:
        states[event.case], _ = apply(states.get(event.case), event, roles)
    return states


def _role_lookup(roles: Roles) -> Callable[[str], str | None]:
    if isinstance(roles, Mapping):
        return roles.get
    return roles


def _blank(event: Event) -> CaseState:
    return CaseState(
        case=event.case,
        stage=None,
        origin=None,
        parties=frozenset(),
        party_roles=MappingProxyType({}),
        last_seq=MappingProxyType({}),
        entries=(),
        updated_at=event.received_at,
        stage_entered_at=None,
        stage_envelope=None,
    )


Finding = tuple[Reason, str] | None
"""A check's verdict: None when the event passes, else the reason and a detail."""
Check = Callable[[CaseState, Event, str | None], Finding]


def _first_anomaly(state: CaseState, event: Event, role: str | None) -> Anomaly | None:
    for check in _CHECKS:
        found = check(state, event, role)
        if found is not None:
            return Anomaly(event.envelope_id, found[0], found[1])
    return None


def _check_policy(state: CaseState, event: Event, role: str | None) -> Finding:
    """The case protocol's verdict, on the routing service's view of the case."""
    refusal = casepolicy.check(
        _view(state),
        casepolicy.CaseMessage(
            event.envelope_id, event.kind, event.case, event.sender, event.recipients
        ),
        role,
    )
    return None if refusal is None else (refusal.reason, refusal.detail)


def _view(state: CaseState) -> casepolicy.CaseView | None:
    """The policy's view of a case the routing service has seen opened; it reads no consent."""
    if state.stage is None:
        return None
    opening = state.opening
    return casepolicy.CaseView(
        case=state.case,
        owner=casepolicy.case_owner(state.case),
        stage=state.stage,
        parties=state.parties,
        addressees=None if opening is None else frozenset(opening.recipients),
        consent=None,
        halted_by=state.stage_envelope if state.stage is S.HALTED else None,
    )


def _check_repeat(state: CaseState, event: Event, role: str | None) -> Finding:
    last = state.last_seq.get(event.sender, 0)
    if event.seq <= last:
        return (
            Reason.SEQUENCE_REPEAT,
            f"seq {event.seq} from {event.sender} "
            f"is not above {last} already seen, under a new envelope id",
        )
    return None


def _check_transition(state: CaseState, event: Event, role: str | None) -> Finding:
    allowed = TRANSITIONS.get(event.kind)
    if allowed is None or state.stage in allowed:
        return None
    reason = (
        Reason.OUT_OF_ORDER if _is_early(state.stage, allowed) else Reason.IMPOSSIBLE_TRANSITION
    )
    return reason, f"{event.kind} cannot follow stage {state.stage}"


def _is_early(stage: Stage | None, allowed: Iterable[Stage | None]) -> bool:
    """Whether every stage the kind may follow lies ahead of `stage` on the same path."""
    for path in PATHS:
        if stage in path:
            ahead = [s for s in allowed if s in path]
            return bool(ahead) and all(path.index(s) > path.index(stage) for s in ahead)
    return False


def _check_receipt(state: CaseState, event: Event, role: str | None) -> Finding:
    if event.kind is not K.DELIVERY_RECEIPT:
        return None
    waiting = state.pending_receipts.get(event.reply_to or "", frozenset())
    if event.sender not in waiting:
        return (
            Reason.UNMATCHED_RECEIPT,
            f"no receipt from {event.sender} is awaited for envelope {event.reply_to}",
        )
    return None


def _check_gap(state: CaseState, event: Event, role: str | None) -> Finding:
    last = state.last_seq.get(event.sender, 0)
    if event.seq > last + 1:
        return (
            Reason.SEQUENCE_GAP,
            f"seq {event.seq} from {event.sender} follows {last}; "
            f"{event.seq - last - 1} message(s) missing",
        )
    return None


_CHECKS: tuple[Check, ...] = (
    _check_policy,
    _check_repeat,
    _check_transition,
    _check_receipt,
    _check_gap,
)


def _record(
    state: CaseState,
    event: Event,
    role_of: Callable[[str], str | None],
    target: Stage | None,
    anomaly: Anomaly | None,
    blocked: bool,
) -> CaseState:
    stage = target if target is not None else state.stage
    moved = target is not None
    joins = not blocked and event.kind not in BOOKKEEPING_KINDS
    parties = state.parties | {event.sender, *event.recipients} if joins else state.parties
    entry = Entry(event, stage, anomaly)
    lineage = state._lineage.after(state.entries, entry)
    grown = CaseState(
        case=state.case,
        stage=stage,
        origin=event.sender if moved and state.origin is None else state.origin,
        parties=parties,
        party_roles=_roles_of(state.party_roles, parties, role_of),
        last_seq=_next_seq(state, event, anomaly),
        entries=_Entries(lineage, lineage.size),
        updated_at=event.received_at,
        stage_entered_at=event.received_at if moved else state.stage_entered_at,
        stage_envelope=event.envelope_id if moved else state.stage_envelope,
    )
    # cached_property's own slot: the grown state starts with its lineage.
    grown.__dict__["_lineage"] = lineage
    return grown


def _roles_of(
    known: Mapping[str, str], parties: frozenset[str], role_of: Callable[[str], str | None]
) -> Mapping[str, str]:
    roles = dict(known)
    for party in sorted(parties - known.keys()):
        role = role_of(party)
        if role is not None:
            roles[party] = role
    return MappingProxyType(roles)


def _next_seq(state: CaseState, event: Event, anomaly: Anomaly | None) -> Mapping[str, int]:
    if anomaly is not None and anomaly.reason == Reason.SEQUENCE_REPEAT:
        return state.last_seq
    return MappingProxyType({**state.last_seq, event.sender: event.seq})


# --- the timeline ---------------------------------------------------------------


@dataclass(frozen=True)
class TimelineRow:
    """One line of a case's history: who sent what to whom, when, and what followed."""

    envelope_id: str
    kind: MessageKind
    sender: str
    recipients: tuple[str, ...]
    sent_at: datetime
    received_at: datetime
    stage_after: Stage | None
    since_previous_handoff: timedelta | None
    """Receive time minus that of the latest earlier handoff (receipts, reminders are not)."""
    anomaly: str | None
    awaiting_receipt: tuple[str, ...]
    """Recipients that have not yet sent a delivery receipt for this envelope."""


def timeline(state: CaseState) -> list[TimelineRow]:
    """The case's history in arrival order."""
    rows: list[TimelineRow] = []
    last_handoff: datetime | None = None
    for entry in state.entries:
        event = entry.event
        rows.append(
            TimelineRow(
                envelope_id=event.envelope_id,
                kind=event.kind,
                sender=event.sender,
                recipients=event.recipients,
                sent_at=event.sent_at,
                received_at=event.received_at,
                stage_after=entry.stage_after,
                since_previous_handoff=None
                if last_handoff is None
                else event.received_at - last_handoff,
                anomaly=None if entry.anomaly is None else entry.anomaly.reason,
                awaiting_receipt=tuple(
                    sorted(state.pending_receipts.get(event.envelope_id, frozenset()))
                ),
            )
        )
        if event.kind not in BOOKKEEPING_KINDS:
            last_handoff = event.received_at
    return rows


# --- serialisation -------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def entry_to_dict(entry: Entry) -> dict[str, Any]:
    """One entry as `CaseState.to_dict` lists it."""
    event = entry.event
    anomaly = entry.anomaly
    return {
        "event": {
            "envelope_id": event.envelope_id,
            "kind": str(event.kind),
            "case": event.case,
            "sender": event.sender,
            "recipients": list(event.recipients),
            "sent_at": event.sent_at.isoformat(),
            "received_at": event.received_at.isoformat(),
            "seq": event.seq,
            "reply_to": event.reply_to,
        },
        "stage_after": None if entry.stage_after is None else str(entry.stage_after),
        "anomaly": None
        if anomaly is None
        else {
            "envelope_id": anomaly.envelope_id,
            "reason": anomaly.reason,
            "detail": anomaly.detail,
        },
    }


def _typed(value: Any, kind: type, name: str) -> Any:
    # bool is an int subclass; a JSON true is never a sequence number.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{name} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _opt(value: Any, kind: type, name: str) -> Any:
    return None if value is None else _typed(value, kind, name)


def _when(value: Any, name: str) -> datetime:
    return _aware(datetime.fromisoformat(_typed(value, str, name)), name)


def _keys(data: Mapping[str, Any], expected: set[str], name: str) -> None:
    _typed(data, Mapping, name)
    if set(data) != expected:
        raise ValueError(f"{name} has keys {sorted(data)}, expected {sorted(expected)}")


def _event_from_dict(data: Mapping[str, Any]) -> Event:
    _keys(data, set(Event.__dataclass_fields__), "event")
    return Event(
        envelope_id=_typed(data["envelope_id"], str, "envelope_id"),
        kind=MessageKind(_typed(data["kind"], str, "kind")),
        case=_typed(data["case"], str, "case"),
        sender=_typed(data["sender"], str, "sender"),
        recipients=tuple(
            _typed(r, str, "recipient") for r in _typed(data["recipients"], list, "recipients")
        ),
        sent_at=_when(data["sent_at"], "sent_at"),
        received_at=_when(data["received_at"], "received_at"),
        seq=_typed(data["seq"], int, "seq"),
        reply_to=_opt(data["reply_to"], str, "reply_to"),
    )


def _entry_from_dict(data: Mapping[str, Any]) -> Entry:
    _keys(data, {"event", "stage_after", "anomaly"}, "entry")
    raw = data["anomaly"]
    anomaly = None
    if raw is not None:
        _keys(raw, {"envelope_id", "reason", "detail"}, "anomaly")
        anomaly = Anomaly(
            _typed(raw["envelope_id"], str, "envelope_id"),
            _typed(raw["reason"], str, "reason"),
            _typed(raw["detail"], str, "detail"),
        )
    stage = _opt(data["stage_after"], str, "stage_after")
    return Entry(_event_from_dict(data["event"]), None if stage is None else Stage(stage), anomaly)


def _state_from_dict(data: Mapping[str, Any]) -> CaseState:
    fields = set(CaseState.__dataclass_fields__) | {"format"}
    _keys(data, fields, "case state")
    if data["format"] != STATE_FORMAT:
        raise ValueError(f"format {data['format']!r} is not {STATE_FORMAT}")
    stage = _opt(data["stage"], str, "stage")
    entered = data["stage_entered_at"]
    lineage = _Lineage(_entry_from_dict(e) for e in _typed(data["entries"], list, "entries"))
    return CaseState(
        case=_typed(data["case"], str, "case"),
        stage=None if stage is None else Stage(stage),
        origin=_opt(data["origin"], str, "origin"),
        parties=frozenset(
            _typed(p, str, "party") for p in _typed(data["parties"], list, "parties")
        ),
        party_roles=MappingProxyType(
            {
                _typed(k, str, "party"): _typed(v, str, "role")
                for k, v in _typed(data["party_roles"], Mapping, "party_roles").items()
            }
        ),
        last_seq=MappingProxyType(
            {
                _typed(k, str, "sender"): _typed(v, int, "seq")
                for k, v in _typed(data["last_seq"], Mapping, "last_seq").items()
            }
        ),
        entries=_Entries(lineage, lineage.size),
        updated_at=_when(data["updated_at"], "updated_at"),
        stage_entered_at=None if entered is None else _when(entered, "stage_entered_at"),
        stage_envelope=_opt(data["stage_envelope"], str, "stage_envelope"),
    )
