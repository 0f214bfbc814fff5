"""The inbox: open, deduplicate, apply and receipt in one transaction; quarantine the rest."""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from adapters.casesystem import FileCaseSystem, load_case_system
from broker.database import (
    inbox_table,
    open_database,
    outbox_table,
    pending_receipts_table,
    quarantine_table,
    receipts_table,
)
from broker.directory import (
    Directory,
    KeyUse,
    load_directory,
    next_body,
    revoke_key,
    sign_directory,
)
from broker.envelope import (
    SIGNED_MAGIC,
    OpenedEnvelope,
    SealedEnvelope,
    open_envelope,
    read_header,
    seal,
)
from broker.errors import CaseSystemError, ConfigError
from broker.inbox import Inbox, Outcome
from broker.outbox import Outbox, Relay
from broker.testing import MemoryBroker, Network, capture_logs
from broker.transport import Delivery
from schemas.base import MessageKind
from schemas.control import DeliveryReceipt
from schemas.examples import EXAMPLE_PERSON_NAME, example, sharing_with

KZ, UZ, NGO = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod"
CASE = "iom-kz.KZ-2026-0042"


def make_inbox(engine: Engine, network: Network, me: str, folder: Path) -> Inbox:
    """`me`'s inbox on `engine`, delivering into `folder`."""
    return Inbox(
        engine,
        recipient=network.recipient(me),
        sender=lambda: network.sender(me),
        directory=lambda: network.directory,
        case_system=FileCaseSystem(folder),
        outbox=Outbox(engine),
    )


def request(
    network: Network, *, envelope_id: UUID | None = None, case: str = CASE
) -> SealedEnvelope:
    """A real return request from KZ to UZ and the NGO, opening `case`."""
    return seal(
        example(MessageKind.RETURN_REQUEST),
        case=case,
        sender=network.sender(KZ),
        recipients=[UZ, NGO],
        directory=network.directory,
        seq=1,
        envelope_id=envelope_id,
    )


def send_to_uz(outbox: Outbox, network: Network, case: str = CASE) -> SealedEnvelope:
    """A real return request from KZ to UZ opening `case`, queued in KZ's `outbox`."""
    return outbox.send(
        lambda seq: seal(
            example(MessageKind.RETURN_REQUEST),
            case=case,
            sender=network.sender(KZ),
            recipients=[UZ],
            directory=network.directory,
            seq=seq,
        ),
        sender=KZ,
        case=case,
    )


def rows(engine: Engine, table: sa.Table) -> list[sa.Row[tuple[object, ...]]]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(table)).all())


def test_applied_once_with_a_receipt_to_the_sender(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """A new envelope is delivered, recorded, and answered by a signed receipt to its sender."""
    inbox = make_inbox(engine, network, UZ, tmp_path / "inbox")
    envelope = request(network)
    result = inbox.handle(envelope.raw, KZ)
    assert (result.outcome, result.envelope_id) == (Outcome.APPLIED, str(envelope.id))
    document = json.loads((tmp_path / "inbox" / f"{envelope.id}.json").read_text())
    assert document["kind"] == "return_request"
    assert document["payload"]["person"]["full_name"] == EXAMPLE_PERSON_NAME
    [row] = rows(engine, inbox_table)
    assert (row.sender, row.digest, row.redeliveries) == (KZ, envelope.digest, 0)
    [out] = Outbox(engine).pending()
    assert out.recipients == (KZ,)
    opened = open_envelope(out.body, recipient=network.recipient(KZ), directory=network.directory)
    assert opened.header.kind is MessageKind.DELIVERY_RECEIPT
    assert (opened.header.case, opened.header.reply_to) == (CASE, envelope.id)
    assert opened.header.sender == UZ
    assert isinstance(opened.message, DeliveryReceipt)
    assert opened.message.envelope_id == envelope.id
    assert opened.message.digest == envelope.digest


def test_duplicate_has_no_second_effect(engine: Engine, network: Network, tmp_path: Path) -> None:
    """The same bytes again (a redelivery after a crash before the ack) change nothing."""
    inbox = make_inbox(engine, network, UZ, tmp_path / "inbox")
    envelope = request(network)
    assert inbox.handle(envelope.raw, KZ).outcome is Outcome.APPLIED
    written = (tmp_path / "inbox" / f"{envelope.id}.json").stat().st_mtime_ns
    again = inbox.handle(envelope.raw, KZ, redelivered=True)
    assert (again.outcome, again.envelope_id) == (Outcome.DUPLICATE, str(envelope.id))
    assert len(list((tmp_path / "inbox").iterdir())) == 1
    assert (tmp_path / "inbox" / f"{envelope.id}.json").stat().st_mtime_ns == written
    assert len(Outbox(engine).pending()) == 1
    [row] = rows(engine, inbox_table)
    assert row.redeliveries == 1


def test_duplicate_is_recognised_without_opening(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """A redelivery of applied bytes is answered from the inbox table, with no crypto."""
    inbox = make_inbox(engine, network, UZ, tmp_path / "inbox")
    envelope = request(network)
    inbox.handle(envelope.raw, KZ)

    def no_directory() -> Directory:
        raise AssertionError("the duplicate was opened again")

    inbox.directory = no_directory
    assert inbox.handle(envelope.raw, KZ, redelivered=True).outcome is Outcome.DUPLICATE
    [row] = rows(engine, inbox_table)
    assert row.redeliveries == 1


def test_same_id_other_bytes_is_quarantined_as_replayed(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """An applied id arriving with different bytes is quarantined as replayed and not applied."""
    inbox = make_inbox(engine, network, UZ, tmp_path / "inbox")
    first = request(network)
    second = request(network, envelope_id=first.id)
    assert first.raw != second.raw
    inbox.handle(first.raw, KZ)
    before = (tmp_path / "inbox" / f"{first.id}.json").read_bytes()
    result = inbox.handle(second.raw, KZ)
    assert (result.outcome, result.reason) == (Outcome.QUARANTINED, "replayed")
    assert (tmp_path / "inbox" / f"{first.id}.json").read_bytes() == before
    assert len(Outbox(engine).pending()) == 1
    [quarantined] = rows(engine, quarantine_table)
    assert (quarantined.envelope_id, quarantined.reason) == (str(first.id), "replayed")
    assert quarantined.body == second.raw


@pytest.mark.parametrize(
    ("damage", "user", "reason"),
    [
        (lambda raw: b"garbage" + raw[:40], KZ, "malformed"),
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), KZ, "bad_signature"),
        (lambda raw: raw, NGO, "sender_mismatch"),
    ],
    ids=["garbled", "tampered", "wrong-user"],
)
def test_refused_envelope_is_quarantined_and_not_applied(
    engine: Engine, network: Network, tmp_path: Path, damage, user: str, reason: str
) -> None:
    """An envelope that fails opening is recorded in quarantine with its reason, nothing applied."""
    inbox = make_inbox(engine, network, UZ, tmp_path / "inbox")
    body = damage(request(network).raw)
    result = inbox.handle(body, user)
    assert (result.outcome, result.reason) == (Outcome.QUARANTINED, reason)
    assert result.detail
    assert not (tmp_path / "inbox").exists()
    assert rows(engine, inbox_table) == []
    assert rows(engine, outbox_table) == []
    [quarantined] = rows(engine, quarantine_table)
    assert (quarantined.reason, quarantined.body, quarantined.sender) == (reason, body, user)
    assert quarantined.redeliveries == 0


def test_quarantine_counts_redeliveries(engine: Engine, network: Network, tmp_path: Path) -> None:
    """The same refused bytes delivered again add to one quarantine row's count."""
    inbox = make_inbox(engine, network, UZ, tmp_path / "inbox")
    body = b"not an envelope at all"
    inbox.handle(body, KZ)
    inbox.handle(body, KZ, redelivered=True)
    [quarantined] = rows(engine, quarantine_table)
    assert (quarantined.envelope_id, quarantined.redeliveries) == (None, 1)


def test_received_receipt_is_recorded_not_answered(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """KZ records UZ's receipt for its envelope and sends no receipt for the receipt."""
    kz_outbox = Outbox(engine)
    envelope = send_to_uz(kz_outbox, network)
    uz_engine = open_database(f"sqlite:///{tmp_path / 'uz.db'}")
    try:
        make_inbox(uz_engine, network, UZ, tmp_path / "uz-inbox").handle(envelope.raw, KZ)
        [receipt] = Outbox(uz_engine).pending()
    finally:
        uz_engine.dispose()
    kz_inbox = make_inbox(engine, network, KZ, tmp_path / "kz-inbox")
    result = kz_inbox.handle(receipt.body, UZ)
    assert result.outcome is Outcome.APPLIED
    assert [m.envelope_id for m in kz_outbox.pending()] == [str(envelope.id)]
    [recorded] = rows(engine, receipts_table)
    assert (recorded.envelope_id, recorded.recipient) == (str(envelope.id), UZ)
    assert recorded.receipt_envelope_id == receipt.envelope_id
    assert kz_outbox.status().receipts == 1
    assert not (tmp_path / "kz-inbox").exists()
    assert kz_inbox.handle(receipt.body, UZ).outcome is Outcome.DUPLICATE
    assert len(rows(engine, receipts_table)) == 1


class CrashAfterWriting(FileCaseSystem):
    """Writes the file, then fails, as a process dying before the commit would."""

    def deliver(self, opened: OpenedEnvelope) -> None:
        super().deliver(opened)
        raise OSError("power lost")


def test_crash_before_commit_then_redelivery_applies_once(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """A case system failing mid-apply rolls everything back; the redelivery applies once."""
    folder = tmp_path / "inbox"
    crashing = make_inbox(engine, network, UZ, folder)
    crashing.case_system = CrashAfterWriting(folder)
    envelope = request(network)
    with pytest.raises(CaseSystemError, match="power lost"):
        crashing.handle(envelope.raw, KZ)
    assert rows(engine, inbox_table) == []
    assert rows(engine, outbox_table) == []
    inbox = make_inbox(engine, network, UZ, folder)
    assert inbox.handle(envelope.raw, KZ, redelivered=True).outcome is Outcome.APPLIED
    assert inbox.handle(envelope.raw, KZ, redelivered=True).outcome is Outcome.DUPLICATE
    assert [p.name for p in folder.iterdir()] == [f"{envelope.id}.json"]
    assert len(rows(engine, inbox_table)) == 1
    assert len(Outbox(engine).pending()) == 1


def test_concurrent_consumers_apply_once(engine: Engine, network: Network, tmp_path: Path) -> None:
    """Two consumers handling the same envelope at once apply it once and send one receipt."""
    envelope = request(network)
    inboxes = [make_inbox(engine, network, UZ, tmp_path / "inbox") for _ in range(2)]
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def consume(inbox: Inbox) -> None:
        try:
            start.wait()
            outcomes.append(inbox.handle(envelope.raw, KZ).outcome)
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=consume, args=(inbox,)) for inbox in inboxes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(outcomes) == [Outcome.APPLIED, Outcome.DUPLICATE]
    assert len(rows(engine, inbox_table)) == 1
    assert len(Outbox(engine).pending()) == 1


@pytest.mark.postgres
def test_a_copy_applied_by_another_consumer_meanwhile_is_a_duplicate(
    postgres_url: str, network: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL another consumer commits the same envelope while this one's batch runs.

    The other commit lands just before this batch reads the case views: the batch must
    see it as a duplicate, never quarantine it against a view that already holds it.
    """
    import broker.inbox

    engine = open_database(postgres_url)
    envelope = request(network)
    mine, other = (make_inbox(engine, network, UZ, tmp_path / "inbox") for _ in range(2))
    first: list[Outcome] = []
    interleaved = threading.Event()

    class CommittedMeanwhile(broker.inbox.CaseGate):
        def __init__(self, *args: object, **kwargs: object) -> None:
            if not interleaved.is_set():  # once: the other consumer's own batch runs plainly
                interleaved.set()
                meanwhile = threading.Thread(
                    target=lambda: first.append(other.handle(envelope.raw, KZ).outcome)
                )
                meanwhile.start()
                meanwhile.join(60)
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(broker.inbox, "CaseGate", CommittedMeanwhile)
    try:
        assert mine.handle(envelope.raw, KZ).outcome is Outcome.DUPLICATE
        assert first == [Outcome.APPLIED]
        assert len(rows(engine, inbox_table)) == 1
        assert rows(engine, quarantine_table) == []
    finally:
        engine.dispose()


def test_no_personal_data_in_logs_or_database(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """The person's name reaches the case system file only: no log line, no database row."""
    inbox = make_inbox(engine, network, UZ, tmp_path / "inbox")
    with capture_logs() as logs:
        inbox.handle(request(network).raw, KZ)
        inbox.handle(b"garbled", KZ)
    assert logs
    assert EXAMPLE_PERSON_NAME not in repr(logs)
    for table in (inbox_table, outbox_table, quarantine_table, receipts_table):
        for row in rows(engine, table):
            for value in row:
                data = value if isinstance(value, bytes) else str(value).encode()
                assert EXAMPLE_PERSON_NAME.encode() not in data


def test_end_to_end_through_memory_broker(engine: Engine, network: Network, tmp_path: Path) -> None:
    """KZ's envelope, delivered twice, is applied once by UZ and its one receipt reaches KZ."""
    broker = MemoryBroker()
    kz_outbox = Outbox(engine)
    envelope = send_to_uz(kz_outbox, network)
    broker.duplicate_next(1)
    Relay(kz_outbox, broker.publisher(KZ)).run_once()
    uz_engine = open_database(f"sqlite:///{tmp_path / 'uz.db'}")
    try:
        uz_inbox = make_inbox(uz_engine, network, UZ, tmp_path / "uz-inbox")
        outcomes = [
            uz_inbox.handle(d.body, d.user_id, d.redelivered).outcome for d in broker.drain(UZ)
        ]
        assert outcomes == [Outcome.APPLIED, Outcome.DUPLICATE]
        Relay(Outbox(uz_engine), broker.publisher(UZ)).run_once()
    finally:
        uz_engine.dispose()
    kz_inbox = make_inbox(engine, network, KZ, tmp_path / "kz-inbox")
    [delivery] = broker.drain(KZ)
    assert kz_inbox.handle(delivery.body, delivery.user_id).outcome is Outcome.APPLIED
    status = kz_outbox.status()
    assert (status.sent, status.pending, status.receipts) == (1, 0, 1)
    assert rows(engine, receipts_table)[0].envelope_id == str(envelope.id)


# --- the case system -----------------------------------------------------------------


def test_file_case_system_writes_private_files(network: Network, tmp_path: Path) -> None:
    """FileCaseSystem writes HOME/inbox/<id>.json, mode 0600, with header fields and payload."""
    envelope = request(network)
    opened = open_envelope(
        envelope.raw, recipient=network.recipient(UZ), directory=network.directory
    )
    system = load_case_system(None, tmp_path)
    system.deliver(opened)
    system.deliver(opened)
    path = tmp_path / "inbox" / f"{envelope.id}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    assert set(document) == {
        "envelope_id",
        "kind",
        "schema_version",
        "case",
        "sender",
        "recipients",
        "sent_at",
        "seq",
        "reply_to",
        "payload",
    }
    assert (document["envelope_id"], document["sender"]) == (str(envelope.id), KZ)
    assert document["recipients"] == [UZ, NGO]
    assert [p.name for p in (tmp_path / "inbox").iterdir()] == [path.name]


def test_case_system_from_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module:factory spec builds the case system by calling the factory with the home."""
    module = types.ModuleType("trm_test_cases")
    made: list[Path] = []

    def factory(home: Path) -> FileCaseSystem:
        made.append(home)
        return FileCaseSystem(home / "elsewhere")

    module.factory = factory  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "trm_test_cases", module)
    system = load_case_system("trm_test_cases:factory", tmp_path)
    assert isinstance(system, FileCaseSystem)
    assert system.folder == tmp_path / "elsewhere"
    assert made == [tmp_path]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("no_such_module_for_trm:factory", "cannot be loaded"),
        ("json:no_such_factory", "cannot be loaded"),
        ("json:__doc__", "not a factory"),
        ("json:dumps", "failed to start|no deliver"),
        ("not-installed", "no case system named"),
    ],
)
def test_bad_case_system_spec(spec: str, words: str, tmp_path: Path) -> None:
    """A case system spec that cannot be loaded or used fails with ConfigError naming it."""
    with pytest.raises(ConfigError, match=words):
        load_case_system(spec, tmp_path)


def test_unwritable_case_folder_is_a_case_system_error(network: Network, tmp_path: Path) -> None:
    """A case folder that cannot be written raises CaseSystemError, not OSError."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    opened = open_envelope(
        request(network).raw, recipient=network.recipient(UZ), directory=network.directory
    )
    with pytest.raises(CaseSystemError, match="cannot write"):
        FileCaseSystem(blocker / "inbox").deliver(opened)


def _delivery(body: bytes, user: str | None, tag: int, redelivered: bool = False) -> Delivery:
    return Delivery(
        body=body,
        user_id=user,
        message_id=None,
        redelivered=redelivered,
        headers={},
        delivery_tag=tag,
    )


def test_batch_applies_quarantines_and_deduplicates_in_one_transaction(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """A batch applies new envelopes once, quarantines a bad one, absorbs a repeat, in order."""
    inbox = make_inbox(engine, network, UZ, tmp_path / "inbox")
    first, second = request(network), request(network, case="iom-kz.KZ-2026-0043")
    bad = first.raw[:-1] + bytes([first.raw[-1] ^ 1])
    batch = [
        _delivery(first.raw, KZ, 1),
        _delivery(bad, KZ, 2),
        _delivery(second.raw, KZ, 3),
        _delivery(first.raw, KZ, 4, redelivered=True),
    ]
    results = inbox.handle_batch(batch)
    assert [r.outcome for r in results] == [
        Outcome.APPLIED,
        Outcome.QUARANTINED,
        Outcome.APPLIED,
        Outcome.DUPLICATE,
    ]
    assert results[1].reason == "bad_signature"
    assert {row.envelope_id for row in rows(engine, inbox_table)} == {
        str(first.id),
        str(second.id),
    }
    assert len(Outbox(engine).pending()) == 2
    assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == sorted(
        [f"{first.id}.json", f"{second.id}.json"]
    )
    [quarantined] = rows(engine, quarantine_table)
    assert quarantined.body == bad
    counted = {row.envelope_id: row.redeliveries for row in rows(engine, inbox_table)}
    assert counted == {str(first.id): 1, str(second.id): 0}
    again = inbox.handle_batch([_delivery(first.raw, KZ, 5, True), _delivery(second.raw, KZ, 6)])
    assert [r.outcome for r in again] == [Outcome.DUPLICATE, Outcome.DUPLICATE]
    assert len(Outbox(engine).pending()) == 2


def test_batch_with_a_failing_case_system_applies_nothing(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """When the case system refuses one envelope of a batch, none of the batch is recorded."""
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the case folder should be")
    inbox = make_inbox(engine, network, UZ, blocked)
    batch = [_delivery(request(network).raw, KZ, tag) for tag in (1, 2)]
    with pytest.raises(CaseSystemError):
        inbox.handle_batch(batch)
    assert rows(engine, inbox_table) == []
    assert rows(engine, outbox_table) == []


def _request_on(
    network: Network, case: str, kind: MessageKind = MessageKind.RETURN_REQUEST
) -> SealedEnvelope:
    return seal(
        example(kind),
        case=case,
        sender=network.sender(KZ),
        recipients=[UZ],
        directory=network.directory,
        seq=1,
    )


def test_batch_receipts_take_consecutive_numbers_per_case(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """The receipts of a batch are numbered 1, 2, 3... per case, and the next batch goes on."""
    inbox = make_inbox(engine, network, UZ, tmp_path / "inbox")
    other = "iom-kz.KZ-2026-0043"
    cases = [CASE, other, CASE, CASE, other]
    update = MessageKind.TRAVEL_ARRANGED
    envelopes = [
        _request_on(network, case, update if case in cases[:i] else MessageKind.RETURN_REQUEST)
        for i, case in enumerate(cases)
    ]
    batch = [_delivery(e.raw, KZ, tag) for tag, e in enumerate(envelopes, 1)]
    assert {r.outcome for r in inbox.handle_batch(batch)} == {Outcome.APPLIED}
    later = [_request_on(network, case, update) for case in (other, CASE)]
    inbox.handle_batch([_delivery(e.raw, KZ, tag) for tag, e in enumerate(later, 6)])
    numbered: dict[str, list[int]] = {CASE: [], other: []}
    answered = []
    for message in Outbox(engine).pending():
        header = read_header(message.body)
        numbered[header.case].append(header.seq)
        answered.append(header.reply_to)
    assert numbered == {CASE: [1, 2, 3, 4], other: [1, 2, 3]}
    assert sorted(map(str, answered)) == sorted(str(e.id) for e in envelopes + later)


def test_batch_of_receipts_records_each_once(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """KZ records a batch of UZ's receipts once each; a copy in the batch is a duplicate."""
    kz_outbox = Outbox(engine)
    sent = [send_to_uz(kz_outbox, network, case) for case in (CASE, "iom-kz.KZ-2026-0043")]
    uz_engine = open_database(f"sqlite:///{tmp_path / 'uz.db'}")
    try:
        uz = make_inbox(uz_engine, network, UZ, tmp_path / "uz-inbox")
        uz.handle_batch([_delivery(e.raw, KZ, tag) for tag, e in enumerate(sent, 1)])
        receipts = Outbox(uz_engine).pending()
    finally:
        uz_engine.dispose()
    kz_inbox = make_inbox(engine, network, KZ, tmp_path / "kz-inbox")
    batch = [_delivery(r.body, UZ, tag) for tag, r in enumerate(receipts, 1)]
    results = kz_inbox.handle_batch([*batch, _delivery(receipts[0].body, UZ, 3)])
    assert [r.outcome for r in results] == [Outcome.APPLIED, Outcome.APPLIED, Outcome.DUPLICATE]
    recorded = {(row.envelope_id, row.recipient) for row in rows(engine, receipts_table)}
    assert recorded == {(str(e.id), UZ) for e in sent}
    assert kz_outbox.status().receipts == 2
    assert {m.envelope_id for m in kz_outbox.pending()} == {str(e.id) for e in sent}
    assert not (tmp_path / "kz-inbox").exists()


def test_file_case_system_remakes_a_removed_folder(network: Network, tmp_path: Path) -> None:
    """A case folder removed while the adapter runs is made again, mode 0700, at the next file."""
    system = FileCaseSystem(tmp_path / "inbox")
    envelopes = [request(network), request(network)]
    opened = [
        open_envelope(e.raw, recipient=network.recipient(UZ), directory=network.directory)
        for e in envelopes
    ]
    system.deliver(opened[0])
    (tmp_path / "inbox" / f"{envelopes[0].id}.json").unlink()
    (tmp_path / "inbox").rmdir()
    with system.batch():
        system.deliver(opened[1])
    assert stat.S_IMODE((tmp_path / "inbox").stat().st_mode) == 0o700
    assert [p.name for p in (tmp_path / "inbox").iterdir()] == [f"{envelopes[1].id}.json"]


def test_file_case_system_never_follows_a_link_at_its_temporary_name(
    network: Network, tmp_path: Path
) -> None:
    """A symbolic link planted where the writer puts its temporary file is not written through."""
    envelope = request(network)
    opened = open_envelope(
        envelope.raw, recipient=network.recipient(UZ), directory=network.directory
    )
    folder = tmp_path / "inbox"
    folder.mkdir()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"untouched")
    name = f"{envelope.id}.json"
    planted = folder / f".{name}.{os.getpid()}.{threading.get_native_id()}.tmp"
    planted.symlink_to(target)
    with pytest.raises(CaseSystemError, match="cannot write"):
        FileCaseSystem(folder).deliver(opened)
    assert target.read_bytes() == b"untouched"
    assert not (folder / name).exists()


def test_logs_name_our_participant_and_files_carry_seq_and_reply_to(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """In every inbox log line `participant` is the inbox's own, the sender is `sender`; the
    delivered file records the envelope's seq and reply_to."""
    from structlog.testing import capture_logs

    inbox = make_inbox(engine, network, UZ, tmp_path / "inbox")
    envelope = request(network)
    answer = seal(
        example(MessageKind.TRAVEL_ARRANGED),
        case=CASE,
        sender=network.sender(KZ),
        recipients=[UZ],
        directory=network.directory,
        seq=2,
        reply_to=envelope.id,
    )
    with capture_logs() as logged:
        inbox.handle(envelope.raw, KZ)
        inbox.handle(answer.raw, KZ)
        inbox.handle(answer.raw, KZ, redelivered=True)
    lines = [e for e in logged if e["event"].startswith("inbox.")]
    assert {e["event"] for e in lines} == {"inbox.applied", "inbox.duplicate"}
    assert all(e["participant"] == UZ and e["sender"] == KZ for e in lines)
    document = json.loads((tmp_path / "inbox" / f"{answer.id}.json").read_text())
    assert (document["seq"], document["reply_to"]) == (2, str(envelope.id))


# --- a delivery without an AMQP user id -------------------------------------------------


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "in-a-batch"])
def test_delivery_without_user_id_is_refused_and_names_no_sender(
    engine: Engine, network: Network, tmp_path: Path, batched: bool
) -> None:
    """A valid envelope delivered without a user id is quarantined as no_user_id, with no
    sender recorded (not the one it claims); a bad one keeps its own reason, also unnamed."""
    inbox = make_inbox(engine, network, UZ, tmp_path / "inbox")
    valid = request(network)
    other = request(network, case="iom-kz.KZ-2026-0043").raw
    tampered = other[:-1] + bytes([other[-1] ^ 1])
    if batched:
        results = inbox.handle_batch([_delivery(valid.raw, None, 1), _delivery(tampered, None, 2)])
    else:
        results = [inbox.handle(valid.raw, None), inbox.handle(tampered, None)]
    assert [(r.outcome, r.reason) for r in results] == [
        (Outcome.QUARANTINED, "no_user_id"),
        (Outcome.QUARANTINED, "bad_signature"),
    ]
    assert "without an AMQP user id" in str(results[0].detail)
    quarantined = {row.reason: row for row in rows(engine, quarantine_table)}
    assert quarantined["no_user_id"].envelope_id == str(valid.id)
    assert [row.sender for row in quarantined.values()] == [None, None]
    assert rows(engine, inbox_table) == []
    assert rows(engine, outbox_table) == []
    assert not (tmp_path / "inbox").exists()


# --- a receipt that cannot be sealed yet ----------------------------------------------------


def _without_encryption_key(network: Network, participant: str) -> Directory:
    """`network`'s directory with `participant`'s encryption keys revoked a minute ago."""
    now = datetime.now(UTC)
    body = network.directory.body
    card = next(p for p in body.participants if p.id == participant)
    for key in card.keys:
        if key.use is KeyUse.ENCRYPT:
            body = revoke_key(body, participant, key.kid, at=now - timedelta(minutes=1), now=now)
    signed = sign_directory(body, network.authority)
    return load_directory(signed, authority=network.authority.public_key())


def _referral(network: Network, case: str) -> SealedEnvelope:
    """The NGO's referral request to its parent mission, opening the NGO's own `case`."""
    return seal(
        sharing_with(example(MessageKind.REFERRAL_REQUEST), [NGO, UZ]),
        case=case,
        sender=network.sender(NGO),
        recipients=[UZ],
        directory=network.directory,
        seq=1,
    )


def _answered(engine: Engine) -> dict[str, str]:
    """Receipts in the outbox: answered envelope id -> receipt recipient."""
    found = {}
    for message in Outbox(engine).pending():
        header = read_header(message.body)
        if header.kind is MessageKind.DELIVERY_RECEIPT:
            found[str(header.reply_to)] = message.recipients[0]
    return found


def test_a_sender_without_encryption_key_is_answered_at_once_by_a_signed_receipt(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """In one batch: the envelope of a sender whose encryption key is revoked here is applied
    and answered like the honest ones around it, nothing pending: a receipt is signed, not
    sealed, so it needs no key of the sender's. It opens for the sender under either
    directory, and its payload is readable in the clear by anyone."""
    inbox = make_inbox(engine, network, UZ, tmp_path / "inbox")
    revoked = _without_encryption_key(network, KZ)
    inbox.directory = lambda: revoked
    honest = [_referral(network, f"{NGO}.R-{i}") for i in (1, 2)]
    answered_late = request(network)
    batch = [
        _delivery(honest[0].raw, NGO, 1),
        _delivery(answered_late.raw, KZ, 2),
        _delivery(honest[1].raw, NGO, 3),
    ]
    results = inbox.handle_batch(batch)
    assert [r.outcome for r in results] == [Outcome.APPLIED] * 3
    assert _answered(engine) == {
        **{str(e.id): NGO for e in honest},
        str(answered_late.id): KZ,
    }
    assert rows(engine, pending_receipts_table) == []
    [receipt] = [
        m for m in Outbox(engine).pending() if read_header(m.body).reply_to == answered_late.id
    ]
    assert receipt.body[:4] == SIGNED_MAGIC
    assert answered_late.digest.encode() in receipt.body, "the payload travels in the clear"
    for directory in (revoked, network.directory):
        opened = open_envelope(receipt.body, recipient=network.recipient(KZ), directory=directory)
        assert isinstance(opened.message, DeliveryReceipt)
        assert (opened.message.envelope_id, opened.message.digest) == (
            answered_late.id,
            answered_late.digest,
        )


def _without_participant(network: Network, participant: str) -> Directory:
    """`network`'s directory, the next serial, no longer listing `participant`."""
    body = network.directory.body
    kept = tuple(p for p in body.participants if p.id != participant)
    signed = sign_directory(next_body(body, kept, now=datetime.now(UTC)), network.authority)
    return load_directory(signed, authority=network.authority.public_key())


def test_a_pending_receipt_waits_while_its_recipient_is_unlisted_then_goes_signed(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """A receipt an older adapter left pending (its recipient had no encryption key then)
    waits, its attempts counted, while the directory does not list the recipient; once one
    does, it is signed, queued once, and opens for the recipient."""
    inbox = make_inbox(engine, network, UZ, tmp_path / "inbox")
    blocked = request(network)
    assert inbox.handle(blocked.raw, KZ).outcome is Outcome.APPLIED
    [answer] = [m for m in Outbox(engine).pending() if read_header(m.body).reply_to == blocked.id]
    with engine.begin() as conn:  # as the older adapter left it: applied, never answered
        conn.execute(outbox_table.delete().where(outbox_table.c.envelope_id == answer.envelope_id))
        conn.execute(
            pending_receipts_table.insert(),
            {
                "envelope_id": str(blocked.id),
                "case_ref": CASE,
                "recipient": KZ,
                "digest": blocked.digest,
                "received_at": datetime.now(UTC),
                "applied_at": datetime.now(UTC),
                "reason": "key_not_valid",
                "last_error": "no valid encryption key",
                "attempts": 0,
            },
        )
    unlisted = _without_participant(network, KZ)
    inbox.directory = lambda: unlisted
    assert inbox.retry_receipts() == 0, "not listed: nothing signed"
    [still] = rows(engine, pending_receipts_table)
    assert (still.attempts, still.queued_at, still.reason) == (1, None, "unknown_participant")
    assert blocked.id not in {read_header(m.body).reply_to for m in Outbox(engine).pending()}

    inbox.directory = lambda: network.directory
    assert inbox.retry_receipts() == 1
    assert inbox.retry_receipts() == 0, "queued once"
    [late] = [m for m in Outbox(engine).pending() if read_header(m.body).reply_to == blocked.id]
    assert late.body[:4] == SIGNED_MAGIC
    opened = open_envelope(late.body, recipient=network.recipient(KZ), directory=network.directory)
    assert isinstance(opened.message, DeliveryReceipt)
    assert (opened.message.envelope_id, opened.message.digest) == (blocked.id, blocked.digest)
    assert opened.message.applied_at == still.applied_at
    [done] = rows(engine, pending_receipts_table)
    assert done.queued_at is not None and done.receipt_id == late.envelope_id


@pytest.mark.rabbitmq
def test_administrator_publish_without_user_id_is_refused_over_rabbitmq(
    local_network, rabbitmq_urls: tuple[str, str]
) -> None:
    """A valid envelope of KZ's, published by the broker's administrator (guest) through
    trm.handoff to UZ's inbox without a user id, is refused by UZ's adapter as no_user_id:
    `trm quarantine list` names no sender, not KZ; KZ's own send right after is applied."""
    import pika
    from click.testing import CliRunner

    from broker.directory import Role
    from broker.topology import EXCHANGE, quarantine_queue
    from trm.cli import cli

    net = local_network([(KZ, Role.MISSION, "KZ", None), (UZ, Role.MISSION, "UZ", None)])
    net.start_adapter(UZ)
    home = net.settings(KZ)
    forged = seal(
        example(MessageKind.RETURN_REQUEST),
        case=CASE,
        sender=home.sender(),
        recipients=[UZ],
        directory=home.directory(),
        seq=1,
    )
    params = pika.URLParameters(rabbitmq_urls[0])
    params.virtual_host = net.vhost
    admin = pika.BlockingConnection(params)
    try:
        channel = admin.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            EXCHANGE, UZ, forged.raw, pika.BasicProperties(delivery_mode=2), mandatory=True
        )
    finally:
        admin.close()
    q = quarantine_table.c

    def refused() -> list[sa.Row[tuple[object, ...]]]:
        with net.engine(UZ).connect() as conn:
            return list(conn.execute(sa.select(q.reason, q.sender, q.envelope_id)).all())

    net.wait_for(lambda: bool(refused()), 60, "UZ to refuse the injection")
    [row] = refused()
    assert (row.reason, row.sender, row.envelope_id) == ("no_user_id", None, str(forged.id))
    assert str(forged.id) not in net.inbox_ids(UZ)
    listed = CliRunner().invoke(
        cli,
        ["quarantine", "list", "--home", str(net.home(UZ)), "--json"],
        env=net.environment(UZ),
        catch_exceptions=False,
    )
    [record] = json.loads(listed.stdout)
    assert (record["reason"], record["sender"]) == ("no_user_id", None)
    admin = pika.BlockingConnection(params)
    try:
        channel = admin.channel()
        copies: list[dict[str, object]] = []

        def copied() -> bool:
            method, properties, _ = channel.basic_get(quarantine_queue(UZ), auto_ack=True)
            if method is not None:
                copies.append(dict(properties.headers or {}))
            return bool(copies)

        net.wait_for(copied, 60, "the copy in UZ's broker quarantine")
    finally:
        admin.close()
    assert copies[0]["x-trm-reason"] == "no_user_id"
    net.start_adapter(KZ)
    honest = net.send(KZ, MessageKind.RETURN_REQUEST, to=[UZ], case=CASE)
    net.wait_for(lambda: str(honest.id) in net.inbox_ids(UZ), 60, "KZ's own send applied")
