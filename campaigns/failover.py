"""Campaign 8: the leading routing service SIGKILLed again and again during a run.

Two ``trm routing run`` processes share one PostgreSQL database. iom-kz's
adapter relays a paced flow to iom-uz; whenever the leader has logged part of
the current round it is killed with SIGKILL, the standby must take over, and
the killed process is started again as the new standby. At the end every
envelope sent must be logged exactly once at indices 0..n-1, the export must
verify and its replay equal the database. The time from each kill to the
standby's ``routing.leader`` line is measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import sqlalchemy as sa

from broker.database import open_database
from campaigns.network import KZ, ROUTING, UZ, Services, flow_message, scratch_network
from campaigns.report import Row
from services.auditlog import log_entries_table
from services.leadership import LEADER_EVENT, STANDBY_EVENT
from trm.localnet import LocalNetwork

_CASES = 50
_TAKEOVER_LIMIT = 60.0
"""Seconds to wait for a standby to lead before the row fails (not a measured threshold)."""

_t = log_entries_table.c


class _Routing:
    """One incarnation of a routing process and its own log file."""

    def __init__(self, net: LocalNetwork, url: str, n: int) -> None:
        self.log = net.root / f"routing-{n}.jsonl"
        args = ["routing", "run", "--home", str(net.home(ROUTING)), "--database-url", url]
        self.proc = net.start_process(
            [*args, "--log-file", str(self.log), "--checkpoint-interval", "1"], f"routing-{n}"
        )

    def leads(self) -> bool:
        """Whether this process has logged ``routing.leader``; RuntimeError if it died first."""
        return self._has_logged(LEADER_EVENT)

    def stands_by(self) -> bool:
        """Whether this process is up and waiting for the lead (or has it already)."""
        return self._has_logged(STANDBY_EVENT) or self._has_logged(LEADER_EVENT)

    def _has_logged(self, event: str) -> bool:
        if self.proc.poll() is not None and not self._in_log(event):
            raise RuntimeError(f"routing process {self.proc.pid} exited {self.proc.returncode}")
        return self._in_log(event)

    def _in_log(self, event: str) -> bool:
        if not self.log.exists():
            return False
        lines = self.log.read_text().splitlines()
        return any(json.loads(line).get("event") == event for line in lines if line)


def _logged(url: str) -> dict[str, int]:
    """Envelope id -> how many log entries hold it."""
    engine = open_database(url)
    try:
        with engine.connect() as conn:
            query = sa.select(_t.envelope_id, sa.func.count()).group_by(_t.envelope_id)
            return {str(i): int(n) for i, n in conn.execute(query)}
    finally:
        engine.dispose()


def _any_logged(url: str, ids: list[str]) -> bool:
    logged = _logged(url)
    return any(i in logged for i in ids)


def _indices_contiguous(url: str) -> bool:
    engine = open_database(url)
    try:
        with engine.connect() as conn:
            low, high, count = conn.execute(
                sa.select(sa.func.min(_t.idx), sa.func.max(_t.idx), sa.func.count())
            ).one()
    finally:
        engine.dispose()
    return bool(count == 0 or (low == 0 and high == count - 1))


def _trm(net: LocalNetwork, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "trm", *args],
        capture_output=True,
        env=net.environment(),
        check=False,
        timeout=600,
    )
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


def _audit(net: LocalNetwork, url: str, size: int) -> dict[str, bool]:
    home = net.home(ROUTING)
    export = net.root / "export.jsonl"
    pub = str(home / "authority.pub")
    exported, _ = _trm(net, "audit", "export", "--home", str(home), "--database-url", url,
                       "--out", str(export))  # fmt: skip
    verified, out = _trm(net, "audit", "verify", str(export), "--directory",
                         str(home / "directory.json"), "--authority-key", pub)  # fmt: skip
    replayed, diff = _trm(net, "audit", "replay", str(export), "--authority-key", pub,
                          "--against", url)  # fmt: skip
    return {
        "the export verifies": exported == 0
        and verified == 0
        and out.startswith(f"intact: {size} entries"),
        "the replay equals the database": replayed == 0 and "no difference" in diff,
    }


def run_routing_failover(root: Path, services: Services, *, messages: int, kills: int) -> Row:
    """Send `messages` in `kills` + 1 rounds, SIGKILLing the routing leader in each but the last."""
    with scratch_network(root, "postgres", [KZ, UZ, ROUTING], services) as net:
        url = net.database_url(ROUTING)
        # One after the other: started together, either might win the lock.
        leader = _Routing(net, url, 0)
        net.wait_for(leader.leads, _TAKEOVER_LIMIT, "the first routing process to lead")
        standby = _Routing(net, url, 1)
        sender = net.start_adapter(KZ)
        rounds = kills + 1
        sent: list[str] = []
        takeovers: list[float] = []
        started = time.monotonic()
        for r in range(rounds):
            chunk = range(r * messages // rounds, (r + 1) * messages // rounds)
            flow = [flow_message(i, _CASES) for i in chunk]
            ids = [str(net.send(KZ, kind, to=[UZ], case=case).id) for kind, case in flow]
            sent += ids
            if r == rounds - 1:
                break
            # Kill while the round flows: some of it logged, the rest still coming.
            net.wait_for(partial(_any_logged, url, ids), 120, "part of the round logged")
            net.kill(leader.proc)
            killed_at = time.monotonic()
            net.wait_for(standby.leads, _TAKEOVER_LIMIT, "the standby to lead")
            takeovers.append(time.monotonic() - killed_at)
            leader, standby = standby, _Routing(net, url, r + 2)
        timeout = 120 + messages * 0.05
        net.wait_for(lambda: set(sent) <= set(_logged(url)), timeout, "every envelope logged")
        seconds = time.monotonic() - started
        net.stop(sender)
        # The last standby may still be starting (importing) on a busy machine: a SIGTERM then
        # would end it before it can stop in order.
        net.wait_for(standby.stands_by, _TAKEOVER_LIMIT, "the last standby to be up")
        stopped = [net.stop(leader.proc), net.stop(standby.proc)]
        logged = _logged(url)
        row = Row("routing_failover", "postgres", messages=len(sent), faults=len(takeovers))
        row.ok = sum(1 for i in sent if logged.get(i) == 1)
        row.lost = sum(1 for i in sent if i not in logged)
        row.duplicated = sum(1 for i in sent if logged.get(i, 0) > 1)
        row.figures.update(
            leader_sigkills=len(takeovers),
            takeover_max_s=round(max(takeovers, default=0.0), 2),
            takeover_mean_s=round(sum(takeovers) / max(len(takeovers), 1), 2),
            log_entries=sum(logged.values()),
            seconds=round(seconds, 1),
        )
        row.must(f"the leader SIGKILLed {kills} times, the standby leading each time",
                 len(takeovers) == kills)  # fmt: skip
        row.must("every envelope logged exactly once", row.ok == len(sent) == messages)
        row.must("nothing else logged", set(logged) == set(sent))
        row.must("log indices 0..n-1, none repeated", _indices_contiguous(url))
        row.must("both routing processes stop cleanly", stopped == [0, 0])
        for statement, held in _audit(net, url, len(sent)).items():
            row.must(statement, held)
        return row
