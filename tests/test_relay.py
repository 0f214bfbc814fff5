"""The relay: publishes the outbox, marks rows sent only on confirm, never drops a row."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from broker.database import open_database, outbox_table
from broker.envelope import SealedEnvelope, seal
from broker.errors import BrokerUnavailable, ConfigError, PublishFailed, TransportError
from broker.outbox import Outbox, Relay
from broker.testing import MemoryBroker, Network, capture_logs, make_network
from schemas.base import MessageKind
from schemas.examples import example

KZ, UZ, NGO = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod"
CASE = "KZ-2026-0042"
KEYS_FROM = datetime.now(UTC) - timedelta(days=1)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Network:
    """Kazakhstan and Uzbekistan missions and an Uzbek NGO, with real keys."""
    return make_network(tmp_path_factory.mktemp("network"), now=KEYS_FROM)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated database, on SQLite and on PostgreSQL."""
    engine = open_database(database_url)
    yield engine
    engine.dispose()


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


def test_bad_settings_are_refused(engine: Engine) -> None:
    """A relay with a zero batch or inverted delays is refused with ConfigError."""
    publisher = MemoryBroker().publisher(KZ)
    with pytest.raises(ConfigError):
        Relay(Outbox(engine), publisher, batch=0)
    with pytest.raises(ConfigError):
        Relay(Outbox(engine), publisher, retry_delay=1, max_retry_delay=0.5)
