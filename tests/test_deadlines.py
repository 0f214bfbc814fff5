"""Deadline policies: due and warning times, owners, reminders once, policy files."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from test_cases import (
    KZ,
    NGO_UZ,
    POLICE_UZ,
    UZ,
    Case,
    fold,
    happy_path,
    service_referral,
)

from broker.casepolicy import PATHS
from broker.errors import CaseError, ConfigError
from schemas.base import MessageKind as K
from services.cases import CaseState, Stage
from services.deadlines import (
    DEFAULT_POLICIES,
    Reminder,
    ReminderKey,
    Status,
    deadline_for,
    due_reminders,
    load_policies,
    parse_duration,
    status,
)


def state_at(stage_count: int, case: Case | None = None) -> CaseState:
    return fold(happy_path(case or Case(), stage_count))[0]


def test_unanswered_request_warns_then_is_overdue() -> None:
    """A request unanswered 71 h warns, at 73 h is overdue, and is owed by its first recipient."""
    state = state_at(1)
    deadline = deadline_for(state)
    assert deadline is not None and state.stage_entered_at is not None
    assert deadline.owed_by == UZ
    assert deadline.about_envelope == state.entries[0].event.envelope_id
    entered = state.stage_entered_at
    assert status(deadline, entered + timedelta(hours=47)) is Status.OK
    assert status(deadline, entered + timedelta(hours=71)) is Status.WARNING
    assert status(deadline, entered + timedelta(hours=73)) is Status.OVERDUE


def test_reminder_is_due_once_per_status() -> None:
    """Polling again after recording sent reminders yields nothing until the status changes."""
    states = [state_at(1, Case("iom-kz.KZ-1")), state_at(2, Case("iom-kz.KZ-2"))]
    entered = states[0].stage_entered_at
    assert entered is not None
    sent: set[ReminderKey] = set()
    now = entered + timedelta(hours=71)
    first = due_reminders(states, now, sent)
    assert [(r.deadline.case, r.status) for r in first] == [("iom-kz.KZ-1", Status.WARNING)]
    sent.update(r.key for r in first)
    assert due_reminders(states, now + timedelta(minutes=30), sent) == []
    overdue = due_reminders(states, entered + timedelta(hours=73), sent)
    assert [(r.deadline.case, r.status) for r in overdue] == [("iom-kz.KZ-1", Status.OVERDUE)]
    sent.update(r.key for r in overdue)
    assert due_reminders(states, entered + timedelta(hours=90), sent.__contains__) == []


def test_a_new_stage_resets_the_deadline() -> None:
    """Accepting the request replaces its overdue deadline by the travel deadline."""
    case = Case()
    requested = state_at(1, case)
    late = case.event(K.RETURN_ACCEPTED, UZ, (KZ, NGO_UZ), after=timedelta(hours=80))
    accepted = fold([*requested.events, late])[0]
    deadline = deadline_for(accepted)
    assert deadline is not None
    assert deadline.stage is Stage.ACCEPTED and deadline.owed_by == KZ
    assert deadline.due == late.received_at + timedelta(days=14)
    assert deadline.warn_at == deadline.due - timedelta(days=3)
    assert status(deadline, late.received_at) is Status.OK
    assert due_reminders([accepted], late.received_at, set()) == []


def test_departed_not_received_is_overdue_and_owed_by_the_ngo() -> None:
    """Departure unconfirmed after 24 hours is overdue and owed by the receiving NGO."""
    state = state_at(4)
    deadline = deadline_for(state)
    assert deadline is not None and state.stage_entered_at is not None
    assert deadline.stage is Stage.DEPARTED and deadline.owed_by == NGO_UZ
    [reminder] = due_reminders([state], state.stage_entered_at + timedelta(hours=25), set())
    assert reminder == Reminder(deadline, Status.OVERDUE)


def test_departed_without_an_ngo_is_owed_by_the_accepting_mission() -> None:
    """When no NGO was told of the departure, the origin-country mission owes the confirmation."""
    case = Case()
    events = happy_path(case, 3)
    events.append(case.event(K.DEPARTED, KZ, (UZ,)))
    deadline = deadline_for(fold(events)[0])
    assert deadline is not None and deadline.owed_by == UZ


@pytest.mark.parametrize(
    ("stages", "stage", "limit", "owed_by"),
    [
        (3, Stage.TRAVEL_ARRANGED, timedelta(days=7), KZ),
        (5, Stage.RECEIVED, timedelta(days=30), NGO_UZ),
        (6, Stage.REINTEGRATION, timedelta(days=90), NGO_UZ),
    ],
)
def test_default_policies_per_stage(
    stages: int, stage: Stage, limit: timedelta, owed_by: str
) -> None:
    """Each later stage has its documented limit and owner, counted from the stage-entered time."""
    state = state_at(stages)
    deadline = deadline_for(state)
    assert deadline is not None and state.stage_entered_at is not None
    assert (deadline.stage, deadline.owed_by) == (stage, owed_by)
    assert deadline.due - state.stage_entered_at == limit


def test_every_referral_stage_has_a_default_policy() -> None:
    """Each open stage on the referral path has a deadline, as each return stage has."""
    covered = {p.stage for p in DEFAULT_POLICIES}
    for path in PATHS:
        assert set(path) <= covered


@pytest.mark.parametrize(
    ("steps", "stage", "limit", "warn_before", "owed_by"),
    [
        (1, Stage.REFERRAL_REQUESTED, timedelta(hours=72), timedelta(hours=24), POLICE_UZ),
        (2, Stage.REFERRAL_ACCEPTED, timedelta(days=7), timedelta(days=2), POLICE_UZ),
        (3, Stage.SERVICE_STARTED, timedelta(days=90), timedelta(days=14), POLICE_UZ),
        (4, Stage.SERVICE_COMPLETED, timedelta(days=30), timedelta(days=7), NGO_UZ),
    ],
)
def test_referral_stage_warns_then_is_overdue_for_whom_owes_it(
    steps: int, stage: Stage, limit: timedelta, warn_before: timedelta, owed_by: str
) -> None:
    """Each referral stage is due its limit after it was entered, owed by the next actor."""
    state = fold(service_referral(Case(f"{NGO_UZ}.REF-1"), steps))[0]
    deadline = deadline_for(state)
    assert deadline is not None and state.stage_entered_at is not None
    assert (deadline.stage, deadline.owed_by) == (stage, owed_by)
    assert deadline.about_envelope == state.entries[-1].event.envelope_id
    entered = state.stage_entered_at
    assert status(deadline, entered + limit - warn_before - timedelta(minutes=1)) is Status.OK
    assert status(deadline, entered + limit - warn_before) is Status.WARNING
    assert status(deadline, entered + limit - timedelta(minutes=1)) is Status.WARNING
    [reminder] = due_reminders([state], entered + limit, set())
    assert reminder == Reminder(deadline, Status.OVERDUE)


def test_started_service_resets_the_referral_deadline() -> None:
    """Starting the service replaces the overdue start deadline by the completion deadline."""
    case = Case(f"{NGO_UZ}.REF-2")
    accepted = fold(service_referral(case, 2))[0]
    late = case.event(K.SERVICE_STARTED, POLICE_UZ, (NGO_UZ,), after=timedelta(days=9))
    started = fold([*accepted.events, late])[0]
    assert due_reminders([accepted], late.received_at, set()) != []
    assert due_reminders([started], late.received_at, set()) == []
    deadline = deadline_for(started)
    assert deadline is not None and deadline.due == late.received_at + timedelta(days=90)


def test_departure_to_a_state_service_is_owed_by_it() -> None:
    """A state service told of the departure owes the reception confirmation, as an NGO would."""
    case = Case()
    steps = [
        (K.RETURN_REQUEST, KZ, (UZ, POLICE_UZ)),
        (K.RETURN_ACCEPTED, UZ, (KZ, POLICE_UZ)),
        (K.TRAVEL_ARRANGED, KZ, (UZ, POLICE_UZ)),
        (K.DEPARTED, KZ, (UZ, POLICE_UZ)),
    ]
    departed = fold([case.event(kind, sender, to) for kind, sender, to in steps])[0]
    deadline = deadline_for(departed)
    assert deadline is not None
    assert (deadline.stage, deadline.owed_by) == (Stage.DEPARTED, POLICE_UZ)
    received = fold([*departed.events, case.event(K.RECEPTION_CONFIRMED, POLICE_UZ, (KZ, UZ))])[0]
    deadline = deadline_for(received)
    assert deadline is not None
    assert (deadline.stage, deadline.owed_by) == (Stage.RECEIVED, POLICE_UZ)


def test_closed_halted_and_unopened_cases_have_no_deadline() -> None:
    """Closed, halted, declined and never-opened cases, returns or referrals, owe nothing."""
    case = Case()
    halted = fold([*happy_path(case, 2), case.event(K.CONSENT_WITHDRAWN, KZ, (UZ,))])[0]
    unopened = fold([Case("iom-kz.KZ-404").event(K.RETURN_ACCEPTED, UZ, (KZ,))])[0]
    referral = Case(f"{NGO_UZ}.REF-3")
    declined = fold(
        [
            *service_referral(referral, 1),
            referral.event(K.REFERRAL_DECLINED, POLICE_UZ, (NGO_UZ,)),
        ]
    )[0]
    closed = fold(service_referral(Case(f"{NGO_UZ}.REF-4")))[0]
    assert (declined.stage, closed.stage) == (Stage.REFERRAL_DECLINED, Stage.CLOSED)
    for state in (state_at(8), halted, unopened, declined, closed):
        assert deadline_for(state) is None


def test_naive_now_is_refused() -> None:
    """A naive `now` raises CaseError instead of a TypeError."""
    deadline = deadline_for(state_at(1))
    assert deadline is not None
    with pytest.raises(CaseError, match="timezone-aware"):
        status(deadline, deadline.due.replace(tzinfo=None))


def test_custom_policies_file_json(tmp_path: Path) -> None:
    """A JSON policies file lengthens the reception limit and keeps every other default."""
    path = tmp_path / "policies.json"
    path.write_text(
        json.dumps({"policies": [{"stage": "departed", "limit": "36h", "warn_before": "12h"}]})
    )
    policies = load_policies(path)
    state = state_at(4)
    deadline = deadline_for(state, policies)
    assert deadline is not None and state.stage_entered_at is not None
    assert deadline.due - state.stage_entered_at == timedelta(hours=36)
    assert deadline.due - deadline.warn_at == timedelta(hours=12)
    assert deadline.owed_by == NGO_UZ
    assert len(policies) == len(DEFAULT_POLICIES)
    assert status(deadline, state.stage_entered_at + timedelta(hours=25)) is Status.WARNING


def test_custom_policies_file_toml_adds_a_stage(tmp_path: Path) -> None:
    """A TOML policies file can give a stage without a default (halted) a deadline."""
    path = tmp_path / "policies.toml"
    path.write_text('[[policies]]\nstage = "halted"\nlimit = "2w"\nowed_by = "origin"\n')
    case = Case()
    halted = fold([*happy_path(case, 2), case.event(K.CONSENT_WITHDRAWN, KZ, (UZ,))])[0]
    deadline = deadline_for(halted, load_policies(path))
    assert deadline is not None and deadline.owed_by == KZ and deadline.stage is Stage.HALTED


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read"),
        ('{"rules": []}', "'policies' list"),
        ('{"policies": [{"stage": "teleported"}]}', "entry 0: 'stage'"),
        ('{"policies": [{"stage": "requested", "limit": "3 fortnights"}]}', "duration"),
        ('{"policies": [{"stage": "requested", "owed_by": "nobody"}]}', "owed_by"),
        ('{"policies": [{"stage": "requested", "colour": "red"}]}', "unknown keys"),
        ('{"policies": [{"stage": "requested", "warn_before": "100h"}]}', "warn_before"),
        ('{"policies": [{"stage": "halted", "limit": "1d"}]}', "no default policy"),
        ('{"policies": [{"stage": "requested"}, {"stage": "requested"}]}', "twice"),
    ],
)
def test_bad_policies_file_names_the_problem(tmp_path: Path, content: str, message: str) -> None:
    """A wrong policies file raises ConfigError naming the file and what is wrong."""
    path = tmp_path / "policies.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_policies(path)
    assert str(path) in str(info.value)


def test_missing_policies_file() -> None:
    """A missing policies file raises ConfigError, not OSError."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_policies("/nonexistent/policies.toml")


def test_parse_duration() -> None:
    """Durations take a number and one unit."""
    assert parse_duration("72h") == timedelta(hours=72)
    assert parse_duration("1.5d") == timedelta(hours=36)
    assert parse_duration("90m") == timedelta(minutes=90)
