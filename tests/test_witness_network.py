"""Witnesses over the real RabbitMQ: `trm witness run`, the routing service, forks and faults."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.directory import load_home_directory
from broker.keys import load_keys
from broker.topology import WITNESS_EXCHANGE, witness_queue
from broker.transport import AmqpSettings, Outgoing, Publisher, open_connection
from services.auditlog import AuditLog, key_name_for
from services.checkpoint import Checkpoint, origin_for, sign_checkpoint
from services.cosignature import check_cosignatures
from services.witness import format_request
from trm.localnet import LocalNetwork

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

KZ, UZ, NGO, ROUTING = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod", "routing"
TIMEOUT = 60.0


def witnessed_network(local_network: Callable[..., Any]) -> LocalNetwork:
    """The demo's participants, both missions witnesses with a quorum of 2."""
    net: LocalNetwork = local_network(witnesses=(KZ, UZ), quorum=2)
    return net


def settings_of(net: LocalNetwork, participant: str) -> AmqpSettings:
    return net.settings(participant).amqp_settings()


def start_witness(net: LocalNetwork, who: str) -> subprocess.Popen[bytes]:
    home = str(net.home(who))
    return net.start_process(
        ["witness", "run", "--home", home, "--database-url", net.database_url(who)],
        f"witness-{who}",
    )


def start_routing(net: LocalNetwork, url: str | None = None) -> subprocess.Popen[bytes]:
    args = ["routing", "run", "--home", str(net.home(ROUTING)), "--checkpoint-interval", "0.2"]
    args += ["--database-url", url or net.database_url(ROUTING)]
    return net.start_process(args, "routing")


def publish_junk(net: LocalNetwork, count: int, tag: str) -> None:
    """Bytes the routing service logs as rejected: the log grows without any case."""
    publisher = Publisher(settings_of(net, NGO), NGO)
    try:
        publisher.publish(
            [
                Outgoing(f"{tag}-{n}", (UZ,), f"{tag}-{n}-{uuid.uuid4()}".encode())
                for n in range(count)
            ]
        )
    finally:
        publisher.close()


def trm(net: LocalNetwork, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m trm ARGS`` on the network, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "trm", *args],
        capture_output=True,
        text=True,
        check=False,
        env=net.environment(ROUTING),
    )


def witness_status(net: LocalNetwork, who: str, *flags: str) -> subprocess.CompletedProcess[str]:
    home, url = str(net.home(who)), net.database_url(who)
    return trm(net, "witness", "status", "--home", home, "--database-url", url, *flags)


def witness_state(net: LocalNetwork, who: str) -> tuple[int, dict[str, Any]]:
    done = witness_status(net, who, "--json")
    return done.returncode, json.loads(done.stdout)


def cosigned_size(net: LocalNetwork, who: str) -> int:
    _, shown = witness_state(net, who)
    return int(shown["logs"][0]["size"]) if shown["logs"] else 0


def newest(net: LocalNetwork, url: str | None = None) -> tuple[int, int, set[str]]:
    """(log size, newest checkpoint size, witnesses whose cosignatures on it verify)."""
    from broker.database import open_database

    engine = open_database(url or net.database_url(ROUTING))
    try:
        log = AuditLog.reader(engine) if _has_checkpoint(engine) else None
        if log is None:
            return 0, 0, set()
        latest = log.latest_checkpoint()
        assert latest is not None
        directory = load_home_directory(net.home(ROUTING))
        return log.size(), latest[0], {c.witness for c in check_cosignatures(latest[2], directory)}
    finally:
        engine.dispose()


def _has_checkpoint(engine: Any) -> bool:
    import sqlalchemy as sa

    from services.auditlog import log_checkpoints_table

    with engine.connect() as conn:
        return (
            conn.execute(sa.select(sa.func.count()).select_from(log_checkpoints_table)).scalar() > 0
        )


def fully_cosigned(net: LocalNetwork, by: set[str], url: str | None = None, above: int = 0) -> bool:
    size, signed, witnesses = newest(net, url)
    return size == signed > above and by <= witnesses


def export_and_verify(net: LocalNetwork, url: str, out: Path) -> subprocess.CompletedProcess[str]:
    home = str(net.home(ROUTING))
    exported = trm(net, "audit", "export", "--home", home, "--database-url", url, "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    pub = str(net.authority / "authority.pub")
    directory = str(net.directory_file)
    return trm(net, "audit", "verify", str(out), "--directory", directory, "--authority-key", pub)


def test_a_forked_routing_database_fails_the_quorum(
    local_network: Callable[..., Any], tmp_path: Path
) -> None:
    """A copy of the routing db logs other envelopes: the witnesses refuse it, keep the fork
    evidence (`trm witness status`), and verify refuses its export for lack of quorum."""
    net = witnessed_network(local_network)
    witnesses = [start_witness(net, w) for w in (KZ, UZ)]
    routing = start_routing(net)
    publish_junk(net, 3, "common")
    net.wait_for(lambda: fully_cosigned(net, {KZ, UZ}), TIMEOUT, "the common prefix cosigned")
    net.stop(routing)
    original = net.home(ROUTING) / "trm.db"
    forked = tmp_path / "forked.db"
    shutil.copyfile(original, forked)
    fork_url = f"sqlite:///{forked}"

    routing = start_routing(net)
    publish_junk(net, 2, "honest")
    net.wait_for(lambda: fully_cosigned(net, {KZ, UZ}, above=3), TIMEOUT, "the honest branch")
    net.stop(routing)
    routing = start_routing(net, fork_url)
    publish_junk(net, 2, "forked")
    net.wait_for(
        lambda: all(witness_state(net, w)[1]["conflicts"] for w in (KZ, UZ)),
        TIMEOUT,
        "both witnesses to keep the fork as evidence",
    )
    net.stop(routing)
    size, signed, cosigners = newest(net, fork_url)
    assert size == signed == 5 and cosigners == set()

    honest = export_and_verify(net, net.database_url(ROUTING), tmp_path / "honest.jsonl")
    assert honest.returncode == 0, honest.stdout + honest.stderr
    assert "quorum met: 2 witnesses" in honest.stdout
    fork = export_and_verify(net, fork_url, tmp_path / "fork.jsonl")
    assert fork.returncode == 1
    assert (
        "the newest checkpoint (size 5" in fork.stdout and "cosigned by 0 of the 2" in fork.stdout
    )
    for who in (KZ, UZ):
        code, shown = witness_state(net, who)
        [conflict] = shown["conflicts"]
        assert code == 1 and conflict["kind"] == "fork"
        assert "\n5\n" in conflict["cosigned_note"] and "\n5\n" in conflict["offered_note"]
        assert "FORK EVIDENCE" in witness_status(net, who).stdout
    for proc in witnesses:
        net.stop(proc)


def test_an_offline_witness_catches_up(local_network: Callable[..., Any]) -> None:
    """Checkpoints go on without a witness that is down; back, it cosigns the newest tree,
    and a witness killed and restarted kept what it had cosigned."""
    net = witnessed_network(local_network)
    kz = start_witness(net, KZ)
    start_witness(net, UZ)
    start_routing(net)
    publish_junk(net, 2, "first")
    net.wait_for(lambda: fully_cosigned(net, {KZ, UZ}), TIMEOUT, "both to cosign")
    net.kill(kz)
    held = cosigned_size(net, KZ)
    for round_ in range(3):
        _, before, _ = newest(net)
        publish_junk(net, 2, f"away{round_}")
        net.wait_for(
            lambda before=before: fully_cosigned(net, {UZ}, above=before),
            TIMEOUT,
            "a newer checkpoint cosigned by the witness still up",
        )
    assert cosigned_size(net, KZ) == held  # killed: its state is where it was
    _, signed, cosigners = newest(net)
    assert KZ not in cosigners and signed > held
    start_witness(net, KZ)
    net.wait_for(lambda: fully_cosigned(net, {KZ, UZ}), TIMEOUT, "the witness back to cosign")
    assert cosigned_size(net, KZ) == newest(net)[1] > held


class Asker:
    """Sends add-checkpoint requests to a witness as the routing user; reads the answers."""

    def __init__(self, net: LocalNetwork, tmp_path: Path) -> None:
        from broker.database import open_database

        self.net = net
        self.keys = load_keys(net.home(ROUTING))
        self.engine = open_database(f"sqlite:///{tmp_path / 'own-log.db'}")
        self.log = AuditLog(self.engine, origin=origin_for(ROUTING), signer=self.keys.sender())
        self.settings = settings_of(net, ROUTING)

    def grow(self, count: int) -> bytes:
        with self.engine.begin() as conn:
            appender = self.log.appender(conn)
            for _ in range(count):
                appender.append(
                    uuid.uuid4().bytes,
                    received_at=datetime.now(UTC),
                    verification="rejected:malformed",
                )
            appender.flush()
        note = self.log.checkpoint()
        assert note is not None
        return note

    def ask(self, who: str, body: bytes) -> dict[str, Any]:
        publisher = Publisher(self.settings, ROUTING, exchange=WITNESS_EXCHANGE)
        try:
            publisher.publish([Outgoing("ask", (who,), body)])
        finally:
            publisher.close()
        connection = open_connection(self.settings)
        found: list[bytes] = []
        try:
            channel = connection.channel()

            def fetched() -> bool:
                method, _, answer = channel.basic_get(witness_queue(ROUTING), auto_ack=True)
                if method is not None:
                    found.append(answer)
                return bool(found)

            self.net.wait_for(fetched, TIMEOUT, f"{who}'s answer")
        finally:
            connection.close()
        answer: dict[str, Any] = json.loads(found[0])
        return answer


def test_witness_refuses_faults_over_the_broker(
    local_network: Callable[..., Any], tmp_path: Path
) -> None:
    """A damaged proof, a non-routing signer, a shrinking size and a replayed checkpoint are
    answered with their reasons and no cosignature; a killed witness keeps its state."""
    net = witnessed_network(local_network)
    kz = start_witness(net, KZ)
    asker = Asker(net, tmp_path)
    try:
        first = asker.grow(3)
        assert asker.ask(KZ, format_request(0, [], first))["cosignature"] is not None
        second = asker.grow(4)
        proof = asker.log.consistency_proof(3, 7)
        damaged = [bytes([proof[-1][0] ^ 0x80]) + proof[-1][1:], *proof[:-1]][::-1]
        kz_keys = load_keys(net.home(KZ)).sender()
        forged = sign_checkpoint(
            Checkpoint(origin_for(ROUTING), 7, asker.log.root(7), datetime.now(UTC)),
            kz_keys.key,
            key_name_for(ROUTING, kz_keys.kid),
        )
        for body, why in (
            (format_request(3, damaged, second), "inconsistent"),
            (format_request(3, proof, forged), "bad_signature"),
        ):
            answer = asker.ask(KZ, body)
            assert (answer["refused"], answer["cosignature"]) == (why, None), answer
            assert cosigned_size(net, KZ) == 3
        assert asker.ask(KZ, format_request(3, proof, second))["cosignature"] is not None

        net.kill(kz)  # killed, then restarted on the same database
        kz = start_witness(net, KZ)
        assert cosigned_size(net, KZ) == 7
        routing = load_keys(net.home(ROUTING)).sender()
        shrunk = sign_checkpoint(
            Checkpoint(
                origin_for(ROUTING), 3, asker.log.root(3), datetime.now(UTC) + timedelta(seconds=1)
            ),
            routing.key,
            key_name_for(ROUTING, routing.kid),
        )
        for body, why in (
            (format_request(0, [], shrunk), "shrinks"),
            (format_request(0, [], first), "stale"),
        ):
            answer = asker.ask(KZ, body)
            assert (answer["refused"], answer["cosignature"]) == (why, None), answer
            assert answer["cosigned_size"] == 7
        assert cosigned_size(net, KZ) == 7
    finally:
        asker.engine.dispose()
        net.stop(kz)


def test_a_witness_without_its_queue_retries_and_does_not_die(
    local_network: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A witness whose queue is missing (a network not provisioned again) logs it and
    keeps trying, so the adapter it runs in goes on; once provisioned, it answers."""
    import threading

    from broker.database import open_database
    from broker.management import ManagementClient
    from broker.testing import capture_logs
    from broker.topology import declare
    from services import witness as witness_module
    from trm.localnet import DEMO_PARTICIPANTS

    net = witnessed_network(local_network)
    monkeypatch.setattr(witness_module, "RETRY_SECONDS", 0.05)
    ManagementClient(net.management_url).delete_queue(net.vhost, witness_queue(KZ))
    home = net.settings(KZ)
    engine = open_database(net.database_url(KZ))
    stop = threading.Event()
    runner = threading.Thread(
        target=witness_module.run_witness,
        args=(witness_module.Witness.of_home(home, engine), home.amqp_settings(), KZ, stop),
    )
    asker = Asker(net, tmp_path)
    try:
        with capture_logs() as logs:
            runner.start()
            net.wait_for(
                lambda: any(e["event"] == "witness failed; will retry" for e in list(logs)),
                TIMEOUT,
                "the witness to report its missing queue",
            )
        assert runner.is_alive()
        admin = AmqpSettings.from_url(net.amqp_url, vhost=net.vhost)
        declare(admin, [(p, str(role)) for p, role, *_ in DEMO_PARTICIPANTS])
        answer = asker.ask(KZ, format_request(0, [], asker.grow(2)))
        assert answer["cosignature"] is not None
    finally:
        stop.set()
        runner.join(30)
        asker.engine.dispose()
        engine.dispose()


def _receipts_back(net: LocalNetwork, sealed: Any) -> bool:
    import sqlalchemy as sa

    from broker.database import receipts_table

    query = sa.select(sa.func.count()).where(receipts_table.c.envelope_id == str(sealed.id))
    with net.engine(sealed.header.sender).connect() as conn:
        return int(conn.execute(query).scalar_one()) == len(sealed.header.recipients)


def check_mine(net: LocalNetwork, who: str) -> subprocess.CompletedProcess[str]:
    home, url = str(net.home(who)), net.database_url(who)
    return trm(net, "audit", "check-mine", "--home", home, "--database-url", url, "--timeout", "60")


def test_an_envelope_left_out_of_the_log_is_reported_by_both_parties(
    local_network: Callable[..., Any],
) -> None:
    """Sender and recipient each prove their envelopes are in a witnessed checkpoint, over the
    network; one the routing service received but never logged is reported by both, exit 1."""
    from broker.topology import ROUTING_QUEUE
    from schemas.base import MessageKind
    from schemas.examples import EXAMPLE_CASE

    net = witnessed_network(local_network)
    for who in (KZ, UZ, NGO):
        net.start_adapter(who)
    routing = start_routing(net)
    admin = AmqpSettings.from_url(net.amqp_url, vhost=net.vhost)
    request = net.send(KZ, MessageKind.RETURN_REQUEST, to=[UZ, NGO], case=EXAMPLE_CASE)
    net.wait_for(lambda: _receipts_back(net, request), TIMEOUT, "the request's receipts")
    net.wait_for(
        lambda: _queue_empty(admin) and fully_cosigned(net, {KZ, UZ}), TIMEOUT, "witnessed"
    )
    proven = check_mine(net, KZ)
    assert proven.returncode == 0, proven.stdout + proven.stderr
    assert "NOT PROVEN" not in proven.stdout

    net.stop(routing)
    accepted = net.send(
        UZ, MessageKind.RETURN_ACCEPTED, to=[KZ, NGO], case=EXAMPLE_CASE, reply_to=request.id
    )
    net.wait_for(lambda: _receipts_back(net, accepted), TIMEOUT, "the acceptance's receipts")
    connection = open_connection(admin)
    try:
        connection.channel().queue_purge(ROUTING_QUEUE)  # received, never logged
    finally:
        connection.close()
    start_routing(net)
    for who, how in ((UZ, "sent"), (KZ, "received")):
        found = check_mine(net, who)
        assert found.returncode == 1, found.stdout + found.stderr
        assert f"NOT PROVEN {accepted.id} ({how}): not in the audit log" in found.stdout
        assert str(request.id) not in found.stdout


def _queue_empty(admin: AmqpSettings) -> bool:
    from broker.topology import ROUTING_QUEUE, queue_depths

    return queue_depths(admin, [ROUTING_QUEUE])[ROUTING_QUEUE] == 0
