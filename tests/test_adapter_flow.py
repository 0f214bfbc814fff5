"""The participant adapter over a real RabbitMQ: the return story, access control, poison,
and clear errors from the commands."""

from __future__ import annotations

import json
import threading

import pika
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from broker.database import outbox_table, quarantine_table, receipts_table
from broker.envelope import seal
from broker.errors import AccessRefused
from broker.keys import load_keys
from broker.topology import inbox_queue, quarantine_queue
from broker.transport import Consumer, Outgoing, Publisher
from schemas.base import MessageKind
from schemas.examples import example, example_payload_bytes
from trm.cli import cli

pytestmark = pytest.mark.rabbitmq

KZ, UZ, NGO = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod"
CASE = "iom-kz.KZ-2026-0042"


def _trm(net, participant_id, args, env=None):
    """Run a trm command in-process with `participant_id`'s network environment."""
    environment = net.environment(participant_id, env)
    return CliRunner().invoke(cli, args, env=environment, catch_exceptions=False)


def _rows(net, participant_id, statement):
    with net.engine(participant_id).connect() as conn:
        return conn.execute(statement).all()


def _quarantine_messages(net, rabbitmq_urls, participant_id):
    """(body, headers) of every message in `participant_id`'s broker quarantine, read as admin."""
    params = pika.URLParameters(rabbitmq_urls[0])
    params.virtual_host = net.vhost
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        found = []
        while True:
            method, properties, body = channel.basic_get(quarantine_queue(participant_id))
            if method is None:
                return found
            found.append((body, dict(properties.headers or {})))
    finally:
        connection.close()


def test_return_story_reaches_everyone_with_receipts(local_network, network_databases, tmp_path):
    """KZ's request to UZ and the NGO (one envelope) is decrypted by both, the NGO's `trm ack`
    reaches both missions, and every sender gets a delivery receipt from every recipient."""
    net = local_network(database_urls=network_databases([KZ, UZ, NGO]))
    for participant_id in (KZ, UZ, NGO):
        net.start_adapter(participant_id)
    payload = tmp_path / "request.json"
    payload.write_bytes(example_payload_bytes(MessageKind.RETURN_REQUEST))
    home = str(net.home(KZ))
    sent = _trm(
        net,
        KZ,
        [
            "send",
            "return_request",
            "--home",
            home,
            "--to",
            f"{UZ},{NGO}",
            "--case",
            CASE,
            "--payload",
            str(payload),
        ],
    )
    assert sent.exit_code == 0, sent.output
    request_id = sent.stdout.strip()
    outbox_rows = _rows(net, KZ, sa.select(outbox_table.c.recipients))
    assert [r.recipients for r in outbox_rows] == [f"{UZ} {NGO}"]
    for reader in (UZ, NGO):
        net.wait_for(
            lambda r=reader: request_id in net.inbox_ids(r), 30, f"the request at {reader}"
        )
        [file] = net.delivered_files(reader)
        document = json.loads(file.read_text())
        assert document["payload"] == example(MessageKind.RETURN_REQUEST).model_dump(mode="json")
        assert document["recipients"] == [UZ, NGO]

    acked = _trm(
        net,
        NGO,
        [
            "ack",
            "--home",
            str(net.home(NGO)),
            "--case",
            CASE,
            "--json",
            "--place",
            "Tashkent airport",
        ],
    )
    assert acked.exit_code == 0, acked.output
    header = json.loads(acked.stdout)
    assert sorted(header["recipients"]) == [KZ, UZ]
    assert header["reply_to"] == request_id
    for mission in (KZ, UZ):
        net.wait_for(
            lambda m=mission: header["id"] in net.inbox_ids(m), 30, f"the ack at {mission}"
        )

    def receipts(participant_id):
        return {
            tuple(r)
            for r in _rows(
                net,
                participant_id,
                sa.select(receipts_table.c.envelope_id, receipts_table.c.recipient),
            )
        }

    net.wait_for(lambda: len(receipts(KZ)) == 2 and len(receipts(NGO)) == 2, 30, "receipts")
    assert receipts(KZ) == {(request_id, UZ), (request_id, NGO)}
    assert receipts(NGO) == {(header["id"], KZ), (header["id"], UZ)}
    status = _trm(net, KZ, ["outbox", "status", "--home", home, "--json"])
    assert json.loads(status.stdout)["receipts"] == 2


def test_reading_another_participants_queue_is_refused(local_network):
    """RabbitMQ refuses iom-kz reading iom-uz's inbox queue."""
    net = local_network()
    settings = net.settings(KZ).amqp_settings()
    consumer = Consumer(settings, inbox_queue(UZ))
    with pytest.raises(AccessRefused, match="refused"):
        consumer.run(lambda _d: None, threading.Event())
    consumer.close()


def test_publishing_with_another_user_id_is_refused(local_network):
    """RabbitMQ refuses iom-kz publishing a message whose user_id says iom-uz."""
    net = local_network()
    impostor = Publisher(net.settings(KZ).amqp_settings(), UZ)
    try:
        with pytest.raises(AccessRefused, match="user_id"):
            impostor.publish([Outgoing("x", (NGO,), b"not an envelope")], timeout=10)
    finally:
        impostor.close()


def test_envelope_signed_by_another_than_the_publisher_is_quarantined(local_network, rabbitmq_urls):
    """An envelope signed by iom-kz but published by iom-uz is quarantined as sender_mismatch."""
    net = local_network()
    home = net.settings(KZ)
    sealed = seal(
        example(MessageKind.RETURN_REQUEST),
        case=CASE,
        sender=load_keys(net.home(KZ)).sender(),
        recipients=(NGO,),
        directory=home.directory(),
        seq=1,
    )
    net.start_adapter(NGO)
    publisher = Publisher(net.settings(UZ).amqp_settings(), UZ)
    try:
        publisher.publish([Outgoing(str(sealed.id), (NGO,), sealed.raw)])
    finally:
        publisher.close()
    reasons = lambda: [r.reason for r in _rows(net, NGO, sa.select(quarantine_table.c.reason))]  # noqa: E731
    net.wait_for(lambda: reasons() == ["sender_mismatch"], 30, "the quarantine record")
    found = []
    net.wait_for(
        lambda: len(found.extend(_quarantine_messages(net, rabbitmq_urls, NGO)) or found) == 1,
        20,
        "the message in the broker quarantine",
    )
    assert [h["x-trm-reason"] for _b, h in found] == ["sender_mismatch"]
    assert net.inbox_ids(NGO) == set()
    assert net.delivered_files(NGO) == []


def test_poison_is_quarantined_on_first_delivery_and_never_blocks(
    local_network, network_databases, rabbitmq_urls
):
    """Garbled and forged messages on iom-uz's queue are quarantined at once with their reason
    (database row and broker quarantine header) and the valid messages behind them apply."""
    net = local_network(database_urls=network_databases([KZ, UZ]))
    forged = bytearray(
        net.send(KZ, MessageKind.RETURN_REQUEST, to=[UZ], case="iom-kz.KZ-POISON-1").raw
    )
    forged[-1] ^= 0x01
    with net.engine(KZ).begin() as conn:
        conn.execute(outbox_table.delete())
    publisher = Publisher(net.settings(KZ).amqp_settings(), KZ)
    try:
        publisher.publish(
            [
                Outgoing("garbled", (UZ,), b"\x00garbled, not an envelope"),
                Outgoing("forged", (UZ,), bytes(forged)),
            ]
        )
    finally:
        publisher.close()
    valid = [
        str(net.send(KZ, MessageKind.RETURN_REQUEST, to=[UZ], case=f"iom-kz.KZ-POISON-OK-{i}").id)
        for i in range(5)
    ]
    net.start_adapter(KZ)
    net.start_adapter(UZ)
    # Deadlines only for a hung run: two adapters start cold on a shared machine.
    net.wait_for(lambda: set(valid) <= net.inbox_ids(UZ), 120, "the valid messages")
    rows = _rows(net, UZ, sa.select(quarantine_table.c.reason, quarantine_table.c.redeliveries))
    assert sorted(r.reason for r in rows) == ["bad_signature", "malformed"]
    assert all(r.redeliveries == 0 for r in rows)
    found: list[tuple[bytes, dict[str, object]]] = []

    def both_in_the_quarantine() -> bool:
        # Each read leaves the messages there (unacked, requeued), so it sees them all.
        found[:] = _quarantine_messages(net, rabbitmq_urls, UZ)
        return len(found) == 2

    net.wait_for(both_in_the_quarantine, 120, "two messages in the broker quarantine")
    assert sorted(h["x-trm-reason"] for _b, h in found) == ["bad_signature", "malformed"]
    listing = _trm(net, UZ, ["quarantine", "list", "--home", str(net.home(UZ)), "--json"])
    records = json.loads(listing.stdout)
    assert len(records) == 2
    shown = _trm(
        net, UZ, ["quarantine", "show", str(records[0]["id"]), "--home", str(net.home(UZ))]
    )
    assert shown.exit_code == 0 and "reason:" in shown.output and "UNVERIFIED" in shown.output


def test_bad_command_input_is_refused_with_nothing_queued(local_network, tmp_path):
    """Unknown kind, a payload off its schema, an unknown recipient and a missing password
    file each end with a clear error, and nothing is queued."""
    net = local_network()
    home = str(net.home(KZ))
    good = tmp_path / "good.json"
    good.write_bytes(example_payload_bytes(MessageKind.RETURN_REQUEST))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"person": "not a person"}))
    cases = [
        (
            [
                "send",
                "return_flight",
                "--home",
                home,
                "--to",
                UZ,
                "--case",
                CASE,
                "--payload",
                str(good),
            ],
            "unknown message kind",
        ),
        (
            [
                "send",
                "return_request",
                "--home",
                home,
                "--to",
                UZ,
                "--case",
                CASE,
                "--payload",
                str(bad),
            ],
            "schema_violation",
        ),
        (
            [
                "send",
                "return_request",
                "--home",
                home,
                "--to",
                "iom-xx",
                "--case",
                CASE,
                "--payload",
                str(good),
            ],
            "not in the directory",
        ),
        (["ack", "--home", str(net.home(NGO)), "--case", "iom-kz.KZ-UNKNOWN-1"], "unknown here"),
    ]
    for args, expected in cases:
        result = _trm(net, KZ, args)
        assert result.exit_code != 0
        assert expected in result.output, result.output
    assert net.outbox_pending(KZ) == 0
    (net.home(UZ) / "amqp-password").unlink()
    result = _trm(net, UZ, ["adapter", "run", "--home", str(net.home(UZ))])
    assert result.exit_code != 0
    assert "TRM_AMQP_PASSWORD_FILE" in result.output


def test_health_passes_and_names_a_failed_login(local_network):
    """`trm health` exits 0 on a working home and 1, naming the broker, on a wrong password."""
    net = local_network()
    home = str(net.home(KZ))
    ok = _trm(net, KZ, ["health", "--home", home])
    assert ok.exit_code == 0, ok.output
    (net.home(KZ) / "amqp-password").write_text("wrong\n")
    failed = _trm(net, KZ, ["health", "--home", home, "--json"])
    assert failed.exit_code == 1
    checks = {c["check"]: c["ok"] for c in json.loads(failed.stdout)}
    assert checks == {
        "keys": True,
        "directory": True,
        "database": True,
        "broker": False,
        "adapter": True,
    }
