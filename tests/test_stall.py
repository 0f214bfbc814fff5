"""What must never stall a participant's inbox, over the real RabbitMQ with real adapters:
a sender whose encryption key is revoked is applied and answered with the honest envelopes
beside it (a receipt is signed, not sealed), and a case folder that
cannot be written makes the adapter hold the delivery and retry it with backoff, say so in
`trm health`, and apply it once the folder is fixed, instead of spinning it into the
quarantine."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pika
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from adapters.adapter import LOCAL_RETRY_INITIAL_SECONDS, LOCAL_RETRY_MAX_SECONDS
from broker.database import inbox_table, pending_receipts_table, quarantine_table, receipts_table
from broker.directory import (
    DIRECTORY_FILE,
    DirectoryBody,
    KeyUse,
    Role,
    install_directory,
    parse_unverified,
    revoke_key,
    sign_directory,
)
from broker.envelope import SealedEnvelope
from broker.keys import load_authority
from broker.testing import read_only
from broker.topology import inbox_queue, quarantine_queue
from schemas.base import MessageKind
from trm.cli import cli
from trm.localnet import LocalNetwork

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

K = MessageKind
KZ, UZ, TJ = "iom-kz", "iom-uz", "iom-tj"
MISSIONS = tuple((p, Role.MISSION, p[-2:].upper(), None) for p in (KZ, UZ, TJ))
WAIT = 60.0
"""Only for a hung run: adapters on a shared machine normally answer within a second."""
HOLD_LINE = "local side unavailable; holding the batch"


def _rows(net: LocalNetwork, participant: str, statement: sa.Select[Any]) -> list[sa.Row[Any]]:
    with net.engine(participant).connect() as conn:
        return list(conn.execute(statement).all())


def _receipt_at(net: LocalNetwork, envelope: SealedEnvelope, recipient: str) -> str | None:
    """The id of `recipient`'s receipt for `envelope` as its sender recorded it, if any."""
    r = receipts_table.c
    found = _rows(
        net,
        envelope.header.sender,
        sa.select(r.receipt_envelope_id).where(
            r.envelope_id == str(envelope.id), r.recipient == recipient
        ),
    )
    return str(found[0].receipt_envelope_id) if found else None


def _install_everywhere(net: LocalNetwork, body: DirectoryBody, homes: Sequence[str]) -> None:
    signed = sign_directory(body, load_authority(net.authority))
    for participant in homes:
        install_directory(signed, net.home(participant))


def _queue_depth(net: LocalNetwork, rabbitmq_urls: tuple[str, str], queue: str) -> int:
    """Messages in `queue` now (a passive declare as the administrator: no stats delay)."""
    params = pika.URLParameters(rabbitmq_urls[0])
    params.virtual_host = net.vhost
    connection = pika.BlockingConnection(params)
    try:
        declared = connection.channel().queue_declare(queue, passive=True)
        return int(declared.method.message_count)
    finally:
        connection.close()


def _log_events(net: LocalNetwork, participant: str) -> list[dict[str, Any]]:
    """The JSON log lines `participant`'s adapter wrote."""
    events = []
    for line in (net.root / "logs" / f"{participant}.log").read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


# --- a sender without a key -------------------------------------------------------------


def test_a_sender_without_an_encryption_key_is_answered_and_never_blocks_the_batch(
    local_network, rabbitmq_urls
) -> None:
    """UZ's directory revokes KZ's encryption key. KZ's request reaches UZ in one batch with
    two of TJ's: all three are applied at once and all three receipted, KZ's too, since a
    receipt is signed, not sealed, and needs no key of its recipient; nothing is pending,
    nothing redelivered, nothing quarantined."""
    net = local_network(MISSIONS)
    body = parse_unverified((net.home(UZ) / DIRECTORY_FILE).read_bytes())
    [kz_card] = [p for p in body.participants if p.id == KZ]
    now = datetime.now(UTC)
    for key in kz_card.keys:
        if key.use is KeyUse.ENCRYPT:
            body = revoke_key(body, KZ, key.kid, at=now, now=now)
    _install_everywhere(net, body, [UZ])

    net.start_adapter(KZ)
    net.start_adapter(TJ)
    honest = [net.send(TJ, K.RETURN_REQUEST, to=[UZ], case=f"{TJ}.STALL-{i}") for i in (1, 2)]
    keyless = net.send(KZ, K.RETURN_REQUEST, to=[UZ], case=f"{KZ}.STALL-1")
    # Everything waits in UZ's queue before its adapter starts, so they arrive together.
    net.wait_for(
        lambda: net.outbox_pending(KZ) == net.outbox_pending(TJ) == 0, WAIT, "all published"
    )
    net.wait_for(
        lambda: _queue_depth(net, rabbitmq_urls, inbox_queue(UZ)) == 3, WAIT, "three queued"
    )
    net.start_adapter(UZ)
    everything = {str(e.id) for e in (*honest, keyless)}
    net.wait_for(lambda: everything <= net.inbox_ids(UZ), WAIT, "all three applied at UZ")
    for envelope in (*honest, keyless):
        net.wait_for(lambda e=envelope: _receipt_at(net, e, UZ) is not None, WAIT, "receipts")
    assert _rows(net, UZ, sa.select(pending_receipts_table)) == []
    i = inbox_table.c
    assert {row.redeliveries for row in _rows(net, UZ, sa.select(i.redeliveries))} == {0}
    assert _rows(net, UZ, sa.select(quarantine_table)) == []
    assert _rows(net, KZ, sa.select(quarantine_table)) == []


# --- a case folder that cannot be written -------------------------------------------------


def _health(net: LocalNetwork, participant: str) -> tuple[int, dict[str, tuple[bool, str]]]:
    """`trm health --json` of `participant`: exit code and check -> (ok, detail)."""
    result = CliRunner().invoke(
        cli,
        ["health", "--home", str(net.home(participant)), "--json"],
        env=net.environment(participant),
        catch_exceptions=False,
    )
    checks = {c["check"]: (c["ok"], c["detail"]) for c in json.loads(result.stdout)}
    return result.exit_code, checks


def test_an_unwritable_case_folder_holds_the_delivery_with_backoff(
    local_network, rabbitmq_urls
) -> None:
    """UZ's case folder is immutable for 6 s when KZ's travel plan arrives: UZ stops
    consuming and tries the delivery again a few times with growing waits (not hundreds),
    `trm health` fails naming the case system while it is down; once the folder is writable
    the delivery is applied once, never redelivered, nothing reaches the quarantine."""
    net = local_network(MISSIONS[:2])
    net.start_adapter(KZ)
    net.start_adapter(UZ)
    case = f"{KZ}.STALL-2"
    opened = net.send(KZ, K.RETURN_REQUEST, to=[UZ], case=case)
    net.wait_for(lambda: str(opened.id) in net.inbox_ids(UZ), WAIT, "the opening applied")
    code, checks = _health(net, UZ)
    assert code == 0 and checks["adapter"][0], checks
    folder = net.settings(UZ).case_dir
    with read_only(folder):
        travel = net.send(KZ, K.TRAVEL_ARRANGED, to=[UZ], case=case)
        net.wait_for(lambda: not _health(net, UZ)[1]["adapter"][0], WAIT, "health to fail")
        code, checks = _health(net, UZ)
        assert code == 1
        ok, detail = checks["adapter"]
        assert not ok and "case_system" in detail and "cannot write" in detail, detail
        assert all(ok for name, (ok, _) in checks.items() if name != "adapter"), checks
        net.wait_for(
            lambda: sum(e["event"] == HOLD_LINE for e in _log_events(net, UZ)) >= 3,
            WAIT,
            "three tries of the held delivery",
        )
        assert str(travel.id) not in net.inbox_ids(UZ)
    net.wait_for(lambda: str(travel.id) in net.inbox_ids(UZ), WAIT, "applied once writable")
    assert (folder / f"{travel.id}.json").exists()
    i = inbox_table.c
    [row] = _rows(net, UZ, sa.select(i.redeliveries).where(i.envelope_id == str(travel.id)))
    assert row.redeliveries == 0, "the held delivery was never handed back to the broker"
    events = _log_events(net, UZ)
    holds = [e for e in events if e["event"] == HOLD_LINE]
    assert 2 <= len(holds) <= 8, [e["wait_seconds"] for e in holds]
    assert all(e["reason"] == "local_unavailable" for e in holds)
    assert all("case_system" in str(e["error"]) for e in holds)
    for hold in holds:
        # Each wait is its step, doubling from the first, times a jitter in [0.5, 1.5).
        doubled = LOCAL_RETRY_INITIAL_SECONDS * 2 ** (int(hold["attempt"]) - 1)
        step = min(doubled, LOCAL_RETRY_MAX_SECONDS)
        wait = float(str(hold["wait_seconds"]))
        assert 0.5 * step - 0.01 <= wait <= 1.5 * step + 0.01, (hold["attempt"], wait)
    assert [int(e["attempt"]) for e in holds] == list(range(1, len(holds) + 1))
    assert [e["event"] for e in events].count("adapter.local_down") == 1
    assert [e["event"] for e in events].count("adapter.local_up") == 1
    net.wait_for(lambda: _health(net, UZ)[0] == 0, WAIT, "health to pass again")
    assert _rows(net, UZ, sa.select(quarantine_table)) == []
    assert _queue_depth(net, rabbitmq_urls, quarantine_queue(UZ)) == 0
    assert _queue_depth(net, rabbitmq_urls, inbox_queue(UZ)) == 0
