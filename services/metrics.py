"""What the routing service's metrics endpoint reads at scrape time (`broker.metrics` serves it).

From the routing database: the audit log's size and newest checkpoint, the
cases overdue by stage and by the participant who owes the next step, and
each witness's newest cosignature. The envelopes logged since the process
started are counted in process (`broker.metrics.LOGGED`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from adapters.metrics import gauge, read_part, unreadable
from broker.database import reading
from services.auditlog import log_checkpoints_table, log_entries_table
from services.casestore import CaseStore
from services.cosigners import log_cosignatures_table
from services.deadlines import Policy, Status, deadline_for, status

_c = log_cosignatures_table.c
_SIZE = sa.select(sa.func.max(log_entries_table.c.idx))
_CHECKPOINT = sa.select(
    sa.func.max(log_checkpoints_table.c.size), sa.func.max(log_checkpoints_table.c.time)
)
_COSIGNED = sa.select(_c.witness, sa.func.max(_c.size), sa.func.max(_c.cosigned_at)).group_by(
    _c.witness
)
NOBODY = "none"
"""The owed_by label of a case whose headers name nobody to act."""


class RoutingCollector(Collector):
    """The routing service's metrics, read at each scrape."""

    def __init__(
        self,
        engine: Engine,
        policies: Sequence[Policy],
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """Read the routing database behind `engine`, judging deadlines by `policies`."""
        self.engine = engine
        self.policies = tuple(policies)
        self.clock = clock or (lambda: datetime.now(UTC))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Every family, the parts that failed named in ``trm_metrics_unreadable``."""
        failed: list[str] = []
        yield from read_part("log", failed, self._log)
        yield from read_part("cases", failed, self._overdue)
        yield unreadable(failed)

    def _log(self) -> list[GaugeMetricFamily]:
        size = gauge("trm_log_size", "Entries in the audit log.")
        checkpoint = gauge(
            "trm_log_checkpoint_size", "Entries the newest signed checkpoint covers."
        )
        checkpoint_age = gauge(
            "trm_log_checkpoint_age_seconds", "Seconds since the newest checkpoint was signed."
        )
        cosigned = gauge(
            "trm_witness_cosigned_size",
            "The largest checkpoint size each witness has cosigned.",
            ["witness"],
        )
        silent = gauge(
            "trm_witness_last_cosignature_seconds",
            "Seconds since each witness's newest cosignature.",
            ["witness"],
        )
        now = self.clock()
        with reading(self.engine) as conn:
            last = conn.execute(_SIZE).scalar_one()
            size.add_metric([], 0 if last is None else int(last) + 1)
            top, at = conn.execute(_CHECKPOINT).one()
            checkpoint.add_metric([], int(top or 0))
            if at is not None:
                checkpoint_age.add_metric([], (now - at).total_seconds())
            for witness, largest, newest in conn.execute(_COSIGNED):
                cosigned.add_metric([witness], int(largest))
                silent.add_metric([witness], (now - newest).total_seconds())
        return [size, checkpoint, checkpoint_age, cosigned, silent]

    def _overdue(self) -> list[GaugeMetricFamily]:
        overdue = gauge(
            "trm_cases_overdue",
            "Cases whose current stage's deadline has passed, by stage and by the participant "
            f"who owes the next step ({NOBODY!r} when the headers name nobody).",
            ["stage", "owed_by"],
        )
        now = self.clock()
        counts: dict[tuple[str, str], int] = {}
        for state in CaseStore(self.engine).states(p.stage for p in self.policies):
            deadline = deadline_for(state, self.policies)
            if deadline is None or status(deadline, now) is not Status.OVERDUE:
                continue
            key = (str(deadline.stage), deadline.owed_by or NOBODY)
            counts[key] = counts.get(key, 0) + 1
        for labels, count in sorted(counts.items()):
            overdue.add_metric(list(labels), count)
        return [overdue]
