"""Faults on a real RabbitMQ: every message applied exactly once through broker restarts,
SIGKILLed consumers and relays, and a broker down at send time."""

from __future__ import annotations

import subprocess
import time

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from broker.database import inbox_table, outbox_table
from schemas.base import MessageKind
from schemas.examples import example_payload_bytes
from trm.cli import cli

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

KZ, UZ = "iom-kz", "iom-uz"
PAIR = (("iom-kz", "mission", "KZ", None), ("iom-uz", "mission", "UZ", None))


def _pair(local_network, network_databases):
    from broker.directory import Role

    participants = [(p, Role(r), c, parent) for p, r, c, parent in PAIR]
    return local_network(participants, database_urls=network_databases([KZ, UZ]))


def _send_many(net, count, prefix):
    """`count` messages on 20 cases of KZ's: each case's request, then departures."""
    return [
        str(net.send(KZ, _kind(i), to=[UZ], case=f"{prefix}-{i % 20:04d}").id) for i in range(count)
    ]


def _kind(i):
    return MessageKind.RETURN_REQUEST if i < 20 else MessageKind.DEPARTED


def _tally(net, sent):
    """Check every sent id is applied exactly once at UZ; the redeliveries it absorbed."""
    applied = net.inbox_ids(UZ)
    files = [p.stem for p in net.delivered_files(UZ)]
    lost = set(sent) - applied
    assert lost == set(), f"{len(lost)} lost"
    assert len(files) == len(set(files)) == len(sent)
    assert set(files) == set(sent) == applied
    with net.engine(UZ).connect() as conn:
        receipts = conn.execute(
            sa.select(sa.func.count()).where(outbox_table.c.kind == "delivery_receipt")
        ).scalar_one()
        redeliveries = conn.execute(sa.select(sa.func.sum(inbox_table.c.redeliveries))).scalar()
    assert receipts == len(sent), "one receipt per applied message, never a second"
    return int(redeliveries or 0)


def _rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@pytest.mark.exclusive
# On SQLite only: it runs alone, after the rest, so each minute here is a minute of make
# test; the restart is the broker's and the transport's, and PostgreSQL's deduplication
# through crashes is the subject of the kill tests below, which run on both.
@pytest.mark.parametrize("network_databases", ["sqlite"], indirect=True)
def test_broker_restart_in_a_run_of_1000_loses_nothing(local_network, network_databases):
    """1,000 messages with RabbitMQ stopped and started in the middle (and `trm send` called
    while it is down, on a case opened meanwhile): every one applied once, none lost, none
    applied twice."""
    net = _pair(local_network, network_databases)
    net.start_adapter(KZ)
    net.start_adapter(UZ)
    started = time.monotonic()
    sent = _send_many(net, 500, "iom-kz.KZ-RESTART")
    net.wait_for(lambda: len(net.inbox_ids(UZ)) >= 150, 60, "150 messages applied")
    payload = net.root / "departed.json"
    payload.write_bytes(example_payload_bytes(MessageKind.DEPARTED))
    try:
        _rabbitmqctl("stop_app")
        sent += _send_many(net, 499, "iom-kz.KZ-RESTARTED")
        result = CliRunner().invoke(
            cli,
            [
                "send",
                "departed",
                "--home",
                str(net.home(KZ)),
                "--to",
                UZ,
                "--case",
                "iom-kz.KZ-RESTARTED-0001",
                "--payload",
                str(payload),
            ],
            env=net.environment(KZ),
        )
        assert result.exit_code == 0, result.output
        sent.append(result.stdout.strip())
        assert net.outbox_pending(KZ) >= 1
    finally:
        _rabbitmqctl("start_app")
        _rabbitmqctl("await_startup")
    net.wait_for(lambda: set(sent) <= net.inbox_ids(UZ), 180, "all 1,000 applied")
    elapsed = time.monotonic() - started
    redeliveries = _tally(net, sent)
    print(
        f"restart: {len(sent)} messages in {elapsed:.1f} s "
        f"({len(sent) / elapsed:.0f}/s), {redeliveries} redeliveries absorbed"
    )


def _until_done(net, start, done, what, attempts=12):
    """Start a process with a fault schedule, restart it each time it dies, until `done`;
    how many times it was killed."""
    for attempt in range(attempts):
        proc = start(attempt)
        net.wait_for(lambda p=proc: p.poll() is not None or done(), 120, what)
        if done():
            net.stop(proc)
            return attempt
        assert proc.returncode == -9, f"exited with {proc.returncode}, not killed"
    raise AssertionError(f"{what}: still not done after {attempts} restarts")


def test_consumer_killed_between_commit_and_ack_applies_once(local_network, network_databases):
    """The receiving adapter SIGKILLed after commits and before acks: after restarts every
    message is applied once and the redeliveries are absorbed as duplicates."""
    net = _pair(local_network, network_databases)
    net.start_adapter(KZ)
    sent = _send_many(net, 200, "iom-kz.KZ-KILL-C")

    # The fault point fires once per applied batch (up to 100 deliveries), so the first
    # two runs die at their first commit for certain; later ones run to the end.
    def start(attempt):
        faults = {"TRM_FAULTS": "inbox.after_commit:1.0", "TRM_FAULT_SEED": f"c{attempt}"}
        return net.start_adapter(UZ, env=faults if attempt < 2 else {})

    kills = _until_done(net, start, lambda: set(sent) <= net.inbox_ids(UZ), "all applied")
    redeliveries = _tally(net, sent)
    assert kills == 2
    assert redeliveries >= kills, "each kill after a commit leaves a duplicate to absorb"
    print(f"consumer kills: {kills}, redeliveries absorbed: {redeliveries}")


def test_relay_killed_between_publish_and_confirm_resends_without_duplicates(
    local_network, network_databases
):
    """The sending adapter SIGKILLed after handing a batch to RabbitMQ and before its
    confirms: restarted, it sends the same envelopes again and each applies once."""
    net = _pair(local_network, network_databases)
    net.start_adapter(UZ)
    sent = _send_many(net, 200, "iom-kz.KZ-KILL-R")
    schedule = ["1.0", "0.5", "0.5"]

    def start(attempt):
        if attempt < len(schedule):
            env = {
                "TRM_FAULTS": f"relay.after_publish:{schedule[attempt]}",
                "TRM_FAULT_SEED": f"r{attempt}",
            }
        else:
            env = {}
        return net.start_adapter(KZ, env=env)

    kills = _until_done(net, start, lambda: net.outbox_pending(KZ) == 0, "the outbox drained")
    net.wait_for(lambda: set(sent) <= net.inbox_ids(UZ), 60, "all applied")
    redeliveries = _tally(net, sent)
    assert kills >= 1
    print(f"relay kills (resends): {kills}, redeliveries absorbed: {redeliveries}")
