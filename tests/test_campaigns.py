"""The short version of every reliability and security campaign, each asserting its musts."""

from __future__ import annotations

import ast
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.database import inbox_table, open_database
from broker.envelope import Recipient, open_envelope, seal
from broker.errors import TrmError
from broker.outbox import Outbox
from broker.testing import make_network
from campaigns.checker import Party, Status, check, header_of
from campaigns.crashes import run_broker_restarts, run_consumer_crashes, run_relay_crashes
from campaigns.failover import run_routing_failover
from campaigns.fuzz import run_fuzz_short
from campaigns.hostile import FAMILIES, Cast, Hostile, Valid, hostile_stream, run_hostile
from campaigns.identity import EXPECTED, run_identity
from campaigns.network import Services, sqlite_synchronous
from campaigns.replay import run_replay
from campaigns.report import Row, render_table, to_json
from schemas.base import MessageKind
from schemas.control import DeliveryReceipt
from schemas.examples import example

NOW = datetime.now(UTC).replace(microsecond=0)
KZ, UZ, NGO = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod"
SHORT_MESSAGES = 200
SHORT_KILLS = 3
DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


# --- the checker -----------------------------------------------------------------------


def test_checker_classifies_ok_lost_duplicated_and_unexpected(tmp_path: Path) -> None:
    """One message of each fate is classified as such, from the databases and files alone."""
    net = make_network(tmp_path / "keys", now=NOW - timedelta(days=1))
    kz_url, uz_url = f"sqlite:///{tmp_path / 'kz.db'}", f"sqlite:///{tmp_path / 'uz.db'}"
    kz, uz = open_database(kz_url), open_database(uz_url)
    files = tmp_path / "uz-inbox"
    files.mkdir()
    sealed = [
        seal(
            example(MessageKind.RETURN_REQUEST),
            case="iom-kz.KZ-2026-0001",
            sender=net.sender(KZ, NOW),
            recipients=(UZ,),
            directory=net.directory,
            seq=i + 1,
            now=NOW,
        )
        for i in range(3)
    ]
    ok, lost, twice = sealed
    with kz.begin() as conn:
        for s in sealed:
            Outbox(kz).add(conn, s, now=NOW)
    with uz.begin() as conn:
        for s, receipts in ((ok, 1), (twice, 2)):
            conn.execute(
                inbox_table.insert().values(
                    envelope_id=str(s.id), digest=s.digest, sender=KZ,
                    case_ref="iom-kz.KZ-2026-0001", kind="return_request",
                    received_at=NOW, applied_at=NOW, redeliveries=1,
                )
            )  # fmt: skip
            (files / f"{s.id}.json").write_text("{}")
            for n in range(receipts):
                receipt = DeliveryReceipt(
                    envelope_id=s.id, digest=s.digest, received_at=NOW, applied_at=NOW
                )
                Outbox(uz).add(
                    conn,
                    seal(
                        receipt, case="iom-kz.KZ-2026-0001", sender=net.sender(UZ, NOW),
                        recipients=(KZ,), directory=net.directory, seq=n + 1, reply_to=s.id,
                        now=NOW,
                    ),
                    now=NOW,
                )  # fmt: skip
    (files / "0190aaaa-0000-7000-8000-000000000000.json").write_text("{}")
    kz.dispose()
    uz.dispose()

    verdict = check([Party(KZ, kz_url), Party(UZ, uz_url, files=files)])

    assert verdict.statuses[str(ok.id)] is Status.OK
    assert verdict.statuses[str(lost.id)] is Status.LOST
    assert verdict.statuses[str(twice.id)] is Status.DUPLICATED
    assert verdict.unexpected == ["0190aaaa-0000-7000-8000-000000000000"]
    assert verdict.redeliveries == 2
    assert verdict.messages() == 3
    assert header_of(ok.raw)["id"] == str(ok.id)


def test_checker_is_independent_of_the_code_under_test() -> None:
    """The checker imports neither the inbox nor the outbox nor any other trm module."""
    source = Path("campaigns/checker.py").read_text(encoding="utf-8")
    imported = {
        alias.name if isinstance(node, ast.Import) else str(node.module)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not {m for m in imported if m.split(".")[0] in {"broker", "adapters", "services"}}


def test_summary_table_and_json_show_failed_musts() -> None:
    """A row with a broken must prints FAIL with the statement, and JSON says passed false."""
    good, bad = Row("a", messages=3, ok=3), Row("b", messages=3, ok=2, lost=1)
    good.must("lost 0", True)
    bad.must("lost 0", False)
    bad.add_reasons(["stale", "stale", "malformed"])
    table = render_table([good, bad])
    assert "PASS" in table and "FAIL" in table
    assert "MUST FAILED: lost 0" in table
    assert "malformed=1 stale=2" in table
    assert '"passed": false' in to_json([bad])
    assert not Row("empty").passed


# --- hostile input, in process --------------------------------------------------------------


def test_every_hostile_family_is_refused_with_its_expected_reason(tmp_path: Path) -> None:
    """Each hostile envelope, opened in process, fails with one of its expected reasons."""
    net = make_network(tmp_path, now=NOW - timedelta(days=1))
    cast = Cast(net.directory, net.keys[KZ], UZ, net.keys[NGO], NOW)
    items = hostile_stream(cast, 300, seed=7)
    recipient = Recipient(UZ, net.keys[UZ].decryption)
    valid_ids = {item.envelope_id for item in items if isinstance(item, Valid)}
    hostile = [item for item in items if isinstance(item, Hostile)]
    assert len({hashlib.sha256(h.body).digest() for h in hostile}) == len(hostile)
    families = set()
    for item in hostile:
        families.add(item.family)
        if item.family == "replayed_id":
            # Refused by the inbox, which knows the id: it must reuse a valid id.
            assert header_of(item.body)["id"] in valid_ids
            continue
        # The AMQP user id each is delivered with: the administrator's injections carry none.
        user = "guest" if item.publish_as == "admin" else item.publish_as
        with pytest.raises(TrmError) as caught:
            open_envelope(
                item.body,
                recipient=recipient,
                directory=net.directory,
                now=NOW,
                amqp_user_id=user,
                require_user_id=True,
            )
        assert caught.value.reason in item.expected, item.family
    assert len(families) >= len(FAMILIES)


# --- campaigns against the real services -------------------------------------------------


@pytest.mark.rabbitmq
def test_identity_matrix_refuses_every_attempt(
    tmp_path: Path, rabbitmq_urls: tuple[str, str]
) -> None:
    """Every participant acting as every other is refused, each attempt with its own reason."""
    row = run_identity(tmp_path, *rabbitmq_urls)
    assert row.passed, render_table([row])
    assert row.messages == row.ok == 6 * 12
    assert set(row.reasons) == set(EXPECTED.values())


def test_fuzz_short_lets_only_trm_errors_escape(tmp_path: Path) -> None:
    """Hundreds of mutated envelopes, re-signed headers and directories raise only TrmError."""
    row = run_fuzz_short(tmp_path, examples=200)
    assert row.passed, render_table([row])
    assert row.messages == 600


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_hostile_input_is_quarantined_without_state_change(
    tmp_path: Path, campaign_services: Services
) -> None:
    """Hostile envelopes on a live queue are all quarantined once; valid ones all delivered."""
    row = run_hostile(tmp_path / "net", campaign_services, hostile=300)
    assert row.passed, render_table([row])
    assert row.quarantined == 300
    assert row.lost == 0


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_replays_are_recognised_as_duplicates(tmp_path: Path, campaign_services: Services) -> None:
    """Every applied envelope published again, live and after a restart, has no second effect."""
    row = run_replay(tmp_path / "net", "sqlite", campaign_services, messages=50)
    assert row.passed, render_table([row])
    assert row.figures["recognised_as_duplicates"] == 100


@pytest.mark.rabbitmq
@pytest.mark.slow
@pytest.mark.parametrize("database", DATABASES)
def test_consumer_crashes_lose_and_duplicate_nothing(
    tmp_path: Path, campaign_services: Services, database: str
) -> None:
    """The receiving adapter SIGKILLed repeatedly, also between commit and ack: lost 0, dup 0."""
    row = run_consumer_crashes(
        tmp_path / "net", database, campaign_services, messages=SHORT_MESSAGES, kills=SHORT_KILLS
    )
    assert row.passed, render_table([row])
    assert row.faults >= SHORT_KILLS
    assert row.ok == SHORT_MESSAGES


@pytest.mark.rabbitmq
@pytest.mark.slow
@pytest.mark.parametrize("database", DATABASES)
def test_relay_crashes_drain_the_outbox(
    tmp_path: Path, campaign_services: Services, database: str
) -> None:
    """The sending adapter SIGKILLed around publish and confirm: the outbox drains, lost 0."""
    row = run_relay_crashes(
        tmp_path / "net", database, campaign_services, messages=SHORT_MESSAGES, kills=SHORT_KILLS
    )
    assert row.passed, render_table([row])
    assert row.ok == SHORT_MESSAGES


@pytest.mark.rabbitmq
@pytest.mark.slow
@pytest.mark.exclusive
def test_broker_restart_applies_every_message_once(
    tmp_path: Path, campaign_services: Services
) -> None:
    """RabbitMQ stopped and started mid-run: every message applied exactly once, broker left up."""
    row = run_broker_restarts(
        tmp_path / "net",
        "sqlite",
        campaign_services,
        messages=SHORT_MESSAGES,
        restarts=1,
        hard_kills=0,
    )
    assert row.passed, render_table([row])
    assert row.ok == SHORT_MESSAGES


def test_sqlite_runs_with_synchronous_full(tmp_path: Path) -> None:
    """The engine trm opens on SQLite has synchronous=FULL in effect."""
    assert sqlite_synchronous(f"sqlite:///{tmp_path / 'trm.db'}") == "FULL"


@pytest.mark.rabbitmq
@pytest.mark.slow
@pytest.mark.postgres
def test_routing_leader_killed_repeatedly_logs_every_envelope_once(
    tmp_path: Path, campaign_services: Services
) -> None:
    """The routing leader SIGKILLed twice: the standby leads each time, the log verifies."""
    row = run_routing_failover(tmp_path / "net", campaign_services, messages=120, kills=2)
    assert row.passed, render_table([row])
    assert row.faults == 2 and row.ok == 120
