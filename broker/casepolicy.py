"""The case protocol: who may say what, on which case, to whom.

One policy for every participant. `trm send` checks it before anything is
sealed, every adapter's inbox checks it on what it receives (a refusal is
quarantined, nothing applied, no receipt), and the routing service records
what breaks it under the same reason names. Nothing else decides these
questions.

The rules, per message kind (`RULES`): the directory roles that may send it;
who on the case may send it (`Who`: its owner, an addressee of the opening
request, any party, a recipient of the envelope a receipt answers, or the
routing service); whether it opens a case; the stages it may follow and the
stage it leads to; the consent purpose it serves; and whether it is still
allowed once consent was withdrawn.

A case reference names its owner: ``<owner>.<local>``, the id of the
participant that opens the case, a dot, and that participant's own
reference (participant ids have no dot). Only the owner may open it, so two
participants can never claim the same case.

The parties of a case come from verified messages only: the opening
request's sender and recipients, then the recipients of every message a
party sends on it (the accepting mission naming the receiving NGO, say).
A participant that first hears of a case from a later message (an NGO named
on the acceptance) takes it only from the case's owner or its own parent
mission, the two senders it can know to be parties without having seen the
opening request.

Consent is the opening request's: every recipient of a message on the case
must be its owner or within ``share_with``, and the message's purpose within
``purposes``. Once consent is withdrawn the case is halted: only the kinds
that close it or account for it (`Rule.after_halt`) are still sent or taken.

This module is pure: `check` judges one message against a `CaseView`,
`advance` folds an accepted one into it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType

from broker.directory import Role
from schemas.base import MessageKind
from schemas.vocabulary import ConsentPurpose

K = MessageKind
OWNER_SEPARATOR = "."


class Stage(StrEnum):
    """Where a return or referral case stands."""

    REQUESTED = "requested"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    TRAVEL_ARRANGED = "travel_arranged"
    DEPARTED = "departed"
    RECEIVED = "received"
    REINTEGRATION = "reintegration"
    CLOSED = "closed"
    HALTED = "halted"
    WITHDRAWN = "withdrawn"
    REFERRAL_REQUESTED = "referral_requested"
    REFERRAL_ACCEPTED = "referral_accepted"
    REFERRAL_DECLINED = "referral_declined"
    SERVICE_STARTED = "service_started"
    SERVICE_COMPLETED = "service_completed"


class Reason(StrEnum):
    """Machine codes of refusals (adapters, `trm send`) and anomalies (the routing service)."""

    UNKNOWN_CASE = "unknown_case"
    AFTER_CLOSE = "after_close"
    CONSENT_WITHDRAWN = "consent_withdrawn"
    WRONG_ROLE = "wrong_role"
    NOT_THE_OWNER = "not_the_owner"
    NOT_A_PARTY = "not_a_party"
    OUTSIDE_CONSENT = "outside_consent"
    SEQUENCE_REPEAT = "sequence_repeat"
    OUT_OF_ORDER = "out_of_order"
    IMPOSSIBLE_TRANSITION = "impossible_transition"
    UNMATCHED_RECEIPT = "unmatched_receipt"
    RECEIPT_MISMATCH = "receipt_mismatch"
    SEQUENCE_GAP = "sequence_gap"
    CONFLICTING_DUPLICATE = "conflicting_duplicate"


class Who(StrEnum):
    """Who on a case may send a kind."""

    OWNER = "owner"
    """The participant the case reference names (it opens and withdraws requests)."""
    ADDRESSEE = "addressee"
    """A recipient of the opening request (it answers the request)."""
    PARTY = "party"
    RECIPIENT = "recipient"
    """A recipient of the envelope a delivery receipt answers."""
    ROUTING = "routing"
    """The routing service, which is no party."""


S = Stage
CASE_ROLES = frozenset({Role.MISSION, Role.NGO, Role.STATE_SERVICE})
"""Roles that take part in cases."""

_OPEN = (
    S.REQUESTED,
    S.ACCEPTED,
    S.TRAVEL_ARRANGED,
    S.DEPARTED,
    S.RECEIVED,
    S.REINTEGRATION,
    S.REFERRAL_REQUESTED,
    S.REFERRAL_ACCEPTED,
    S.SERVICE_STARTED,
    S.SERVICE_COMPLETED,
)
OPEN_STAGES = frozenset(_OPEN)
"""Stages at which consent can still be withdrawn."""

_CLOSABLE = (
    S.RECEIVED,
    S.REINTEGRATION,
    S.REFERRAL_ACCEPTED,
    S.REFERRAL_DECLINED,
    S.SERVICE_STARTED,
    S.SERVICE_COMPLETED,
    S.DECLINED,
    S.HALTED,
    S.WITHDRAWN,
)
_WITHDRAWABLE = (S.REQUESTED, S.ACCEPTED, S.TRAVEL_ARRANGED, S.REFERRAL_REQUESTED)

PATHS: tuple[tuple[Stage, ...], ...] = (
    (S.REQUESTED, S.ACCEPTED, S.TRAVEL_ARRANGED, S.DEPARTED, S.RECEIVED, S.REINTEGRATION),
    (
        S.REFERRAL_REQUESTED,
        S.REFERRAL_ACCEPTED,
        S.SERVICE_STARTED,
        S.SERVICE_COMPLETED,
        S.REINTEGRATION,
    ),
)
"""The forward order of each kind of case, to tell an early message from an impossible one."""


@dataclass(frozen=True)
class Rule:
    """What the protocol says about one message kind."""

    roles: frozenset[Role]
    who: Who
    follows: Mapping[Stage | None, Stage] = field(default_factory=dict)
    """Stage before -> stage after; empty for kinds that never move a case."""
    opens: bool = False
    purpose: ConsentPurpose | None = None
    """What consent must allow for the message to be sent; None: it carries no case data."""
    after_halt: bool = False
    """Still sent and taken once consent was withdrawn."""

    @property
    def bookkeeping(self) -> bool:
        """Whether the kind accounts for other messages rather than handing the case on."""
        return not self.follows


_PARTIES = CASE_ROLES
_MISSION = frozenset({Role.MISSION})
_RETURN = ConsentPurpose.RETURN_ASSISTANCE
_REFERRAL = ConsentPurpose.REFERRAL
_REFERRAL_DONE = (S.SERVICE_COMPLETED, S.REFERRAL_ACCEPTED)

RULES: Mapping[MessageKind, Rule] = MappingProxyType(
    {
        K.RETURN_REQUEST: Rule(
            _MISSION, Who.OWNER, {None: S.REQUESTED}, opens=True, purpose=_RETURN
        ),
        K.RETURN_ACCEPTED: Rule(
            _MISSION, Who.ADDRESSEE, {S.REQUESTED: S.ACCEPTED}, purpose=_RETURN
        ),
        K.RETURN_DECLINED: Rule(
            _MISSION, Who.ADDRESSEE, {S.REQUESTED: S.DECLINED}, purpose=_RETURN
        ),
        K.TRAVEL_ARRANGED: Rule(
            _MISSION,
            Who.PARTY,
            {S.ACCEPTED: S.TRAVEL_ARRANGED, S.TRAVEL_ARRANGED: S.TRAVEL_ARRANGED},
            purpose=_RETURN,
        ),
        K.DEPARTED: Rule(_MISSION, Who.PARTY, {S.TRAVEL_ARRANGED: S.DEPARTED}, purpose=_RETURN),
        K.RECEPTION_CONFIRMED: Rule(
            frozenset({Role.NGO, Role.STATE_SERVICE}),
            Who.PARTY,
            {S.DEPARTED: S.RECEIVED},
            purpose=ConsentPurpose.RECEPTION,
        ),
        K.REINTEGRATION_UPDATE: Rule(
            _PARTIES,
            Who.PARTY,
            dict.fromkeys((S.RECEIVED, S.REINTEGRATION, *_REFERRAL_DONE), S.REINTEGRATION),
            purpose=ConsentPurpose.REINTEGRATION,
        ),
        K.REFERRAL_REQUEST: Rule(
            _PARTIES, Who.OWNER, {None: S.REFERRAL_REQUESTED}, opens=True, purpose=_REFERRAL
        ),
        K.REFERRAL_ACCEPTED: Rule(
            _PARTIES, Who.ADDRESSEE, {S.REFERRAL_REQUESTED: S.REFERRAL_ACCEPTED}, purpose=_REFERRAL
        ),
        K.REFERRAL_DECLINED: Rule(
            _PARTIES, Who.ADDRESSEE, {S.REFERRAL_REQUESTED: S.REFERRAL_DECLINED}, purpose=_REFERRAL
        ),
        K.SERVICE_STARTED: Rule(
            _PARTIES, Who.PARTY, {S.REFERRAL_ACCEPTED: S.SERVICE_STARTED}, purpose=_REFERRAL
        ),
        K.SERVICE_COMPLETED: Rule(
            _PARTIES, Who.PARTY, {S.SERVICE_STARTED: S.SERVICE_COMPLETED}, purpose=_REFERRAL
        ),
        K.CASE_CLOSED: Rule(
            _PARTIES, Who.PARTY, dict.fromkeys(_CLOSABLE, S.CLOSED), after_halt=True
        ),
        K.CONSENT_WITHDRAWN: Rule(_PARTIES, Who.PARTY, dict.fromkeys(_OPEN, S.HALTED)),
        K.REQUEST_WITHDRAWN: Rule(_PARTIES, Who.OWNER, dict.fromkeys(_WITHDRAWABLE, S.WITHDRAWN)),
        K.DELIVERY_RECEIPT: Rule(frozenset(Role), Who.RECIPIENT, after_halt=True),
        K.ERASURE_CONFIRMED: Rule(_PARTIES, Who.PARTY, after_halt=True),
        K.REMINDER: Rule(frozenset({Role.ROUTING}), Who.ROUTING, after_halt=True),
    }
)
"""The rule of every message kind."""

OPENING_KINDS = frozenset(kind for kind, rule in RULES.items() if rule.opens)
BOOKKEEPING_KINDS = frozenset(kind for kind, rule in RULES.items() if rule.bookkeeping)
"""Kinds that are part of the timeline but not handoffs."""


def case_owner(case: str) -> str:
    """The participant a case reference names as its owner (the part before the first dot)."""
    owner, dot, local = case.partition(OWNER_SEPARATOR)
    return owner if dot and local else ""


@dataclass(frozen=True)
class Consent:
    """What the opening request's consent allows: recipients and purposes."""

    share_with: frozenset[str]
    purposes: frozenset[str]


@dataclass(frozen=True)
class CaseMessage:
    """What the protocol judges of a message: its verified header fields."""

    envelope_id: str
    kind: MessageKind
    case: str
    sender: str
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class CaseView:
    """A case as one participant knows it, from the verified messages it sent and took."""

    case: str
    owner: str
    stage: Stage | None
    parties: frozenset[str]
    addressees: frozenset[str] | None
    """Recipients of the opening request; None where it was never seen."""
    consent: Consent | None
    """The opening request's consent; None where it was never seen."""
    halted_by: str | None = None
    """The envelope id of the consent withdrawal that halted the case."""

    @property
    def halted(self) -> bool:
        """Whether consent was withdrawn."""
        return self.halted_by is not None


@dataclass(frozen=True)
class Refusal:
    """Why the protocol forbids a message; `reason` is a `Reason` code."""

    reason: Reason
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def check(
    view: CaseView | None,
    message: CaseMessage,
    role: Role | str | None,
    *,
    vouchers: Iterable[str] | None = None,
    consent: Consent | None = None,
) -> Refusal | None:
    """Why `message` may not be sent or taken on a case known as `view`, or None if it may.

    `view` is None for a case not known here. `vouchers` are the senders,
    besides the case's owner, trusted to bring a case known here for the
    first time (an NGO's parent mission); None for the routing service,
    which sees every opening request, so that any other first message is
    an unknown case. `consent` is an opening request's own, which its
    recipients and purpose must keep within. Delivery receipts are judged
    by `check_receipt`, against the envelope they answer.
    """
    rule = RULES[message.kind]
    found = _check_role(message, rule, role)
    if found is None and rule.who is not Who.ROUTING and rule.who is not Who.RECIPIENT:
        trusted = None if vouchers is None else frozenset(vouchers)
        found = _check_case(view, message, rule, trusted)
    if found is None and rule.opens and consent is not None:
        found = _check_consent(_first_view(message, consent), message, rule)
    return found


def _check_role(message: CaseMessage, rule: Rule, role: Role | str | None) -> Refusal | None:
    if role in rule.roles:
        return None
    who = "has no role in the directory" if role is None else f"is a {role}"
    allowed = " or ".join(sorted(rule.roles))
    return Refusal(
        Reason.WRONG_ROLE, f"{message.sender} {who}; {message.kind} is sent by {allowed}"
    )


def _check_case(
    view: CaseView | None, message: CaseMessage, rule: Rule, vouchers: frozenset[str] | None
) -> Refusal | None:
    owner = case_owner(message.case)
    if rule.opens:
        return _check_opening(view, message, owner)
    if view is None:
        return _check_first_contact(message, owner, vouchers)
    if view.halted and not rule.after_halt:
        return Refusal(
            Reason.CONSENT_WITHDRAWN,
            f"consent on case {message.case} was withdrawn (envelope {view.halted_by}); "
            f"{message.kind} is no longer sent on it",
        )
    if view.stage is S.CLOSED and not rule.bookkeeping:
        return Refusal(Reason.AFTER_CLOSE, f"case {message.case} is closed")
    return _check_sender(view, message, rule) or _check_consent(view, message, rule)


def _check_opening(view: CaseView | None, message: CaseMessage, owner: str) -> Refusal | None:
    if message.sender != owner:
        named = f"names {owner!r}" if owner else "names no owner (<owner>.<reference>)"
        return Refusal(
            Reason.NOT_THE_OWNER,
            f"case reference {message.case!r} {named}; only its owner opens it, "
            f"so {message.sender} must use {message.sender}.<reference>",
        )
    # A view without addressees came from a later message that overtook the
    # opening (a redelivery, say): the opening still completes it.
    if view is not None and view.stage is not None and view.addressees is not None:
        return Refusal(
            Reason.IMPOSSIBLE_TRANSITION,
            f"case {message.case} was opened already (stage {view.stage})",
        )
    return None


def _check_first_contact(
    message: CaseMessage, owner: str, vouchers: frozenset[str] | None
) -> Refusal | None:
    if vouchers is None:
        return Refusal(
            Reason.UNKNOWN_CASE,
            f"no request has opened case {message.case} before this {message.kind}",
        )
    if message.sender == owner or message.sender in vouchers:
        return None
    return Refusal(
        Reason.NOT_A_PARTY,
        f"case {message.case} is not known here and {message.sender} is neither "
        "its owner nor a participant trusted to bring it",
    )


def _check_sender(view: CaseView, message: CaseMessage, rule: Rule) -> Refusal | None:
    sender = message.sender
    if rule.who is Who.OWNER and sender != view.owner:
        return Refusal(
            Reason.NOT_THE_OWNER,
            f"{message.kind} is sent by the case's owner {view.owner}, not {sender}",
        )
    if rule.who is Who.ADDRESSEE and view.addressees is not None and sender not in view.addressees:
        return Refusal(
            Reason.NOT_A_PARTY,
            f"{message.kind} answers the opening request, which was not addressed to {sender}",
        )
    if sender not in view.parties:
        return Refusal(Reason.NOT_A_PARTY, f"{sender} is not a party to case {message.case}")
    return None


def _check_consent(view: CaseView, message: CaseMessage, rule: Rule) -> Refusal | None:
    consent = view.consent
    if consent is None:
        return None
    if rule.purpose is not None and rule.purpose not in consent.purposes:
        return Refusal(
            Reason.OUTSIDE_CONSENT,
            f"the person's consent on case {message.case} does not cover purpose "
            f"{rule.purpose} ({message.kind}); it covers {', '.join(sorted(consent.purposes))}",
        )
    return _check_recipients_consent(view, message)


def _check_recipients_consent(view: CaseView, message: CaseMessage) -> Refusal | None:
    """A refusal naming the first recipient the consent does not share with, if any."""
    consent = view.consent
    if consent is None:
        return None
    for recipient in message.recipients:
        if recipient != view.owner and recipient not in consent.share_with:
            return Refusal(
                Reason.OUTSIDE_CONSENT,
                f"the person's consent on case {message.case} does not share with "
                f"{recipient}; it shares with {', '.join(sorted(consent.share_with))}",
            )
    return None


def check_receipt(
    receipt_sender: str,
    answers: str,
    sent_recipients: Iterable[str] | None,
    sent_digest: str | None,
    receipt_digest: str,
) -> Refusal | None:
    """Whether a delivery receipt matches the envelope it answers, as its sender holds it.

    `sent_recipients` and `sent_digest` are None when the envelope is not
    one the receiving participant sent.
    """
    if sent_recipients is None or receipt_sender not in set(sent_recipients):
        return Refusal(
            Reason.UNMATCHED_RECEIPT,
            f"{receipt_sender} was not a recipient of envelope {answers} sent from here",
        )
    if sent_digest != receipt_digest:
        return Refusal(
            Reason.RECEIPT_MISMATCH,
            f"the receipt from {receipt_sender} names digest {receipt_digest[:16]}..., "
            f"not that of envelope {answers}",
        )
    return None


def check_new_recipients(view: CaseView | None, message: CaseMessage) -> Refusal | None:
    """For a sender: refuse a message that names someone who is not (yet) a party.

    Every kind may bring a new party in from its sender's side except the
    bookkeeping kinds, which go to parties only; with no view the check is
    left to `check`.
    """
    rule = RULES[message.kind]
    if view is None or rule.opens or not rule.bookkeeping:
        return None
    for recipient in message.recipients:
        if recipient not in view.parties:
            return Refusal(
                Reason.NOT_A_PARTY,
                f"{recipient} is not a party to case {message.case}; "
                f"{message.kind} goes to its parties only",
            )
    return None


def check_outgoing(
    view: CaseView | None,
    message: CaseMessage,
    role: Role | str | None,
    consent: Consent | None = None,
) -> Refusal | None:
    """Why this participant may not send `message`, or None: what `trm send` checks.

    `consent` is the message's own when it opens the case. On top of what a
    receiver checks: a case must be known here before anything but its
    opening is sent on it, an opening must stay within its own consent, and
    bookkeeping kinds go to parties only.
    """
    rule = RULES[message.kind]
    if rule.opens:
        return check(view, message, role, vouchers=(), consent=consent)
    if view is None and rule.who is not Who.RECIPIENT:
        return Refusal(
            Reason.UNKNOWN_CASE,
            f"case {message.case} is not known here: no message on it was sent or received "
            "(check the reference with the participant that opened it)",
        )
    return check(view, message, role, vouchers=()) or check_new_recipients(view, message)


def advance(
    view: CaseView | None, message: CaseMessage, consent: Consent | None = None
) -> CaseView | None:
    """The view after `message`, which `check` accepted; `consent` is an opening's.

    Receipts and reminders leave the view as it was (None stays None).
    """
    rule = RULES[message.kind]
    if rule.who is Who.RECIPIENT or rule.who is Who.ROUTING:
        return view
    if view is None:
        return _first_view(message, consent if rule.opens else None)
    if rule.opens:
        return _overtaken(view, _first_view(message, consent))
    halted = message.envelope_id if message.kind is K.CONSENT_WITHDRAWN else None
    return replace(
        view,
        stage=_next_stage(view.stage, rule),
        parties=view.parties | {message.sender, *message.recipients},
        halted_by=view.halted_by or halted,
    )


def _overtaken(later: CaseView, opening: CaseView) -> CaseView:
    """A view built from messages that overtook the opening request, completed by it."""
    return replace(
        later,
        stage=later.stage or opening.stage,
        parties=later.parties | opening.parties,
        addressees=opening.addressees,
        consent=opening.consent,
    )


def _first_view(message: CaseMessage, consent: Consent | None) -> CaseView:
    rule = RULES[message.kind]
    recipients = frozenset(message.recipients)
    owner = case_owner(message.case)
    known = {message.sender, *recipients} | ({owner} if owner else set())
    return CaseView(
        case=message.case,
        owner=owner,
        stage=_next_stage(None, rule) if rule.follows else None,
        parties=frozenset(known),
        addressees=recipients if rule.opens else None,
        consent=consent,
        halted_by=message.envelope_id if message.kind is K.CONSENT_WITHDRAWN else None,
    )


def _next_stage(stage: Stage | None, rule: Rule) -> Stage | None:
    """The stage after a kind.

    An adapter sees only the messages addressed to it, so it may have missed
    the stage before; then a kind with a single target (reception moves to
    received from wherever) still moves the view, and one with several
    leaves it where it was.
    """
    if not rule.follows:
        return stage
    if stage in rule.follows:
        return rule.follows[stage]
    targets = set(rule.follows.values())
    return targets.pop() if len(targets) == 1 else stage


AFTER_HALT_KINDS = frozenset(kind for kind, rule in RULES.items() if rule.after_halt)
"""Kinds still sent and taken on a halted case."""


def rules_table() -> str:
    """`RULES` as the Markdown table of docs/security.md (a test keeps the two equal)."""
    lines = [
        "| kind | sent by | who on the case | opens | stage before -> after "
        "| consent purpose | after a withdrawal |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, rule in RULES.items():
        moves = "; ".join(
            f"{' / '.join(str(b or '(none)') for b in befores)} -> {after}"
            for after, befores in _befores(rule).items()
        )
        lines.append(
            f"| `{kind}` | {', '.join(sorted(rule.roles))} | {rule.who} "
            f"| {'yes' if rule.opens else ''} | {moves or 'never moves'} "
            f"| {rule.purpose or '-'} | {'allowed' if rule.after_halt else 'refused'} |"
        )
    return "\n".join(lines)


def _befores(rule: Rule) -> dict[Stage, list[Stage | None]]:
    grouped: dict[Stage, list[Stage | None]] = {}
    for before, after in rule.follows.items():
        grouped.setdefault(after, []).append(before)
    return grouped
