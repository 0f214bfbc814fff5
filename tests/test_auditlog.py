"""The routing service's audit log on SQLite and PostgreSQL: append, checkpoint, proofs, export."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.directory import (
    Directory,
    DirectoryBody,
    Role,
    load_directory,
    sign_directory,
)
from broker.envelope import read_header, seal
from broker.errors import AuditError, ProofInvalid, StorageError, TreeRequestInvalid
from broker.keys import (
    ParticipantKeys,
    Sender,
    init_authority,
    init_participant,
    load_authority,
    load_keys,
    pin_authority,
)
from schemas.base import MessageKind
from schemas.examples import example
from services.audit import verify_export
from services.auditlog import (
    ZERO_HASH,
    Appender,
    AuditLog,
    LogEntry,
    format_time,
    log_entries_table,
)
from services.checkpoint import open_checkpoint, origin_for
from services.merkle import leaf_hash, verify_consistency, verify_inclusion

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
KEYS_FROM = T0 - timedelta(days=10)
KZ, UZ, NGO, ROUTING = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod", "routing"
CASE = "iom-kz.KZ-2026-0042"

# A return from Kazakhstan to Uzbekistan up to the NGO's reception.
STORY: tuple[tuple[MessageKind, str, tuple[str, ...]], ...] = (
    (MessageKind.RETURN_REQUEST, KZ, (UZ, NGO)),
    (MessageKind.RETURN_ACCEPTED, UZ, (KZ, NGO)),
    (MessageKind.TRAVEL_ARRANGED, KZ, (UZ, NGO)),
    (MessageKind.DEPARTED, KZ, (UZ, NGO)),
    (MessageKind.RECEPTION_CONFIRMED, NGO, (KZ, UZ)),
)


@dataclass(frozen=True)
class World:
    """An authority, three case participants and the routing service, with real keys."""

    root: Path
    keys: dict[str, ParticipantKeys]
    authority: Ed25519PrivateKey
    body: DirectoryBody
    directory: Directory

    def sender(self, pid: str) -> Sender:
        return self.keys[pid].sender(T0)

    def signed(self, body: DirectoryBody) -> Directory:
        """`body` signed by the authority and loaded."""
        raw = sign_directory(body, self.authority)
        return load_directory(raw, authority=self.authority.public_key())

    def log(self, engine: sa.Engine) -> AuditLog:
        return AuditLog(engine, origin=origin_for(ROUTING), signer=self.sender(ROUTING))

    def seal_story(self, case: str = CASE, start: datetime = T0) -> list[tuple[bytes, datetime]]:
        """The story's envelopes for `case`, each with the time the routing service got it."""
        out = []
        seqs: dict[str, int] = {}
        for step, (kind, sender, recipients) in enumerate(STORY):
            seqs[sender] = seqs.get(sender, 0) + 1
            sent = start + timedelta(minutes=10 * step)
            sealed = seal(
                example(kind),
                case=case,
                sender=self.sender(sender),
                recipients=list(recipients),
                directory=self.directory,
                seq=seqs[sender],
                now=sent,
            )
            out.append((sealed.raw, sent + timedelta(seconds=2, microseconds=123)))
        return out


def make_world(root: Path) -> World:
    """Keys for every participant, the signed directory, and the routing service's home."""
    init_authority(root / "authority")
    authority = load_authority(root / "authority")
    specs: list[tuple[str, Role, str, str | None]] = [
        (KZ, Role.MISSION, "KZ", None),
        (UZ, Role.MISSION, "UZ", None),
        (NGO, Role.NGO, "UZ", UZ),
        (ROUTING, Role.ROUTING, "KZ", None),
    ]
    cards = [
        init_participant(
            root / pid,
            participant_id=pid,
            role=role,
            country=c,
            parent=p,
            valid_days=3650,
            now=KEYS_FROM,
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
    return World(root, keys, authority, body, directory)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """One set of keys for the whole session."""
    return make_world(tmp_path_factory.mktemp("audit-world"))


def append_all(log: AuditLog, items: list[tuple[bytes, datetime, str]]) -> list[int]:
    """Append each (envelope, received_at, verification), one transaction each."""
    indices = []
    for raw, at, verdict in items:
        with log.engine.begin() as conn:
            indices.append(log.append(conn, raw, received_at=at, verification=verdict))
    return indices


def test_append_links_each_entry_to_the_previous(world: World, engine: sa.Engine) -> None:
    """Entries get consecutive indices, each storing the previous leaf hash and its own."""
    log = world.log(engine)
    story = world.seal_story()
    indices = append_all(log, [(raw, at, "ok") for raw, at in story])
    assert indices == list(range(len(story)))
    prev = ZERO_HASH
    for i, (raw, at) in enumerate(story):
        entry = log.entry(i)
        assert entry == LogEntry(i, format_time(at), "ok", prev, raw)
        assert log.leaf(i) == entry.leaf_hash() == leaf_hash(entry.leaf_input())
        prev = entry.leaf_hash()
    assert log.size() == len(story)


def test_find_returns_the_index_of_an_envelope(world: World, engine: sa.Engine) -> None:
    """find names the entry holding an envelope id, and None for an unknown id."""
    log = world.log(engine)
    story = world.seal_story()
    append_all(log, [(raw, at, "ok") for raw, at in story])
    append_all(log, [(b"not an envelope", T0, "rejected:malformed")])
    assert log.find(str(read_header(story[3][0]).id)) == 3
    assert log.find("0190c0de-0000-7000-8000-000000000001") is None
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(log_entries_table.c.envelope_id).where(log_entries_table.c.idx == 5)
        ).scalar()
    assert stored is None


def test_bad_verification_is_refused_and_nothing_stored(world: World, engine: sa.Engine) -> None:
    """A verification that is neither ok nor rejected:<reason> raises and appends nothing."""
    log = world.log(engine)
    with pytest.raises(AuditError, match="neither 'ok' nor"), engine.begin() as conn:
        log.append(conn, b"x", received_at=T0, verification="fine")
    with pytest.raises(AuditError, match="timezone-aware"), engine.begin() as conn:
        log.append(conn, b"x", received_at=T0.replace(tzinfo=None), verification="ok")
    assert log.size() == 0


def test_rolled_back_append_leaves_no_entry(world: World, engine: sa.Engine) -> None:
    """An append in a transaction that rolls back leaves neither a row nor a cached leaf."""
    log = world.log(engine)
    append_all(log, [(b"first", T0, "rejected:malformed")])
    with pytest.raises(RuntimeError), engine.begin() as conn:
        log.append(conn, b"second", received_at=T0, verification="rejected:malformed")
        raise RuntimeError("the case update failed")
    assert log.size() == 1
    assert append_all(log, [(b"third", T0, "rejected:malformed")]) == [1]
    assert log.entry(1).prev == log.leaf(0)


def test_another_process_sees_new_entries(world: World, engine: sa.Engine) -> None:
    """A second AuditLog on the same database picks up rows the first one committed."""
    writer, reader = world.log(engine), AuditLog(engine, origin=origin_for(ROUTING), signer=None)
    append_all(writer, [(b"a", T0, "rejected:malformed")])
    assert reader.size() == 1
    append_all(writer, [(b"b", T0, "rejected:malformed"), (b"c", T0, "rejected:malformed")])
    assert reader.size() == 3
    assert reader.root() == writer.root()


def test_concurrent_appenders_get_distinct_linked_indices(world: World, engine: sa.Engine) -> None:
    """Threads appending at once produce indices 0..n-1 with an unbroken chain."""
    log = world.log(engine)
    errors: list[BaseException] = []

    def work(name: int) -> None:
        try:
            for i in range(10):
                with engine.begin() as conn:
                    log.append(
                        conn, f"{name}-{i}".encode(), received_at=T0, verification="rejected:x"
                    )
        except BaseException as e:  # handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert log.size() == 40
    prev = ZERO_HASH
    for i in range(40):
        entry = log.entry(i)
        assert entry.prev == prev
        prev = entry.leaf_hash()


def test_checkpoint_signs_only_when_the_log_grew(world: World, engine: sa.Engine) -> None:
    """checkpoint signs size and root once per growth, and the note opens with the routing key."""
    log = world.log(engine)
    assert log.checkpoint(T0) is None
    append_all(log, [(b"a", T0, "rejected:malformed"), (b"b", T0, "rejected:malformed")])
    note = log.checkpoint(T0 + timedelta(minutes=1))
    assert note is not None
    routing = world.sender(ROUTING)
    cp = open_checkpoint(note, key=routing.key.public_key(), key_name=f"{ROUTING}/{routing.kid}")
    assert (cp.origin, cp.size, cp.root) == (origin_for(ROUTING), 2, log.root())
    assert log.checkpoint(T0 + timedelta(minutes=2)) is None
    latest = log.latest_checkpoint()
    assert latest is not None and latest[0] == 2 and latest[2] == note


def test_checkpoint_is_never_dated_before_what_it_covers(world: World, engine: sa.Engine) -> None:
    """A checkpoint asked for with an earlier clock takes the newest entry's receive time."""
    log = world.log(engine)
    append_all(log, [(b"a", T0, "rejected:malformed")])
    note = log.checkpoint(T0 - timedelta(hours=1))
    assert note is not None and b"time 2026-03-01T08:00:00Z" in note


def test_read_only_log_refuses_to_sign(world: World, engine: sa.Engine) -> None:
    """A log opened without the routing key cannot checkpoint, nor export an unsigned log."""
    log = AuditLog(engine, origin=origin_for(ROUTING), signer=None)
    append_all(log, [(b"a", T0, "rejected:malformed")])
    with pytest.raises(AuditError, match="read-only"):
        log.checkpoint(T0)
    with pytest.raises(AuditError, match="no checkpoint yet"):
        log.export(world.root / "never.jsonl")


def test_should_checkpoint_on_size_or_time(world: World, engine: sa.Engine) -> None:
    """should_checkpoint is true after enough entries or enough time, never without growth."""
    log = world.log(engine)
    every = timedelta(minutes=5)
    assert not log.should_checkpoint(every_entries=3, every=every, now=T0)
    append_all(log, [(b"a", T0, "rejected:malformed")])
    assert not log.should_checkpoint(every_entries=3, every=every, now=T0 + timedelta(minutes=1))
    assert log.should_checkpoint(every_entries=3, every=every, now=T0 + every)
    append_all(log, [(b"b", T0, "rejected:malformed"), (b"c", T0, "rejected:malformed")])
    assert log.should_checkpoint(every_entries=3, every=every, now=T0)
    log.checkpoint(T0)
    assert not log.should_checkpoint(every_entries=1, every=every, now=T0 + every * 10)


def test_export_round_trip_verifies(world: World, engine: sa.Engine, tmp_path: Path) -> None:
    """Real envelopes, some recorded as rejected, checkpointed twice, export and verify intact."""
    log = world.log(engine)
    story = world.seal_story()
    tampered = bytearray(story[1][0])
    tampered[-1] ^= 1
    items = [(raw, at, "ok") for raw, at in story[:3]]
    items += [(bytes(tampered), story[1][1], "rejected:bad_signature")]
    items += [(b"junk", story[2][1], "rejected:malformed")]
    append_all(log, items)
    log.checkpoint(story[2][1])
    append_all(log, [(raw, at, "ok") for raw, at in story[3:]])
    summary = log.export(tmp_path / "audit.jsonl", now=story[-1][1], directory=world.directory)
    assert (summary.entries, summary.checkpoints) == (7, 2)
    assert summary.root == log.root().hex()
    report = verify_export(tmp_path / "audit.jsonl", world.directory, workers=1)
    assert (report.entries, report.checkpoints, report.envelopes_ok) == (7, 2, 5)
    assert (report.rejected_recorded, report.rejected_confirmed) == (2, 2)
    assert report.root == summary.root


def test_export_holds_no_payload(world: World, engine: sa.Engine, tmp_path: Path) -> None:
    """A victim's name from a payload appears neither in the log table nor in the export."""
    log = world.log(engine)
    append_all(log, [(raw, at, "ok") for raw, at in world.seal_story()])
    log.export(tmp_path / "audit.jsonl", now=T0 + timedelta(hours=1))
    name = example(MessageKind.RETURN_REQUEST).model_dump()["person"]["full_name"]
    assert name == "Dilnoza Yusupova"
    assert name.encode() not in (tmp_path / "audit.jsonl").read_bytes()
    with engine.connect() as conn:
        bodies = b"".join(bytes(r.body) for r in conn.execute(sa.select(log_entries_table)))
    assert name.encode() not in bodies


def test_export_stops_at_the_newest_checkpoint(world: World, engine: sa.Engine) -> None:
    """A read-only export leaves out entries committed after the newest checkpoint."""
    log = world.log(engine)
    append_all(log, [(b"a", T0, "rejected:malformed")])
    log.checkpoint(T0)
    append_all(log, [(b"b", T0, "rejected:malformed")])
    reader = AuditLog(engine, origin=origin_for(ROUTING), signer=None)
    path = world.root / f"partial-{id(engine)}.jsonl"
    summary = reader.export(path)
    assert summary.entries == 1
    assert path.read_text().count('"type":"entry"') == 1


def test_inclusion_proofs_for_every_entry_of_300(world: World, engine: sa.Engine) -> None:
    """Each of 300 entries has a proof that verifies; a wrong index, bit or length fails."""
    log = world.log(engine)
    append_all(log, [(f"entry {i}".encode(), T0, "rejected:malformed") for i in range(300)])
    note = log.checkpoint(T0)
    assert note is not None
    root = log.root()
    for i in range(300):
        entry = log.entry(i)
        proof = log.inclusion_proof(i)
        verify_inclusion(entry.leaf_hash(), i, 300, proof, root)
        with pytest.raises(ProofInvalid):
            verify_inclusion(entry.leaf_hash(), (i + 1) % 300, 300, proof, root)
        broken = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
        with pytest.raises(ProofInvalid):
            verify_inclusion(entry.leaf_hash(), i, 300, broken, root)
        with pytest.raises(ProofInvalid):
            verify_inclusion(entry.leaf_hash(), i, 300, proof[:-1], root)
        with pytest.raises(ProofInvalid):
            verify_inclusion(entry.leaf_hash(), i, 300, [*proof, proof[0]], root)
    small = log.inclusion_proof(7, 100)
    verify_inclusion(log.leaf(7), 7, 100, small, log.root(100))
    with pytest.raises(TreeRequestInvalid):
        log.inclusion_proof(300)


def test_consistency_proofs_between_sizes(world: World, engine: sa.Engine) -> None:
    """The log proves every earlier size is a prefix of the current one; a flipped proof fails."""
    log = world.log(engine)
    append_all(log, [(f"e{i}".encode(), T0, "rejected:malformed") for i in range(40)])
    new_root = log.root()
    for old in range(1, 41):
        proof = log.consistency_proof(old)
        verify_consistency(old, 40, log.root(old), new_root, proof)
        if proof:
            bad = [bytes([proof[-1][0] ^ 1]) + proof[-1][1:], *proof[:-1]][::-1]
            with pytest.raises(ProofInvalid):
                verify_consistency(old, 40, log.root(old), new_root, bad)


def test_export_to_a_missing_folder_fails_clearly(world: World, engine: sa.Engine) -> None:
    """Exporting into a folder that does not exist raises AuditError naming the file."""
    log = world.log(engine)
    append_all(log, [(b"a", T0, "rejected:malformed")])
    with pytest.raises(AuditError, match="cannot write the export"):
        log.export(Path("/nonexistent/folder/audit.jsonl"), now=T0)


def test_storage_failures_are_translated(world: World, tmp_path: Path) -> None:
    """A database without the log tables gives a StorageError, not a driver exception."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    log = world.log(engine)
    with pytest.raises(StorageError, match="audit log"):
        log.size()


def test_a_second_entry_at_a_taken_index_is_refused(engine: sa.Engine) -> None:
    """Two writers that both read the same tail cannot both log: the index is unique.

    The routing service's locks keep this from happening; the table refuses
    it as well, so that the log cannot fork even if they were bypassed.
    """
    with engine.begin() as conn:
        first = AuditLog.appender(conn)
        first.append(b"first", received_at=T0, verification="ok")
        first.flush()
    with pytest.raises(StorageError, match="appending to the audit log"), engine.begin() as conn:
        stale = Appender(conn, 0, ZERO_HASH)  # a writer that read the log while it was empty
        stale.append(b"second", received_at=T0, verification="ok")
        stale.flush()
    with engine.connect() as conn:
        assert conn.execute(sa.select(log_entries_table.c.body)).scalars().all() == [b"first"]
