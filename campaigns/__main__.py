"""``python -m campaigns [--full] [--only NAME] [--database sqlite|postgres|both] [--json]``.

Runs the campaigns one after another, prints one summary table (or the rows
as JSON with ``--json``) and exits 0 only if every must of every campaign
held. Without ``--full`` each campaign runs its short version, as the test
suite does.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from campaigns.cluster import run_federation_cut, run_node_kills, run_node_outages
from campaigns.crashes import (
    ensure_rabbitmq_running,
    run_broker_restarts,
    run_consumer_crashes,
    run_relay_crashes,
)
from campaigns.failover import run_routing_failover
from campaigns.fuzz import run_fuzz_full, run_fuzz_short
from campaigns.hostile import run_hostile
from campaigns.identity import run_identity
from campaigns.network import Services
from campaigns.replay import run_replay
from campaigns.report import Row, render_table, to_json
from trm.progress import Meter


@dataclass(frozen=True)
class Sizes:
    """How big each campaign runs."""

    messages: int
    kills: int
    restarts: int
    hard_kills: int
    hostile: int
    replays: int
    leader_kills: int
    node_kills: int = 3
    federated: int = 200


SHORT = Sizes(
    messages=300, kills=5, restarts=1, hard_kills=0, hostile=400, replays=100, leader_kills=3
)
FULL = Sizes(
    messages=10000,
    kills=50,
    restarts=5,
    hard_kills=1,
    hostile=1200,
    replays=1000,
    leader_kills=20,
    federated=5000,
)
"""The issues' sizes: 10,000 messages per crash campaign, 50 kills, 5 restarts and a kill -9;
the routing leader killed 20 times; the inbox's leading node SIGKILLed 3 times; 5,000
messages across a federation link cut."""
NAMES = (
    "identity",
    "fuzz",
    "hostile_input",
    "replay",
    "consumer_crashes",
    "relay_crashes",
    "broker_restarts",
    "routing_failover",
    "cluster_node_kills",
    "cluster_node_outages",
    "federation_cut",
)
PER_DATABASE = {"consumer_crashes", "relay_crashes", "broker_restarts"}
SQLITE_ONLY = {
    "hostile_input",
    "replay",
    "cluster_node_kills",
    "cluster_node_outages",
    "federation_cut",
}
POSTGRES_ONLY = {"routing_failover"}
"""A standby routing service needs PostgreSQL (on SQLite a second one refuses to start)."""
NO_DATABASE = {"identity", "fuzz"}


def _plan(
    sizes: Sizes, full: bool, services: Services, work: Path
) -> dict[str, Callable[[str], Row]]:
    def root(name: str, database: str) -> Path:
        return work / f"{name}-{database}"

    return {
        "identity": lambda _db: run_identity(
            root("identity", "-"), services.amqp_url, services.management_url
        ),
        "fuzz": lambda _db: (
            run_fuzz_full(root("fuzz", "-")) if full else run_fuzz_short(root("fuzz", "-"))
        ),
        "hostile_input": lambda _db: run_hostile(
            root("hostile", "sqlite"), services, hostile=sizes.hostile
        ),
        "replay": lambda db: run_replay(root("replay", db), db, services, messages=sizes.replays),
        "consumer_crashes": lambda db: run_consumer_crashes(
            root("consumer", db), db, services, messages=sizes.messages, kills=sizes.kills
        ),
        "relay_crashes": lambda db: run_relay_crashes(
            root("relay", db), db, services, messages=sizes.messages, kills=sizes.kills
        ),
        "broker_restarts": lambda db: run_broker_restarts(
            root("broker", db),
            db,
            services,
            messages=sizes.messages,
            restarts=sizes.restarts,
            hard_kills=sizes.hard_kills,
        ),
        "routing_failover": lambda _db: run_routing_failover(
            root("failover", "postgres"),
            services,
            messages=sizes.messages,
            kills=sizes.leader_kills,
        ),
        "cluster_node_kills": lambda db: run_node_kills(
            root("nodekills", db), db, services, messages=sizes.messages, kills=sizes.node_kills
        ),
        "cluster_node_outages": lambda db: run_node_outages(
            root("outages", db), db, services, messages=sizes.messages
        ),
        "federation_cut": lambda db: run_federation_cut(
            root("federation", db), db, services, messages=sizes.federated
        ),
    }


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m campaigns", description=__doc__)
    parser.add_argument("--full", action="store_true", help="the full campaigns (make chaos)")
    parser.add_argument("--only", choices=NAMES, action="append", help="run only these")
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--messages", type=int, help="messages per crash campaign")
    parser.add_argument("--kills", type=int, help="kills per crash campaign")
    parser.add_argument("--work", type=Path, help="keep the networks under this folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen campaigns; 0 if every must held."""
    args = _arguments(argv)
    # The campaign's own in-process sends would log every envelope; keep the table readable.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    sizes = FULL if args.full else SHORT
    if args.messages or args.kills:
        sizes = Sizes(
            messages=args.messages or sizes.messages,
            kills=args.kills or sizes.kills,
            restarts=sizes.restarts,
            hard_kills=sizes.hard_kills,
            hostile=sizes.hostile,
            replays=sizes.replays,
            leader_kills=sizes.leader_kills,
            node_kills=sizes.node_kills,
            federated=sizes.federated,
        )
    databases = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    chosen = args.only or list(NAMES)
    rows: list[Row] = []
    runs = [(name, db) for name in NAMES if name in chosen for db in _databases(name, databases)]
    with (
        tempfile.TemporaryDirectory(prefix="trm-chaos-") as scratch,
        Meter("campaigns", len(runs), unit="runs") as meter,
    ):
        work = args.work or Path(scratch)
        plan = _plan(sizes, args.full, Services(), work)
        for name, database in runs:
            meter.update(meter.done, note=f"{name} [{database}]")
            rows.append(_run_one(name, database, plan[name]))
            meter.advance()
            if not args.json:
                meter.echo(f"{name} [{database}]: {'PASS' if rows[-1].passed else 'FAIL'}")
    if not ensure_rabbitmq_running():
        rows.append(Row("rabbitmq_left_running", musts={"RabbitMQ runs at the end": False}))
    print(to_json(rows) if args.json else render_table(rows))
    return 0 if all(row.passed for row in rows) else 1


def _databases(name: str, chosen: list[str]) -> list[str]:
    if name in NO_DATABASE:
        return ["-"]
    if name in SQLITE_ONLY:
        return ["sqlite"]
    if name in POSTGRES_ONLY:
        return [d for d in chosen if d == "postgres"]
    return chosen


def _run_one(name: str, database: str, run: Callable[[str], Row]) -> Row:
    started = time.monotonic()
    try:
        row = run(database if database != "-" else "sqlite")
    except Exception as e:
        # A campaign that could not finish fails its row; the others still run.
        row = Row(name, database)
        row.must(f"the campaign ran to its end ({type(e).__name__}: {e})", False)
        row.figures["error"] = traceback.format_exc(limit=3).strip().splitlines()[-1]
    row.database = database
    row.figures.setdefault("seconds", round(time.monotonic() - started, 1))
    return row


if __name__ == "__main__":
    sys.exit(main())
