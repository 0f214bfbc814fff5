"""The outbox: transactional writes, per-case sequence numbers, pending order, status."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from broker.database import outbox_table
from broker.envelope import SealedEnvelope, seal
from broker.errors import KeyNotValid, StorageError
from broker.outbox import Outbox
from broker.testing import Network
from schemas.base import MessageKind
from schemas.examples import EXAMPLE_PERSON_NAME, example

KZ, UZ, NGO = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod"
CASE = "iom-kz.KZ-2026-0042"


def sealed(network: Network, seq: int, *, sender: str = KZ, case: str = CASE) -> SealedEnvelope:
    """A real return request sealed by `sender` for UZ and the NGO."""
    return seal(
        example(MessageKind.RETURN_REQUEST),
        case=case,
        sender=network.sender(sender),
        recipients=[UZ, NGO],
        directory=network.directory,
        seq=seq,
    )


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(outbox_table)).scalar_one())


def run_together(worker: Callable[[], None], threads: int) -> None:
    """Run `worker` on `threads` threads at once and wait for all of them."""
    started = [threading.Thread(target=worker) for _ in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()


def test_rolled_back_transaction_leaves_nothing(engine: Engine, network: Network) -> None:
    """An add inside a transaction that rolls back stores no envelope and uses no number."""
    outbox = Outbox(engine)
    with engine.connect() as conn:
        transaction = conn.begin()
        seq = outbox.next_seq(conn, KZ, CASE)
        outbox.add(conn, sealed(network, seq))
        transaction.rollback()
    assert outbox.pending() == []
    assert count(engine) == 0
    with engine.begin() as conn:
        assert outbox.next_seq(conn, KZ, CASE) == 1


def test_send_stores_nothing_when_sealing_fails(engine: Engine) -> None:
    """If sealing raises inside send, the outbox and the sequence are untouched."""
    outbox = Outbox(engine)

    def refuse(seq: int) -> SealedEnvelope:
        raise KeyNotValid("no signing key valid now")

    with pytest.raises(KeyNotValid):
        outbox.send(refuse, sender=KZ, case=CASE)
    assert count(engine) == 0
    with engine.begin() as conn:
        assert outbox.next_seq(conn, KZ, CASE) == 1


def test_sequence_per_sender_and_case(engine: Engine) -> None:
    """Sequence numbers count from 1 separately for each (sender, case)."""
    outbox = Outbox(engine)
    with engine.begin() as conn:
        kz_a = [outbox.next_seq(conn, KZ, CASE) for _ in range(3)]
        kz_b = outbox.next_seq(conn, KZ, "iom-kz.KZ-2026-0043")
        uz_a = outbox.next_seq(conn, UZ, CASE)
    with engine.begin() as conn:
        again = outbox.next_seq(conn, KZ, CASE)
    assert kz_a == [1, 2, 3]
    assert (kz_b, uz_a, again) == (1, 1, 4)


def test_reserve_seqs_takes_a_run_per_case(engine: Engine) -> None:
    """reserve_seqs takes consecutive numbers per case in one go and next_seq continues after."""
    outbox = Outbox(engine)
    with engine.begin() as conn:
        assert outbox.next_seq(conn, KZ, CASE) == 1
        firsts = outbox.reserve_seqs(conn, KZ, {CASE: 3, "iom-kz.KZ-2026-0043": 2})
        assert outbox.reserve_seqs(conn, KZ, {}) == {}
    assert firsts == {CASE: 2, "iom-kz.KZ-2026-0043": 1}
    with engine.begin() as conn:
        after = (outbox.next_seq(conn, KZ, CASE), outbox.next_seq(conn, KZ, "iom-kz.KZ-2026-0043"))
        other = outbox.reserve_seqs(conn, UZ, {CASE: 2})
    assert after == (5, 3)
    assert other == {CASE: 1}


def test_concurrent_reservations_never_share_a_number(engine: Engine) -> None:
    """Four threads reserving runs on the same two cases get disjoint runs covering 1..n."""
    outbox = Outbox(engine)
    taken: dict[str, list[int]] = {CASE: [], "iom-kz.KZ-2026-0043": []}
    errors: list[BaseException] = []
    counts = {CASE: 3, "iom-kz.KZ-2026-0043": 2}

    def worker() -> None:
        try:
            for _ in range(5):
                with engine.begin() as conn:
                    firsts = outbox.reserve_seqs(conn, KZ, counts)
                for case, first in firsts.items():
                    taken[case].extend(range(first, first + counts[case]))
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    run_together(worker, 4)
    assert errors == []
    assert sorted(taken[CASE]) == list(range(1, 61))
    assert sorted(taken["iom-kz.KZ-2026-0043"]) == list(range(1, 41))


def test_send_uses_the_next_number(engine: Engine, network: Network) -> None:
    """send seals with consecutive numbers and stores each envelope pending."""
    outbox = Outbox(engine)
    first = outbox.send(lambda seq: sealed(network, seq), sender=KZ, case=CASE)
    second = outbox.send(lambda seq: sealed(network, seq), sender=KZ, case=CASE)
    assert (first.header.seq, second.header.seq) == (1, 2)
    pending = outbox.pending()
    assert [m.envelope_id for m in pending] == [str(first.id), str(second.id)]
    assert pending[0].body == first.raw
    assert pending[0].recipients == (UZ, NGO)


def test_concurrent_senders_never_share_a_number(engine: Engine, network: Network) -> None:
    """Four threads sending on one case at once get 40 distinct consecutive numbers."""
    outbox = Outbox(engine)
    seqs: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(10):
                s = outbox.send(lambda seq: sealed(network, seq), sender=KZ, case=CASE)
                seqs.append(s.header.seq)
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    run_together(worker, 4)
    assert errors == []
    assert sorted(seqs) == list(range(1, 41))
    assert count(engine) == 40


def test_pending_oldest_first_with_limit(engine: Engine, network: Network) -> None:
    """pending returns unsent envelopes by the time they were written, up to the limit."""
    outbox = Outbox(engine)
    base = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    envelopes = [sealed(network, seq) for seq in (1, 2, 3)]
    with engine.begin() as conn:
        for envelope, minutes in zip(envelopes, (2, 0, 1), strict=True):
            outbox.add(conn, envelope, now=base + timedelta(minutes=minutes))
    ids = [str(e.id) for e in envelopes]
    assert [m.envelope_id for m in outbox.pending()] == [ids[1], ids[2], ids[0]]
    assert [m.envelope_id for m in outbox.pending(limit=2)] == [ids[1], ids[2]]
    outbox.mark_sent([ids[1]])
    assert [m.envelope_id for m in outbox.pending()] == [ids[2], ids[0]]


def test_status_counts(engine: Engine, network: Network) -> None:
    """status reports pending and sent counts, the oldest pending time and its last error."""
    outbox = Outbox(engine)
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    envelopes = [sealed(network, seq) for seq in (1, 2, 3)]
    with engine.begin() as conn:
        for i, envelope in enumerate(envelopes):
            outbox.add(conn, envelope, now=at + timedelta(seconds=i))
    empty = Outbox(engine).status()
    assert (empty.pending, empty.sent, empty.oldest_pending) == (3, 0, at)
    outbox.mark_sent([str(envelopes[0].id)])
    outbox.record_failure([str(e.id) for e in envelopes], "broker_unavailable: down")
    status = outbox.status()
    assert (status.pending, status.sent, status.receipts) == (2, 1, 0)
    assert status.oldest_pending == at + timedelta(seconds=1)
    assert status.last_error == "broker_unavailable: down"


def test_mark_sent_is_idempotent(engine: Engine, network: Network) -> None:
    """Marking an envelope sent twice keeps its first confirm time."""
    outbox = Outbox(engine)
    envelope = outbox.send(lambda seq: sealed(network, seq), sender=KZ, case=CASE)
    first = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    outbox.mark_sent([str(envelope.id)], at=first)
    outbox.mark_sent([str(envelope.id)], at=first + timedelta(hours=1))
    with engine.connect() as conn:
        assert conn.execute(sa.select(outbox_table.c.sent_at)).scalar_one() == first


def test_add_many_mark_sent_and_failures_for_a_window(engine: Engine, network: Network) -> None:
    """A window added at once is pending in order; failures count on each, confirms mark each."""
    outbox = Outbox(engine)
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    envelopes = [sealed(network, seq) for seq in range(1, 6)]
    with engine.begin() as conn:
        outbox.add_many(conn, [(e, at + timedelta(seconds=i)) for i, e in enumerate(envelopes)])
    ids = [str(e.id) for e in envelopes]
    assert [m.envelope_id for m in outbox.pending()] == ids
    outbox.record_failure(ids[:3], "broker_unavailable: down")
    outbox.mark_sent(ids[:4], at=at)
    outbox.mark_sent([])
    assert [m.envelope_id for m in outbox.pending()] == ids[4:]
    with engine.connect() as conn:
        found = conn.execute(sa.select(outbox_table.c.envelope_id, outbox_table.c.attempts))
        attempts = {row.envelope_id: row.attempts for row in found}
    assert [attempts[i] for i in ids] == [2, 2, 2, 1, 0]


def test_same_envelope_twice_is_refused(engine: Engine, network: Network) -> None:
    """Adding an envelope id already in the outbox raises StorageError and keeps the first."""
    outbox = Outbox(engine)
    envelope = sealed(network, 1)
    with engine.begin() as conn:
        outbox.add(conn, envelope)
    with pytest.raises(StorageError, match="storing envelope"), engine.begin() as conn:
        outbox.add(conn, envelope)
    assert [m.body for m in outbox.pending()] == [envelope.raw]


def test_body_is_stored_sealed(engine: Engine, network: Network) -> None:
    """The outbox holds the sealed bytes: the person's name appears nowhere in the row."""
    outbox = Outbox(engine)
    envelope = outbox.send(lambda seq: sealed(network, seq), sender=KZ, case=CASE)
    with engine.connect() as conn:
        row = conn.execute(sa.select(outbox_table)).one()
    assert row.body == envelope.raw
    name = EXAMPLE_PERSON_NAME.encode()
    assert all(name not in str(value).encode() for value in row._mapping.values())
    assert name not in row.body
