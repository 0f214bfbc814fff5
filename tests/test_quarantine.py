"""The quarantine as an operator works it, over a real RabbitMQ: list what the broker
dead-lettered too, requeue once the cause is fixed, purge with a confirmation."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pika
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from broker.database import inbox_table, quarantine_table
from broker.directory import install_directory, parse_unverified, sign_directory
from broker.keys import load_authority
from broker.quarantine import BrokerQuarantine
from broker.topology import DELIVERY_LIMIT, inbox_queue, quarantine_queue, queue_depths
from broker.transport import AmqpSettings, Outgoing, Publisher
from schemas.base import MessageKind
from trm.cli import cli

pytestmark = pytest.mark.rabbitmq

KZ, UZ = "iom-kz", "iom-uz"
WAIT = 120  # only for a hung run: adapters start cold on a shared machine


def _trm(net, participant_id, args, input=None) -> Result:
    """`trm ARGS --home HOME` in-process with `participant_id`'s network environment."""
    return CliRunner().invoke(
        cli,
        [*args, "--home", str(net.home(participant_id))],
        env=net.environment(participant_id),
        input=input,
        catch_exceptions=False,
    )


def _listing(net, participant_id) -> list[dict[str, object]]:
    result = _trm(net, participant_id, ["quarantine", "list", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _admin(net, rabbitmq_urls) -> AmqpSettings:
    return AmqpSettings.from_url(rabbitmq_urls[0], vhost=net.vhost)


def _depth(net, rabbitmq_urls, queue: str) -> int:
    return queue_depths(_admin(net, rabbitmq_urls), [queue])[queue]


def _rows(net, participant_id):
    with net.engine(participant_id).connect() as conn:
        return conn.execute(sa.select(quarantine_table).order_by(quarantine_table.c.id)).all()


def _applied(net, participant_id, envelope_id: str):
    with net.engine(participant_id).connect() as conn:
        return conn.execute(
            sa.select(inbox_table).where(inbox_table.c.envelope_id == envelope_id)
        ).one_or_none()


def _dead_letter_at_the_limit(net, rabbitmq_urls, queue: str) -> None:
    """Return the queue's one message unacked until RabbitMQ dead-letters it at the limit."""
    params = pika.URLParameters(rabbitmq_urls[0])
    params.virtual_host = net.vhost
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        for _ in range(DELIVERY_LIMIT + 2):
            method, _properties, _body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                return
            channel.basic_nack(method.delivery_tag, requeue=True)
    finally:
        connection.close()
    raise AssertionError(f"{queue} still holds its message after {DELIVERY_LIMIT} deliveries")


def _install_directory(net, participant_id, drop: str | None, serial: int) -> None:
    """Install at `participant_id` a newly signed directory, without `drop` (and the NGOs
    it is the parent of) if given."""
    body = parse_unverified(net.directory_file.read_bytes())
    cards = tuple(c for c in body.participants if drop is None or drop not in (c.id, c.parent))
    signed = sign_directory(
        body.model_copy(
            update={"serial": serial, "issued_at": datetime.now(UTC), "participants": cards}
        ),
        load_authority(net.authority),
    )
    install_directory(signed, net.home(participant_id))


def test_a_broker_dead_letter_is_listed_and_requeued_into_the_inbox(local_network, rabbitmq_urls):
    """A message RabbitMQ moved to the quarantine at the delivery limit, which no local row
    records, is listed with its envelope, sender and "dead-lettered: delivery_limit", and a
    requeue has the adapter apply it once and leaves the broker quarantine empty."""
    net = local_network()
    sealed = net.send(KZ, MessageKind.RETURN_REQUEST, to=[UZ], case="iom-kz.KZ-DEAD-1")
    envelope_id = str(sealed.header.id)
    net.start_adapter(KZ)
    net.wait_for(lambda: net.outbox_pending(KZ) == 0, WAIT, "KZ's request to be published")
    net.wait_for(
        lambda: _depth(net, rabbitmq_urls, inbox_queue(UZ)) == 1, WAIT, "the request in UZ's inbox"
    )
    _dead_letter_at_the_limit(net, rabbitmq_urls, inbox_queue(UZ))
    net.wait_for(
        lambda: _depth(net, rabbitmq_urls, quarantine_queue(UZ)) == 1, WAIT, "the dead letter"
    )

    [record] = _listing(net, UZ)
    assert record["reason"] == "dead-lettered: delivery_limit"
    assert record["envelope_id"] == envelope_id
    assert record["sender"] == KZ
    assert record["in_database"] is False
    assert str(record["id"]).startswith("b-")
    text = _trm(net, UZ, ["quarantine", "list"])
    assert "dead-lettered: delivery_limit" in text.output

    net.start_adapter(UZ)
    result = _trm(net, UZ, ["quarantine", "requeue", str(record["id"])])
    assert result.exit_code == 0, result.output
    net.wait_for(lambda: _applied(net, UZ, envelope_id) is not None, WAIT, "the requeued request")
    assert len(net.delivered_files(UZ)) == 1
    assert _depth(net, rabbitmq_urls, quarantine_queue(UZ)) == 0
    assert _listing(net, UZ) == []


def test_requeue_after_the_cause_is_fixed_applies_once_then_absorbs_a_repeat(
    local_network, network_databases
):
    """An envelope refused because its sender was missing from the directory is refused again
    when requeued before the fix, applied exactly once when requeued after the directory is
    fixed, and absorbed as a duplicate when requeued once more."""
    net = local_network(database_urls=network_databases([KZ, UZ]))
    _install_directory(net, UZ, drop=KZ, serial=2)
    net.start_adapter(KZ)
    net.start_adapter(UZ)
    sealed = net.send(KZ, MessageKind.RETURN_REQUEST, to=[UZ], case="iom-kz.KZ-FIX-1")
    envelope_id = str(sealed.header.id)
    net.wait_for(lambda: len(_rows(net, UZ)) == 1, WAIT, "UZ to quarantine the request")
    [row] = _rows(net, UZ)
    assert (row.reason, row.envelope_id, row.sender) == ("unknown_sender", envelope_id, KZ)
    [record] = _listing(net, UZ)
    assert record["id"] == str(row.id) and record["in_database"] is True

    early = _trm(net, UZ, ["quarantine", "requeue", str(row.id)])
    assert early.exit_code == 0, early.output
    net.wait_for(lambda: _rows(net, UZ)[0].redeliveries == 1, WAIT, "the early requeue refused")
    [again] = _rows(net, UZ)
    assert again.requeued_at is None, "refused again, it is back in the quarantine"
    assert _applied(net, UZ, envelope_id) is None

    _install_directory(net, UZ, drop=None, serial=3)
    fixed = _trm(net, UZ, ["quarantine", "requeue", str(row.id)])
    assert fixed.exit_code == 0, fixed.output
    net.wait_for(lambda: _applied(net, UZ, envelope_id) is not None, WAIT, "the requeued request")
    [marked] = _rows(net, UZ)
    assert marked.requeued_at is not None and marked.redeliveries == 1
    assert _listing(net, UZ)[0]["requeued_at"] is not None
    assert len(net.delivered_files(UZ)) == 1

    repeat = _trm(net, UZ, ["quarantine", "requeue", str(row.id)])
    assert repeat.exit_code == 0, repeat.output
    net.wait_for(
        lambda: _applied(net, UZ, envelope_id).redeliveries == 1, WAIT, "the repeat absorbed"
    )
    assert len(net.delivered_files(UZ)) == 1
    assert len(_rows(net, UZ)) == 1


def test_requeue_of_an_unknown_record_is_refused(local_network):
    """Requeueing an id the quarantine does not hold fails with a reason and sends nothing."""
    net = local_network()
    result = CliRunner().invoke(
        cli,
        ["quarantine", "requeue", "b-000000000000", "--home", str(net.home(UZ))],
        env=net.environment(UZ),
    )
    assert result.exit_code != 0
    assert "no quarantine record b-000000000000" in result.output


def test_purge_asks_first_then_empties_the_table_and_the_broker_queue(
    local_network, network_databases, rabbitmq_urls
):
    """`trm quarantine purge` removes nothing when the operator says no, and with --yes
    deletes every local record and drains the broker quarantine."""
    net = local_network(database_urls=network_databases([KZ, UZ]))
    publisher = Publisher(net.settings(KZ).amqp_settings(), KZ)
    try:
        publisher.publish(
            [
                Outgoing("garbled-1", (UZ,), b"\x00garbled, not an envelope"),
                Outgoing("garbled-2", (UZ,), b"\x00garbled too"),
            ]
        )
    finally:
        publisher.close()
    net.start_adapter(UZ)
    net.wait_for(lambda: len(_rows(net, UZ)) == 2, WAIT, "two quarantine records")
    net.wait_for(
        lambda: _depth(net, rabbitmq_urls, quarantine_queue(UZ)) == 2, WAIT, "two broker copies"
    )

    refused = _trm(net, UZ, ["quarantine", "purge"], input="n\n")
    assert refused.exit_code != 0
    assert "Aborted" in refused.output
    unanswered = _trm(net, UZ, ["quarantine", "purge"])
    assert unanswered.exit_code != 0
    assert len(_rows(net, UZ)) == 2
    assert _depth(net, rabbitmq_urls, quarantine_queue(UZ)) == 2

    done = _trm(net, UZ, ["quarantine", "purge", "--yes"])
    assert done.exit_code == 0, done.output
    assert "purged 2 records and 2 broker messages" in done.output
    assert _rows(net, UZ) == []
    assert _depth(net, rabbitmq_urls, quarantine_queue(UZ)) == 0
    assert _listing(net, UZ) == []


def test_a_read_gives_every_message_back_before_the_next_read(local_network, rabbitmq_urls):
    """Reading the broker quarantine returns only once every message is back in the queue, so
    a read straight after it (the requeue after a listing, the removal after a requeue's
    read) finds them all: a quorum queue takes back a closed channel's messages on its own
    time, and a read that merely closed its channel left the next one an empty queue."""
    net = local_network()
    publisher = Publisher(net.settings(KZ).amqp_settings(), KZ)
    try:
        publisher.publish(
            [Outgoing(f"garbled-{n}", (UZ,), b"\x00garbled %d" % n) for n in range(3)]
        )
    finally:
        publisher.close()
    net.start_adapter(UZ)
    net.wait_for(
        lambda: _depth(net, rabbitmq_urls, quarantine_queue(UZ)) == 3, WAIT, "three broker copies"
    )
    quarantine = BrokerQuarantine(net.settings(UZ).amqp_settings(), UZ)
    watcher = pika.BlockingConnection(_admin(net, rabbitmq_urls).parameters())
    try:
        channel = watcher.channel()
        counts = []
        for _ in range(20):
            read = len(quarantine.messages())
            ready = channel.queue_declare(quarantine.queue, passive=True).method.message_count
            counts.append((read, ready))
    finally:
        watcher.close()
    assert counts == [(3, 3)] * 20
