"""Prometheus metrics: the process's counters, its broker connections and the HTTP endpoint.

Events (resends, flags, envelopes logged) are counted in process, here, by
the code that does them. What the database already holds (the outbox, the
receipts awaited, the quarantine, the log) is read at scrape time by a
collector (`adapters.metrics`, `services.metrics`), so a restarted process
reports it at once and nothing is counted twice.

Labels carry participant ids, key ids, reasons, stages and broker nodes,
never a case reference or an envelope id: a scrape goes to a monitoring
system that is not a party to any case.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from broker.errors import ConfigError

log = structlog.get_logger(__name__)

METRICS_PORT_ENV = "TRM_METRICS_PORT"
METRICS_HOST_ENV = "TRM_METRICS_HOST"
DEFAULT_METRICS_HOST = "127.0.0.1"
"""Loopback unless told otherwise: a scrape names the participants this one deals with."""

REGISTRY = CollectorRegistry()
"""The registry the endpoint serves; only trm's metrics, so a scrape is exactly these."""

RESENDS = Counter(
    "trm_resends",
    "Envelopes published again to a recipient whose delivery receipt was overdue.",
    ["recipient"],
    registry=REGISTRY,
)
FLAGGED = Counter(
    "trm_receipt_waits_flagged",
    "Receipt waits given up after every try (also a gauge: trm_receipts_flagged).",
    ["recipient"],
    registry=REGISTRY,
)
LOGGED = Counter(
    "trm_routing_envelopes_logged",
    "Envelopes the routing service appended to the audit log, by verification result.",
    ["result"],
    registry=REGISTRY,
)
REDELIVERED = Counter(
    "trm_routing_envelopes_duplicate",
    "Deliveries the routing service absorbed as already logged.",
    registry=REGISTRY,
)


class Connections(Collector):
    """The broker connections this process holds open, by node (`trm_broker_connections`).

    RabbitMQ's connection properties name the cluster (``cluster_name``),
    not the node, so the node is the address the connection reached: in a
    cluster each node has its own.
    """

    def __init__(self) -> None:
        """Start with no connection."""
        self._lock = threading.Lock()
        self._open: weakref.WeakKeyDictionary[Any, tuple[str, str]] = weakref.WeakKeyDictionary()

    def opened(self, connection: Any, host: str, port: int) -> None:
        """Note a connection `open_connection` made to `host`:`port`."""
        properties = getattr(getattr(connection, "_impl", None), "server_properties", None) or {}
        cluster = properties.get("cluster_name", "")
        if isinstance(cluster, bytes):
            cluster = cluster.decode("utf-8", "replace")
        with self._lock:
            self._open[connection] = (f"{host}:{port}", str(cluster))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Open connections by node and cluster, at scrape time."""
        family = GaugeMetricFamily(
            "trm_broker_connections",
            "Open connections of this process to a RabbitMQ node (node: host:port reached).",
            labels=["node", "cluster"],
        )
        counts: dict[tuple[str, str], int] = {}
        with self._lock:
            held = list(self._open.items())
        for connection, where in held:
            counts.setdefault(where, 0)
            if getattr(connection, "is_open", False):
                counts[where] += 1
        for (node, cluster), count in sorted(counts.items()):
            family.add_metric([node, cluster], count)
        yield family


CONNECTIONS = Connections()
REGISTRY.register(CONNECTIONS)

_served: list[int] = []


def serve(port: int, host: str, collector: Collector) -> None:
    """Serve `REGISTRY`, with `collector` added, on http://`host`:`port`/metrics.

    The server runs in a daemon thread; it ends with the process.
    """
    if _served:
        raise ConfigError(f"metrics are already served on port {_served[0]}")
    REGISTRY.register(collector)
    try:
        start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as e:
        REGISTRY.unregister(collector)
        raise ConfigError(
            f"cannot serve metrics on {host}:{port} ({e.strerror}): choose another "
            f"--metrics-port ({METRICS_PORT_ENV})"
        ) from e
    _served.append(port)
    log.info("metrics.serving", host=host, port=port)
