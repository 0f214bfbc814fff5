"""A standby routing service: two processes on one database, the leader SIGKILLed."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_routing import trm
from test_routing_e2e import ROUTING, publish_outbox

from broker.database import open_database
from broker.topology import PASSWORD_FILE, ROUTING_QUEUE, queue_consumers
from broker.transport import AmqpSettings
from schemas.base import MessageKind
from services.auditlog import log_entries_table
from services.leadership import LEADER_EVENT, STANDBY_EVENT, leader_pid

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

SENDER, RECIPIENT = "iom-kz", "iom-uz"


def start(net: Any, url: str, name: str) -> Any:
    home = net.home(ROUTING)
    args = ["routing", "run", "--home", str(home), "--database-url", url]
    args += ["--log-file", str(net.root / f"{name}.jsonl"), "--checkpoint-interval", "1"]
    return net.start_process(args, name)


def events(net: Any, name: str) -> list[str]:
    path = net.root / f"{name}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line).get("event") for line in path.read_text().splitlines() if line]


def send(net: Any, amqp_url: str, count: int, first: int) -> list[str]:
    """`count` return requests, each opening its own case, published now."""
    ids = []
    for n in range(first, first + count):
        case = f"{SENDER}.KZ-2026-{n:04d}"
        ids.append(str(net.send(SENDER, MessageKind.RETURN_REQUEST, to=[RECIPIENT], case=case).id))
    assert publish_outbox(net, amqp_url, SENDER) == count
    return ids


def routing_consumers(net: Any, amqp_url: str) -> int:
    """How many consumers ``trm.routing`` has now, asked as the routing user."""
    secret = (net.home(ROUTING) / PASSWORD_FILE).read_text().strip()
    settings = AmqpSettings.from_url(amqp_url, vhost=net.vhost, username=ROUTING, password=secret)
    return queue_consumers(settings, [ROUTING_QUEUE])[ROUTING_QUEUE]


def status(net: Any, url: str) -> tuple[int, list[tuple[str, int]]]:
    """`trm routing status --json`: its exit code and the (role, pid) it lists."""
    code, out = trm("routing", "status", "--home", str(net.home(ROUTING)),
                    "--database-url", url, "--json")  # fmt: skip
    return code, [(m["role"], m["pid"]) for m in json.loads(out)["members"]]


def logged_ids(url: str) -> list[str | None]:
    engine = open_database(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(log_entries_table.c.envelope_id)).scalars())
    finally:
        engine.dispose()


def log_indices(url: str) -> list[int]:
    engine = open_database(url)
    try:
        with engine.connect() as conn:
            query = sa.select(log_entries_table.c.idx).order_by(log_entries_table.c.idx)
            return list(conn.execute(query).scalars())
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("network_databases", ["postgres"], indirect=True)
def test_standby_takes_over_when_the_leader_is_killed(
    local_network: Callable[..., Any],
    network_databases: Callable[[list[str]], dict[str, str]],
    rabbitmq_urls: tuple[str, str],
    tmp_path: Path,
) -> None:
    """Leader SIGKILLed mid-run: the standby leads, every envelope logged once, log verifies."""
    net = local_network(database_urls=network_databases([ROUTING]))
    url = net.database_url(ROUTING)
    first = start(net, url, "routing-a")
    net.wait_for(lambda: LEADER_EVENT in events(net, "routing-a"), 30, "the first to lead")
    second = start(net, url, "routing-b")
    net.wait_for(lambda: STANDBY_EVENT in events(net, "routing-b"), 30, "the second to wait")
    engine = open_database(url)
    try:
        assert leader_pid(engine) is not None
    finally:
        engine.dispose()
    assert status(net, url) == (0, [("leader", first.pid), ("standby", second.pid)])

    sent = send(net, rabbitmq_urls[0], 30, 0)
    net.wait_for(lambda: set(sent) <= set(logged_ids(url)), 30, "the leader to log the first")
    assert events(net, "routing-b") == [STANDBY_EVENT]  # no witness, proof or relay thread
    assert routing_consumers(net, rabbitmq_urls[0]) == 1  # the standby takes no delivery

    net.kill(first)
    sent += send(net, rabbitmq_urls[0], 30, 30)  # published while nobody may lead yet
    net.wait_for(lambda: LEADER_EVENT in events(net, "routing-b"), 30, "the standby to lead")
    sent += send(net, rabbitmq_urls[0], 30, 60)
    assert status(net, url) == (0, [("leader", second.pid)])
    net.wait_for(lambda: set(sent) <= set(logged_ids(url)), 60, "the new leader to log the rest")
    assert net.stop(second) == 0

    counts = Counter(logged_ids(url))
    assert sorted(counts) == sorted(sent)
    assert set(counts.values()) == {1}, "an envelope logged more than once"
    assert log_indices(url) == list(range(len(sent)))  # no index skipped nor repeated

    export = tmp_path / "export.jsonl"
    home = net.home(ROUTING)
    code, out = trm("audit", "export", "--home", str(home), "--database-url", url,
                    "--out", str(export))  # fmt: skip
    assert code == 0, out
    pub = str(home / "authority.pub")
    code, out = trm("audit", "verify", str(export), "--directory", str(home / "directory.json"),
                    "--authority-key", pub, "--workers", "1")  # fmt: skip
    assert code == 0 and out.startswith(f"intact: {len(sent)} entries"), out
    code, out = trm("audit", "replay", str(export), "--authority-key", pub, "--against", url)
    assert code == 0 and "no difference" in out, out


@pytest.mark.postgres
@pytest.mark.parametrize("network_databases", ["postgres"], indirect=True)
def test_leader_whose_lock_session_ends_steps_down(
    local_network: Callable[..., Any],
    network_databases: Callable[[list[str]], dict[str, str]],
    rabbitmq_urls: tuple[str, str],
) -> None:
    """The server ends the leader's lock session: it exits 1, the standby leads and logs on."""
    net = local_network(database_urls=network_databases([ROUTING]))
    url = net.database_url(ROUTING)
    first = start(net, url, "routing-a")
    net.wait_for(lambda: LEADER_EVENT in events(net, "routing-a"), 30, "the first to lead")
    second = start(net, url, "routing-b")
    net.wait_for(lambda: STANDBY_EVENT in events(net, "routing-b"), 30, "the second to wait")
    engine = open_database(url)
    try:
        with engine.connect() as conn:
            backend = leader_pid(engine)
            assert conn.execute(sa.select(sa.func.pg_terminate_backend(backend))).scalar()
    finally:
        engine.dispose()
    assert first.wait(60) == 1
    assert "lost the routing leader's lock" in (net.root / "logs" / "routing-a.log").read_text()
    net.wait_for(lambda: LEADER_EVENT in events(net, "routing-b"), 30, "the standby to lead")
    sent = send(net, rabbitmq_urls[0], 10, 0)
    net.wait_for(lambda: set(sent) <= set(logged_ids(url)), 30, "the new leader to log")
    assert net.stop(second) == 0
    assert sorted(logged_ids(url)) == sorted(sent)


@pytest.mark.parametrize("network_databases", ["sqlite"], indirect=True)
def test_second_routing_process_on_sqlite_refuses_to_start(
    local_network: Callable[..., Any],
    network_databases: Callable[[list[str]], dict[str, str]],
) -> None:
    """SQLite has no standby: a second process exits 1 naming the first, which runs on."""
    net = local_network()
    url = net.database_url(ROUTING)
    first = start(net, url, "routing-a")
    net.wait_for(lambda: LEADER_EVENT in events(net, "routing-a"), 30, "the first to lead")
    second = start(net, url, "routing-b")
    assert second.wait(60) == 1
    failure = (net.root / "logs" / "routing-b.log").read_text()
    assert f"pid {first.pid}" in failure and "needs PostgreSQL" in failure, failure
    assert first.poll() is None
    assert status(net, url) == (0, [("leader", first.pid)])
    assert net.stop(first) == 0
    assert status(net, url) == (1, [])
    # The lock went with the first process: a new one leads.
    third = start(net, url, "routing-c")
    net.wait_for(lambda: LEADER_EVENT in events(net, "routing-c"), 30, "a restart to lead")
    assert net.stop(third) == 0
