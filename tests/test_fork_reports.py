"""Fork reports over the real RabbitMQ: a witness tells the auditors; `trm audit forks` checks."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_witness_network import (
    KZ,
    NGO,
    ROUTING,
    TIMEOUT,
    UZ,
    fully_cosigned,
    publish_junk,
    settings_of,
    start_routing,
    start_witness,
    trm,
    witness_state,
    witnessed_network,
)

from broker.database import open_database
from broker.keys import Sender, load_keys
from broker.testing import capture_logs
from broker.topology import WITNESS_EXCHANGE
from broker.transport import AmqpSettings, Outgoing, Publisher
from services.auditlog import key_name_for
from services.checkpoint import Checkpoint, origin_for, sign_checkpoint
from services.forkreport import report_body
from services.witness import Witness, WitnessRefused, format_request, report_conflicts
from services.witness import witness_conflicts_table as conflicts
from trm.localnet import LocalNetwork

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

AUDITOR = "auditor"
T0 = datetime(2026, 12, 1, 9, tzinfo=UTC)


def audit_forks(net: LocalNetwork) -> tuple[int, dict[str, Any]]:
    done = trm(net, "audit", "forks", "--home", str(net.home(AUDITOR)), "--json")
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def routing_note(net: LocalNetwork, size: int, root_byte: int, at: datetime) -> bytes:
    """A checkpoint of the routing log signed with the routing key: any tree we like."""
    signer = load_keys(net.home(ROUTING)).sender()
    checkpoint = Checkpoint(origin_for(ROUTING), size, bytes([root_byte]) * 32, at)
    return sign_checkpoint(checkpoint, signer.key, key_name_for(ROUTING, signer.kid))


def reported(net: LocalNetwork, witnesses: tuple[str, ...]) -> bool:
    """Every witness keeps a same-size fork and has reported each conflict it keeps."""
    kept = [witness_state(net, w)[1]["conflicts"] for w in witnesses]
    forked = all(any(c["kind"] == "fork" for c in found) for found in kept)
    return forked and all(c["reported_at"] for found in kept for c in found)


def send_report(net: LocalNetwork, user: str, body: bytes) -> None:
    """Publish `body` to the auditor's witness queue as RabbitMQ user `user`."""
    publisher = Publisher(settings_of(net, user), user, exchange=WITNESS_EXCHANGE)
    try:
        publisher.publish([Outgoing("report", (AUDITOR,), body)])
    finally:
        publisher.close()


def signed(signer: Sender, cosigned: bytes, offered: bytes, kind: str = "fork") -> bytes:
    return report_body(
        signer,
        origin=origin_for(ROUTING),
        kind=kind,
        detail="made up by the test",
        detected_at=T0,
        cosigned_note=cosigned.decode(),
        offered_note=offered.decode(),
    )


def test_a_forked_routing_database_is_reported_to_the_auditor(
    local_network: Callable[..., Any], tmp_path: Path
) -> None:
    """Both witnesses report the fork they keep; `trm audit forks` verifies, keeps and lists it
    (exit 1), and still lists it once the queue is empty."""
    net = witnessed_network(local_network)
    witnesses = [start_witness(net, w) for w in (KZ, UZ)]
    routing = start_routing(net)
    publish_junk(net, 3, "common")
    net.wait_for(lambda: fully_cosigned(net, {KZ, UZ}), TIMEOUT, "the common prefix cosigned")
    net.stop(routing)
    forked = tmp_path / "forked.db"
    shutil.copyfile(net.home(ROUTING) / "trm.db", forked)
    routing = start_routing(net)
    publish_junk(net, 2, "honest")
    net.wait_for(lambda: fully_cosigned(net, {KZ, UZ}, above=3), TIMEOUT, "the honest branch")
    net.stop(routing)
    assert audit_forks(net) == (0, {"forks": [], "refused": [], "new": 0})
    routing = start_routing(net, f"sqlite:///{forked}")
    publish_junk(net, 2, "forked")
    net.wait_for(lambda: reported(net, (KZ, UZ)), TIMEOUT, "both witnesses to report the fork")
    net.stop(routing)
    code, shown = audit_forks(net)
    assert code == 1 and shown["refused"] == [] and shown["new"] == len(shown["forks"])
    for fork in shown["forks"]:
        assert fork["origin"] == origin_for(ROUTING) and fork["strength"] == "proven"
    same_size = {
        f["witness"] for f in shown["forks"] if (f["kind"], f["sizes"]) == ("fork", [5, 5])
    }
    assert same_size == {KZ, UZ}
    again = trm(net, "audit", "forks", "--home", str(net.home(AUDITOR)))
    assert again.returncode == 1 and "proven, sizes 5 and 5" in again.stdout
    assert again.stdout.count("FORK ") == len(shown["forks"])
    for proc in witnesses:
        net.stop(proc)


def test_forged_reports_are_refused_with_their_reason(local_network: Callable[..., Any]) -> None:
    """Reports signed by a key not the witness's, sent by another user, from no witness, or
    holding notes that do not conflict are refused; genuine ones say how strong they are."""
    net = witnessed_network(local_network)
    t0 = datetime.now(UTC)
    kz, ngo = load_keys(net.home(KZ)).sender(), load_keys(net.home(NGO)).sender()
    three, seven = routing_note(net, 3, 1, t0), routing_note(net, 7, 2, t0 + timedelta(minutes=1))
    other_three = routing_note(net, 3, 9, t0 + timedelta(minutes=2))
    later_three = routing_note(net, 3, 1, t0 + timedelta(minutes=2))
    send_report(net, KZ, signed(kz, three, other_three))
    send_report(net, KZ, signed(kz, three, seven, "inconsistent"))
    send_report(net, KZ, signed(replace(kz, key=ngo.key), three, other_three))
    send_report(net, UZ, signed(kz, three, other_three))
    send_report(net, NGO, signed(ngo, three, other_three))
    send_report(net, KZ, signed(kz, three, later_three))
    code, shown = audit_forks(net)
    assert code == 1, shown
    assert sorted((f["strength"], tuple(f["sizes"])) for f in shown["forks"]) == [
        ("attested", (3, 7)),
        ("proven", (3, 3)),
    ]
    reasons = sorted(r["reason"].split(":")[0] for r in shown["refused"])
    assert reasons == ["bad_signature", "no_conflict", "not_a_witness", "wrong_sender"]
    again = audit_forks(net)[1]
    assert (len(again["forks"]), again["refused"], again["new"]) == (2, [], 0)


def test_a_report_the_broker_refused_goes_when_it_is_back(
    local_network: Callable[..., Any],
) -> None:
    """A conflict whose report cannot reach RabbitMQ stays unreported and the witness goes on;
    `trm witness run`, once connected, sends it once, and the auditor verifies it."""
    net = witnessed_network(local_network)
    engine = open_database(net.database_url(KZ))
    witness = Witness.of_home(net.settings(KZ), engine)
    t0 = datetime.now(UTC)
    try:
        witness.add_checkpoint(format_request(0, [], routing_note(net, 3, 1, t0)))
        with pytest.raises(WitnessRefused, match="fork"):
            witness.add_checkpoint(format_request(0, [], routing_note(net, 3, 2, t0)))
        unreachable = AmqpSettings.from_url(
            "amqp://127.0.0.1:1/", vhost=net.vhost, username=KZ, password="unused"
        )

        def down(batch: list[Outgoing]) -> None:
            Publisher(unreachable, KZ, exchange=WITNESS_EXCHANGE).publish(batch)

        with capture_logs() as logs:
            assert report_conflicts(witness, down) == 0
        assert any(e["event"] == "fork evidence not reported yet; will retry" for e in logs)
        assert _reported(engine) == [None]
        assert audit_forks(net)[1]["forks"] == []

        process = start_witness(net, KZ)  # its connection up, it sends what waits
        net.wait_for(lambda: _reported(engine) != [None], TIMEOUT, "the witness to report")
        net.stop(process)
        publisher = Publisher(settings_of(net, KZ), KZ, exchange=WITNESS_EXCHANGE)
        try:
            assert report_conflicts(witness, publisher.publish) == 0
        finally:
            publisher.close()
        code, shown = audit_forks(net)
        assert code == 1 and shown["new"] == 1
        [fork] = shown["forks"]
        assert (fork["witness"], fork["strength"]) == (KZ, "proven")
    finally:
        engine.dispose()


def _reported(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(conflicts.c.reported_at)).scalars())
