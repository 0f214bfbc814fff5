"""What an adapter's metrics endpoint reads at scrape time (`broker.metrics` serves it).

From the local database: the outbox still pending, the receipts awaited and
flagged by recipient, the quarantine by reason. From the broker: the inbox
queue's depth (messages ready, not yet delivered to the consumer), read with
a passive declare on a connection of the collector's own. From the installed
directory: the days left on each of this participant's keys. A part that
cannot be read is reported as ``trm_metrics_unreadable{part=...} 1`` and the
rest still is, so a scrape never fails because the database or the broker
is down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import sqlalchemy as sa
import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from adapters.home import Home
from broker.database import awaiting_receipts_table, outbox_table, quarantine_table, reading
from broker.errors import TrmError
from broker.reception import ANSWERED
from broker.topology import inbox_queue
from broker.transport import open_connection

log = structlog.get_logger(__name__)

_a = awaiting_receipts_table.c
_o = outbox_table.c
_q = quarantine_table.c
_PENDING = sa.select(sa.func.count()).where(_o.sent_at.is_(None))
_AWAITED = (
    sa.select(
        _a.recipient,
        sa.func.count(),
        sa.func.count(_a.flagged_at),
        sa.func.min(_o.sent_at),
    )
    .join(outbox_table, _o.envelope_id == _a.envelope_id)
    .where(~ANSWERED)
    .group_by(_a.recipient)
)
_QUARANTINE = (
    sa.select(_q.reason, sa.func.count()).where(_q.requeued_at.is_(None)).group_by(_q.reason)
)
_SECONDS_PER_DAY = 86400.0


def gauge(name: str, text: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    """A gauge family with `labels` (none by default)."""
    return GaugeMetricFamily(name, text, labels=labels or [])


def unreadable(parts: list[str]) -> GaugeMetricFamily:
    """``trm_metrics_unreadable``: 1 for each part this scrape could not read."""
    family = gauge(
        "trm_metrics_unreadable",
        "1 for a part of this scrape that could not be read (see the process's log).",
        ["part"],
    )
    for part in parts:
        family.add_metric([part], 1)
    return family


def read_part(
    part: str, failed: list[str], read: Callable[[], list[GaugeMetricFamily]]
) -> list[GaugeMetricFamily]:
    """`read()`, or nothing with `part` noted in `failed` when it raises a trm or driver error."""
    try:
        return read()
    except (TrmError, sa.exc.SQLAlchemyError, OSError) as e:
        failed.append(part)
        log.warning("metrics.unreadable", part=part, error=type(e).__name__)
        return []


class AdapterCollector(Collector):
    """One participant's adapter metrics, read at each scrape."""

    def __init__(self, home: Home, clock: Callable[[], datetime] | None = None) -> None:
        """Read `home`'s database, directory and inbox queue."""
        self.home = home
        self.clock = clock or (lambda: datetime.now(UTC))
        self._engine: Engine | None = None
        self._broker: object | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Every family, the parts that failed named in ``trm_metrics_unreadable``."""
        failed: list[str] = []
        with self._lock:
            yield from read_part("database", failed, self._database)
            yield from read_part("broker", failed, self._queue)
            yield from read_part("directory", failed, self._keys)
        yield unreadable(failed)

    def _database(self) -> list[GaugeMetricFamily]:
        if self._engine is None:
            self._engine = self.home.open_database()
        pending = gauge("trm_outbox_pending", "Envelopes in the outbox not yet confirmed.")
        awaited = gauge(
            "trm_receipts_awaited",
            "Delivery receipts our envelopes still wait for, by recipient (flagged included).",
            ["recipient"],
        )
        flagged = gauge(
            "trm_receipts_flagged",
            "Receipt waits given up after every try and not yet answered, by recipient.",
            ["recipient"],
        )
        oldest = gauge(
            "trm_receipt_oldest_wait_seconds",
            "Seconds since the broker confirmed the oldest envelope still awaiting a receipt.",
            ["recipient"],
        )
        quarantined = gauge(
            "trm_quarantine",
            "Envelopes refused on arrival and kept in the quarantine table, by reason.",
            ["reason"],
        )
        now = self.clock()
        with reading(self._engine) as conn:
            pending.add_metric([], conn.execute(_PENDING).scalar_one())
            for recipient, count, flags, first in conn.execute(_AWAITED):
                awaited.add_metric([recipient], count)
                flagged.add_metric([recipient], flags)
                if first is not None:
                    oldest.add_metric([recipient], (now - first).total_seconds())
            for reason, count in conn.execute(_QUARANTINE):
                quarantined.add_metric([reason], count)
        return [pending, awaited, flagged, oldest, quarantined]

    def _queue(self) -> list[GaugeMetricFamily]:
        depth = gauge(
            "trm_inbox_queue_ready",
            "Messages ready in this participant's inbox queue, not yet delivered to the "
            "adapter (the consumer's lag).",
        )
        depth.add_metric([], self._ready())
        return [depth]

    def _ready(self) -> int:
        connection = self._broker
        if connection is None or not getattr(connection, "is_open", False):
            connection = open_connection(self.home.amqp_settings())
            self._broker = connection
        try:
            channel = connection.channel()  # type: ignore[attr-defined]
            try:
                declared = channel.queue_declare(
                    inbox_queue(self.home.participant_id), passive=True
                )
            finally:
                if channel.is_open:
                    channel.close()
        except Exception as e:
            # A closed connection or channel: open a new one at the next scrape.
            self._broker = None
            raise OSError(f"cannot read the inbox queue: {type(e).__name__}") from e
        return int(declared.method.message_count)

    def _keys(self) -> list[GaugeMetricFamily]:
        days = gauge(
            "trm_key_expiry_days",
            "Days until each of this participant's keys in the directory expires "
            "(negative once expired); revoked keys are left out.",
            ["kid", "use"],
        )
        now = self.clock()
        participant = self.home.directory().participant(self.home.participant_id)
        for key in participant.keys:
            if key.revoked_at is not None and key.revoked_at <= now:
                continue
            left = (key.not_after - now).total_seconds() / _SECONDS_PER_DAY
            days.add_metric([key.kid, str(key.use)], left)
        return [days]
