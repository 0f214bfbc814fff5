"""Witnesses: cosign only what extends what they cosigned; the routing service collects; quorum."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from broker.database import open_database
from broker.directory import (
    Directory,
    Role,
    canonical_body,
    load_directory,
    set_witnesses,
    sign_directory,
)
from broker.errors import LogTampered, MalformedDirectory
from broker.testing import Network, make_network
from services.audit import verify_export
from services.auditlog import AuditLog, key_name_for
from services.checkpoint import Checkpoint, origin_for, sign_checkpoint
from services.cosignature import CosignatureInvalid, check_cosignatures, require_quorum
from services.cosigners import Cosigners
from services.witness import Witness, WitnessRefused, _answer, format_request

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
KZ, UZ, NGO, ROUTING, AUDITOR = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod", "routing", "auditor"
PARTICIPANTS: tuple[tuple[str, Role, str, str | None], ...] = (
    (KZ, Role.MISSION, "KZ", None),
    (UZ, Role.MISSION, "UZ", None),
    (NGO, Role.NGO, "UZ", UZ),
    (ROUTING, Role.ROUTING, "AT", None),
    (AUDITOR, Role.AUDITOR, "AT", None),
)


@dataclass(frozen=True)
class World:
    """Keys, and the directory naming both missions witnesses with a quorum of 2."""

    net: Network
    directory: Directory

    def routing_log(self, engine: Engine) -> AuditLog:
        return AuditLog(engine, origin=origin_for(ROUTING), signer=self.net.sender(ROUTING, T0))

    def witness(self, engine: Engine, who: str = KZ) -> Witness:
        return Witness(
            engine,
            sender=lambda at: self.net.sender(who, at),
            directory=lambda: self.directory,
            clock=lambda: T0 + timedelta(days=1),
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """One set of keys for the module."""
    net = make_network(tmp_path_factory.mktemp("witness-world"), now=T0, participants=PARTICIPANTS)
    body = set_witnesses(net.directory.body, (KZ, UZ), 2, now=T0)
    raw = sign_directory(body, net.authority)
    return World(net, load_directory(raw, authority=net.authority.public_key()))


def grow(log: AuditLog, count: int, tag: bytes = b"e", at: datetime = T0) -> None:
    """Append `count` entries (opaque bytes, recorded as rejected) in one transaction."""
    start = log.size()
    with log.engine.begin() as conn:
        appender = log.appender(conn)
        for n in range(count):
            body = tag + b"-%d" % (start + n)
            appender.append(body, received_at=at, verification="rejected:malformed")
        appender.flush()


def signed(log: AuditLog, at: datetime) -> bytes:
    """Sign a checkpoint of the whole log at `at`."""
    note = log.checkpoint(at)
    assert note is not None
    return note


def request(log: AuditLog, note: bytes, old: int) -> bytes:
    size = int(note.split(b"\n")[1])
    return format_request(old, [] if old == 0 else log.consistency_proof(old, size), note)


@pytest.fixture
def witness_engine(tmp_path: Path) -> Engine:
    """A witness's own SQLite database, migrated."""
    engine = open_database(f"sqlite:///{tmp_path / 'witness.db'}")
    yield engine
    engine.dispose()


# --- the directory -------------------------------------------------------------------------


def test_directory_without_witnesses_keeps_its_bytes(world: World) -> None:
    """A body with no witnesses encodes without the new fields, so older directories verify."""
    body = world.net.directory.body
    assert b"witnesses" not in canonical_body(body) and b"quorum" not in canonical_body(body)
    assert world.directory.body.witnesses == (KZ, UZ) and world.directory.body.quorum == 2


@pytest.mark.parametrize(
    ("witnesses", "quorum", "problem"),
    [
        ((NGO,), 1, "not a mission or an auditor"),
        ((KZ,), 2, "only 1 witnesses"),
        ((KZ, KZ), 1, "twice"),
    ],
)
def test_directory_refuses_bad_witnesses(
    world: World, witnesses: tuple[str, ...], quorum: int, problem: str
) -> None:
    """A witness must be a listed mission or auditor, once, and the quorum within their number."""
    with pytest.raises(MalformedDirectory, match=problem):
        set_witnesses(world.net.directory.body, witnesses, quorum, now=T0)


# --- the witness ---------------------------------------------------------------------------


def test_witness_cosigns_a_growing_log(
    world: World, engine: Engine, witness_engine: Engine
) -> None:
    """The first checkpoint is cosigned from 0, the next with a proof from it; both verify."""
    log, witness = world.routing_log(engine), world.witness(witness_engine)
    grow(log, 3)
    first = signed(log, T0 + timedelta(minutes=1))
    done = witness.add_checkpoint(request(log, first, 0))
    assert done.size == 3
    [cosig] = check_cosignatures(first + done.line, world.directory)
    assert cosig.witness == KZ and cosig.time == T0 + timedelta(days=1)
    grow(log, 4)
    second = signed(log, T0 + timedelta(minutes=2))
    assert witness.add_checkpoint(request(log, second, 3)).size == 7
    assert witness.status()["logs"][0]["size"] == 7


def _refused(witness: Witness, body: bytes, why: str) -> WitnessRefused:
    before = witness.status()
    with pytest.raises(WitnessRefused) as caught:
        witness.add_checkpoint(body)
    assert caught.value.why == why, str(caught.value)
    assert witness.status()["logs"] == before["logs"]  # nothing cosigned, nothing moved
    return caught.value


def test_witness_refuses_each_fault_with_its_reason(
    world: World, engine: Engine, witness_engine: Engine
) -> None:
    """Damaged proof, non-routing key, shrinking size, replayed checkpoint: each refused, named."""
    log, witness = world.routing_log(witness_engine), world.witness(engine)  # witness on both dbs
    grow(log, 3)
    old = signed(log, T0 + timedelta(minutes=1))
    witness.add_checkpoint(request(log, old, 0))
    grow(log, 5)
    new = signed(log, T0 + timedelta(minutes=2))
    proof = log.consistency_proof(3, 8)
    damaged = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
    assert "does not link" in str(
        _refused(witness, format_request(3, damaged, new), "inconsistent")
    )

    kz = world.net.sender(KZ, T0)
    forged = sign_checkpoint(
        Checkpoint(origin_for(ROUTING), 8, log.root(8), T0 + timedelta(minutes=2)),
        kz.key,
        key_name_for(ROUTING, kz.kid),
    )
    _refused(witness, format_request(3, proof, forged), "bad_signature")
    by_mission = sign_checkpoint(
        Checkpoint(origin_for(KZ), 8, log.root(8), T0), kz.key, key_name_for(KZ, kz.kid)
    )
    _refused(witness, format_request(3, proof, by_mission), "unknown_log")

    assert witness.add_checkpoint(format_request(3, proof, new)).size == 8
    routing = world.net.sender(ROUTING, T0)
    smaller = sign_checkpoint(
        Checkpoint(origin_for(ROUTING), 3, log.root(3), T0 + timedelta(minutes=3)),
        routing.key,
        key_name_for(ROUTING, routing.kid),
    )
    _refused(witness, format_request(0, [], smaller), "shrinks")
    _refused(witness, request(log, old, 0), "stale")
    assert witness.add_checkpoint(format_request(3, proof, new)).size == 8  # the same again
    grow(log, 2)
    newer = signed(log, T0 + timedelta(minutes=4))
    assert _refused(witness, request(log, newer, 3), "conflict").cosigned_size == 8


def test_witness_state_survives_a_restart(
    world: World, database_url: str, witness_engine: Engine
) -> None:
    """A witness opened again on its database holds its cosigned size and never goes back."""
    log = world.routing_log(witness_engine)
    grow(log, 4)
    note = signed(log, T0 + timedelta(minutes=1))
    first = open_database(database_url)
    world.witness(first).add_checkpoint(request(log, note, 0))
    first.dispose()
    again = open_database(database_url)
    try:
        restarted = world.witness(again)
        assert restarted.status()["logs"][0]["size"] == 4
        grow(log, 2)
        newer = signed(log, T0 + timedelta(minutes=2))
        refused = _refused(restarted, request(log, newer, 0), "conflict")
        assert refused.cosigned_size == 4
        assert restarted.add_checkpoint(request(log, newer, 4)).size == 6
    finally:
        again.dispose()


# --- the routing service collects ----------------------------------------------------------


def collect(
    world: World, cosigners: Cosigners, witnesses: dict[str, Witness], rounds: int = 0
) -> None:
    """Hand every due request to its witness and every answer back, until none is due.

    With `rounds`, stop after that many (a refused checkpoint is asked for again and again).
    """
    for _ in range(rounds or 10):
        due = cosigners.due()
        if not due:
            return
        for outgoing in due:
            who = outgoing.recipients[0]
            answer = _answer(witnesses[who], who, outgoing.body)
            assert answer is not None
            cosigners.take(answer[1], who)
        cosigners._asked.clear()  # answered: nothing outstanding
    if not rounds:
        raise AssertionError("requests kept coming")


def test_cosignatures_reach_the_checkpoint_and_the_export(
    world: World, engine: Engine, tmp_path: Path
) -> None:
    """Both witnesses' cosignatures are appended to the note; the export verifies the quorum."""
    log = world.routing_log(engine)
    cosigners = Cosigners(log, lambda: world.directory, resend_after=0)
    engines = {w: open_database(f"sqlite:///{tmp_path / w}.db") for w in (KZ, UZ)}
    witnesses = {w: world.witness(e, w) for w, e in engines.items()}
    try:
        grow(log, 3)
        signed(log, T0 + timedelta(minutes=1))
        collect(world, cosigners, witnesses)
        grow(log, 2)
        note = signed(log, T0 + timedelta(minutes=2))
        collect(world, cosigners, witnesses)
        stored = log.checkpoint_note(5)
        assert stored is not None and stored.startswith(note)
        assert require_quorum(stored, world.directory, 2) == [KZ, UZ]
        export = tmp_path / "audit.jsonl"
        log.export(export, now=T0 + timedelta(minutes=2))
        report = verify_export(export, world.directory, workers=1)
        assert report.witnesses == (KZ, UZ) and report.quorum == 2
        assert "quorum met: 2 witnesses" in report.summary()
    finally:
        for e in engines.values():
            e.dispose()


def test_an_offline_witness_catches_up_on_the_newest_tree(
    world: World, engine: Engine, tmp_path: Path
) -> None:
    """Checkpoints go on while a witness is away; back, it cosigns the newest one."""
    log = world.routing_log(engine)
    cosigners = Cosigners(log, lambda: world.directory, resend_after=3600)
    kz_engine = open_database(f"sqlite:///{tmp_path / 'kz'}.db")
    try:
        grow(log, 2)
        signed(log, T0 + timedelta(minutes=1))
        [queued] = [o for o in cosigners.due() if o.recipients == (KZ,)]
        for minute in (2, 3, 4):  # away: nothing answered, nothing asked twice
            grow(log, 3)
            signed(log, T0 + timedelta(minutes=minute))
            assert [o for o in cosigners.due() if o.recipients == (KZ,)] == []
        kz = world.witness(kz_engine)
        answer = _answer(kz, KZ, queued.body)
        assert answer is not None
        cosigners.take(answer[1], KZ)
        collect(world, cosigners, {KZ: kz, UZ: world.witness(kz_engine, UZ)})
        assert kz.status()["logs"][0]["size"] == 11
        newest = log.checkpoint_note(11)
        assert newest is not None and KZ in require_quorum(newest, world.directory, 1)
    finally:
        kz_engine.dispose()


# --- a forked routing database ----------------------------------------------------------


def test_a_forked_log_cannot_reach_the_quorum(world: World, tmp_path: Path) -> None:
    """Two branches of one routing db: witnesses cosign the first; the second fails verify."""
    base = tmp_path / "routing.db"
    engine = open_database(f"sqlite:///{base}")
    log = world.routing_log(engine)
    grow(log, 3)
    signed(log, T0 + timedelta(minutes=1))
    engine.dispose()
    (tmp_path / "fork.db").write_bytes(base.read_bytes())
    branches = {
        name: open_database(f"sqlite:///{tmp_path / name}.db") for name in ("routing", "fork")
    }
    engines = {w: open_database(f"sqlite:///{tmp_path / w}-w.db") for w in (KZ, UZ)}
    witnesses = {w: world.witness(e, w) for w, e in engines.items()}
    try:
        logs = {name: world.routing_log(e) for name, e in branches.items()}
        collect(
            world, Cosigners(logs["routing"], lambda: world.directory, resend_after=0), witnesses
        )
        for name, branch in logs.items():
            grow(branch, 2, tag=name.encode())
            signed(branch, T0 + timedelta(minutes=2))
        for name, branch in logs.items():
            cosigners = Cosigners(branch, lambda: world.directory, resend_after=0)
            collect(world, cosigners, witnesses, rounds=3 if name == "fork" else 0)
        exports = {}
        for name, branch in logs.items():
            exports[name] = tmp_path / f"{name}.jsonl"
            branch.export(exports[name], now=T0 + timedelta(minutes=2))
        assert verify_export(exports["routing"], world.directory, workers=1).witnesses == (KZ, UZ)
        with pytest.raises(LogTampered, match=r"size 5.*lacks the witness quorum: cosigned by 0"):
            verify_export(exports["fork"], world.directory, workers=1)
        lowered = verify_export(exports["fork"], world.directory, workers=1, quorum=0)
        assert "LOWERED" in lowered.summary()
        for witness in witnesses.values():
            [conflict] = witness.status()["conflicts"]
            assert conflict["kind"] == "fork"
            assert conflict["offered_note"] == logs["fork"].checkpoint_note(5).decode()
    finally:
        for e in [*branches.values(), *engines.values()]:
            e.dispose()


def test_a_bad_cosignature_fails_verification(world: World, engine: Engine) -> None:
    """A cosignature line by a witness's name that does not verify is refused, not ignored."""
    log, witness = world.routing_log(engine), world.witness(open_database("sqlite://"))
    grow(log, 2)
    note = signed(log, T0 + timedelta(minutes=1))
    line = witness.add_checkpoint(request(log, note, 0)).line
    name, blob = line.decode().rstrip("\n").split(" ")[1:]
    raw = bytearray(base64.b64decode(blob))
    raw[-1] ^= 1
    bad = note + f"\u2014 {name} {base64.b64encode(bytes(raw)).decode()}\n".encode()
    with pytest.raises(CosignatureInvalid, match="does not verify"):
        check_cosignatures(bad, world.directory)
    assert json.loads(json.dumps(witness.status()))["logs"][0]["size"] == 2


def test_a_refused_checkpoint_is_not_asked_for_again_at_once(
    world: World, engine: Engine, tmp_path: Path
) -> None:
    """A witness refusing a fork is asked again only after `resend_after`, not on every tick;
    a conflict naming a size the log signed is asked again at once, from that size."""
    engines = [open_database(f"sqlite:///{tmp_path / name}.db") for name in ("kz", "fork")]
    honest = world.routing_log(engine)
    kz = world.witness(engines[0])
    grow(honest, 3, tag=b"honest")
    kz.add_checkpoint(request(honest, signed(honest, T0 + timedelta(minutes=1)), 0))
    fork = world.routing_log(engines[1])
    grow(fork, 3, tag=b"fork")
    signed(fork, T0 + timedelta(minutes=1))
    cosigners = Cosigners(fork, lambda: world.directory, resend_after=3600)
    [asked] = [o for o in cosigners.due() if o.recipients == (KZ,)]
    answered = _answer(kz, KZ, asked.body)
    assert answered is not None and json.loads(answered[1])["refused"] == "fork"
    cosigners.take(answered[1], KZ)
    assert [o for o in cosigners.due() if o.recipients == (KZ,)] == []

    grow(honest, 2, tag=b"honest")
    signed(honest, T0 + timedelta(minutes=2))
    again = Cosigners(honest, lambda: world.directory, resend_after=3600)
    again._known[KZ] = 0  # as if it had forgotten what KZ cosigned
    [stale] = [o for o in again.due() if o.recipients == (KZ,)]
    conflict = _answer(kz, KZ, stale.body)
    assert conflict is not None and json.loads(conflict[1])["refused"] == "conflict"
    again.take(conflict[1], KZ)
    [retry] = [o for o in again.due() if o.recipients == (KZ,)]
    assert retry.body.startswith(b"old 3\n")
    for opened in engines:
        opened.dispose()
