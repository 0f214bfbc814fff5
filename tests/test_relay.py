"""The relay: publishes the outbox, marks rows sent only on confirm, never drops a row."""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from adapters.casesystem import FileCaseSystem
from broker.database import open_database, outbox_table
from broker.directory import Role
from broker.envelope import SealedEnvelope, seal
from broker.errors import BrokerUnavailable, ConfigError, PublishFailed, TransportError
from broker.inbox import Inbox, Outcome
from broker.management import ManagementClient
from broker.outbox import CommitWatch, Outbox, Relay
from broker.testing import MemoryBroker, Network, capture_logs, make_network
from broker.topology import inbox_queue, provision
from broker.transport import AmqpSettings, Consumer, Delivery, Publisher
from schemas.base import MessageKind
from schemas.examples import example, sharing_with

KZ, UZ, NGO = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod"
CASE = "iom-kz.KZ-2026-0042"
KEYS_FROM = datetime.now(UTC) - timedelta(days=1)


def send(outbox: Outbox, network: Network, recipients: tuple[str, ...] = (UZ,)) -> SealedEnvelope:
    """Seal a real message from KZ and put it in the outbox."""
    return outbox.send(
        lambda seq: seal(
            example(MessageKind.RETURN_ACCEPTED),
            case=CASE,
            sender=network.sender(KZ),
            recipients=recipients,
            directory=network.directory,
            seq=seq,
        ),
        sender=KZ,
        case=CASE,
    )


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Poll `condition` until it holds, failing the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        threading.Event().wait(0.01)


def test_run_once_publishes_and_marks_sent(engine: Engine, network: Network) -> None:
    """One pass publishes every pending envelope to its recipients and marks them sent."""
    outbox, broker = Outbox(engine), MemoryBroker()
    envelopes = [send(outbox, network, (UZ, NGO)) for _ in range(3)]
    relay = Relay(outbox, broker.publisher(KZ))
    assert relay.run_once() == 3
    assert outbox.pending() == []
    assert [m.envelope_id for m in broker.confirmed] == [str(e.id) for e in envelopes]
    delivered = broker.drain(UZ)
    assert [d.body for d in delivered] == [e.raw for e in envelopes]
    assert {d.user_id for d in delivered} == {KZ}
    assert broker.depth(NGO) == 3
    assert relay.run_once() == 0


def test_run_once_respects_batch(engine: Engine, network: Network) -> None:
    """A pass publishes at most `batch` envelopes, oldest first."""
    outbox, broker = Outbox(engine), MemoryBroker()
    envelopes = [send(outbox, network) for _ in range(5)]
    relay = Relay(outbox, broker.publisher(KZ), batch=2)
    assert relay.run_once() == 2
    assert [m.envelope_id for m in broker.confirmed] == [str(e.id) for e in envelopes[:2]]
    assert len(outbox.pending()) == 3


@pytest.mark.parametrize(
    "error",
    [BrokerUnavailable("connection refused"), PublishFailed("nacked by the broker")],
    ids=["unavailable", "nacked"],
)
def test_failure_keeps_rows_and_resends_same_envelopes(
    engine: Engine, network: Network, error: TransportError
) -> None:
    """An unconfirmed publish leaves rows pending; the next pass sends the same ids and bytes."""
    outbox, broker = Outbox(engine), MemoryBroker()
    envelopes = [send(outbox, network) for _ in range(2)]
    relay = Relay(outbox, broker.publisher(KZ))
    broker.fail_next(1, error)
    with pytest.raises(type(error)):
        relay.run_once()
    assert [m.envelope_id for m in outbox.pending()] == [str(e.id) for e in envelopes]
    status = outbox.status()
    assert status.sent == 0
    assert status.last_error is not None and error.reason in status.last_error
    assert relay.run_once() == 2
    assert [(m.envelope_id, m.body) for m in broker.confirmed] == [
        (str(e.id), e.raw) for e in envelopes
    ]
    with engine.connect() as conn:
        attempts = conn.execute(sa.select(outbox_table.c.attempts)).scalars().all()
    assert attempts == [2, 2]


def test_lost_confirm_means_a_duplicate_never_a_loss(engine: Engine, network: Network) -> None:
    """When the broker took a batch but the confirm was lost, the batch goes again, unchanged."""
    outbox, broker = Outbox(engine), MemoryBroker()
    envelope = send(outbox, network)
    relay = Relay(outbox, broker.publisher(KZ))
    broker.fail_next(1, after_delivery=True)
    with pytest.raises(BrokerUnavailable):
        relay.run_once()
    assert relay.run_once() == 1
    delivered = broker.drain(UZ)
    assert [d.body for d in delivered] == [envelope.raw, envelope.raw]
    assert {d.message_id for d in delivered} == {str(envelope.id)}


def test_no_row_dropped_under_random_failures(engine: Engine, network: Network) -> None:
    """With a third of publishes failing at random, every envelope is confirmed exactly once."""
    outbox, broker = Outbox(engine), MemoryBroker()
    envelopes = [send(outbox, network) for _ in range(60)]
    relay = Relay(outbox, broker.publisher(KZ), batch=7)
    chance = random.Random(20260301)
    failures = 0
    for _ in range(500):
        if not outbox.pending(1):
            break
        if chance.random() < 0.33:
            broker.fail_next(1, after_delivery=chance.random() < 0.5)
            failures += 1
        with contextlib.suppress(BrokerUnavailable):
            relay.run_once()
    assert failures > 0
    assert outbox.status().pending == 0
    assert outbox.status().sent == 60
    confirmed = [m.envelope_id for m in broker.confirmed]
    assert sorted(confirmed) == sorted(str(e.id) for e in envelopes)
    assert len(set(confirmed)) == len(confirmed)
    received = {d.message_id for d in broker.drain(UZ)}
    assert received == {str(e.id) for e in envelopes}


def test_run_backs_off_and_drains_when_the_broker_returns(engine: Engine, network: Network) -> None:
    """The running relay survives failing publishes and sends everything once they succeed."""
    outbox, broker = Outbox(engine), MemoryBroker()
    envelopes = [send(outbox, network) for _ in range(4)]
    broker.fail_next(3)
    relay = Relay(outbox, broker.publisher(KZ), batch=2, retry_delay=0.01, max_retry_delay=0.05)
    stop = threading.Event()
    with capture_logs() as logs:
        thread = threading.Thread(target=relay.run, args=(stop,))
        thread.start()
        try:
            wait_for(lambda: len(broker.confirmed) == 4)
        finally:
            stop.set()
            thread.join(timeout=10)
    assert not thread.is_alive()
    assert [m.envelope_id for m in broker.confirmed] == [str(e.id) for e in envelopes]
    retries = [e for e in logs if e["event"] == "relay.retrying"]
    assert len(retries) == 3
    assert all(e["reason"] == "broker_unavailable" for e in retries)


def test_run_picks_up_rows_from_another_process(engine: Engine, network: Network) -> None:
    """Rows written through another engine (as by `trm send`) go out without any wake-up."""
    broker = MemoryBroker()
    relay = Relay(Outbox(engine), broker.publisher(KZ))
    other = open_database(engine.url.render_as_string(hide_password=False))
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop, threading.Event()))
    thread.start()
    try:
        envelope = send(Outbox(other), network)
        wait_for(lambda: [m.envelope_id for m in broker.confirmed] == [str(envelope.id)])
    finally:
        stop.set()
        thread.join(timeout=10)
        other.dispose()
    assert not thread.is_alive()
    assert Outbox(engine).status().sent == 1


def test_wake_sends_promptly(engine: Engine, network: Network) -> None:
    """A local sender that sets `wake` has its envelope relayed by the running relay."""
    outbox, broker = Outbox(engine), MemoryBroker()
    relay = Relay(outbox, broker.publisher(KZ))
    stop, wake = threading.Event(), threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop, wake))
    thread.start()
    try:
        envelope = send(outbox, network)
        wake.set()
        wait_for(lambda: len(broker.confirmed) == 1)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert broker.confirmed[0].envelope_id == str(envelope.id)


def test_commit_watch_sees_a_commit_by_another_connection(engine: Engine, network: Network) -> None:
    """The watch says True once after another engine's outbox commit, and False while idle."""
    other = open_database(engine.url.render_as_string(hide_password=False))
    watch = CommitWatch(engine)
    try:
        assert watch.changed()  # the first look after connecting
        assert not watch.changed()
        send(Outbox(other), network)
        wait_for(watch.changed)
        assert not watch.changed()
    finally:
        watch.close()
        other.dispose()
    assert Outbox(engine).status().pending == 1


def test_bad_settings_are_refused(engine: Engine) -> None:
    """A relay with a zero batch or inverted delays is refused with ConfigError."""
    publisher = MemoryBroker().publisher(KZ)
    with pytest.raises(ConfigError):
        Relay(Outbox(engine), publisher, batch=0)
    with pytest.raises(ConfigError):
        Relay(Outbox(engine), publisher, retry_delay=1, max_retry_delay=0.5)


# --- against a real RabbitMQ ---------------------------------------------------------


def consume_until(
    settings: AmqpSettings, queue: str, inbox: Inbox, results: list[Outcome], count: int
) -> None:
    """Consume `queue` into `inbox` until `count` deliveries were handled."""
    consumer = Consumer(settings, queue)
    stop = threading.Event()

    def handle(delivery: Delivery) -> None:
        results.append(inbox.handle(delivery.body, delivery.user_id, delivery.redelivered).outcome)
        if len(results) >= count:
            stop.set()

    thread = threading.Thread(target=consumer.run, args=(handle, stop))
    thread.start()
    try:
        wait_for(lambda: len(results) >= count, timeout=30)
    finally:
        stop.set()
        thread.join(timeout=10)
        consumer.close()


def _shared(message, share_with):
    """An opening request's consent shared with `share_with`; other kinds as they are."""
    return sharing_with(message, share_with) if hasattr(message, "consent") else message


@pytest.mark.rabbitmq
def test_relay_and_inbox_through_rabbitmq(
    rabbitmq_urls: tuple[str, str], vhost: str, tmp_path: Path
) -> None:
    """Envelopes relayed with real confirms are applied once by UZ, whose receipts reach KZ."""
    suffix = uuid.uuid4().hex[:8]
    kz, uz = f"kz-{suffix}", f"uz-{suffix}"
    passwords = {kz: uuid.uuid4().hex, uz: uuid.uuid4().hex}
    provision(
        ManagementClient(rabbitmq_urls[1]),
        rabbitmq_urls[0],
        vhost,
        [(kz, "mission"), (uz, "mission")],
        passwords=passwords,
    )
    net = make_network(
        tmp_path / "keys",
        now=KEYS_FROM,
        participants=[(kz, Role.MISSION, "KZ", None), (uz, Role.MISSION, "UZ", None)],
    )

    def settings(pid: str) -> AmqpSettings:
        return AmqpSettings.from_url(
            rabbitmq_urls[0], vhost=vhost, username=pid, password=passwords[pid]
        )

    def inbox(engine: Engine, me: str) -> Inbox:
        return Inbox(
            engine,
            recipient=net.recipient(me),
            sender=lambda: net.sender(me),
            directory=lambda: net.directory,
            case_system=FileCaseSystem(tmp_path / me),
            outbox=Outbox(engine),
        )

    kz_db = open_database(f"sqlite:///{tmp_path / 'kz.db'}")
    uz_db = open_database(f"sqlite:///{tmp_path / 'uz.db'}")
    try:
        kz_outbox = Outbox(kz_db)
        case = f"{kz}.KZ-2026-0042"
        kinds = [MessageKind.RETURN_REQUEST] + [MessageKind.TRAVEL_ARRANGED] * 4
        envelopes = [
            kz_outbox.send(
                lambda seq, kind=kind: seal(
                    _shared(example(kind), [kz, uz]),
                    case=case,
                    sender=net.sender(kz),
                    recipients=[uz],
                    directory=net.directory,
                    seq=seq,
                ),
                sender=kz,
                case=case,
            )
            for kind in kinds
        ]
        assert Relay(kz_outbox, Publisher(settings(kz), kz)).run_once() == 5
        applied: list[Outcome] = []
        consume_until(settings(uz), inbox_queue(uz), inbox(uz_db, uz), applied, 5)
        assert applied == [Outcome.APPLIED] * 5
        assert Relay(Outbox(uz_db), Publisher(settings(uz), uz)).run_once() == 5
        receipts: list[Outcome] = []
        consume_until(settings(kz), inbox_queue(kz), inbox(kz_db, kz), receipts, 5)
        assert receipts == [Outcome.APPLIED] * 5
        status = kz_outbox.status()
        assert (status.sent, status.pending, status.receipts) == (5, 0, 5)
        assert sorted(p.stem for p in (tmp_path / uz).iterdir()) == sorted(
            str(e.id) for e in envelopes
        )
    finally:
        kz_db.dispose()
        uz_db.dispose()
