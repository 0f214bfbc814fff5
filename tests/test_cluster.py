"""A local three-node RabbitMQ cluster and a second, federated country broker, both beside
the machine's default broker: the cluster script, quorum replicas, an adapter failing over
to another node, and a return case crossing two linked brokers with its receipts.

Both come from the module's `local_sites`: the cluster script starts the cluster and
removes it at the end leaving nothing. The short versions of the
cluster campaigns (campaigns/cluster.py, full size in make chaos) run on them here too, so
that one file, on one test worker, holds everything that needs the cluster."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
import sqlalchemy as sa

from broker.database import open_database, receipts_table
from broker.federation import grant_link_user, link_permissions, link_status
from broker.management import ManagementClient
from broker.topology import EXCHANGE, ROUTING_QUEUE, inbox_queue
from campaigns.cluster import run_federation_cut, run_node_kills, run_node_outages
from campaigns.network import Services
from campaigns.report import render_table
from schemas.base import MessageKind
from services.auditlog import log_entries_table

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

KZ, UZ, NGO, ROUTING = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod", "routing"
CASE = "iom-kz.KZ-2026-0777"


@dataclass
class LocalSites:
    """A local three-node cluster and a single-node second country broker, and how the
    cluster script's start went."""

    cluster: Any
    site: Any
    script: dict[str, Any] = field(default_factory=dict)


def _cluster_script(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(__file__).resolve().parent.parent / "scripts" / "rabbitmq-cluster"
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def local_sites(rabbitmq_urls: tuple[str, str]) -> Iterator[LocalSites]:
    """A RabbitMQ cluster on 5680-5682 and a second broker on 5690, beside the default one.

    The cluster is started with scripts/rabbitmq-cluster; at the module's end the script
    removes it, both are gone without a trace (so a new start finds nothing in its way),
    and the default broker must still answer.
    """
    from broker.management import ManagementClient
    from trm.localcluster import LocalCluster, free_base_port

    # Free ports from 5680 (else 5700, 5720...): another session may run its own beside.
    cluster_base = free_base_port(3)
    sites = LocalSites(
        LocalCluster(count=3, base_port=cluster_base),
        LocalCluster(count=1, base_port=free_base_port(1, cluster_base + 10)),
    )
    base = str(sites.cluster.base_port)
    started_here: list[Any] = []
    try:
        with ThreadPoolExecutor(1) as pool:
            site = pool.submit(sites.site.start)
            started = _cluster_script("start", "--base-port", base)
            sites.script["start"] = (started.returncode, started.stdout, started.stderr)
            if started.returncode == 0:
                # Whatever runs on these ports now is this session's own, until it is stopped.
                started_here.append(sites.cluster)
            site.result()
            started_here.append(sites.site)
        assert started.returncode == 0, started.stderr
        yield sites
    finally:
        # Only what this session started: a cluster that refused to start is another's.
        removed = (
            _cluster_script("stop", "--base-port", base) if sites.cluster in started_here else None
        )
        for cluster in started_here:
            cluster.stop()
        assert removed is None or removed.returncode == 0, removed.stderr
        assert all(cluster.leftovers() == [] for cluster in started_here)
        assert ManagementClient(rabbitmq_urls[1]).request("GET", "/overview") is not None


@pytest.fixture
def local_network(tmp_path: Path) -> Iterator[Any]:
    """A factory of `trm.localnet` networks on the brokers given, each closed afterwards."""
    from trm.localnet import DEMO_PARTICIPANTS, LocalNetwork, create_network

    networks: list[LocalNetwork] = []

    def make(**options: Any) -> LocalNetwork:
        net = create_network(tmp_path / f"net{len(networks)}", DEMO_PARTICIPANTS, **options)
        networks.append(net)
        return net

    try:
        yield make
    finally:
        for net in networks:
            net.close()


def _admin(url: str, vhost: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.virtual_host = vhost
    return pika.BlockingConnection(params)


def test_provisioning_puts_every_quorum_queue_on_all_three_nodes(local_sites, local_network):
    """On the cluster every queue trm broker provision declares is a quorum queue with a member
    on each of the three nodes."""
    cluster = local_sites.cluster
    net = local_network(amqp_url=cluster.amqp_url, management_url=cluster.management_url)
    client = ManagementClient(cluster.management_url)
    queues = [
        q for q in client.request("GET", f"/queues/{net.vhost}") if q["name"].startswith("trm.")
    ]
    assert {q["name"] for q in queues} >= {inbox_queue(KZ), inbox_queue(UZ), ROUTING_QUEUE}
    nodes = sorted(node.name for node in cluster.nodes)
    for queue in queues:
        assert queue["type"] == "quorum", queue["name"]
        assert sorted(queue["members"]) == nodes, queue["name"]


def _consumer_node(client: ManagementClient, vhost: str, queue: str) -> str | None:
    found = client.request("GET", f"/queues/{vhost}/{queue}")
    for detail in found.get("consumer_details", []):
        name = detail.get("channel_details", {}).get("connection_name", "")
        if name:
            return str(detail["channel_details"].get("node"))
    return None


def test_an_adapter_fails_over_to_another_node_and_goes_on_delivering(local_sites, local_network):
    """The node iom-uz's adapter consumes through is stopped: the adapter reconnects to another
    node of TRM_AMQP_URL by itself and the next request is applied; the node it reached is
    in its log."""
    cluster = local_sites.cluster
    # Node 2 first in every participant's list, so that stopping it forces a failover.
    order = [cluster.nodes[1].amqp_url, cluster.nodes[0].amqp_url, cluster.nodes[2].amqp_url]
    net = local_network(amqp_url=",".join(order), management_url=cluster.management_url)
    client = ManagementClient(cluster.management_url)
    net.start_adapter(KZ)
    net.start_adapter(UZ)
    first = net.send(KZ, MessageKind.RETURN_REQUEST, to=[UZ], case=CASE)
    net.wait_for(lambda: str(first.id) in net.inbox_ids(UZ), 60, "the first request at iom-uz")
    net.wait_for(
        lambda: _consumer_node(client, net.vhost, inbox_queue(UZ)) is not None, 30, "a consumer"
    )
    assert _consumer_node(client, net.vhost, inbox_queue(UZ)) == cluster.nodes[1].name
    cluster.stop_node(1)
    try:
        second = net.send(KZ, MessageKind.RETURN_REQUEST, to=[UZ], case=f"{CASE}-2")
        net.wait_for(lambda: str(second.id) in net.inbox_ids(UZ), 90, "the second request")
        node = _consumer_node(client, net.vhost, inbox_queue(UZ))
        assert node in (cluster.nodes[0].name, cluster.nodes[2].name)
    finally:
        cluster.start_node(1)
    lines = [
        json.loads(line)
        for line in (net.root / "logs" / f"{UZ}.log").read_text().splitlines()
        if line.startswith("{")
    ]
    changed = [line for line in lines if line.get("event") == "broker node changed"]
    assert changed and changed[-1]["previous"] == f"127.0.0.1:{cluster.nodes[1].amqp_port}"
    assert net.inbox_ids(UZ) == {str(first.id), str(second.id)}


def _trm(*args: str) -> str:
    from click.testing import CliRunner

    from trm.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _link_sites(net: Any, sites: Any) -> None:
    """Federate trm.handoff both ways between the cluster and the country broker, with
    trm broker link-user on each upstream and trm broker link on each downstream."""
    secret = net.root / "link-password"
    secret.write_text(uuid.uuid4().hex)
    a, b = sites.cluster, sites.site
    for broker, user in ((a, "trm-link-uz"), (b, "trm-link-kz")):
        _trm(
            "broker",
            "link-user",
            "--vhost",
            net.vhost,
            "--management-url",
            broker.management_url,
            "--user",
            user,
            "--password-file",
            str(secret),
        )
    password = secret.read_text()
    to_a = net.root / "upstream-a"
    to_a.write_text(
        ",".join(
            f"amqp://trm-link-uz:{password}@127.0.0.1:{n.amqp_port}/{net.vhost}" for n in a.nodes
        )
    )
    to_b = net.root / "upstream-b"
    to_b.write_text(f"amqp://trm-link-kz:{password}@127.0.0.1:{b.nodes[0].amqp_port}/{net.vhost}")
    for broker, name, upstream in ((b, "site-kz", to_a), (a, "site-uz", to_b)):
        _trm(
            "broker",
            "link",
            "--vhost",
            net.vhost,
            "--management-url",
            broker.management_url,
            "--name",
            name,
            "--upstream-url-file",
            str(upstream),
        )
    for broker in (a, b):
        client = ManagementClient(broker.management_url)
        net.wait_for(
            lambda c=client: [s.status for s in link_status(c, net.vhost)] == ["running"],
            60,
            "the federation link running",
        )
    assert "running" in _trm(
        "broker", "links", "--vhost", net.vhost, "--management-url", b.management_url
    )


def test_a_return_case_crosses_two_federated_brokers_with_its_receipts(local_sites, local_network):
    """iom-kz on the cluster sends a return request to iom-uz and its NGO on another broker;
    both apply it, the NGO's acknowledgement comes back to both missions, every receipt comes
    back, and the routing service (on the cluster) logs each envelope exactly once."""
    cluster, site = local_sites.cluster, local_sites.site
    net = local_network(
        amqp_url=cluster.amqp_url,
        management_url=cluster.management_url,
        provisioned=[KZ, ROUTING],
    )
    net.add_site([UZ, NGO], amqp_url=site.amqp_url, management_url=site.management_url)
    _link_sites(net, local_sites)
    database = f"sqlite:///{net.root / 'routing.db'}"
    net.start_process(
        ["routing", "run", "--home", str(net.home(ROUTING)), "--database-url", database],
        "routing",
    )
    for participant_id in (KZ, UZ, NGO):
        net.start_adapter(participant_id)
    request = net.send(KZ, MessageKind.RETURN_REQUEST, to=[UZ, NGO], case=CASE)
    for reader in (UZ, NGO):
        net.wait_for(lambda r=reader: str(request.id) in net.inbox_ids(r), 60, f"at {reader}")
    ack = net.send(
        NGO, MessageKind.RECEPTION_CONFIRMED, to=[KZ, UZ], case=CASE, reply_to=request.id
    )
    for mission in (KZ, UZ):
        net.wait_for(lambda m=mission: str(ack.id) in net.inbox_ids(m), 60, f"ack at {mission}")

    def receipts(participant_id: str) -> set[tuple[str, str]]:
        with net.engine(participant_id).connect() as conn:
            rows = conn.execute(sa.select(receipts_table.c.envelope_id, receipts_table.c.recipient))
            return {(r.envelope_id, r.recipient) for r in rows}

    net.wait_for(lambda: len(receipts(KZ)) == 2 and len(receipts(NGO)) == 2, 60, "receipts")
    assert receipts(KZ) == {(str(request.id), UZ), (str(request.id), NGO)}
    assert receipts(NGO) == {(str(ack.id), KZ), (str(ack.id), UZ)}
    # Two envelopes and four receipts, each logged once, with a verified signature.
    engine = open_database(database)

    def logged() -> list[tuple[str, str]]:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(log_entries_table.c.envelope_id, log_entries_table.c.verification)
            )
            return [(r.envelope_id, r.verification) for r in rows]

    try:
        net.wait_for(lambda: len(logged()) >= 6, 60, "six envelopes in the routing log")
        entries = logged()
    finally:
        engine.dispose()
    assert len(entries) == len({e for e, _v in entries}) == 6
    assert {v for _e, v in entries} == {"ok"}
    assert {str(request.id), str(ack.id)} <= {e for e, _v in entries}
    b = ManagementClient(site.management_url)
    assert b.get_queue(net.vhost, ROUTING_QUEUE) is None
    assert b.get_queue(net.vhost, inbox_queue(KZ)) is None


def test_the_link_user_may_not_publish_nor_read_an_inbox(local_sites, local_network):
    """The federation link's user on the upstream broker is refused publishing to trm.handoff
    and consuming a participant's inbox."""
    cluster = local_sites.cluster
    net = local_network(amqp_url=cluster.amqp_url, management_url=cluster.management_url)
    client = ManagementClient(cluster.management_url)
    grant_link_user(client, net.vhost, "trm-link-test", "link-secret-1")
    allowed = link_permissions()
    assert client.get_permissions(net.vhost, "trm-link-test") is not None
    url = f"amqp://trm-link-test:link-secret-1@127.0.0.1:{cluster.nodes[0].amqp_port}/"
    try:
        connection = _admin(url, net.vhost)
        channel = connection.channel()
        channel.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="403"):
            channel.basic_publish(EXCHANGE, UZ, b"x", mandatory=True)
        connection.close()
        connection = _admin(url, net.vhost)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="403"):
            connection.channel().basic_get(inbox_queue(UZ))
        connection.close()
    finally:
        client.delete_user("trm-link-test")
    assert "trm\\.inbox" not in allowed.read and allowed.write.startswith("^federation")


def test_the_script_starts_the_cluster_beside_the_default_broker(local_sites):
    """scripts/rabbitmq-cluster started three nodes as one cluster and printed their
    TRM_AMQP_URL; the default broker answers and is not part of it. (At the module's end the
    script removes the cluster, and no folder, epmd name, port or process may be left.)"""
    start, cluster = local_sites.script["start"], local_sites.cluster
    assert start[0] == 0, start[2]
    assert start[1].strip() == cluster.amqp_url
    assert cluster.running() == sorted(node.name for node in cluster.nodes)
    overview = ManagementClient("http://guest:guest@127.0.0.1:15672/").request("GET", "/overview")
    assert overview["cluster_name"] != cluster.cluster_name


# --- the cluster campaigns, short (make chaos runs them full: campaigns/cluster.py) -------


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_the_inbox_leader_sigkilled_three_times_loses_and_duplicates_nothing(
    tmp_path: Path, local_sites: Any, campaign_services: Services
) -> None:
    """The node leading iom-uz's inbox is SIGKILLed and restarted three times during the flow:
    every message applied and receipted once, delivery resuming after each kill."""
    row = run_node_kills(
        tmp_path / "net",
        "sqlite",
        campaign_services,
        messages=120,
        kills=3,
        cluster=local_sites.cluster,
        flow_seconds=10,
    )
    assert row.passed, render_table([row])
    assert (row.lost, row.duplicated, row.faults) == (0, 0, 3)
    assert row.figures["no_delivery_max_s"] > 0


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_one_node_down_delivers_and_two_down_queue_until_they_return(
    tmp_path: Path, local_sites: Any, campaign_services: Services
) -> None:
    """One node of three down for the second half: delivery goes on; two down: publishing
    stops with the quorum named in the adapter's log and trm health, trm send queues, and
    everything drains exactly once when they return."""
    row = run_node_outages(
        tmp_path / "net",
        "sqlite",
        campaign_services,
        messages=100,
        cluster=local_sites.cluster,
        flow_seconds=8,
    )
    assert row.passed, render_table([row])
    assert (row.lost, row.duplicated) == (0, 0)
    assert row.figures["queued_while_two_down"] >= 10


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_a_federation_link_cut_loses_and_duplicates_nothing(
    tmp_path: Path, local_sites: Any, campaign_services: Services
) -> None:
    """iom-uz's broker, linked to iom-kz's cluster, is stopped midway and started again:
    every message crosses and is applied once, every receipt comes back."""
    row = run_federation_cut(
        tmp_path / "net",
        "sqlite",
        campaign_services,
        messages=150,
        cluster=local_sites.cluster,
        site=local_sites.site,
        flow_seconds=15,
    )
    assert row.passed, render_table([row])
    assert (row.lost, row.duplicated, row.faults) == (0, 0, 1)
