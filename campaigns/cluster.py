"""Campaigns 11-13: a three-node RabbitMQ cluster losing nodes, and two linked country brokers.

Each runs on its own local cluster (`trm.localcluster`, beside the machine's
broker, removed afterwards) unless one is handed in, and leaves every node
of it running. The flow is the crash campaigns' (`campaigns.crashes`): iom-kz
sends to iom-uz from a thread, the routing service logs everything, and
`campaigns.checker` judges from the databases alone.

- **cluster_node_kills**: the node leading iom-uz's inbox queue is SIGKILLed,
  then started again once delivery resumed, `kills` times; the time from
  each kill to the next envelope applied is measured.
- **cluster_node_outages**: one node of three stopped for the whole second
  half of the run; then a second one, so that the quorum queues lose their
  majority: publishing must stop with a clear reason in iom-kz's adapter log
  and in ``trm health``, ``trm send`` must go on queueing in the outbox, and
  once both nodes are back everything drains exactly once.
- **federation_cut**: iom-kz and the routing service on the cluster, iom-uz
  on a second broker, linked both ways (`broker.federation`); the second
  broker is stopped midway and started again.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from broker.database import inbox_table, open_database
from broker.errors import ConfigError, ProvisioningError
from broker.federation import grant_link_user, link, link_status
from broker.management import ManagementClient
from broker.topology import inbox_queue
from campaigns.crashes import CASES, Supervised, _count, _Run, _timeout
from campaigns.network import KZ, ROUTING, UZ, Services, flow_message, scratch_network
from campaigns.report import Row
from schemas.base import MessageKind
from schemas.examples import example_payload_bytes
from trm.localcluster import LocalCluster, free_base_port
from trm.localnet import LocalNetwork

CLUSTER_BASE_PORT = 5700
"""The campaigns' cluster: ports 5700-5702, 15700-15702, 25700-25702 if free (else the next
free block of 20; tests start at 5680)."""
SITE_BASE_PORT = 5710
"""The second country broker of the federation campaign (likewise)."""
NODE_EVENT_SECONDS = 20.0
"""About how long one node kill, failover and restart takes; paces the flow across them
(`flow_seconds` shortens it where a short run's flow need not span so long)."""
_INBOX = "SELECT count(*) FROM inbox"
PREFETCH = 200
"""The adapters' prefetch window (`AmqpSettings.prefetch`)."""
_AFTER = timedelta(seconds=60)
"""How long after a kill to look for the pause in delivery."""
_PENDING = "SELECT count(*) FROM outbox WHERE sent_at IS NULL"
_REFUSED_EVENTS = ("adapter.publishing_stalled", "relay.retrying", "broker unavailable; retrying")


@contextmanager
def _cluster(given: LocalCluster | None, count: int, base_port: int) -> Iterator[LocalCluster]:
    """`given`, or a cluster started here and removed afterwards."""
    if given is not None:
        yield given
        return
    # Another campaign or test session may hold the first ports: take the next free ones.
    cluster = LocalCluster(count=count, base_port=free_base_port(count, base_port))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _on(cluster: LocalCluster, services: Services) -> Services:
    return replace(services, amqp_url=cluster.amqp_url, management_url=cluster.management_url)


def _management(cluster: LocalCluster) -> ManagementClient:
    """The management API of a node that runs (node 1 may be the one down)."""
    for index, node in enumerate(cluster.nodes):
        if cluster.pid(index) is not None:
            return ManagementClient(node.management_url, retry_delays=(0.5, 1, 2))
    raise ConfigError("no node of the cluster runs")


def _leader(cluster: LocalCluster, vhost: str, queue: str) -> int:
    """The index of the node leading `queue` now."""
    found = _management(cluster).get_queue(vhost, queue) or {}
    names = [node.name for node in cluster.nodes]
    leader = found.get("leader")
    if leader not in names:
        raise ProvisioningError(f"queue {queue} reports no leader among {names}: {leader!r}")
    return names.index(str(leader))


def _start_all(cluster: LocalCluster) -> None:
    down = [i for i in range(cluster.count) if cluster.pid(i) is None]
    with ThreadPoolExecutor(max(len(down), 1)) as pool:
        list(pool.map(cluster.start_node, down))


def _wait(condition: Callable[[], bool], timeout: float, tend: Callable[[], None]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tend()
        if condition():
            return True
        time.sleep(0.2)
    return False


def run_node_kills(
    root: Path,
    database: str,
    services: Services,
    *,
    messages: int,
    kills: int,
    cluster: LocalCluster | None = None,
    flow_seconds: float | None = None,
    seed: int = 11,
) -> Row:
    """Campaign 11: SIGKILL the node leading iom-uz's inbox `kills` times during the flow."""
    resumed: list[datetime] = []
    killed: list[tuple[str, datetime]] = []
    with (
        _cluster(cluster, 3, CLUSTER_BASE_PORT) as nodes,
        scratch_network(root, database, [KZ, UZ, ROUTING], _on(nodes, services)) as net,
    ):
        try:
            run = _Run(net, messages, seed)
            sender, receiver = Supervised(net, KZ), Supervised(net, UZ)
            sender.start()
            receiver.start()
            started = time.monotonic()
            flow = NODE_EVENT_SECONDS * kills if flow_seconds is None else flow_seconds
            run.sender(pace=flow / max(messages, 1))

            def tend() -> None:
                sender.tend()
                receiver.tend()
                if len(killed) < kills and run.sent >= messages * (len(killed) + 1) / (kills + 1):
                    _kill_leader(net, nodes, resumed, killed, messages=messages, tend=lambda: None)

            settled = run.wait(_timeout(messages) + 60 * kills, tend, lambda: len(killed) == kills)
            seconds = time.monotonic() - started
            sender.stop()
            receiver.stop()
            run.stop()
            row = run.verdict_row("cluster_node_kills", database, seconds, settled)
            pauses = _pauses(net.database_url(UZ), [at for _name, at in killed])
        finally:
            _start_all(nodes)
    row.faults = len(killed)
    row.figures.update(
        killed=",".join(name.split("@")[0] for name, _at in killed),
        no_delivery_max_s=round(max(pauses, default=0.0), 2),
        no_delivery_mean_s=round(sum(pauses) / max(len(pauses), 1), 2),
        adapter_deaths=sender.deaths + receiver.deaths,
    )
    row.must(
        f"the node leading {inbox_queue(UZ)} SIGKILLed and restarted {kills} times",
        len(killed) == kills,
    )
    row.must("delivery resumed after every kill", len(resumed) == kills)
    return row


def _kill_leader(
    net: LocalNetwork,
    nodes: LocalCluster,
    resumed: list[datetime],
    killed: list[tuple[str, datetime]],
    *,
    messages: int,
    tend: Callable[[], None],
) -> None:
    """SIGKILL the inbox's leader, wait until envelopes are applied again, start it again."""
    index = _leader(nodes, net.vhost, inbox_queue(UZ))
    applied = _count(net.database_url(UZ), _INBOX)
    nodes.kill_node(index)
    killed.append((nodes.nodes[index].name, datetime.now(UTC)))
    # Beyond what the prefetch window may have held when the node died (as far as the run
    # has that many left): applied after a reconnection.
    beyond = applied + min(PREFETCH, (messages - applied) // 2)

    def again() -> bool:
        count = _count(net.database_url(UZ), _INBOX)
        # Everything applied also counts: a short run may have nothing left to resume.
        return count > beyond or count >= messages

    if _wait(again, 180, tend):
        resumed.append(datetime.now(UTC))
    nodes.start_node(index)


def _pauses(url: str, kills: list[datetime]) -> list[float]:
    """The longest pause between two envelopes applied at iom-uz from the last one before
    each kill to a minute after it.

    Read from the inbox's ``applied_at`` once the run is over: the
    deliveries already in the consumer's hand are applied after the kill,
    so the pause is the one before the first envelope that came through the
    reconnection.
    """
    engine = open_database(url)
    try:
        with engine.connect() as conn:
            times = sorted(conn.execute(sa.select(inbox_table.c.applied_at)).scalars())
    finally:
        engine.dispose()
    pauses = []
    for at in kills:
        before = [t for t in times if t < at][-1:]
        near = before + [t for t in times if at <= t <= at + _AFTER]
        steps = [(b - a).total_seconds() for a, b in itertools.pairwise(near)]
        pauses.append(max(steps, default=0.0))
    return pauses


def _trm(net: LocalNetwork, participant: str, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "trm", *args],
        capture_output=True,
        env=net.environment(participant),
        check=False,
        timeout=300,
    )
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


def _log_events(net: LocalNetwork, name: str) -> list[dict[str, object]]:
    path = net.root / "logs" / f"{name}.log"
    if not path.exists():
        return []
    found = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def _publish_refused(net: LocalNetwork) -> list[dict[str, object]]:
    """iom-kz's adapter log lines saying the broker could not take its envelopes."""
    return [
        e
        for e in _log_events(net, KZ)
        if e.get("event") in _REFUSED_EVENTS and "quorum" in str(e.get("error", e.get("cause")))
    ]


def run_node_outages(
    root: Path,
    database: str,
    services: Services,
    *,
    messages: int,
    cluster: LocalCluster | None = None,
    flow_seconds: float = NODE_EVENT_SECONDS,
    seed: int = 12,
) -> Row:
    """Campaign 12: one node of three down for the second half, then two of three."""
    with (
        _cluster(cluster, 3, CLUSTER_BASE_PORT) as nodes,
        scratch_network(root, database, [KZ, UZ, ROUTING], _on(nodes, services)) as net,
    ):
        try:
            row = _outages(net, nodes, database, messages, seed, flow_seconds)
        finally:
            _start_all(nodes)
    return row


def _outages(
    net: LocalNetwork, nodes: LocalCluster, database: str, messages: int, seed: int, flow: float
) -> Row:
    late = max(10, messages // 10)
    run = _Run(net, messages, seed)
    sender, receiver = Supervised(net, KZ), Supervised(net, UZ)
    sender.start()
    receiver.start()
    started = time.monotonic()
    run.sender(pace=flow / max(messages, 1))
    stopped_one = {"done": False}

    def tend() -> None:
        sender.tend()
        receiver.tend()
        if not stopped_one["done"] and run.sent >= messages // 2:
            nodes.stop_node(2)
            stopped_one["done"] = True

    one_down = run.wait(_timeout(messages), tend, lambda: stopped_one["done"])
    # Two of three: the quorum queues have no majority left.
    nodes.stop_node(1)
    queued_before = _count(net.database_url(KZ), _PENDING)
    ids = [
        str(net.send(KZ, kind, to=[UZ], case=case).id)
        for kind, case in (flow_message(messages + i, CASES) for i in range(late - 1))
    ]
    payload = net.root / "travel.json"
    payload.write_bytes(example_payload_bytes(MessageKind.TRAVEL_ARRANGED))
    code, _ = _trm(
        net, KZ, "send", "travel_arranged", "--home", str(net.home(KZ)), "--to", UZ,
        "--case", flow_message(0, CASES)[1], "--payload", str(payload),
    )  # fmt: skip
    queued = _count(net.database_url(KZ), _PENDING)
    refused = _wait(lambda: bool(_publish_refused(net)), 120, tend)
    health_code, health = _trm(net, KZ, "health", "--home", str(net.home(KZ)))
    down_seconds = time.monotonic() - started
    _start_all(nodes)
    run.messages += late
    run.sent += late
    drained = run.wait(_timeout(late) + 120, tend)
    seconds = time.monotonic() - started
    sender.stop()
    receiver.stop()
    run.stop()
    row = run.verdict_row("cluster_node_outages", database, seconds, one_down and drained)
    row.faults = 3
    row.figures.update(
        queued_while_two_down=queued - queued_before,
        adapter_errors=len(_publish_refused(net)),
        two_down_s=round(seconds - down_seconds, 1),
        adapter_deaths=sender.deaths + receiver.deaths,
    )
    row.must("delivery went on with one node of three stopped for the second half", one_down)
    row.must("trm send queued in the outbox with two of three nodes down",
             code == 0 and queued >= late and len(ids) == late - 1)  # fmt: skip
    row.must("the adapter logged that the quorum queues refused publishing", refused)
    row.must("trm health failed its broker check, naming the quorum",
             health_code != 0 and "broker" in health and "quorum" in health)  # fmt: skip
    row.must("after both nodes returned everything drained exactly once", drained)
    return row


def run_federation_cut(
    root: Path,
    database: str,
    services: Services,
    *,
    messages: int,
    cluster: LocalCluster | None = None,
    site: LocalCluster | None = None,
    flow_seconds: float = 3 * NODE_EVENT_SECONDS,
    seed: int = 13,
) -> Row:
    """Campaign 13: the broker of iom-uz's site stopped midway through the flow, then restarted."""
    with (
        _cluster(cluster, 3, CLUSTER_BASE_PORT) as home,
        _cluster(site, 1, SITE_BASE_PORT) as remote,
        scratch_network(root, database, [KZ, UZ, ROUTING], _on(home, services)) as net,
    ):
        try:
            row = _federation(net, home, remote, database, messages, seed, flow_seconds)
        finally:
            _start_all(remote)
    return row


def _federation(
    net: LocalNetwork,
    home: LocalCluster,
    remote: LocalCluster,
    database: str,
    messages: int,
    seed: int,
    flow: float,
) -> Row:
    # The inbox and user of iom-uz move to the remote broker; nothing of it stays here.
    admin = ManagementClient(home.management_url)
    admin.delete_queue(net.vhost, inbox_queue(UZ))
    net.add_site([UZ], amqp_url=remote.amqp_url, management_url=remote.management_url)
    _link(net, home, remote)
    run = _Run(net, messages, seed)
    sender, receiver = Supervised(net, KZ), Supervised(net, UZ)
    sender.start()
    receiver.start()
    started = time.monotonic()
    run.sender(pace=flow / max(messages, 1))
    cut = {"at": 0.0, "back": 0.0}

    def tend() -> None:
        sender.tend()
        receiver.tend()
        if not cut["at"] and run.sent >= messages // 3:
            remote.stop_node(0)
            cut["at"] = time.monotonic()
        elif cut["at"] and not cut["back"] and run.sent >= 2 * messages // 3:
            remote.start_node(0)
            cut["back"] = time.monotonic()

    settled = run.wait(_timeout(messages) + 120, tend, lambda: bool(cut["back"]))
    seconds = time.monotonic() - started
    sender.stop()
    receiver.stop()
    run.stop()
    row = run.verdict_row("federation_cut", database, seconds, settled)
    row.faults = 1 if cut["back"] else 0
    row.figures["remote_down_s"] = round(cut["back"] - cut["at"], 1) if cut["back"] else None
    row.figures["adapter_deaths"] = sender.deaths + receiver.deaths
    row.must("the remote broker was stopped during the run and started again", row.faults == 1)
    row.must("the link runs again afterwards", _links_running(net, home, remote))
    return row


def _link(net: LocalNetwork, home: LocalCluster, remote: LocalCluster) -> None:
    """Federate trm.handoff both ways between the two brokers and wait for both links."""
    secret = uuid.uuid4().hex
    here, there = ManagementClient(home.management_url), ManagementClient(remote.management_url)
    grant_link_user(here, net.vhost, "trm-link-uz", secret)
    grant_link_user(there, net.vhost, "trm-link-kz", secret)
    upstream_home = ",".join(
        f"amqp://trm-link-uz:{secret}@127.0.0.1:{node.amqp_port}/{net.vhost}" for node in home.nodes
    )
    link(there, net.vhost, "site-kz", upstream_home)
    remote_node = remote.nodes[0]
    link(here, net.vhost, "site-uz",
         f"amqp://trm-link-kz:{secret}@127.0.0.1:{remote_node.amqp_port}/{net.vhost}")  # fmt: skip
    net.wait_for(lambda: _links_running(net, home, remote), 60, "both federation links running")


def _links_running(net: LocalNetwork, home: LocalCluster, remote: LocalCluster) -> bool:
    statuses = [
        s.status
        for cluster in (home, remote)
        for s in link_status(ManagementClient(cluster.management_url), net.vhost)
    ]
    return statuses == ["running", "running"]
