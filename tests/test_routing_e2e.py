"""The routing service as a real process on a real RabbitMQ, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_routing import FULL_RETURN, trm

from broker.database import open_database
from broker.outbox import Outbox, Relay
from broker.topology import PASSWORD_FILE
from broker.transport import AmqpSettings, Publisher
from schemas.base import MessageKind
from schemas.examples import EXAMPLE_PERSON_NAME
from services.auditlog import AuditLog, log_entries_table
from services.casestore import CaseStore
from services.checkpoint import origin_for

ROUTING = "routing"
CASE = "iom-kz.KZ-2026-0777"

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def publish_outbox(net: Any, amqp_url: str, participant: str) -> int:
    """Publish `participant`'s pending outbox as that RabbitMQ user, with confirms."""
    secret = (net.home(participant) / PASSWORD_FILE).read_text().strip()
    settings = AmqpSettings.from_url(
        amqp_url, vhost=net.vhost, username=participant, password=secret
    )
    publisher = Publisher(settings, participant)
    try:
        return Relay(Outbox(net.engine(participant)), publisher).run_once()
    finally:
        publisher.close()


def start_routing(net: Any, url: str, *extra: str) -> Any:
    home = net.home(ROUTING)
    args = ["routing", "run", "--home", str(home), "--database-url", url]
    args += ["--log-file", str(net.root / "routing.jsonl"), "--checkpoint-interval", "1"]
    return net.start_process([*args, *extra], "routing")


def test_full_return_through_the_routing_process(
    local_network: Callable[..., Any],
    network_databases: Callable[[list[str]], dict[str, str]],
    tmp_path: Path,
) -> None:
    """KZ -> UZ -> UZ NGO over RabbitMQ: all logged, every stage timed, the replay matches.

    Each participant runs its adapter, so that every recipient has taken an
    envelope (and knows the case) before it answers; the adapters' delivery
    receipts are logged and tracked beside the handoffs.
    """
    net = local_network(database_urls=network_databases([ROUTING]))
    url = net.database_url(ROUTING)
    proc = start_routing(net, url)
    adapters = [net.start_adapter(p) for p in sorted({s for _, s, _, _ in FULL_RETURN})]
    engine = open_database(url)
    try:
        store = CaseStore(engine)
        previous = None
        sent = []
        for kind, sender, recipients, stage in FULL_RETURN:
            sealed = net.send(sender, kind, to=list(recipients), case=CASE, reply_to=previous)
            previous = sealed.id
            sent.append(str(sealed.id))

            def reached(want: Any = stage) -> bool:
                state = store.get(CASE)
                return state is not None and state.stage == want

            def taken(envelope: str = str(sealed.id), by: Any = recipients) -> bool:
                return all(envelope in net.inbox_ids(r) for r in by)

            net.wait_for(reached, 30, f"case at stage {stage}")
            net.wait_for(taken, 30, f"{kind} taken by {', '.join(recipients)}")

        def receipted() -> bool:
            state = store.get(CASE)
            return state is not None and not state.pending_receipts

        net.wait_for(receipted, 30, "every recipient's delivery receipt logged")
        assert [net.stop(a) for a in adapters] == [0] * len(adapters)
        assert net.stop(proc) == 0
    finally:
        engine.dispose()

    code, out = trm("cases", "show", CASE, "--home", str(net.home(ROUTING)),
                    "--database-url", url, "--json")  # fmt: skip
    assert code == 0, out
    timeline = json.loads(out)["timeline"]
    handoffs = [t for t in timeline if t["kind"] != MessageKind.DELIVERY_RECEIPT]
    assert [t["envelope_id"] for t in handoffs] == sent
    assert [t["stage_after"] for t in handoffs] == [str(s) for *_, s in FULL_RETURN]
    assert all(t["received_at"] for t in timeline)
    assert all(t["anomaly"] is None for t in timeline)
    receipts = len(timeline) - len(handoffs)
    assert receipts == sum(len(recipients) for _, _, recipients, _ in FULL_RETURN)

    engine = open_database(url)
    try:
        log = AuditLog(engine, origin=origin_for(ROUTING), signer=None)
        with engine.connect() as conn:
            logged = conn.execute(
                sa.select(log_entries_table.c.envelope_id, log_entries_table.c.verification)
            ).all()
        latest = log.latest_checkpoint()
    finally:
        engine.dispose()
    assert sorted(logged) == sorted((t["envelope_id"], "ok") for t in timeline)
    assert latest is not None and latest[0] == len(logged)  # the shutdown checkpoint covers all

    export = tmp_path / "export.jsonl"
    code, out = trm("audit", "export", "--home", str(net.home(ROUTING)), "--database-url", url,
                    "--out", str(export))  # fmt: skip
    assert code == 0, out
    pub = str(net.home(ROUTING) / "authority.pub")
    code, out = trm("audit", "replay", str(export), "--authority-key", pub, "--against", url)
    assert code == 0 and "no difference" in out

    lines = [json.loads(line) for line in (net.root / "routing.jsonl").read_text().splitlines()]
    logged_ids = {x["envelope_id"] for x in lines if x.get("event") == "envelope logged"}
    assert logged_ids == {t["envelope_id"] for t in timeline}
    assert EXAMPLE_PERSON_NAME not in json.dumps(lines)


@pytest.mark.parametrize("network_databases", ["sqlite"], indirect=True)
def test_overdue_reminder_is_published_and_logged_once(
    local_network: Callable[..., Any],
    network_databases: Callable[[list[str]], dict[str, str]],
    rabbitmq_urls: tuple[str, str],
    tmp_path: Path,
) -> None:
    """With a 1 s request limit the process relays one signed reminder, seen back on its queue."""
    net = local_network()
    policies = tmp_path / "policies.json"
    policies.write_text(
        json.dumps({"policies": [{"stage": "requested", "limit": "1s", "warn_before": "0s"}]})
    )
    url = net.database_url(ROUTING)
    proc = start_routing(net, url, "--policies", str(policies), "--deadline-poll", "0.2")
    engine = open_database(url)
    try:
        request = net.send("iom-kz", MessageKind.RETURN_REQUEST, to=["iom-uz"], case=CASE)
        publish_outbox(net, rabbitmq_urls[0], "iom-kz")
        store = CaseStore(engine)

        def reminded() -> bool:
            state = store.get(CASE)
            return state is not None and any(e.kind is MessageKind.REMINDER for e in state.events)

        net.wait_for(reminded, 30, "the routing service's reminder to come back on its queue")
        net.wait_for(lambda: Outbox(engine).status().pending == 0, 30, "the reminder relayed")
        assert net.stop(proc) == 0
        state = store.get(CASE)
        assert state is not None
        [reminder] = [e for e in state.events if e.kind is MessageKind.REMINDER]
        assert (reminder.sender, reminder.recipients) == (ROUTING, ("iom-uz",))
        assert reminder.reply_to == str(request.id)
        assert [r.status for r in store.reminders(CASE)] == ["overdue"]
        assert store.anomalies(CASE) == []
    finally:
        engine.dispose()
