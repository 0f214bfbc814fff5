"""The case handoff state machine: stages, anomalies, replay, serialisation, timeline."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import CaseError, CaseStateInvalid
from schemas.base import MessageKind as K
from schemas.header import EnvelopeHeader
from services import cases
from services.cases import (
    CaseState,
    Entry,
    Event,
    Reason,
    Stage,
    apply,
    replay,
    timeline,
)

KZ = "iom-kz"
UZ = "iom-uz"
NGO_UZ = "ngo-uz-istiqbolli-avlod"
NGO_KZ = "ngo-kz-rodnik"
POLICE_UZ = "police-uz-tashkent"
ROUTING = "routing"
ROLES = {
    KZ: "mission",
    UZ: "mission",
    NGO_UZ: "ngo",
    NGO_KZ: "ngo",
    POLICE_UZ: "state_service",
    ROUTING: "routing",
}
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


class Case:
    """Builds the events of one case with correct per-sender sequence numbers."""

    def __init__(self, ref: str = "iom-kz.KZ-2025-0001") -> None:
        self.ref = ref
        self.seqs: dict[str, int] = {}
        self.clock = T0

    def event(
        self,
        kind: K,
        sender: str,
        recipients: tuple[str, ...],
        *,
        after: timedelta = timedelta(hours=1),
        seq: int | None = None,
        reply_to: str | None = None,
    ) -> Event:
        """The next event of the case, `after` the previous one."""
        self.clock += after
        if seq is None:
            seq = self.seqs.get(sender, 0) + 1
        self.seqs[sender] = max(seq, self.seqs.get(sender, 0))
        return Event(
            envelope_id=str(uuid.uuid4()),
            kind=kind,
            case=self.ref,
            sender=sender,
            recipients=recipients,
            sent_at=self.clock - timedelta(seconds=5),
            received_at=self.clock,
            seq=seq,
            reply_to=reply_to,
        )


HAPPY_STEPS: tuple[tuple[K, str, tuple[str, ...], timedelta], ...] = (
    (K.RETURN_REQUEST, KZ, (UZ, NGO_UZ), timedelta(hours=1)),
    (K.RETURN_ACCEPTED, UZ, (KZ, NGO_UZ), timedelta(hours=20)),
    (K.TRAVEL_ARRANGED, KZ, (UZ, NGO_UZ), timedelta(days=3)),
    (K.DEPARTED, KZ, (UZ, NGO_UZ), timedelta(days=2)),
    (K.RECEPTION_CONFIRMED, NGO_UZ, (KZ, UZ), timedelta(hours=5)),
    (K.REINTEGRATION_UPDATE, NGO_UZ, (UZ,), timedelta(days=20)),
    (K.REINTEGRATION_UPDATE, NGO_UZ, (UZ,), timedelta(days=60)),
    (K.CASE_CLOSED, UZ, (KZ, NGO_UZ), timedelta(days=30)),
)


def happy_path(case: Case, upto: int = len(HAPPY_STEPS)) -> list[Event]:
    """The first `upto` stages of a return from Kazakhstan to Uzbekistan."""
    return [
        case.event(kind, sender, recipients, after=after)
        for kind, sender, recipients, after in HAPPY_STEPS[:upto]
    ]


def fold(events: list[Event]) -> tuple[CaseState, list[object]]:
    state: CaseState | None = None
    anomalies: list[object] = []
    for event in events:
        state, anomaly = apply(state, event, ROLES)
        anomalies.append(anomaly)
    assert state is not None
    return state, anomalies


def test_return_happy_path_reaches_every_stage() -> None:
    """A full return walks requested → accepted → … → closed with no anomaly."""
    state: CaseState | None = None
    stages = []
    for event in happy_path(Case()):
        state, anomaly = apply(state, event, ROLES)
        assert anomaly is None
        stages.append(state.stage)
    assert stages == [
        Stage.REQUESTED,
        Stage.ACCEPTED,
        Stage.TRAVEL_ARRANGED,
        Stage.DEPARTED,
        Stage.RECEIVED,
        Stage.REINTEGRATION,
        Stage.REINTEGRATION,
        Stage.CLOSED,
    ]
    assert state is not None
    assert state.origin == KZ
    assert state.parties == {KZ, UZ, NGO_UZ}
    assert state.last_seq == {KZ: 3, UZ: 2, NGO_UZ: 3}
    assert state.anomalies == ()


def test_stage_entered_at_is_the_routing_receive_time_of_the_moving_envelope() -> None:
    """The stage clock starts when the routing service received the envelope that moved it."""
    events = happy_path(Case(), 3)
    state, _ = fold(events)
    assert state.stage_entered_at == events[2].received_at
    assert state.stage_envelope == events[2].envelope_id


def test_referral_path() -> None:
    """A referral is requested, accepted, followed by reintegration updates, and closed."""
    case = Case(f"{NGO_UZ}.REF-UZ-7")
    state, anomalies = fold(
        [
            case.event(K.REFERRAL_REQUEST, NGO_UZ, (NGO_KZ,)),
            case.event(K.REFERRAL_ACCEPTED, NGO_KZ, (NGO_UZ,)),
            case.event(K.REINTEGRATION_UPDATE, NGO_KZ, (NGO_UZ,)),
            case.event(K.CASE_CLOSED, NGO_KZ, (NGO_UZ,)),
        ]
    )
    assert anomalies == [None] * 4
    assert [e.stage_after for e in state.entries] == [
        Stage.REFERRAL_REQUESTED,
        Stage.REFERRAL_ACCEPTED,
        Stage.REINTEGRATION,
        Stage.CLOSED,
    ]


def test_referral_declined_then_closed() -> None:
    """A declined referral can be closed administratively."""
    case = Case(f"{NGO_UZ}.REF-UZ-8")
    state, anomalies = fold(
        [
            case.event(K.REFERRAL_REQUEST, NGO_UZ, (NGO_KZ,)),
            case.event(K.REFERRAL_DECLINED, NGO_KZ, (NGO_UZ,)),
            case.event(K.CASE_CLOSED, NGO_UZ, (NGO_KZ,)),
        ]
    )
    assert anomalies == [None] * 3
    assert state.stage is Stage.CLOSED


SERVICE_REFERRAL: tuple[tuple[K, str, tuple[str, ...], Stage], ...] = (
    (K.REFERRAL_REQUEST, NGO_UZ, (POLICE_UZ,), Stage.REFERRAL_REQUESTED),
    (K.REFERRAL_ACCEPTED, POLICE_UZ, (NGO_UZ,), Stage.REFERRAL_ACCEPTED),
    (K.SERVICE_STARTED, POLICE_UZ, (NGO_UZ,), Stage.SERVICE_STARTED),
    (K.SERVICE_COMPLETED, POLICE_UZ, (NGO_UZ,), Stage.SERVICE_COMPLETED),
    (K.CASE_CLOSED, NGO_UZ, (POLICE_UZ,), Stage.CLOSED),
)
"""An NGO refers a person to a state service, which provides the service; the NGO closes."""


def service_referral(case: Case, upto: int = len(SERVICE_REFERRAL)) -> list[Event]:
    """The first `upto` steps of `SERVICE_REFERRAL`."""
    return [case.event(k, sender, to) for k, sender, to, _ in SERVICE_REFERRAL[:upto]]


def test_referral_to_a_state_service_walks_the_service_stages() -> None:
    """A state service accepts, starts and completes a referred service; the NGO closes it."""
    state, anomalies = fold(service_referral(Case(f"{NGO_UZ}.REF-UZ-9")))
    assert anomalies == [None] * len(SERVICE_REFERRAL)
    assert [e.stage_after for e in state.entries] == [s for *_, s in SERVICE_REFERRAL]
    assert state.origin == NGO_UZ
    assert state.party_roles == {NGO_UZ: "ngo", POLICE_UZ: "state_service"}


@pytest.mark.parametrize(
    ("prefix", "kind", "sender", "expected_stage", "reason"),
    [
        (1, K.SERVICE_STARTED, POLICE_UZ, Stage.REFERRAL_REQUESTED, Reason.OUT_OF_ORDER),
        (2, K.SERVICE_COMPLETED, POLICE_UZ, Stage.REFERRAL_ACCEPTED, Reason.OUT_OF_ORDER),
        (3, K.REINTEGRATION_UPDATE, POLICE_UZ, Stage.SERVICE_STARTED, Reason.IMPOSSIBLE_TRANSITION),
        (4, K.SERVICE_STARTED, POLICE_UZ, Stage.SERVICE_COMPLETED, Reason.IMPOSSIBLE_TRANSITION),
        (1, K.REFERRAL_ACCEPTED, NGO_KZ, Stage.REFERRAL_REQUESTED, Reason.NOT_A_PARTY),
        (2, K.SERVICE_STARTED, NGO_KZ, Stage.REFERRAL_ACCEPTED, Reason.NOT_A_PARTY),
        (2, K.REQUEST_WITHDRAWN, POLICE_UZ, Stage.REFERRAL_ACCEPTED, Reason.NOT_THE_OWNER),
        (5, K.SERVICE_COMPLETED, POLICE_UZ, Stage.CLOSED, Reason.AFTER_CLOSE),
    ],
)
def test_referral_service_anomalies_keep_the_stage(
    prefix: int, kind: K, sender: str, expected_stage: Stage, reason: Reason
) -> None:
    """An early, impossible or outsider's step on a referral is recorded with its reason only."""
    case = Case(f"{NGO_UZ}.REF-UZ-10")
    state, _ = fold(service_referral(case, prefix))
    after, anomaly = apply(state, case.event(kind, sender, (NGO_UZ,)), ROLES)
    assert anomaly is not None and anomaly.reason == reason
    assert after.stage is expected_stage
    assert after.stage_envelope == state.stage_envelope


def test_service_started_on_a_return_case_is_impossible() -> None:
    """The referral's service stages do not follow a return's acceptance."""
    case = Case()
    state, _ = fold(happy_path(case, 2))
    after, anomaly = apply(state, case.event(K.SERVICE_STARTED, UZ, (KZ,)), ROLES)
    assert anomaly is not None and anomaly.reason == Reason.IMPOSSIBLE_TRANSITION
    assert after.stage is Stage.ACCEPTED


def test_opening_under_another_participants_reference_takes_nothing() -> None:
    """An NGO opening a case named for KZ is not_the_owner; KZ's own request still opens it."""
    case = Case("iom-kz.KZ-2025-0100")
    state, anomaly = apply(None, case.event(K.REFERRAL_REQUEST, NGO_UZ, (UZ,)), ROLES)
    assert anomaly is not None and anomaly.reason == Reason.NOT_THE_OWNER
    assert (state.stage, state.origin, state.parties) == (None, None, frozenset())
    state, anomaly = apply(state, case.event(K.RETURN_REQUEST, KZ, (UZ, NGO_UZ)), ROLES)
    assert anomaly is None
    assert (state.stage, state.origin) == (Stage.REQUESTED, KZ)
    _, anomaly = apply(state, case.event(K.RETURN_ACCEPTED, NGO_UZ, (KZ,)), ROLES)
    assert anomaly is not None and anomaly.reason == Reason.WRONG_ROLE


def test_erasure_confirmed_after_a_halt_is_recorded_and_moves_nothing() -> None:
    """A recipient's erasure confirmation on a halted case is no anomaly and keeps the stage."""
    case = Case()
    halted, _ = fold([*happy_path(case, 2), case.event(K.CONSENT_WITHDRAWN, KZ, (UZ, NGO_UZ))])
    confirmation = case.event(K.ERASURE_CONFIRMED, NGO_UZ, (KZ,))
    after, anomaly = apply(halted, confirmation, ROLES)
    assert anomaly is None
    assert after.entries[-1] == Entry(confirmation, Stage.HALTED)
    assert (after.stage, after.stage_entered_at, after.stage_envelope) == (
        halted.stage,
        halted.stage_entered_at,
        halted.stage_envelope,
    )
    _, anomaly = apply(after, case.event(K.ERASURE_CONFIRMED, NGO_KZ, (KZ,)), ROLES)
    assert anomaly is not None and anomaly.reason == Reason.NOT_A_PARTY


def test_consent_withdrawn_halts_then_nothing_moves_but_a_close() -> None:
    """Consent withdrawn halts a case; a departure is then consent_withdrawn; a close is allowed."""
    case = Case()
    events = happy_path(case, 3)
    events.append(case.event(K.CONSENT_WITHDRAWN, KZ, (UZ, NGO_UZ)))
    state, anomalies = fold(events)
    assert state.stage is Stage.HALTED
    assert anomalies[-1] is None
    state, anomaly = apply(state, case.event(K.DEPARTED, KZ, (UZ,)), ROLES)
    assert state.stage is Stage.HALTED
    assert anomaly is not None and anomaly.reason == Reason.CONSENT_WITHDRAWN
    state, anomaly = apply(state, case.event(K.CASE_CLOSED, UZ, (KZ,)), ROLES)
    assert anomaly is None and state.stage is Stage.CLOSED


def test_request_withdrawn() -> None:
    """The requesting mission withdraws an accepted request before travel."""
    case = Case()
    events = happy_path(case, 2)
    events.append(case.event(K.REQUEST_WITHDRAWN, KZ, (UZ, NGO_UZ)))
    state, anomalies = fold(events)
    assert state.stage is Stage.WITHDRAWN
    assert anomalies == [None, None, None]


def test_request_cannot_be_withdrawn_after_departure() -> None:
    """Withdrawing a request once the person has departed is an impossible transition."""
    case = Case()
    events = happy_path(case, 4)
    events.append(case.event(K.REQUEST_WITHDRAWN, KZ, (UZ,)))
    state, anomalies = fold(events)
    assert state.stage is Stage.DEPARTED
    assert anomalies[-1].reason == Reason.IMPOSSIBLE_TRANSITION  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("prefix", "kind", "sender", "expected_stage", "reason"),
    [
        (1, K.DEPARTED, KZ, Stage.REQUESTED, Reason.OUT_OF_ORDER),
        (1, K.RECEPTION_CONFIRMED, NGO_UZ, Stage.REQUESTED, Reason.OUT_OF_ORDER),
        (2, K.CASE_CLOSED, UZ, Stage.ACCEPTED, Reason.OUT_OF_ORDER),
        (5, K.RECEPTION_CONFIRMED, NGO_UZ, Stage.RECEIVED, Reason.IMPOSSIBLE_TRANSITION),
        (4, K.RETURN_ACCEPTED, UZ, Stage.DEPARTED, Reason.IMPOSSIBLE_TRANSITION),
        (1, K.RETURN_REQUEST, KZ, Stage.REQUESTED, Reason.IMPOSSIBLE_TRANSITION),
        (2, K.RETURN_DECLINED, UZ, Stage.ACCEPTED, Reason.IMPOSSIBLE_TRANSITION),
        (1, K.REFERRAL_ACCEPTED, UZ, Stage.REQUESTED, Reason.IMPOSSIBLE_TRANSITION),
        (8, K.REINTEGRATION_UPDATE, NGO_UZ, Stage.CLOSED, Reason.AFTER_CLOSE),
        (8, K.CONSENT_WITHDRAWN, UZ, Stage.CLOSED, Reason.AFTER_CLOSE),
        (8, K.CASE_CLOSED, UZ, Stage.CLOSED, Reason.AFTER_CLOSE),
    ],
)
def test_impossible_transitions_keep_the_stage_and_name_the_reason(
    prefix: int, kind: K, sender: str, expected_stage: Stage, reason: Reason
) -> None:
    """Each impossible or early transition gives its own anomaly, keeps the stage, is recorded."""
    case = Case()
    state, _ = fold(happy_path(case, prefix))
    odd = case.event(kind, sender, (KZ, UZ) if sender != KZ else (UZ,))
    after, anomaly = apply(state, odd, ROLES)
    assert anomaly is not None and anomaly.reason == reason
    assert anomaly.envelope_id == odd.envelope_id
    assert after.stage is expected_stage
    assert after.stage_entered_at == state.stage_entered_at
    assert after.entries[-1].event == odd and after.entries[-1].anomaly == anomaly


def test_first_event_that_does_not_open_a_case_is_unknown_case() -> None:
    """An acceptance for a case never requested is recorded as unknown_case with no stage."""
    case = Case("iom-kz.KZ-404")
    state, anomaly = apply(None, case.event(K.RETURN_ACCEPTED, UZ, (KZ,)), ROLES)
    assert anomaly is not None and anomaly.reason == Reason.UNKNOWN_CASE
    assert state.stage is None and len(state.entries) == 1


def test_reception_confirmed_by_a_mission_is_wrong_role() -> None:
    """A mission confirming reception is recorded as wrong_role and does not move the case."""
    case = Case()
    state, _ = fold(happy_path(case, 4))
    after, anomaly = apply(state, case.event(K.RECEPTION_CONFIRMED, UZ, (KZ,)), ROLES)
    assert anomaly is not None and anomaly.reason == Reason.WRONG_ROLE
    assert after.stage is Stage.DEPARTED
    assert len(after.entries) == len(state.entries) + 1


@pytest.mark.parametrize(
    ("kind", "sender"),
    [(K.RETURN_REQUEST, NGO_KZ), (K.REMINDER, KZ), (K.RETURN_REQUEST, "iom-unknown")],
)
def test_wrong_or_unknown_role(kind: K, sender: str) -> None:
    """An NGO requesting a return, a mission reminding, or an unknown sender is wrong_role."""
    case = Case()
    state, _ = fold(happy_path(case, 1))
    _, anomaly = apply(state, case.event(kind, sender, (UZ,)), ROLES)
    assert anomaly is not None and anomaly.reason == Reason.WRONG_ROLE


def test_roles_may_be_a_callable() -> None:
    """Roles can be looked up through a function instead of a mapping."""
    state, anomaly = apply(None, Case().event(K.RETURN_REQUEST, KZ, (UZ,)), ROLES.get)
    assert anomaly is None and state.stage is Stage.REQUESTED


def test_sender_who_took_no_part_cannot_move_the_case() -> None:
    """A mission that was never sender or recipient cannot accept someone else's request."""
    case = Case()
    state, _ = fold(happy_path(case, 1))
    after, anomaly = apply(
        state, case.event(K.RETURN_ACCEPTED, "iom-tj", (KZ,)), {**ROLES, "iom-tj": "mission"}
    )
    assert anomaly is not None and anomaly.reason == Reason.NOT_A_PARTY
    assert after.stage is Stage.REQUESTED


def test_sequence_gap_is_reported_and_still_applied() -> None:
    """A skipped sequence number is an anomaly, but the transition still happens."""
    case = Case()
    state, _ = fold(happy_path(case, 2))
    after, anomaly = apply(state, case.event(K.TRAVEL_ARRANGED, KZ, (UZ,), seq=4), ROLES)
    assert anomaly is not None and anomaly.reason == Reason.SEQUENCE_GAP
    assert after.stage is Stage.TRAVEL_ARRANGED
    assert after.last_seq[KZ] == 4


def test_sequence_repeat_under_a_new_id_is_not_applied() -> None:
    """A used sequence number under a new envelope id is recorded but does not move the case."""
    case = Case()
    state, _ = fold(happy_path(case, 2))
    after, anomaly = apply(state, case.event(K.TRAVEL_ARRANGED, KZ, (UZ,), seq=1), ROLES)
    assert anomaly is not None and anomaly.reason == Reason.SEQUENCE_REPEAT
    assert after.stage is Stage.ACCEPTED
    assert after.last_seq[KZ] == 1


def test_reapplying_the_same_envelope_is_idempotent() -> None:
    """The same envelope applied again, even redelivered later, changes and reports nothing."""
    events = happy_path(Case())
    state, _ = fold(events)
    for event in events:
        redelivered = Event(
            **{**event.__dict__, "received_at": event.received_at + timedelta(hours=3)}
        )
        again, anomaly = apply(state, redelivered, ROLES)
        assert anomaly is None
        assert again == state


def test_same_id_with_another_header_is_a_conflicting_duplicate() -> None:
    """A recorded id reused with a different header is reported and not recorded again."""
    events = happy_path(Case(), 2)
    state, _ = fold(events)
    forged = Event(**{**events[1].__dict__, "kind": K.RETURN_DECLINED})
    again, anomaly = apply(state, forged, ROLES)
    assert anomaly is not None and anomaly.reason == Reason.CONFLICTING_DUPLICATE
    assert again == state


def _long_case(length: int) -> tuple[Case, CaseState]:
    """A request, its acceptance, then travel re-arranged until the case has `length` entries."""
    case = Case()
    state, _ = fold(happy_path(case, 2))
    for _ in range(length - 2):
        state, anomaly = apply(state, case.event(K.TRAVEL_ARRANGED, KZ, (UZ, NGO_UZ)), ROLES)
        assert anomaly is None
    return case, state


def test_an_event_indexes_one_entry_at_any_case_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """Growing a case event by event indexes each entry once: no event rescans the case."""
    built: list[int] = []
    added: list[str] = []
    init, add = cases._Lineage.__init__, cases._Lineage.add

    def counting_init(self: cases._Lineage, entries: Iterable[Entry]) -> None:
        init(self, entries)
        built.append(self.size)

    def counting_add(self: cases._Lineage, entry: Entry) -> None:
        added.append(entry.event.envelope_id)
        add(self, entry)

    monkeypatch.setattr(cases._Lineage, "__init__", counting_init)
    monkeypatch.setattr(cases._Lineage, "add", counting_add)
    case, state = _long_case(300)
    assert built == [0] and len(added) == 300
    first = state.entries[0].event
    redelivered = Event(**{**first.__dict__, "received_at": first.received_at + timedelta(days=1)})
    before = len(added)
    assert apply(state, redelivered, ROLES) == (state, None)
    grown, _ = apply(state, case.event(K.TRAVEL_ARRANGED, KZ, (UZ, NGO_UZ)), ROLES)
    assert len(added) - before == 1 and built == [0]
    assert grown.opening == first


@pytest.mark.parametrize("length", [2_000, 8_000])
def test_an_event_touches_one_pending_envelope_and_copies_nothing(
    length: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 2k and 8k entries alike, each event settles one envelope's receipts and copies nothing.

    The grown states share their predecessor's entries and pending receipts
    (the same list and dict, each state seeing its own length), no event
    rebuilds them, and the receipts owed are those a fold from scratch gives.
    """
    case, state = _long_case(length)
    assert len(state.pending_receipts) == length
    settled: list[str] = []
    rebuilt: list[int] = []
    settle, init = cases._settle, cases._Lineage.__init__

    def counting_settle(pending: dict[str, frozenset[str]], entry: Entry) -> None:
        settled.append(entry.event.envelope_id)
        settle(pending, entry)

    def counting_init(self: cases._Lineage, entries: Iterable[Entry]) -> None:
        rebuilt.append(0)
        init(self, entries)

    monkeypatch.setattr(cases, "_settle", counting_settle)
    monkeypatch.setattr(cases._Lineage, "__init__", counting_init)
    grown = state
    for n in range(10):
        before = grown
        answered = before.entries[n + 1].event.envelope_id
        event = (
            case.event(K.DELIVERY_RECEIPT, UZ, (KZ,), reply_to=answered)
            if n % 2
            else case.event(K.TRAVEL_ARRANGED, KZ, (UZ, NGO_UZ))
        )
        grown, anomaly = apply(before, event, ROLES)
        assert anomaly is None
        assert grown._lineage.entries is before._lineage.entries
        assert grown._lineage.pending is before._lineage.pending
    assert len(settled) == 10 and rebuilt == []
    monkeypatch.undo()
    assert grown.pending_receipts == fold([e.event for e in grown.entries])[0].pending_receipts


def test_a_state_keeps_its_pending_receipts_when_later_states_settle_them() -> None:
    """Receipts applied to a state's successors, or to a branch, leave its own pending receipts."""
    case = Case()
    state, _ = fold(happy_path(case, 1))
    request = state.entries[0].event.envelope_id
    from_uz = case.event(K.DELIVERY_RECEIPT, UZ, (KZ,), reply_to=request)
    from_ngo = case.event(K.DELIVERY_RECEIPT, NGO_UZ, (KZ,), reply_to=request)
    left, _ = apply(state, from_uz, ROLES)
    both, _ = apply(left, from_ngo, ROLES)
    right, _ = apply(state, from_ngo, ROLES)
    assert state.pending_receipts == {request: {UZ, NGO_UZ}}
    assert left.pending_receipts == {request: {NGO_UZ}}
    assert right.pending_receipts == {request: {UZ}}
    assert both.pending_receipts == {}
    assert left != right and left.entries == (*state.entries, Entry(from_uz, Stage.REQUESTED))
    loaded = CaseState.from_dict(json.loads(json.dumps(left.to_dict())))
    assert loaded == left and loaded.pending_receipts == left.pending_receipts
    assert "pending_receipts" not in left.to_dict()


def test_states_grown_from_one_state_each_see_only_their_own_entries() -> None:
    """Two different events applied to the same state: each result finds its own id only."""
    case, state = _long_case(5)
    left_event = case.event(K.TRAVEL_ARRANGED, KZ, (UZ, NGO_UZ))
    right_event = case.event(K.TRAVEL_ARRANGED, KZ, (UZ, NGO_UZ))
    left, _ = apply(state, left_event, ROLES)
    right, _ = apply(state, right_event, ROLES)
    assert state.entry(left_event.envelope_id) is None
    assert state.entry(right_event.envelope_id) is None
    assert left.entry(right_event.envelope_id) is None
    found = right.entry(right_event.envelope_id)
    assert found is not None and found.event == right_event
    assert left == fold([*(e.event for e in state.entries), left_event])[0]
    again, _ = apply(left, left_event, ROLES)
    assert again == left
    loaded = CaseState.from_dict(json.loads(json.dumps(right.to_dict())))
    assert loaded.entry(right_event.envelope_id) == found and loaded.opening == right.opening


def test_event_for_another_case_raises() -> None:
    """Applying one case's event to another case's state is a caller error with a clear message."""
    state, _ = fold(happy_path(Case("iom-kz.CASE-A"), 1))
    with pytest.raises(CaseError, match="CASE-B"):
        apply(state, Case("iom-kz.CASE-B").event(K.RETURN_REQUEST, KZ, (UZ,)), ROLES)


def test_naive_receive_time_is_refused() -> None:
    """An event built with a naive datetime fails at construction with CaseError."""
    with pytest.raises(CaseError, match="received_at"):
        Event("id", K.REMINDER, "C-1", ROUTING, (KZ,), T0, datetime(2025, 1, 1), 1)


def test_event_from_header() -> None:
    """A verified header becomes an event carrying its fields and the routing receive time."""
    reply = uuid.uuid4()
    header = EnvelopeHeader(
        id=uuid.uuid4(),
        kind=K.RETURN_ACCEPTED,
        schema_version=1,
        case="iom-kz.KZ-2025-0001",
        sender=UZ,
        sender_key="k1",
        recipients=(KZ, NGO_UZ),
        sent_at=T0,
        seq=1,
        reply_to=reply,
    )
    event = Event.from_header(header, T0 + timedelta(seconds=2))
    assert event.envelope_id == str(header.id)
    assert event.reply_to == str(reply)
    assert event.recipients == (KZ, NGO_UZ)
    assert event.received_at - event.sent_at == timedelta(seconds=2)


def test_delivery_receipts_clear_pending_recipients() -> None:
    """A receipt from each recipient marks the handoff delivered; a stray receipt is unmatched."""
    case = Case()
    state, _ = fold(happy_path(case, 1))
    request = state.entries[0].event
    assert state.pending_receipts == {request.envelope_id: {UZ, NGO_UZ}}
    receipt = case.event(K.DELIVERY_RECEIPT, UZ, (KZ,), reply_to=request.envelope_id)
    state, anomaly = apply(state, receipt, ROLES)
    assert anomaly is None and state.stage is Stage.REQUESTED
    assert state.pending_receipts[request.envelope_id] == {NGO_UZ}
    state, anomaly = apply(
        state, case.event(K.DELIVERY_RECEIPT, NGO_UZ, (KZ,), reply_to=request.envelope_id), ROLES
    )
    assert anomaly is None
    assert request.envelope_id not in state.pending_receipts
    state, anomaly = apply(
        state, case.event(K.DELIVERY_RECEIPT, UZ, (KZ,), reply_to=request.envelope_id), ROLES
    )
    assert anomaly is not None and anomaly.reason == Reason.UNMATCHED_RECEIPT


def test_receipts_and_reminders_after_close_are_not_anomalies() -> None:
    """The receipt of the closing message arrives after the close and is accepted."""
    case = Case()
    state, _ = fold(happy_path(case))
    closing = state.entries[-1].event
    state, anomaly = apply(
        state, case.event(K.DELIVERY_RECEIPT, KZ, (UZ,), reply_to=closing.envelope_id), ROLES
    )
    assert anomaly is None and state.stage is Stage.CLOSED


def interleave(cases: list[list[Event]], rng: random.Random) -> Iterator[Event]:
    """Shuffle events across cases while keeping each case's own order."""
    queues = [list(events) for events in cases]
    while any(queues):
        queue = rng.choice([q for q in queues if q])
        yield queue.pop(0)


def test_replay_of_interleaved_cases_equals_sequential_apply() -> None:
    """Replaying interleaved cases, each in its arrival order, equals applying each alone."""
    cases = [happy_path(Case(f"iom-kz.KZ-2025-{n:04d}")) for n in range(4)]
    cases[1] = [*cases[1][:3], cases[1][5]]  # an out-of-order event, recorded as an anomaly
    expected = {events[0].case: fold(events)[0] for events in cases}
    for seed in range(5):
        assert replay(interleave(cases, random.Random(seed)), ROLES) == expected


def test_to_dict_round_trip_through_json() -> None:
    """A state with anomalies and pending receipts survives to_dict → JSON → from_dict unchanged."""
    case = Case()
    events = happy_path(case, 4)
    events.append(case.event(K.DEPARTED, KZ, (UZ,), seq=7))
    state, _ = fold(events)
    assert state.anomalies
    data = json.loads(json.dumps(state.to_dict()))
    assert CaseState.from_dict(data) == state
    assert CaseState.from_dict(data).to_dict() == state.to_dict()


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.pop("stage"),
        lambda d: d.update(stage="teleported"),
        lambda d: d.update(format=99),
        lambda d: d["entries"][0]["event"].update(seq="1"),
        lambda d: d["entries"][0]["event"].update(sent_at="2025-03-01T09:00:00"),
        lambda d: d.update(extra=1),
    ],
)
def test_from_dict_refuses_damaged_input(damage: object) -> None:
    """A damaged serialised state raises CaseStateInvalid, never a raw Python error."""
    data = fold(happy_path(Case(), 2))[0].to_dict()
    damage(data)  # type: ignore[operator]
    with pytest.raises(CaseStateInvalid, match="trm audit replay"):
        CaseState.from_dict(data)


def test_timeline_rows_and_gaps() -> None:
    """The timeline lists each envelope, the stage after it and the gap since the last handoff."""
    case = Case()
    events = happy_path(case, 1)
    request = events[0].envelope_id
    events += [
        case.event(K.DELIVERY_RECEIPT, UZ, (KZ,), reply_to=request, after=timedelta(minutes=10)),
        case.event(K.RETURN_ACCEPTED, UZ, (KZ, NGO_UZ), after=timedelta(hours=20)),
        case.event(K.TRAVEL_ARRANGED, KZ, (UZ, NGO_UZ), after=timedelta(days=3)),
    ]
    state, _ = fold(events)
    rows = timeline(state)
    assert [r.kind for r in rows] == [
        K.RETURN_REQUEST,
        K.DELIVERY_RECEIPT,
        K.RETURN_ACCEPTED,
        K.TRAVEL_ARRANGED,
    ]
    assert [r.stage_after for r in rows] == [
        Stage.REQUESTED,
        Stage.REQUESTED,
        Stage.ACCEPTED,
        Stage.TRAVEL_ARRANGED,
    ]
    assert rows[0].since_previous_handoff is None
    assert rows[1].since_previous_handoff == timedelta(minutes=10)
    assert rows[2].since_previous_handoff == timedelta(hours=20, minutes=10)
    assert rows[3].since_previous_handoff == timedelta(days=3)
    assert rows[0].awaiting_receipt == (NGO_UZ,)
    assert rows[2].sender == UZ and rows[2].recipients == (KZ, NGO_UZ)


PEOPLE = [KZ, UZ, NGO_UZ, NGO_KZ, POLICE_UZ, ROUTING, "auditor-vienna", "iom-ghost"]
CASE_REFS = [f"{KZ}.CASE-1", f"{NGO_UZ}.CASE-2", f"{POLICE_UZ}.CASE-3"]
"""Owner-named, so that a random opening by its owner opens the case."""
ALL_ROLES = {**ROLES, "auditor-vienna": "auditor"}


@st.composite
def random_events(draw: st.DrawFn) -> list[Event]:
    """Arbitrary header sequences over three cases, with reused ids, seqs and reply-tos."""
    ids = [str(uuid.UUID(int=n)) for n in range(1, 12)]
    count = draw(st.integers(0, 30))
    events = []
    for n in range(count):
        sender = draw(st.sampled_from(PEOPLE))
        recipients = draw(st.lists(st.sampled_from(PEOPLE), min_size=1, max_size=3, unique=True))
        events.append(
            Event(
                envelope_id=draw(st.sampled_from(ids)),
                kind=draw(st.sampled_from(list(K))),
                case=draw(st.sampled_from(CASE_REFS)),
                sender=sender,
                recipients=tuple(recipients),
                sent_at=T0 + timedelta(minutes=n),
                received_at=T0 + timedelta(minutes=n, seconds=draw(st.integers(0, 59))),
                seq=draw(st.integers(1, 5)),
                reply_to=draw(st.none() | st.sampled_from(ids)),
            )
        )
    return events


@settings(max_examples=200, deadline=None)
@given(random_events())
def test_random_event_sequences_never_raise(events: list[Event]) -> None:
    """Any event sequence never raises, leaves a Stage or None, and round-trips exactly."""
    states = replay(events, ALL_ROLES)
    for state in states.values():
        assert state.stage is None or isinstance(state.stage, Stage)
        assert CaseState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    assert sum(len(s.entries) for s in states.values()) <= len(events)
