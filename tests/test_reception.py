"""Reception awareness: an envelope waits for every recipient's receipt, is resent (same id,
same bytes, only to the recipients still awaiting) with backoff, and is flagged after its tries."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from adapters.casesystem import FileCaseSystem
from broker.database import awaiting_receipts_table, inbox_table, open_database
from broker.directory import Role
from broker.envelope import SealedEnvelope, seal
from broker.errors import BrokerUnavailable, ConfigError
from broker.inbox import Inbox, Outcome
from broker.management import ManagementClient
from broker.outbox import Outbox, Relay
from broker.reception import ReceptionPolicy, awaiting
from broker.testing import MemoryBroker, Network, capture_logs, make_network
from broker.topology import inbox_queue, provision
from broker.transport import AmqpSettings, Consumer, Delivery, Publisher
from schemas.base import MessageKind
from schemas.control import DeliveryReceipt
from schemas.examples import example, sharing_with
from trm.cli import cli

KZ, UZ, NGO = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod"
CASE = "iom-kz.KZ-2026-0042"
AFTER = 10.0


class Clock:
    """A clock the test moves by hand, so that resends fall due without waiting."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def send(
    outbox: Outbox,
    network: Network,
    recipients: Sequence[str] = (UZ, NGO),
    *,
    sender: str = KZ,
    case: str = CASE,
) -> SealedEnvelope:
    """Seal a return request from `sender` to `recipients` and put it in `outbox`."""
    return outbox.send(
        lambda seq: seal(
            sharing_with(example(MessageKind.RETURN_REQUEST), [sender, *recipients]),
            case=case,
            sender=network.sender(sender),
            recipients=recipients,
            directory=network.directory,
            seq=seq,
        ),
        sender=sender,
        case=case,
    )


def receipt(network: Network, by: str, sealed: SealedEnvelope, to: str = KZ) -> SealedEnvelope:
    """`by`'s signed delivery receipt for `sealed`, as its inbox would seal it."""
    now = datetime.now(UTC)
    return seal(
        DeliveryReceipt(
            envelope_id=sealed.id, digest=sealed.digest, received_at=now, applied_at=now
        ),
        case=sealed.header.case,
        sender=network.sender(by),
        recipients=[to],
        directory=network.directory,
        seq=1,
        reply_to=sealed.id,
    )


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


def waits(engine: Engine) -> dict[tuple[str, str], sa.Row[tuple[object, ...]]]:
    """Every ``awaiting_receipts`` row by (envelope, recipient)."""
    with engine.connect() as conn:
        found = conn.execute(sa.select(awaiting_receipts_table)).all()
    return {(row.envelope_id, row.recipient): row for row in found}


def relay_on(
    engine: Engine, broker: MemoryBroker, clock: Clock, tries: int = 5
) -> tuple[Outbox, Relay]:
    outbox = Outbox(engine)
    relay = Relay(
        outbox,
        broker.publisher(KZ),
        reception=ReceptionPolicy(after=AFTER, tries=tries),
        clock=clock,
    )
    return outbox, relay


def test_confirmed_envelope_awaits_each_recipient_but_a_receipt_awaits_none(
    engine: Engine, network: Network
) -> None:
    """A confirmed envelope awaits one receipt per recipient, due `after` seconds on; a
    delivery receipt awaits none, and a relay without a policy (the routing service's) none."""
    clock = Clock()
    outbox, relay = relay_on(engine, MemoryBroker(), clock)
    sealed = send(outbox, network)
    answer = receipt(network, KZ, sealed, to=UZ)
    with engine.begin() as conn:
        outbox.add(conn, answer)
    assert relay.run_once() == 2
    found = waits(engine)
    assert set(found) == {(str(sealed.id), UZ), (str(sealed.id), NGO)}
    for row in found.values():
        assert (row.tries, row.flagged_at) == (1, None)
        assert row.next_resend_at == clock.now + timedelta(seconds=AFTER)
    assert Outbox(engine).status().awaiting == 2

    plain = Relay(outbox, MemoryBroker().publisher(KZ))
    later = send(outbox, network, case="iom-kz.KZ-2026-0043")
    assert plain.run_once() == 1
    assert not any(envelope_id == str(later.id) for envelope_id, _ in waits(engine))
    assert plain.resend_once() == 0


def test_receipts_clear_the_wait_per_recipient(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """A receipt recorded by the inbox ends that recipient's wait and no other's."""
    clock = Clock()
    outbox, relay = relay_on(engine, MemoryBroker(), clock)
    sealed = send(outbox, network)
    relay.run_once()
    kz_inbox = make_inbox(engine, network, KZ, tmp_path / "kz")
    assert kz_inbox.handle(receipt(network, NGO, sealed).raw, NGO).outcome is Outcome.APPLIED
    assert set(waits(engine)) == {(str(sealed.id), UZ)}
    assert [(w.envelope_id, w.recipient) for w in awaiting(engine)] == [(str(sealed.id), UZ)]
    assert kz_inbox.handle(receipt(network, UZ, sealed).raw, UZ).outcome is Outcome.APPLIED
    assert waits(engine) == {}
    assert awaiting(engine) == []
    status = Outbox(engine).status()
    assert (status.receipts, status.awaiting) == (2, 0)


def test_resend_goes_to_the_recipients_still_awaiting_with_the_same_bytes(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """Once due, the envelope is published again, same id and bytes, to UZ alone (the NGO
    answered), and UZ's next resend waits twice as long."""
    clock, broker = Clock(), MemoryBroker()
    outbox, relay = relay_on(engine, broker, clock)
    sealed = send(outbox, network)
    relay.run_once()
    broker.drain(UZ)  # the broker dropped UZ's copy
    broker.drain(NGO)
    make_inbox(engine, network, KZ, tmp_path / "kz").handle(receipt(network, NGO, sealed).raw, NGO)
    clock.advance(AFTER - 1)
    assert relay.resend_once() == 0
    assert broker.depth(UZ) == 0
    clock.advance(1)
    with capture_logs() as logs:
        assert relay.resend_once() == 1
    [again] = broker.drain(UZ)
    assert (again.message_id, again.body) == (str(sealed.id), sealed.raw)
    assert broker.depth(NGO) == 0
    assert broker.confirmed[-1].recipients == (UZ,)
    row = waits(engine)[(str(sealed.id), UZ)]
    assert row.tries == 2
    assert row.next_resend_at == clock.now + timedelta(seconds=2 * AFTER)
    assert [e["envelope_id"] for e in logs if e["event"] == "relay.resent"] == [str(sealed.id)]


def test_backoff_doubles_then_the_wait_is_flagged_logged_and_still_cleared_by_a_late_receipt(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """With 3 tries: resent after 10 s and 20 s more, flagged 40 s later (logged, counted,
    listed without a next resend), never resent again, and cleared by a late receipt."""
    clock, broker = Clock(), MemoryBroker()
    outbox, relay = relay_on(engine, broker, clock, tries=3)
    sealed = send(outbox, network, (UZ,))
    relay.run_once()
    for wait in (AFTER, 2 * AFTER):
        clock.advance(wait)
        assert relay.resend_once() == 1
    assert broker.depth(UZ) == 3
    clock.advance(4 * AFTER - 1)
    assert relay.resend_once() == 0
    clock.advance(1)
    with capture_logs() as logs:
        assert relay.resend_once() == 1
    assert broker.depth(UZ) == 3
    [flag] = [e for e in logs if e["event"] == "relay.flagged"]
    assert (flag["envelope_id"], flag["participant"], flag["tries"]) == (str(sealed.id), UZ, 3)
    [listed] = awaiting(engine)
    assert (listed.tries, listed.flagged_at, listed.next_resend_at) == (3, clock.now, None)
    assert Outbox(engine).status().flagged == 1
    clock.advance(1000 * AFTER)
    assert relay.resend_once() == 0
    make_inbox(engine, network, KZ, tmp_path / "kz").handle(receipt(network, UZ, sealed).raw, UZ)
    assert awaiting(engine) == []
    assert Outbox(engine).status().flagged == 0


def test_a_failed_resend_records_nothing_and_is_due_again(engine: Engine, network: Network) -> None:
    """An unconfirmed resend leaves the try uncounted; the next pass sends it."""
    clock, broker = Clock(), MemoryBroker()
    outbox, relay = relay_on(engine, broker, clock)
    sealed = send(outbox, network, (UZ,))
    relay.run_once()
    clock.advance(AFTER)
    broker.fail_next(1, BrokerUnavailable("down"))
    with pytest.raises(BrokerUnavailable):
        relay.resend_once()
    assert waits(engine)[(str(sealed.id), UZ)].tries == 1
    assert relay.resend_once() == 1
    assert waits(engine)[(str(sealed.id), UZ)].tries == 2


def _delivery(body: bytes, user: str, tag: int) -> Delivery:
    return Delivery(
        body=body, user_id=user, message_id=None, redelivered=False, headers={}, delivery_tag=tag
    )


def test_an_envelope_applied_before_sends_its_receipt_again(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """A copy of an applied envelope, known at once or found in a batch, queues the receipt
    already sent once more, same bytes, and applies nothing again; the receipt is not
    queued again before it was first sent."""
    kz_db = open_database(f"sqlite:///{tmp_path / 'kz.db'}")
    try:
        first, second = (
            send(Outbox(kz_db), network, (UZ,), case=f"iom-kz.KZ-2026-00{n}") for n in (42, 43)
        )
    finally:
        kz_db.dispose()
    uz = make_inbox(engine, network, UZ, tmp_path / "uz")
    assert uz.handle(first.raw, KZ).outcome is Outcome.APPLIED
    assert uz.handle(first.raw, KZ).outcome is Outcome.DUPLICATE
    [receipt_row] = Outbox(engine).pending()
    relay = Relay(Outbox(engine), MemoryBroker().publisher(UZ))
    assert relay.run_once() == 1

    assert uz.handle(first.raw, KZ).outcome is Outcome.DUPLICATE
    assert Outbox(engine).pending() == [receipt_row]
    assert relay.run_once() == 1

    outcomes = uz.handle_batch([_delivery(first.raw, KZ, 1), _delivery(second.raw, KZ, 2)])
    assert [r.outcome for r in outcomes] == [Outcome.DUPLICATE, Outcome.APPLIED]
    again, answer = Outbox(engine).pending()
    assert again == receipt_row
    assert answer.recipients == (KZ,)
    assert len(list((tmp_path / "uz").iterdir())) == 2


def test_the_policy_refuses_settings_that_cannot_work() -> None:
    """A wait that is not positive, or fewer than one try, is a ConfigError naming the flags."""
    for after, tries in ((0.0, 5), (-1.0, 5), (10.0, 0)):
        with pytest.raises(ConfigError, match="--resend-after"):
            ReceptionPolicy(after=after, tries=tries)
    assert ReceptionPolicy(after=1, tries=40).wait(40) == timedelta(days=1)


# --- against a real RabbitMQ ---------------------------------------------------------------


def _database(urls: dict[str, str], participant: str, tmp_path: Path) -> Engine:
    return open_database(urls.get(participant) or f"sqlite:///{tmp_path / participant}.db")


def _take(settings: AmqpSettings, queue: str, handle: Callable[[Delivery], None]) -> None:
    """Consume `queue` until one delivery was handled."""
    consumer = Consumer(settings, queue)
    stop = threading.Event()

    def once(delivery: Delivery) -> None:
        handle(delivery)
        stop.set()

    try:
        consumer.run(once, stop)
    finally:
        consumer.close()


@dataclass
class Rabbit:
    """KZ, UZ and an NGO under this run's names on a fresh vhost, each with a database and
    an inbox; KZ's relay resends on a clock the test moves."""

    amqp_url: str
    vhost: str
    network: Network
    ids: tuple[str, str, str]
    passwords: dict[str, str]
    engines: dict[str, Engine]
    inboxes: dict[str, Inbox]
    clock: Clock
    outcomes: list[Outcome] = field(default_factory=list)

    def settings(self, pid: str) -> AmqpSettings:
        return AmqpSettings.from_url(
            self.amqp_url, vhost=self.vhost, username=pid, password=self.passwords[pid]
        )

    def relay(self, pid: str) -> Relay:
        """`pid`'s relay; KZ's resends after `AFTER` seconds of the test's clock."""
        policy = ReceptionPolicy(after=AFTER, tries=5)
        return Relay(
            Outbox(self.engines[pid]),
            Publisher(self.settings(pid), pid),
            reception=policy if pid == self.ids[0] else None,
            clock=self.clock,
        )

    def take(self, pid: str, bodies: list[bytes] | None = None) -> None:
        """Consume one delivery from `pid`'s inbox queue into its inbox (keeping its bytes)."""

        def apply(delivery: Delivery) -> None:
            if bodies is not None:
                bodies.append(delivery.body)
            self.outcomes.append(self.inboxes[pid].handle(delivery.body, delivery.user_id).outcome)

        _take(self.settings(pid), inbox_queue(pid), apply)

    def depth(self, pid: str) -> int:
        return _admin(
            self.amqp_url,
            self.vhost,
            lambda ch: ch.queue_declare(inbox_queue(pid), passive=True).method.message_count,
        )

    def purge(self, pid: str) -> int:
        """Drop every message in `pid`'s inbox queue as the administrator; how many."""
        return _admin(
            self.amqp_url,
            self.vhost,
            lambda ch: ch.queue_purge(inbox_queue(pid)).method.message_count,
        )


def _admin(amqp_url: str, vhost: str, act: Callable[[Any], int]) -> int:
    params = pika.URLParameters(amqp_url)
    params.virtual_host = vhost
    connection = pika.BlockingConnection(params)
    try:
        return int(act(connection.channel()))
    finally:
        connection.close()


@pytest.fixture
def rabbit(
    rabbitmq_urls: tuple[str, str],
    vhost: str,
    network_databases: Callable[[Sequence[str]], dict[str, str]],
    tmp_path: Path,
) -> Iterator[Rabbit]:
    """See `Rabbit`; on SQLite and on PostgreSQL."""
    suffix = uuid.uuid4().hex[:8]
    kz, uz, ngo = f"kz-{suffix}", f"uz-{suffix}", f"ngo-{suffix}"
    ids = (kz, uz, ngo)
    passwords = {pid: uuid.uuid4().hex for pid in ids}
    provision(
        ManagementClient(rabbitmq_urls[1]),
        rabbitmq_urls[0],
        vhost,
        [(kz, "mission"), (uz, "mission"), (ngo, "ngo")],
        passwords=passwords,
    )
    net = make_network(
        tmp_path / "keys",
        now=datetime.now(UTC) - timedelta(days=1),
        participants=[
            (kz, Role.MISSION, "KZ", None),
            (uz, Role.MISSION, "UZ", None),
            (ngo, Role.NGO, "UZ", uz),
        ],
    )
    urls = network_databases(ids)
    engines = {pid: _database(urls, pid, tmp_path) for pid in ids}
    inboxes = {pid: make_inbox(engines[pid], net, pid, tmp_path / f"{pid}-cases") for pid in ids}
    try:
        yield Rabbit(rabbitmq_urls[0], vhost, net, ids, passwords, engines, inboxes, Clock())
    finally:
        for engine in engines.values():
            engine.dispose()


@pytest.mark.rabbitmq
def test_a_dropped_copy_is_resent_through_rabbitmq_to_that_recipient_alone(rabbit: Rabbit) -> None:
    """The broker drops UZ's copy of a request to UZ and the NGO; the NGO answers; the resend
    reaches UZ alone, byte for byte, UZ applies it once, and both receipts end the wait."""
    kz, uz, ngo = rabbit.ids
    relay = rabbit.relay(kz)
    sealed = send(relay.outbox, rabbit.network, (uz, ngo), sender=kz, case=f"{kz}.KZ-2026-0042")
    assert relay.run_once() == 1
    assert rabbit.purge(uz) == 1
    rabbit.take(ngo)
    assert rabbit.relay(ngo).run_once() == 1
    rabbit.take(kz)
    assert set(waits(rabbit.engines[kz])) == {(str(sealed.id), uz)}

    rabbit.clock.advance(AFTER)
    assert relay.resend_once() == 1
    bodies: list[bytes] = []
    rabbit.take(uz, bodies)
    assert bodies == [sealed.raw]
    assert rabbit.depth(ngo) == 0
    assert rabbit.relay(uz).run_once() == 1
    rabbit.take(kz)
    assert rabbit.outcomes == [Outcome.APPLIED] * 4
    assert waits(rabbit.engines[kz]) == {}
    with rabbit.engines[uz].connect() as conn:
        applied = conn.execute(sa.select(inbox_table.c.digest)).scalars().all()
    assert applied == [sealed.digest]


@pytest.mark.rabbitmq
def test_a_dropped_receipt_is_sent_again_when_the_envelope_comes_again(rabbit: Rabbit) -> None:
    """UZ applied the request but its receipt was dropped; KZ's resend is a duplicate at UZ,
    which publishes the same receipt again, and that receipt ends KZ's wait."""
    kz, uz, _ = rabbit.ids
    relay = rabbit.relay(kz)
    sealed = send(relay.outbox, rabbit.network, (uz,), sender=kz, case=f"{kz}.KZ-2026-0042")
    assert relay.run_once() == 1
    rabbit.take(uz)
    [receipt_row] = Outbox(rabbit.engines[uz]).pending()
    assert rabbit.relay(uz).run_once() == 1
    assert rabbit.purge(kz) == 1
    assert set(waits(rabbit.engines[kz])) == {(str(sealed.id), uz)}

    rabbit.clock.advance(AFTER)
    assert relay.resend_once() == 1
    rabbit.take(uz)
    assert Outbox(rabbit.engines[uz]).pending() == [receipt_row]
    assert rabbit.relay(uz).run_once() == 1
    bodies: list[bytes] = []
    rabbit.take(kz, bodies)
    assert bodies == [receipt_row.body]
    assert rabbit.outcomes == [Outcome.APPLIED, Outcome.DUPLICATE, Outcome.APPLIED]
    assert waits(rabbit.engines[kz]) == {}


@pytest.mark.rabbitmq
def test_adapters_flag_an_unanswered_envelope_then_a_late_recipient_clears_it(
    local_network: Callable[..., Any],
    network_databases: Callable[[Sequence[str]], dict[str, str]],
) -> None:
    """KZ's adapter resends a request to a UZ whose adapter is down until it is flagged and
    shown by `trm outbox status --json`; UZ then applies one copy, absorbs the resends as
    duplicates, and its receipt clears the wait."""
    net = local_network(database_urls=network_databases([KZ, UZ, NGO]))
    tries = 3
    net.start_adapter(KZ, env={"TRM_RESEND_AFTER_SECONDS": "0.2", "TRM_RESEND_TRIES": str(tries)})
    sealed = net.send(KZ, MessageKind.RETURN_REQUEST, to=[UZ], case=CASE)

    def status(*flags: str) -> Any:
        result = CliRunner().invoke(
            cli,
            ["outbox", "status", "--home", str(net.home(KZ)), *flags],
            env=net.environment(KZ),
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout) if flags else result.stdout

    def flagged() -> bool:
        return status("--json")["flagged"] == 1

    net.wait_for(flagged, 60, "the wait for UZ's receipt flagged")
    shown = status("--json")
    assert shown["awaiting"] == 1
    [envelope] = shown["awaiting_receipts"]
    assert (envelope["envelope_id"], envelope["kind"]) == (str(sealed.id), "return_request")
    [wait] = envelope["recipients"]
    assert (wait["recipient"], wait["tries"], wait["next_resend_at"]) == (UZ, tries, None)
    assert wait["flagged_at"] is not None
    [line] = [text for text in status().splitlines() if text.strip().startswith(UZ)]
    assert f"tries {tries}" in line
    assert f"FLAGGED since {wait['flagged_at']}" in line

    net.start_adapter(UZ)
    net.wait_for(lambda: status("--json")["awaiting"] == 0, 60, "UZ's receipt clearing the wait")
    with net.engine(UZ).connect() as conn:
        [row] = conn.execute(sa.select(inbox_table)).all()
    assert (row.envelope_id, row.digest, row.redeliveries) == (
        str(sealed.id),
        sealed.digest,
        tries - 1,
    )
    assert status("--json")["awaiting_receipts"] == []
