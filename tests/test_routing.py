"""The routing service's handler and deadline poll on SQLite and PostgreSQL, with real keys."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest
import sqlalchemy as sa
from alembic import command
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import envelope
from broker.database import alembic_config, migrate, open_database
from broker.directory import (
    Directory,
    DirectoryBody,
    Role,
    load_directory,
    revoke_key,
    sign_directory,
)
from broker.envelope import (
    EnvelopeVerifier,
    Recipient,
    open_envelope,
    read_header,
    seal,
    sign,
)
from broker.errors import StorageError
from broker.keys import (
    ParticipantKeys,
    init_authority,
    init_participant,
    load_authority,
    load_keys,
    pin_authority,
)
from broker.outbox import Outbox
from broker.testing import capture_logs
from broker.transport import Delivery
from schemas.base import MessageKind
from schemas.control import DeliveryReceipt
from schemas.control import Reminder as ReminderMessage
from schemas.examples import EXAMPLE_PERSON_NAME, example
from schemas.registry import encode_payload
from services.audit import diff_states, replay_export
from services.auditlog import AuditLog, log_entries_table
from services.cases import CaseState, Stage
from services.casestore import CaseStore, CaseWrite
from services.checkpoint import origin_for
from services.deadlines import Status
from services.routing import HomeDirectory, Logged, Outcome, RoutingService, Timers
from trm.cli import cli

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
KEYS_FROM = T0 - timedelta(days=10)
KZ, UZ, NGO, ROUTING = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod", "routing"
STATE = "police-uz-tashkent"
"""A state service: an Uzbek police unit, a case party with no parent mission."""
CASE = "iom-kz.KZ-2026-0042"

K = MessageKind
FULL_RETURN: tuple[tuple[MessageKind, str, tuple[str, ...], Stage], ...] = (
    (K.RETURN_REQUEST, KZ, (UZ, NGO), Stage.REQUESTED),
    (K.RETURN_ACCEPTED, UZ, (KZ, NGO), Stage.ACCEPTED),
    (K.TRAVEL_ARRANGED, KZ, (UZ, NGO), Stage.TRAVEL_ARRANGED),
    (K.DEPARTED, KZ, (UZ, NGO), Stage.DEPARTED),
    (K.RECEPTION_CONFIRMED, NGO, (KZ, UZ), Stage.RECEIVED),
    (K.REINTEGRATION_UPDATE, NGO, (KZ, UZ), Stage.REINTEGRATION),
    (K.CASE_CLOSED, UZ, (KZ, NGO), Stage.CLOSED),
)
"""A return from Kazakhstan to Uzbekistan, from request to closure, and the stage after each."""


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@dataclass(frozen=True)
class World:
    """An authority, three case participants and the routing service, with real keys."""

    root: Path
    keys: dict[str, ParticipantKeys]
    authority: Ed25519PrivateKey
    directory: Directory

    @property
    def home(self) -> Path:
        """The routing service's home (keys, pinned authority, directory.json)."""
        return self.root / ROUTING

    def seal(
        self,
        kind: MessageKind,
        sender: str,
        recipients: tuple[str, ...],
        *,
        seq: int,
        at: datetime,
        case: str = CASE,
        envelope_id: UUID | None = None,
    ) -> bytes:
        """The exact bytes of a sealed example message of `kind`."""
        return seal(
            example(kind),
            case=case,
            sender=self.keys[sender].sender(at),
            recipients=list(recipients),
            directory=self.directory,
            seq=seq,
            now=at,
            envelope_id=envelope_id,
        ).raw


def make_world(root: Path) -> World:
    """Key folders for KZ, UZ, the NGO, a state service and routing; the signed directory."""
    init_authority(root / "authority")
    authority = load_authority(root / "authority")
    specs: list[tuple[str, Role, str, str | None]] = [
        (KZ, Role.MISSION, "KZ", None),
        (UZ, Role.MISSION, "UZ", None),
        (NGO, Role.NGO, "UZ", UZ),
        (STATE, Role.STATE_SERVICE, "UZ", None),
        (ROUTING, Role.ROUTING, "KZ", None),
    ]
    cards = [
        init_participant(
            root / pid, participant_id=pid, role=role, country=c, parent=p, now=KEYS_FROM
        )
        for pid, role, c, p in specs
    ]
    body = DirectoryBody(serial=1, issued_at=KEYS_FROM, participants=tuple(cards))
    raw = sign_directory(body, authority)
    (root / "directory.json").write_bytes(raw)
    (root / ROUTING / "directory.json").write_bytes(raw)
    pin_authority(root / ROUTING, root / "authority" / "authority.pub")
    directory = load_directory(raw, authority=authority.public_key())
    keys = {pid: load_keys(root / pid) for pid, *_ in specs}
    return World(root, keys, authority, directory)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """One set of keys for the whole session."""
    return make_world(tmp_path_factory.mktemp("routing-world"))


def service(world: World, engine: sa.Engine, clock: Clock, **kwargs: object) -> RoutingService:
    """A routing service object on `engine` with the test's clock and the home's directory."""
    return RoutingService(world.home, engine, HomeDirectory(world.home), clock=clock, **kwargs)  # type: ignore[arg-type]


def feed_full_return(world: World, svc: RoutingService, clock: Clock) -> list[datetime]:
    """Every envelope of the full return, one hour apart; returns the receive times."""
    seqs: dict[str, int] = {}
    times = []
    for kind, sender, recipients, stage in FULL_RETURN:
        seqs[sender] = seqs.get(sender, 0) + 1
        at = clock.advance(hours=1)
        raw = world.seal(kind, sender, recipients, seq=seqs[sender], at=at - timedelta(seconds=3))
        outcome = svc.receive(raw, user_id=sender)
        assert (outcome.verification, outcome.stage, outcome.anomaly) == ("ok", stage, None)
        times.append(at)
    return times


def trm(*args: str) -> tuple[int, str]:
    """Run the trm command line in-process; (exit code, output)."""
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def show(world: World, url: str, *extra: str) -> dict[str, object]:
    code, out = trm("cases", "show", CASE, "--home", str(world.home), "--database-url", url,
                    "--json", *extra)  # fmt: skip
    assert code == 0, out
    return json.loads(out)  # type: ignore[no-any-return]


def log_size(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(log_entries_table)).scalar_one()
        )


# --- tracking ---------------------------------------------------------------------------


def test_full_return_case_shows_every_stage_with_times(
    world: World, engine: sa.Engine, database_url: str
) -> None:
    """A full return's envelopes yield every stage, each with its receive time, in `cases show`."""
    clock = Clock(T0)
    times = feed_full_return(world, service(world, engine, clock), clock)
    detail = show(world, database_url)
    timeline = detail["timeline"]
    assert isinstance(timeline, list)
    assert [t["stage_after"] for t in timeline] == [str(s) for *_, s in FULL_RETURN]
    assert [t["received_at"] for t in timeline] == [t.isoformat() for t in times]
    assert [t["sender"] for t in timeline] == [s for _, s, _, _ in FULL_RETURN]
    assert [t["gap_seconds"] for t in timeline] == [None] + [3600.0] * (len(FULL_RETURN) - 1)
    assert detail["stage"] == "closed" and detail["deadline"] is None
    code, text = trm("cases", "show", CASE, "--home", str(world.home), "--database-url",
                     database_url)  # fmt: skip
    assert code == 0
    for _, _, _, stage in FULL_RETURN:
        assert str(stage) in text
    assert times[0].strftime("%Y-%m-%d %H:%M:%S") in text


def test_out_of_order_envelope_is_stored_as_an_anomaly(
    world: World, engine: sa.Engine, database_url: str
) -> None:
    """A departure before acceptance is logged, kept in the timeline and stored as an anomaly."""
    clock = Clock(T0)
    svc = service(world, engine, clock)
    svc.receive(world.seal(K.RETURN_REQUEST, KZ, (UZ, NGO), seq=1, at=T0), user_id=KZ)
    early = world.seal(K.DEPARTED, KZ, (UZ, NGO), seq=2, at=clock.advance(hours=2))
    outcome = svc.receive(early, user_id=KZ)
    assert outcome.verification == "ok" and outcome.anomaly is not None
    assert outcome.anomaly.reason == "out_of_order" and outcome.stage is Stage.REQUESTED
    store = CaseStore(engine)
    [stored] = store.anomalies(CASE)
    assert (stored.envelope_id, stored.reason) == (str(read_header(early).id), "out_of_order")
    assert "cannot follow stage requested" in stored.detail
    assert log_size(engine) == 2
    detail = show(world, database_url)
    assert [t["anomaly"] for t in detail["timeline"]] == [None, "out_of_order"]  # type: ignore[attr-defined]
    code, out = trm("cases", "list", "--home", str(world.home), "--database-url", database_url)
    assert code == 0 and CASE in out and "requested" in out


def test_forged_and_malformed_envelopes_are_logged_as_rejected(
    world: World, engine: sa.Engine
) -> None:
    """A flipped signature bit, a wrong AMQP user and garbage are logged rejected; no case moves."""
    clock = Clock(T0)
    svc = service(world, engine, clock)
    raw = world.seal(K.RETURN_REQUEST, KZ, (UZ, NGO), seq=1, at=T0)
    forged = raw[:-1] + bytes([raw[-1] ^ 1])
    assert svc.receive(forged, user_id=KZ).verification == "rejected:bad_signature"
    assert svc.receive(raw, user_id=UZ).verification == "rejected:sender_mismatch"
    garbage = svc.receive(b"\x00not an envelope", user_id=KZ)
    assert (garbage.verification, garbage.envelope_id) == ("rejected:malformed", None)
    assert CaseStore(engine).get(CASE) is None
    log = AuditLog(engine, origin=origin_for(ROUTING), signer=None)
    verdicts = [log.entry(i).verification for i in range(log.size())]
    assert verdicts == ["rejected:bad_signature", "rejected:sender_mismatch", "rejected:malformed"]
    assert log.entry(0).envelope == forged
    # The genuine envelope from its genuine sender is still accepted afterwards.
    assert svc.receive(raw, user_id=KZ).stage is Stage.REQUESTED


def test_a_signed_receipt_is_logged_and_a_signed_return_request_is_rejected_unsealed(
    world: World, engine: sa.Engine
) -> None:
    """The routing service logs a receipt in the signed form as verified and tracks it; a
    return request signed by its real sender but not sealed is logged as rejected:not_sealed
    and opens no case."""
    clock = Clock(T0)
    svc = service(world, engine, clock)
    request = world.seal(K.RETURN_REQUEST, KZ, (UZ,), seq=1, at=T0)
    assert svc.receive(request, user_id=KZ).verification == "ok"
    request_id = str(read_header(request).id)
    before = CaseStore(engine).get(CASE)
    assert before is not None and before.pending_receipts[request_id] == {UZ}
    receipt = sign(
        DeliveryReceipt(
            envelope_id=read_header(request).id,
            digest=hashlib.sha256(request).hexdigest(),
            received_at=T0,
            applied_at=T0,
        ),
        case=CASE,
        sender=world.keys[UZ].sender(T0),
        recipients=[KZ],
        directory=world.directory,
        seq=1,
        reply_to=read_header(request).id,
        now=T0,
    ).raw
    assert receipt[:4] == b"TRS1"
    assert svc.receive(receipt, user_id=UZ).verification == "ok"
    after = CaseStore(engine).get(CASE)
    assert after is not None and request_id not in after.pending_receipts

    other = "iom-kz.KZ-2026-0077"
    sealed = world.seal(K.RETURN_REQUEST, KZ, (UZ,), seq=1, at=T0, case=other)
    header_bytes = sealed[8 : 8 + int.from_bytes(sealed[4:8], "big")]
    payload = encode_payload(example(K.RETURN_REQUEST))
    body = b"TRS1" + len(header_bytes).to_bytes(4, "big") + header_bytes
    body += len(payload).to_bytes(4, "big") + payload
    unsealed = body + world.keys[KZ].sender(T0).key.sign(envelope.SIGNED_CONTEXT + body)
    outcome = svc.receive(unsealed, user_id=KZ)
    assert outcome.verification == "rejected:not_sealed"
    assert CaseStore(engine).get(other) is None
    assert log_size(engine) == 3


def test_key_revoked_in_a_newly_installed_directory_is_refused(
    engine: sa.Engine, tmp_path: Path
) -> None:
    """The service verifies with the directory installed now, not the one it verified with first."""
    fresh = make_world(tmp_path)
    clock = Clock(T0)
    svc = service(fresh, engine, clock)
    request = fresh.seal(K.RETURN_REQUEST, KZ, (UZ, NGO), seq=1, at=T0 - timedelta(seconds=3))
    assert svc.receive(request, user_id=KZ).verification == "ok"
    revoked = clock.advance(minutes=1)
    kid = fresh.keys[KZ].sender(T0).kid
    body = revoke_key(fresh.directory.body, KZ, kid, at=revoked, now=revoked)
    (fresh.home / "directory.json").write_bytes(sign_directory(body, fresh.authority))
    at = clock.advance(minutes=1)
    later = fresh.seal(K.TRAVEL_ARRANGED, KZ, (UZ, NGO), seq=2, at=at - timedelta(seconds=3))
    assert svc.receive(later, user_id=KZ).verification == "rejected:revoked_key"


def test_redelivery_changes_nothing(world: World, engine: sa.Engine) -> None:
    """The same bytes delivered again (valid or garbage) add no log entry and leave the state."""
    clock = Clock(T0)
    svc = service(world, engine, clock)
    request = world.seal(K.RETURN_REQUEST, KZ, (UZ, NGO), seq=1, at=T0)
    first = svc.receive(request, user_id=KZ)
    svc.receive(b"garbage", user_id=KZ)
    before = CaseStore(engine).get(CASE)
    clock.advance(minutes=5)
    again = svc.receive(request, user_id=KZ)
    assert first.index == 0 and again.duplicate and again.index is None
    assert svc.receive(b"garbage", user_id=KZ).duplicate
    assert log_size(engine) == 2
    assert CaseStore(engine).get(CASE) == before
    assert CaseStore(engine).anomalies() == []


def test_same_id_with_other_bytes_is_rejected_as_replayed(world: World, engine: sa.Engine) -> None:
    """A validly signed envelope reusing a verified id with other bytes is logged as replayed."""
    clock = Clock(T0)
    svc = service(world, engine, clock)
    request = world.seal(K.RETURN_REQUEST, KZ, (UZ, NGO), seq=1, at=T0)
    svc.receive(request, user_id=KZ)
    twin = world.seal(
        K.RETURN_REQUEST, KZ, (UZ,), seq=2, at=T0, envelope_id=read_header(request).id
    )
    outcome = svc.receive(twin, user_id=KZ)
    assert (outcome.verification, outcome.index) == ("rejected:replayed", 1)
    state = CaseStore(engine).get(CASE)
    assert state is not None and len(state.entries) == 1


def test_checkpoint_every_n_entries(world: World, engine: sa.Engine) -> None:
    """With checkpoint_every=3 a checkpoint covering 3 entries is signed after the third."""
    clock = Clock(T0)
    svc = service(world, engine, clock, timers=Timers(checkpoint_every=3))
    for n in range(3):
        svc.receive(f"junk {n}".encode(), user_id=KZ)
        latest = svc.auditlog.latest_checkpoint()
        assert (latest is None) == (n < 2)
    assert latest is not None and latest[0] == 3
    assert svc.checkpoint() is None  # nothing new to sign


def test_log_replay_equals_the_database(world: World, engine: sa.Engine, tmp_path: Path) -> None:
    """Replaying an export of the log gives exactly the case states the database holds."""
    clock = Clock(T0)
    svc = service(world, engine, clock)
    feed_full_return(world, svc, clock)
    svc.receive(world.seal(K.DEPARTED, KZ, (UZ,), seq=9, at=clock.now, case="iom-kz.KZ-2026-0043"),
                user_id=KZ)  # fmt: skip
    svc.receive(b"garbage", user_id=KZ)
    out = tmp_path / "export.jsonl"
    svc.auditlog.export(out, now=clock.advance(minutes=1), directory=world.directory)
    replayed = replay_export(out, world.directory)
    assert set(replayed) == {CASE, "iom-kz.KZ-2026-0043"}
    assert diff_states(replayed, CaseStore(engine).all_states()) == []


def test_no_payload_reaches_logs_or_the_case_tables(world: World, engine: sa.Engine) -> None:
    """The person's name in the payloads reaches no log line, case, anomaly or reminder row."""
    clock = Clock(T0)
    with capture_logs() as logs:
        svc = service(world, engine, clock)
        feed_full_return(world, svc, clock)
        clock.advance(days=400)
        svc.poll_deadlines()
    assert logs and EXAMPLE_PERSON_NAME not in json.dumps(logs, default=str)
    with engine.connect() as conn:
        for table in ("cases", "anomalies", "reminders"):
            rows = conn.execute(sa.text(f"SELECT * FROM {table}")).all()  # noqa: S608
            assert EXAMPLE_PERSON_NAME not in repr(rows)


# --- the case protocol --------------------------------------------------------------------

REFERRAL = f"{NGO}.REF-2026-0007"
SERVICE_REFERRAL: tuple[tuple[MessageKind, str, tuple[str, ...], Stage], ...] = (
    (K.REFERRAL_REQUEST, NGO, (STATE,), Stage.REFERRAL_REQUESTED),
    (K.REFERRAL_ACCEPTED, STATE, (NGO,), Stage.REFERRAL_ACCEPTED),
    (K.SERVICE_STARTED, STATE, (NGO,), Stage.SERVICE_STARTED),
    (K.SERVICE_COMPLETED, STATE, (NGO,), Stage.SERVICE_COMPLETED),
    (K.CASE_CLOSED, NGO, (STATE,), Stage.CLOSED),
)
"""The NGO refers the person to a state service, which provides it; the NGO closes the case."""


class Feed:
    """Seals one case's envelopes an hour apart, each sender's seq the next, and delivers them."""

    def __init__(self, world: World, svc: RoutingService, clock: Clock, case: str) -> None:
        self.world, self.svc, self.clock, self.case = world, svc, clock, case
        self.seqs: dict[str, int] = {}

    def send(self, kind: MessageKind, sender: str, recipients: tuple[str, ...]) -> Outcome:
        """The outcome of the next envelope, delivered as its sender's AMQP user."""
        self.seqs[sender] = self.seqs.get(sender, 0) + 1
        at = self.clock.advance(hours=1)
        raw = self.world.seal(kind, sender, recipients, seq=self.seqs[sender],
                              at=at - timedelta(seconds=3), case=self.case)  # fmt: skip
        return self.svc.receive(raw, user_id=sender)


def reasons(outcomes: Sequence[Outcome]) -> list[str | None]:
    """Each outcome's anomaly reason, None where there was none."""
    return [None if o.anomaly is None else o.anomaly.reason for o in outcomes]


def test_referral_under_another_participants_reference_does_not_take_the_case(
    world: World, engine: sa.Engine
) -> None:
    """The NGO opening KZ's reference is not_the_owner; KZ's own request still opens the case."""
    clock = Clock(T0)
    feed = Feed(world, service(world, engine, clock), clock, CASE)
    claim = feed.send(K.REFERRAL_REQUEST, NGO, (UZ,))
    assert (claim.verification, claim.stage) == ("ok", None)
    assert claim.anomaly is not None and claim.anomaly.reason == "not_the_owner"
    unclaimed = CaseStore(engine).get(CASE)
    assert unclaimed is not None and (unclaimed.origin, unclaimed.parties) == (None, frozenset())
    opened = feed.send(K.REFERRAL_REQUEST, KZ, (UZ,))
    assert (opened.stage, opened.anomaly) == (Stage.REFERRAL_REQUESTED, None)
    answer = feed.send(K.REFERRAL_ACCEPTED, NGO, (KZ,))
    assert answer.anomaly is not None and answer.anomaly.reason == "not_a_party"
    state = CaseStore(engine).get(CASE)
    assert state is not None and (state.origin, state.stage) == (KZ, Stage.REFERRAL_REQUESTED)
    assert NGO not in state.parties
    assert [a.reason for a in CaseStore(engine).anomalies(CASE)] == ["not_the_owner", "not_a_party"]


def test_referral_to_a_state_service_walks_to_closure(
    world: World, engine: sa.Engine, database_url: str
) -> None:
    """A state service accepts, starts and completes the NGO's referral; every stage is shown."""
    clock = Clock(T0)
    feed = Feed(world, service(world, engine, clock), clock, REFERRAL)
    outcomes = [feed.send(kind, sender, to) for kind, sender, to, _ in SERVICE_REFERRAL]
    assert [o.stage for o in outcomes] == [stage for *_, stage in SERVICE_REFERRAL]
    assert reasons(outcomes) == [None] * len(SERVICE_REFERRAL)
    state = CaseStore(engine).get(REFERRAL)
    assert state is not None and state.origin == NGO
    assert state.party_roles == {NGO: "ngo", STATE: "state_service"}
    code, out = trm("cases", "show", REFERRAL, "--home", str(world.home), "--database-url",
                    database_url, "--json")  # fmt: skip
    assert code == 0, out
    timeline = json.loads(out)["timeline"]
    assert [t["stage_after"] for t in timeline] == [str(s) for *_, s in SERVICE_REFERRAL]
    assert [t["sender"] for t in timeline] == [sender for _, sender, _, _ in SERVICE_REFERRAL]


def test_unanswered_referral_reminds_the_state_service(world: World, engine: sa.Engine) -> None:
    """Past 72 h the referral's reminder is sealed for the state service, which can open it."""
    clock = Clock(T0)
    svc = service(world, engine, clock)
    request = Feed(world, svc, clock, REFERRAL).send(K.REFERRAL_REQUEST, NGO, (STATE,))
    assert request.anomaly is None
    clock.advance(hours=73)
    [sent] = svc.poll_deadlines()
    assert (sent.reminder.deadline.owed_by, sent.reminder.status) == (STATE, Status.OVERDUE)
    [body] = pending_reminders(engine)
    assert read_header(body).recipients == (STATE,)
    opened = open_envelope(
        body,
        recipient=Recipient(STATE, world.keys[STATE].decryption),
        directory=world.directory,
        now=clock.now,
        amqp_user_id=ROUTING,
    )
    assert isinstance(opened.message, ReminderMessage)
    assert (opened.message.stage, opened.message.owed_by) == ("referral_requested", STATE)
    echoed = svc.receive(body, user_id=ROUTING)  # as it comes back on the routing queue
    assert (echoed.stage, echoed.anomaly) == (Stage.REFERRAL_REQUESTED, None)


def test_handoff_after_consent_withdrawn_is_consent_withdrawn(
    world: World, engine: sa.Engine
) -> None:
    """Once KZ withdraws consent, a travel arrangement is recorded as consent_withdrawn."""
    clock = Clock(T0)
    feed = Feed(world, service(world, engine, clock), clock, CASE)
    opened = [feed.send(kind, sender, to) for kind, sender, to, _ in FULL_RETURN[:2]]
    halt = feed.send(K.CONSENT_WITHDRAWN, KZ, (UZ, NGO))
    assert reasons(opened) == [None, None] and halt.stage is Stage.HALTED
    travel = feed.send(K.TRAVEL_ARRANGED, KZ, (UZ, NGO))
    assert travel.anomaly is not None and travel.anomaly.reason == "consent_withdrawn"
    assert halt.envelope_id is not None and halt.envelope_id in travel.anomaly.detail
    assert travel.stage is Stage.HALTED
    [stored] = CaseStore(engine).anomalies(CASE)
    assert (stored.envelope_id, stored.reason) == (travel.envelope_id, "consent_withdrawn")


def test_erasure_confirmed_after_a_halt_is_recorded_and_moves_nothing(
    world: World, engine: sa.Engine
) -> None:
    """The NGO's erasure confirmation on a halted case is no anomaly; the stage stays."""
    clock = Clock(T0)
    feed = Feed(world, service(world, engine, clock), clock, CASE)
    for kind, sender, to, _ in FULL_RETURN[:2]:
        feed.send(kind, sender, to)
    halt = feed.send(K.CONSENT_WITHDRAWN, KZ, (UZ, NGO))
    halted = CaseStore(engine).get(CASE)
    erased = feed.send(K.ERASURE_CONFIRMED, NGO, (KZ,))
    assert (erased.verification, erased.stage, erased.anomaly) == ("ok", Stage.HALTED, None)
    state = CaseStore(engine).get(CASE)
    assert halted is not None and state is not None
    assert state.entries[:-1] == halted.entries
    assert state.entries[-1].event.kind is K.ERASURE_CONFIRMED
    assert (state.stage_envelope, state.stage_entered_at) == (
        halt.envelope_id,
        halted.stage_entered_at,
    )
    assert CaseStore(engine).anomalies(CASE) == []


def test_reminder_from_a_participant_is_wrong_role(world: World, engine: sa.Engine) -> None:
    """A mission that sends a reminder is recorded as wrong_role and the case stays requested."""
    clock = Clock(T0)
    feed = Feed(world, service(world, engine, clock), clock, CASE)
    feed.send(K.RETURN_REQUEST, KZ, (UZ, NGO))
    nudge = feed.send(K.REMINDER, KZ, (UZ,))
    assert nudge.anomaly is not None and nudge.anomaly.reason == "wrong_role"
    assert nudge.stage is Stage.REQUESTED
    assert [a.reason for a in CaseStore(engine).anomalies(CASE)] == ["wrong_role"]


# --- batches ------------------------------------------------------------------------------


def delivery(body: bytes, user_id: str, tag: int) -> Delivery:
    """A delivery as the batch consumer hands it over."""
    return Delivery(body, user_id, None, False, {}, tag)


def test_batch_is_logged_in_arrival_order_and_absorbed_when_redelivered(
    world: World, engine: sa.Engine
) -> None:
    """Valid, duplicate and forged envelopes in one batch are logged in order once, never again."""
    clock = Clock(T0)
    svc = service(world, engine, clock)
    request = world.seal(K.RETURN_REQUEST, KZ, (UZ, NGO), seq=1, at=T0)
    svc.receive(request, user_id=KZ)
    accepted = world.seal(K.RETURN_ACCEPTED, UZ, (KZ, NGO), seq=1, at=clock.advance(hours=1))
    travel = world.seal(K.TRAVEL_ARRANGED, KZ, (UZ, NGO), seq=2, at=clock.advance(hours=1))
    forged = travel[:-1] + bytes([travel[-1] ^ 1])
    batch = [
        delivery(accepted, UZ, 1),
        delivery(request, KZ, 2),  # logged before this batch
        delivery(forged, KZ, 3),
        delivery(travel, KZ, 4),
        delivery(accepted, UZ, 5),  # twice in the same batch
    ]
    outcomes = svc.receive_batch([(d.body, d.user_id) for d in batch])
    assert [(o.verification, o.index, o.stage) for o in outcomes] == [
        ("ok", 1, Stage.ACCEPTED),
        ("duplicate", None, None),
        ("rejected:bad_signature", 2, None),
        ("ok", 3, Stage.TRAVEL_ARRANGED),
        ("duplicate", None, None),
    ]
    log = AuditLog(engine, origin=origin_for(ROUTING), signer=None)
    entries = [log.entry(i) for i in range(log.size())]
    assert [(e.envelope, e.verification) for e in entries] == [
        (request, "ok"),
        (accepted, "ok"),
        (forged, "rejected:bad_signature"),
        (travel, "ok"),
    ]
    assert [e.received_at for e in entries] == sorted(e.received_at for e in entries)
    state = CaseStore(engine).get(CASE)
    assert state is not None and state.stage is Stage.TRAVEL_ARRANGED
    clock.advance(minutes=5)
    svc.handle_batch(batch)  # the broker redelivers the whole batch after a lost ack
    assert log.size() == 4
    assert CaseStore(engine).get(CASE) == state
    assert CaseStore(engine).anomalies() == []
    again = svc.receive_batch([(d.body, d.user_id) for d in batch])
    assert all(o.duplicate for o in again)


def _forged(raw: bytes, n: int) -> bytes:
    """`raw` with byte `n` of its ciphertext changed: the same header, a bad signature."""
    at = len(raw) - 65 - n
    return raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]


@contextmanager
def _statements(engine: sa.Engine) -> Iterator[list[str]]:
    """Every statement run on `engine` while the block runs."""
    seen: list[str] = []

    def note(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)


def test_redelivery_check_reads_no_body_however_many_share_the_id(
    world: World, engine: sa.Engine
) -> None:
    """Junk under one verified id: each check reads digests of its own bytes, never a body."""
    svc = service(world, engine, Clock(T0))
    request = world.seal(K.RETURN_REQUEST, KZ, (UZ, NGO), seq=1, at=T0)
    svc.receive(request, user_id=KZ)
    junk = [_forged(request, n) for n in range(1, 31)]
    for raw in junk[:-1]:
        assert svc.receive(raw, user_id=KZ).verification == "rejected:bad_signature"
    with _statements(engine) as statements:
        last = svc.receive(junk[-1], user_id=KZ)
        again = svc.receive(junk[0], user_id=KZ)
    assert last.verification == "rejected:bad_signature" and again.duplicate
    assert not [s for s in statements if re.search(r"\blog_entries\.body\b", s)]
    with engine.connect() as conn:
        checked = [EnvelopeVerifier(world.directory).check(raw, at=T0) for raw in junk[:3]]
        logged = Logged.read(conn, checked)
    # One row per envelope asked about, whatever else is logged under the id.
    assert len(logged.verdicts) == 3 and logged.verified_ids == set()
    assert {v for found in logged.verdicts.values() for v in found} == {"rejected:bad_signature"}


def test_each_envelope_is_parsed_once(
    world: World, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verifying, naming and logging an envelope, refused or not, frames its bytes once."""
    svc = service(world, engine, Clock(T0))
    request = world.seal(K.RETURN_REQUEST, KZ, (UZ, NGO), seq=1, at=T0)
    request_id = str(read_header(request).id)
    parses: list[bytes] = []
    parse = envelope._parse

    def counting(raw: bytes) -> object:
        parses.append(raw)
        return parse(raw)

    monkeypatch.setattr(envelope, "_parse", counting)
    outcomes = svc.receive_batch([(request, KZ), (_forged(request, 1), KZ), (b"junk", KZ)])
    assert [o.verification for o in outcomes] == [
        "ok",
        "rejected:bad_signature",
        "rejected:malformed",
    ]
    assert [o.envelope_id for o in outcomes[:2]] == [request_id] * 2
    assert len(parses) == 3


def test_migration_gives_every_logged_entry_its_digest(database_url: str) -> None:
    """Entries logged before 0008 get the SHA-256 of their body; 0007 again drops it."""
    engine = sa.create_engine(database_url)
    old = sa.table(
        "log_entries",
        *(sa.column(c.name, c.type) for c in log_entries_table.c if c.name != "body_sha256"),
    )
    bodies = [b"first envelope", b"second envelope"]
    try:
        migrate(engine, "0007")
        with engine.begin() as conn:
            conn.execute(
                old.insert(),
                [
                    {
                        "idx": i,
                        "envelope_id": None,
                        "received_at": T0,
                        "verification": "ok",
                        "prev_hash": bytes(32),
                        "leaf_hash": bytes(32),
                        "body": body,
                    }
                    for i, body in enumerate(bodies)
                ],
            )
        migrate(engine)
        with engine.connect() as conn:
            query = sa.select(log_entries_table.c.body_sha256).order_by(log_entries_table.c.idx)
            stored = [bytes(d) for d in conn.execute(query).scalars()]
        assert stored == [hashlib.sha256(body).digest() for body in bodies]
        migrate_down(engine, "0007")
        columns = {c["name"] for c in sa.inspect(engine).get_columns("log_entries")}
        assert "body_sha256" not in columns and "body" in columns
    finally:
        engine.dispose()


def migrate_down(engine: sa.Engine, revision: str) -> None:
    """Run the migrations down to `revision`."""
    with engine.begin() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def test_batch_failing_before_commit_leaves_nothing_and_is_applied_once_later(
    world: World, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage error when the batch's cases are stored rolls back its log entries too.

    Both envelopes are appended to the log before the batch stores the case
    they share; the failure must leave neither entry, and the retry logs both.
    """
    clock = Clock(T0)
    svc = service(world, engine, clock)
    request = world.seal(K.RETURN_REQUEST, KZ, (UZ, NGO), seq=1, at=T0)
    accepted = world.seal(K.RETURN_ACCEPTED, UZ, (KZ, NGO), seq=1, at=T0)
    arrivals = [(request, KZ), (accepted, UZ)]
    saved: list[CaseState] = []

    def failing_save(conn: sa.Connection, writes: Sequence[CaseWrite]) -> list[int]:
        saved.extend(write.state for write in writes)
        raise StorageError("saving a case failed: disk I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(CaseStore, "save_all", staticmethod(failing_save))
        with pytest.raises(StorageError, match="disk I/O error"):
            svc.receive_batch(arrivals)
    assert [len(state.entries) for state in saved] == [2]
    assert log_size(engine) == 0 and CaseStore(engine).get(CASE) is None
    outcomes = svc.receive_batch(arrivals)
    assert [(o.verification, o.index) for o in outcomes] == [("ok", 0), ("ok", 1)]
    state = CaseStore(engine).get(CASE)
    assert state is not None and state.stage is Stage.ACCEPTED


def test_batch_on_one_case_stores_it_once_with_every_event(
    world: World, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Three envelopes on one case in a batch: one case write, the same state as one by one."""
    clock = Clock(T0)
    svc = service(world, engine, clock)
    arrivals = [
        (world.seal(K.RETURN_REQUEST, KZ, (UZ, NGO), seq=1, at=T0), KZ),
        (world.seal(K.RETURN_ACCEPTED, UZ, (KZ, NGO), seq=1, at=T0), UZ),
        (world.seal(K.TRAVEL_ARRANGED, KZ, (UZ, NGO), seq=2, at=T0), KZ),
    ]
    save_all = CaseStore.save_all
    saved: list[CaseState] = []

    def counting_save(conn: sa.Connection, writes: Sequence[CaseWrite]) -> list[int]:
        saved.extend(write.state for write in writes)
        return save_all(conn, writes)

    with monkeypatch.context() as patch:
        patch.setattr(CaseStore, "save_all", staticmethod(counting_save))
        outcomes = svc.receive_batch(arrivals)
    assert [o.index for o in outcomes] == [0, 1, 2]
    assert [len(state.entries) for state in saved] == [3]
    batched = CaseStore(engine).get(CASE)
    assert batched is not None and batched.stage is Stage.TRAVEL_ARRANGED

    one_by_one = open_database(f"sqlite:///{tmp_path / 'one-by-one.db'}")
    single = service(world, one_by_one, Clock(T0))
    for arrival in arrivals:
        single.receive_batch([arrival])
    assert CaseStore(one_by_one).get(CASE) == batched
    one_by_one.dispose()


def test_case_written_by_another_service_is_read_again(world: World, engine: sa.Engine) -> None:
    """A service's cached state is not used once another process has stored the case."""
    first, second = service(world, engine, Clock(T0)), service(world, engine, Clock(T0))
    first.receive_batch([(world.seal(K.RETURN_REQUEST, KZ, (UZ, NGO), seq=1, at=T0), KZ)])
    second.receive_batch([(world.seal(K.RETURN_ACCEPTED, UZ, (KZ, NGO), seq=1, at=T0), UZ)])
    outcomes = first.receive_batch(
        [(world.seal(K.TRAVEL_ARRANGED, KZ, (UZ, NGO), seq=2, at=T0), KZ)]
    )
    assert outcomes[0].anomaly is None and outcomes[0].stage is Stage.TRAVEL_ARRANGED
    state = CaseStore(engine).get(CASE)
    assert state is not None and len(state.entries) == 3


def test_checkpoint_threshold_counts_entries_of_batches(world: World, engine: sa.Engine) -> None:
    """With checkpoint_every=3, the batch whose entries reach 3 signs a checkpoint covering it."""
    clock = Clock(T0)
    svc = service(world, engine, clock, timers=Timers(checkpoint_every=3))
    svc.receive_batch([(b"junk 0", KZ), (b"junk 1", KZ), (b"junk 0", KZ)])
    assert svc.auditlog.latest_checkpoint() is None
    svc.receive_batch([(b"junk 2", KZ), (b"junk 3", KZ)])
    latest = svc.auditlog.latest_checkpoint()
    assert latest is not None and latest[0] == 4


# --- deadlines ----------------------------------------------------------------------------


def pending_reminders(engine: sa.Engine) -> list[bytes]:
    """Bodies of the reminder envelopes waiting in the routing service's outbox."""
    return [m.body for m in Outbox(engine).pending()]


def test_unanswered_request_is_overdue_and_reminded_once(
    world: World, engine: sa.Engine, database_url: str
) -> None:
    """Past 72 h a request is listed overdue and one reminder is queued, however often polled."""
    clock = Clock(T0)
    svc = service(world, engine, clock)
    svc.receive(world.seal(K.RETURN_REQUEST, KZ, (UZ, NGO), seq=1, at=T0), user_id=KZ)
    assert svc.poll_deadlines() == []
    clock.advance(hours=73)
    [sent] = svc.poll_deadlines()
    assert sent.reminder.status is Status.OVERDUE and sent.reminder.deadline.owed_by == UZ
    for _ in range(5):
        clock.advance(minutes=30)
        assert svc.poll_deadlines() == []
    restarted = service(world, engine, clock)
    assert restarted.poll_deadlines() == []
    [body] = pending_reminders(engine)
    assert str(read_header(body).id) == sent.envelope_id

    at = clock.now.isoformat()
    base = ("--home", str(world.home), "--database-url", database_url, "--at", at, "--json")
    code, out = trm("cases", "list", "--overdue", *base)
    assert code == 0 and [c["case"] for c in json.loads(out)["cases"]] == [CASE]
    code, out = trm("cases", "list", "--needs-action", UZ, *base)
    assert [c["owed_by"] for c in json.loads(out)["cases"]] == [UZ]
    code, out = trm("cases", "list", "--needs-action", KZ, *base)
    assert json.loads(out)["cases"] == []
    assert show(world, database_url, "--at", at)["reminders"][0]["status"] == "overdue"  # type: ignore[index]


def test_reminder_envelope_is_signed_for_the_owner_without_personal_data(
    world: World, engine: sa.Engine
) -> None:
    """The queued reminder verifies as sent by routing, opens for UZ only and names the stage."""
    clock = Clock(T0)
    svc = service(world, engine, clock)
    request = world.seal(K.RETURN_REQUEST, KZ, (UZ, NGO), seq=1, at=T0)
    svc.receive(request, user_id=KZ)
    clock.advance(hours=80)
    svc.poll_deadlines()
    [body] = pending_reminders(engine)
    header = read_header(body)
    assert (header.kind, header.sender, header.recipients) == (K.REMINDER, ROUTING, (UZ,))
    assert header.reply_to == read_header(request).id
    opened = open_envelope(
        body,
        recipient=Recipient(UZ, world.keys[UZ].decryption),
        directory=world.directory,
        now=clock.now,
        amqp_user_id=ROUTING,
    )
    message = opened.message
    assert isinstance(message, ReminderMessage)
    assert (message.stage, message.owed_by, message.overdue) == ("requested", UZ, True)
    assert message.deadline == T0 + timedelta(hours=72)
    assert EXAMPLE_PERSON_NAME.encode() not in body


def test_warning_then_overdue_each_reminded_once(world: World, engine: sa.Engine) -> None:
    """A deadline gets one warning reminder (from 48 h) and one overdue reminder (from 72 h)."""
    clock = Clock(T0)
    svc = service(world, engine, clock)
    svc.receive(world.seal(K.RETURN_REQUEST, KZ, (UZ, NGO), seq=1, at=T0), user_id=KZ)
    clock.advance(hours=50)
    assert [s.reminder.status for s in svc.poll_deadlines()] == [Status.WARNING]
    assert svc.poll_deadlines() == []
    clock.advance(hours=23)
    assert [s.reminder.status for s in svc.poll_deadlines()] == [Status.OVERDUE]
    assert svc.poll_deadlines() == []
    assert len(pending_reminders(engine)) == 2


def test_new_stage_resets_the_deadline(world: World, engine: sa.Engine, database_url: str) -> None:
    """After acceptance the request's reminder is over; the accepted stage gets its own later."""
    clock = Clock(T0)
    svc = service(world, engine, clock)
    svc.receive(world.seal(K.RETURN_REQUEST, KZ, (UZ, NGO), seq=1, at=T0), user_id=KZ)
    clock.advance(hours=73)
    assert len(svc.poll_deadlines()) == 1
    accepted_at = clock.advance(hours=1)
    svc.receive(world.seal(K.RETURN_ACCEPTED, UZ, (KZ, NGO), seq=1, at=accepted_at), user_id=UZ)
    assert svc.poll_deadlines() == []
    at = clock.now.isoformat()
    code, out = trm("cases", "list", "--overdue", "--home", str(world.home), "--database-url",
                    database_url, "--at", at, "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["cases"] == []
    clock.advance(days=15)
    [sent] = svc.poll_deadlines()
    deadline = sent.reminder.deadline
    assert (deadline.stage, deadline.owed_by, sent.reminder.status) == (
        Stage.ACCEPTED,
        KZ,
        Status.OVERDUE,
    )
    assert deadline.due == accepted_at + timedelta(days=14)
    assert len(pending_reminders(engine)) == 2


def test_show_unknown_case_fails_clearly(world: World, database_url: str) -> None:
    """`trm cases show` of a reference the database lacks exits non-zero naming it."""
    code, out = trm("cases", "show", "iom-kz.KZ-0000-NONE", "--home", str(world.home),
                    "--database-url", database_url)  # fmt: skip
    assert code == 1 and "no case 'iom-kz.KZ-0000-NONE'" in out


def test_audit_replay_against_reports_differences(
    world: World, engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    """`trm audit replay --against` exits 0 on the routing database, 1 naming an altered case."""
    clock = Clock(T0)
    feed_full_return(world, service(world, engine, clock), clock)
    out = tmp_path / "export.jsonl"
    code, text = trm("audit", "export", "--home", str(world.home), "--database-url",
                     database_url, "--out", str(out))  # fmt: skip
    assert code == 0, text
    replay = ("audit", "replay", str(out), "--authority-key", str(world.home / "authority.pub"))
    code, text = trm(*replay, "--against", database_url)
    assert code == 0 and "no difference" in text
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM cases"))
    code, text = trm(*replay, "--against", database_url, "--json")
    assert code == 1
    assert json.loads(text)["differences"] == [f"case {CASE}: only in the first (log)"]


def test_routing_run_without_a_password_fails_clearly(world: World, tmp_path: Path) -> None:
    """`trm routing run` with no RabbitMQ password file exits 1 naming the file and the fix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRM_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trm",
            "routing",
            "run",
            "--home",
            str(world.home),
            "--database-url",
            f"sqlite:///{tmp_path / 'r.db'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "amqp-password" in result.stderr and "trm broker provision" in result.stderr
