"""Deadline policies per case stage: when a handoff is due, when to warn, who owes it.

A deadline runs from the moment the routing service received the envelope
that moved the case into its current stage (`CaseState.stage_entered_at`), so
every clock here is the routing service's own. A new stage, or a repeat of a
stage such as a further reintegration update, starts a new deadline.

The routing service cannot read payloads. A planned arrival time lives in the
travel arrangement's payload, so the clock for reception starts at departure;
its limit (24 hours by default) is configurable like every other. Likewise a
referred service's planned dates are payload data: its clocks start at
acceptance (the service starts within 7 days), at the start (it is completed
within 90 days) and at completion (the referring party follows up or closes
within 30 days).

Reminders go to whoever the headers name as owing the next step; a state
service (police, a ministry, a state shelter) is owed a reminder exactly as
an NGO is, whether it receives a returnee or provides a referred service.

Policies can be tuned per deployment with `load_policies`, from a JSON or TOML
file. JSON::

    {"policies": [
        {"stage": "departed", "limit": "36h", "warn_before": "12h"},
        {"stage": "requested", "limit": "5d", "owed_by": "first_recipient",
         "description": "a request is answered within five days"}
    ]}

TOML::

    [[policies]]
    stage = "departed"
    limit = "36h"
    warn_before = "12h"

Each entry names a `Stage` and may set ``limit``, ``warn_before`` (durations:
a number and a unit, ``s``, ``m``, ``h``, ``d`` or ``w``), ``owed_by`` (one of
`OWNER_RULES`) and ``description``. An entry replaces the default policy of
its stage; fields it leaves out keep the default's value. A stage with no
default policy needs at least ``limit`` and ``owed_by``.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from broker.directory import Role
from broker.errors import CaseError, ConfigError
from services.cases import CaseState, Event, Stage

OwnerRule = Callable[[CaseState], str | None]


class Status(StrEnum):
    """How a deadline stands at a given time."""

    OK = "ok"
    WARNING = "warning"
    OVERDUE = "overdue"


# --- who owes the next handoff --------------------------------------------------


def _stage_event(state: CaseState) -> Event | None:
    entry = None if state.stage_envelope is None else state.entry(state.stage_envelope)
    return None if entry is None else entry.event


def first_recipient(state: CaseState) -> str | None:
    """The first recipient of the envelope that opened the current stage (who must answer it)."""
    event = _stage_event(state)
    return None if event is None else event.recipients[0]


def stage_sender(state: CaseState) -> str | None:
    """The sender of the envelope that opened the current stage (who carries the case on)."""
    event = _stage_event(state)
    return None if event is None else event.sender


def origin(state: CaseState) -> str | None:
    """The participant that opened the case: the requesting mission or referring party."""
    return state.origin


def receiving_ngo(state: CaseState) -> str | None:
    """A recipient of the departure notice that is an NGO or a state service, else the mission.

    The origin-country mission is the sender of the applied acceptance, or
    failing that the first recipient of the applied request.
    """
    event = _stage_event(state)
    for recipient in () if event is None else event.recipients:
        if state.party_roles.get(recipient) in (Role.NGO, Role.STATE_SERVICE):
            return recipient
    moves = _moves(state)
    for wanted in (Stage.ACCEPTED, Stage.REQUESTED):
        if wanted in moves:
            moved = moves[wanted]
            return moved.sender if wanted is Stage.ACCEPTED else moved.recipients[0]
    return None


def _moves(state: CaseState) -> dict[Stage, Event]:
    """The first event that moved the case into each stage it has been in."""
    moves: dict[Stage, Event] = {}
    before: Stage | None = None
    for entry in state.entries:
        after = entry.stage_after
        if after is not None and after is not before:
            moves.setdefault(after, entry.event)
        before = after
    return moves


OWNER_RULES: Mapping[str, OwnerRule] = MappingProxyType(
    {
        "first_recipient": first_recipient,
        "stage_sender": stage_sender,
        "origin": origin,
        "receiving_ngo": receiving_ngo,
    }
)
"""The owner rules a policies file may name in ``owed_by``."""


# --- policies -----------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """How long a case may stay in `stage`, when to warn, and who must act."""

    stage: Stage
    limit: timedelta
    warn_before: timedelta
    owed_by: OwnerRule
    description: str

    def __post_init__(self) -> None:
        if self.limit <= timedelta(0):
            raise ConfigError(f"policy for {self.stage}: limit must be positive, got {self.limit}")
        if not timedelta(0) <= self.warn_before <= self.limit:
            raise ConfigError(
                f"policy for {self.stage}: warn_before must lie between 0 and the limit "
                f"{self.limit}, got {self.warn_before}"
            )


_H = timedelta(hours=1)
_D = timedelta(days=1)

DEFAULT_POLICIES: tuple[Policy, ...] = (
    Policy(
        Stage.REQUESTED,
        72 * _H,
        24 * _H,
        first_recipient,
        "a return request is accepted or declined by its first recipient within 72 hours",
    ),
    Policy(
        Stage.ACCEPTED,
        14 * _D,
        3 * _D,
        origin,
        "the requesting mission arranges travel within 14 days of acceptance",
    ),
    Policy(
        Stage.TRAVEL_ARRANGED,
        7 * _D,
        2 * _D,
        origin,
        "the requesting mission reports departure within 7 days of arranging travel",
    ),
    Policy(
        Stage.DEPARTED,
        24 * _H,
        6 * _H,
        receiving_ngo,
        "the receiving NGO or state service confirms reception within 24 hours of departure "
        "(planned arrival is payload data the routing service cannot read)",
    ),
    Policy(
        Stage.RECEIVED,
        30 * _D,
        7 * _D,
        stage_sender,
        "the receiving NGO sends a first reintegration update within 30 days of reception",
    ),
    Policy(
        Stage.REINTEGRATION,
        90 * _D,
        14 * _D,
        stage_sender,
        "the next reintegration update follows within 90 days of the last",
    ),
    Policy(
        Stage.REFERRAL_REQUESTED,
        72 * _H,
        24 * _H,
        first_recipient,
        "a referral is accepted or declined by its first recipient within 72 hours",
    ),
    Policy(
        Stage.REFERRAL_ACCEPTED,
        7 * _D,
        2 * _D,
        stage_sender,
        "the party that accepted a referral starts the service within 7 days of accepting it",
    ),
    Policy(
        Stage.SERVICE_STARTED,
        90 * _D,
        14 * _D,
        stage_sender,
        "the party that started a referred service reports it completed (done or not) "
        "within 90 days of starting it",
    ),
    Policy(
        Stage.SERVICE_COMPLETED,
        30 * _D,
        7 * _D,
        origin,
        "the referring party sends a reintegration update or closes the case "
        "within 30 days of the service's completion",
    ),
)
"""Declined, halted, withdrawn and closed cases owe nothing, so have no policy."""


# --- deadlines ----------------------------------------------------------------

ReminderKey = tuple[str, str, str, str]
"""(case, stage, envelope the deadline is about, status): one reminder per key."""


@dataclass(frozen=True)
class Deadline:
    """The next handoff a case owes: by whom, when it warns and when it is due."""

    case: str
    stage: Stage
    owed_by: str | None
    """The participant expected to act; None when the headers name nobody."""
    due: datetime
    warn_at: datetime
    about_envelope: str
    """The envelope that opened the stage the deadline belongs to."""


@dataclass(frozen=True)
class Reminder:
    """A deadline that warrants a reminder, and whether it warns or is overdue."""

    deadline: Deadline
    status: Status

    @property
    def key(self) -> ReminderKey:
        """What to record once the reminder is sent, so it is never sent twice."""
        d = self.deadline
        return (d.case, str(d.stage), d.about_envelope, str(self.status))


def deadline_for(
    state: CaseState, policies: Iterable[Policy] = DEFAULT_POLICIES
) -> Deadline | None:
    """The deadline of the case's current stage, or None when the stage has no policy."""
    if state.stage is None or state.stage_entered_at is None or state.stage_envelope is None:
        return None
    policy = next((p for p in policies if p.stage == state.stage), None)
    if policy is None:
        return None
    due = state.stage_entered_at + policy.limit
    return Deadline(
        case=state.case,
        stage=state.stage,
        owed_by=policy.owed_by(state),
        due=due,
        warn_at=due - policy.warn_before,
        about_envelope=state.stage_envelope,
    )


def status(deadline: Deadline, now: datetime | None = None) -> Status:
    """Overdue from `due` on, warning from `warn_at` on, else ok."""
    at = _now(now)
    if at >= deadline.due:
        return Status.OVERDUE
    if at >= deadline.warn_at:
        return Status.WARNING
    return Status.OK


def due_reminders(
    states: Iterable[CaseState],
    now: datetime | None,
    already_sent: Callable[[ReminderKey], bool] | Set[ReminderKey],
    policies: Iterable[Policy] = DEFAULT_POLICIES,
) -> list[Reminder]:
    """Warning and overdue deadlines whose reminder has not been sent, earliest due first.

    Record each returned reminder's `key` when it is sent: a deadline then
    yields one warning and one overdue reminder, however often this is polled.
    """
    at = _now(now)
    sent = already_sent.__contains__ if isinstance(already_sent, Set) else already_sent
    chosen = tuple(policies)
    found: list[Reminder] = []
    for state in states:
        deadline = deadline_for(state, chosen)
        if deadline is None:
            continue
        reminder = Reminder(deadline, status(deadline, at))
        if reminder.status is not Status.OK and not sent(reminder.key):
            found.append(reminder)
    return sorted(found, key=lambda r: (r.deadline.due, r.deadline.case))


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise CaseError(f"now must be a timezone-aware datetime, got naive {now!r}")
    return now


# --- policies files -----------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_FIELDS = frozenset({"stage", "limit", "warn_before", "owed_by", "description"})


def parse_duration(text: str) -> timedelta:
    """``"72h"``, ``"14d"``, ``"90m"``, ``"1.5d"``, ``"2w"`` as a timedelta."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(
            f"duration {text!r} is not a number and a unit (s, m, h, d, w), e.g. '72h' or '14d'"
        )
    return timedelta(**{_UNITS[match[2]]: float(match[1])})


def load_policies(
    path: Path | str, base: Iterable[Policy] = DEFAULT_POLICIES
) -> tuple[Policy, ...]:
    """The `base` policies with a JSON or TOML file's entries applied (see the module docstring).

    Raises ConfigError, naming the file and the entry, when the file cannot be
    read or an entry is wrong.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
        data = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"policies file {file}: cannot read it as JSON or TOML: {e}") from e
    entries = data.get("policies") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"policies file {file}: expected a top-level 'policies' list")
    by_stage = {p.stage: p for p in base}
    seen: set[Stage] = set()
    for index, raw in enumerate(entries):
        try:
            policy = _policy_from(raw, by_stage, seen)
        except ConfigError as e:
            raise ConfigError(f"policies file {file}, entry {index}: {e}") from e
        by_stage[policy.stage] = policy
    return tuple(by_stage.values())


def _policy_from(raw: Any, by_stage: Mapping[Stage, Policy], seen: set[Stage]) -> Policy:
    if not isinstance(raw, dict):
        raise ConfigError("each entry must be a table/object")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
    stage = _stage(raw.get("stage"))
    if stage in seen:
        raise ConfigError(f"stage {stage} appears twice")
    seen.add(stage)
    default = by_stage.get(stage)
    if default is None and not {"limit", "owed_by"} <= set(raw):
        raise ConfigError(f"stage {stage} has no default policy: set 'limit' and 'owed_by'")
    changes: dict[str, Any] = {}
    for name in ("limit", "warn_before"):
        if name in raw:
            changes[name] = parse_duration(raw[name])
    if "owed_by" in raw:
        changes["owed_by"] = _owner(raw["owed_by"])
    if "description" in raw:
        changes["description"] = str(raw["description"])
    if default is None:
        start = Policy(stage, changes["limit"], timedelta(0), changes["owed_by"], str(stage))
        return replace(start, **changes)
    return replace(default, **changes)


def _stage(value: Any) -> Stage:
    try:
        return Stage(value)
    except ValueError as e:
        raise ConfigError(
            f"'stage' is {value!r}; expected one of {', '.join(s.value for s in Stage)}"
        ) from e


def _owner(value: Any) -> OwnerRule:
    rule = OWNER_RULES.get(value) if isinstance(value, str) else None
    if rule is None:
        raise ConfigError(f"'owed_by' is {value!r}; expected one of {', '.join(OWNER_RULES)}")
    return rule
