"""The Prometheus endpoints of a real adapter and a real routing process, scraped over HTTP."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from broker.directory import load_home_directory
from broker.transport import Outgoing, Publisher
from schemas.base import MessageKind
from trm.cli import cli
from trm.localnet import DEMO_PARTICIPANTS, LocalNetwork

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

KZ, UZ, ROUTING = "iom-kz", "iom-uz", "routing"
TIMEOUT = 120.0
"""Only for a hung run: processes start cold on a shared machine."""
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
CASE_REF = re.compile(
    r"(^|[^A-Za-z0-9-])(" + "|".join(re.escape(p[0]) for p in DEMO_PARTICIPANTS) + r")\.[A-Za-z0-9]"
)
"""A case reference, ``<owner>.<local>``, anywhere in a label value."""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
DEPLOYMENT = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def scrape(port: int) -> Samples:
    """Every sample at http://127.0.0.1:PORT/metrics, by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode("utf-8")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def names(port: int) -> set[str]:
    """Every sample name the endpoint describes, those without a sample yet included."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode("utf-8")
    found: set[str] = set()
    for family in text_string_to_metric_families(text):
        found.add(family.name)
        if family.type == "counter":
            found.add(f"{family.name}_total")
    return found


def alert_metric_names() -> set[str]:
    """The trm_* names the alert rules in docs/deployment.md use."""
    text = DEPLOYMENT.read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None, "docs/deployment.md has no yaml block of alert rules"
    rules = [r for g in yaml.safe_load(block[1])["groups"] for r in g["rules"]]
    return {n for r in rules for n in re.findall(r"\btrm_[a-z_]+", r["expr"])}


def scraped(port: int) -> Samples:
    """`scrape`, or nothing while the process is not serving yet."""
    try:
        return scrape(port)
    except (urllib.error.URLError, ConnectionError):
        return {}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def waits_for(
    net: LocalNetwork, port: int, name: str, want: Callable[[float | None], bool], **labels: str
) -> Samples:
    """Scrape until `name` with `labels` satisfies `want`; the last scrape."""
    seen: list[Samples] = []

    def done() -> bool:
        seen.append(scraped(port))
        return want(value(seen[-1], name, **labels))

    net.wait_for(done, TIMEOUT, f"{name}{labels} on port {port}")
    return seen[-1]


def no_identifier_in_labels(samples: Samples, secrets: set[str]) -> None:
    for (name, labels), _ in samples.items():
        for key, text in labels:
            assert not UUID.search(text), (name, key, text)
            assert not CASE_REF.search(text), (name, key, text)
            assert not any(secret in text for secret in secrets), (name, key, text)


def test_adapter_and_routing_endpoints(
    local_network: Callable[..., Any], network_databases, tmp_path
) -> None:
    """Outbox, receipts awaited, resends, quarantine, queue depth, keys and broker node on two
    adapters; ingest, log size and overdue cases on the routing service; no case or id in a
    label. On SQLite and PostgreSQL."""
    net: LocalNetwork = local_network(database_urls=network_databases([KZ, UZ, ROUTING]))
    cases = [f"iom-kz.KZ-METRICS-{n}" for n in range(3)]
    sent = [str(net.send(KZ, MessageKind.RETURN_REQUEST, to=[UZ], case=c).id) for c in cases]
    secrets = {*cases, *sent}
    publisher = Publisher(net.settings(KZ).amqp_settings(), KZ)
    try:
        publisher.publish([Outgoing("garbled", (UZ,), b"\x00garbled, not an envelope")])
    finally:
        publisher.close()
    kz_port, uz_port, routing_port = free_port(), free_port(), free_port()
    started = datetime.now(UTC)
    # A resend is due half a second after the first publish, and iom-uz is not running yet.
    net.start_adapter(KZ, env={"TRM_METRICS_PORT": str(kz_port), "TRM_RESEND_AFTER_SECONDS": "0.5"})
    kz = waits_for(net, kz_port, "trm_outbox_pending", lambda v: v == 0)
    kz = waits_for(net, kz_port, "trm_resends_total", lambda v: (v or 0) >= 1, recipient=UZ)
    assert value(kz, "trm_receipts_awaited", recipient=UZ) == 3
    assert value(kz, "trm_receipts_flagged", recipient=UZ) == 0
    assert (value(kz, "trm_receipt_oldest_wait_seconds", recipient=UZ) or 0) > 0
    nodes = {
        dict(labels)["node"]: v for (n, labels), v in kz.items() if n == "trm_broker_connections"
    }
    assert nodes.get("127.0.0.1:5672", 0) >= 1, nodes
    scraped_by = datetime.now(UTC)
    for key in load_home_directory(net.home(KZ)).participant(KZ).keys:
        days = value(kz, "trm_key_expiry_days", kid=key.kid, use=str(key.use))
        left = [(key.not_after - t).total_seconds() / 86400 for t in (scraped_by, started)]
        assert days is not None and 0 < left[0] <= days <= left[1], (key.kid, days, left)
    assert not [k for k in kz if k[0] == "trm_metrics_unreadable"]

    policies = tmp_path / "policies.json"
    policies.write_text(
        json.dumps({"policies": [{"stage": "requested", "limit": "1s", "warn_before": "0s"}]})
    )
    routing_args = ["routing", "run", "--home", str(net.home(ROUTING))]
    routing_args += ["--database-url", net.database_url(ROUTING), "--policies", str(policies)]
    routing_args += ["--metrics-port", str(routing_port)]
    net.start_process(routing_args, "routing")
    found: list[Samples] = []

    def ingested() -> bool:
        # The routing service's own reminders are logged too: at least the three envelopes.
        found.append(scraped(routing_port))
        logged = [v for (n, _), v in found[-1].items() if n == "trm_routing_envelopes_logged_total"]
        return (
            (value(found[-1], "trm_routing_envelopes_logged_total", result="ok") or 0) >= 3
            and value(found[-1], "trm_routing_envelopes_logged_total", result="rejected") == 1
            and value(found[-1], "trm_cases_overdue", stage="requested", owed_by=UZ) == 3
            and value(found[-1], "trm_log_size") == sum(logged)
        )

    net.wait_for(ingested, TIMEOUT, "the routing service's ingest, log size and overdue cases")
    routing = found[-1]
    assert not [k for k in routing if k[0] == "trm_metrics_unreadable"]

    net.start_adapter(UZ, env={"TRM_METRICS_PORT": str(uz_port)})
    net.wait_for(lambda: set(sent) <= net.inbox_ids(UZ), TIMEOUT, "the envelopes applied")
    uz = waits_for(net, uz_port, "trm_quarantine", lambda v: v == 1, reason="malformed")
    uz = waits_for(net, uz_port, "trm_inbox_queue_ready", lambda v: v == 0)
    assert not [k for k in uz if k[0] == "trm_metrics_unreadable"]
    kz = waits_for(
        net, kz_port, "trm_receipts_awaited", lambda v: v is None, recipient=UZ
    )  # every receipt back: no series left for iom-uz
    for samples in (kz, uz, routing, scrape(routing_port)):
        no_identifier_in_labels(samples, secrets)
    served = names(kz_port) | names(routing_port)
    assert alert_metric_names() - served == set()


def test_a_busy_metrics_port_is_refused_before_the_adapter_starts(local_network) -> None:
    """The port taken: the command ends with a reason naming the port and the setting."""
    net: LocalNetwork = local_network()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["adapter", "run", "--home", str(net.home(KZ)), "--metrics-port", str(port)]
        result = CliRunner().invoke(cli, args, env=net.environment(KZ))
    assert result.exit_code == 1, result.output
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.output
    assert "TRM_METRICS_PORT" in result.output
