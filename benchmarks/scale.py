"""Scale figures: a hundred participants' week of backlog, and a log of a million entries.

Run: ``python -m benchmarks.scale [--participants N] [--backlog N] [--log-entries N] [--json]``,
or ``make bench-scale`` / ``trm bench --scale`` from the repository root.

1. **Backlog.** The missions and NGOs of ``participants.json``
   (`PARTICIPANTS_FILE`), scaled to N participants in the same proportion,
   on a scratch vhost. Every mission sends; each message opens a case of its
   own (a return request to a mission, a referral to an NGO), with sent
   times spread over the past week. The messages sit in the recipients'
   inboxes, published by their senders (and recorded in their outboxes as
   sent, so that the receipts find them), while every adapter is down; then
   the adapters drain them, `concurrent` at a time (a hundred adapters at
   once would be a hundred idle relays on two cores; in production each runs
   on its own machine). Figures: the time until every message was applied,
   the time spent draining (adapter start-up left out), and the rate against
   the per-message cryptography ceiling measured in the same run.
2. **Routing memory.** A routing database holding M log entries, written
   directly with the log's own `Appender` and checkpoint signing (envelopes
   sealed on every core with `seal`, never through the broker), then
   ``trm routing run`` on it ingesting a few hundred envelopes from
   RabbitMQ: its resident memory (RSS) once it has.
3. **Audit at scale.** That log exported (`AuditLog.export`, timed), then
   ``verify_export`` on every core, each in a process of its own, of the
   export's first K entries and of all M: time, peak memory of the process
   and its workers, and the cost per entry at each size, which should be
   flat.

Every size is a flag, so a test runs the whole of it tiny.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pika
import structlog

from benchmarks import audit as audit_bench
from benchmarks import crypto, e2e, routing
from benchmarks.raw import BenchmarkFailed, scratch_vhost
from broker.database import inbox_table, open_database, quarantine_table
from broker.directory import (
    Directory,
    DirectoryBody,
    Role,
    install_directory,
    load_home_directory,
    sign_directory,
)
from broker.envelope import SealedEnvelope, read_header, seal
from broker.errors import TransportError
from broker.keys import init_authority, init_participant, load_authority, load_keys, pin_authority
from broker.management import ManagementClient
from broker.outbox import Outbox
from broker.topology import inbox_queue, provision
from broker.transport import AmqpSettings, Outgoing, Publisher
from schemas.base import Message, MessageKind
from schemas.examples import example, sharing_with
from services.audit import verify_export
from services.auditlog import AuditLog, log_entries_table
from services.checkpoint import origin_for
from trm.progress import Meter

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672/"
PARTICIPANTS_FILE = Path(__file__).with_name("participants.json")
"""The programme's missions and NGOs (see DOMAIN.md), scaled for the backlog."""
WEEK = timedelta(days=7)
PUBLISH_BATCH = 500
LOG_BATCH = 1000
"""Log entries per transaction when generating, and between two signed checkpoints."""
ROUTING_EXTRA = 200
"""Envelopes the routing service ingests over the generated log before its memory is read."""


@dataclass(frozen=True)
class Config:
    """The sizes of a scale run and where it runs."""

    participants: int = 100
    backlog: int = 50_000
    concurrent: int = 4
    """Adapters draining at once."""
    log_entries: int = 1_000_000
    early_entries: int = 100_000
    """The prefix of the export whose cost per entry is compared with the whole's."""
    payload_bytes: int = 2048
    workers: int = os.cpu_count() or 1
    ceiling_seconds: float = 1.0
    """Time each core spends measuring the per-message cryptography."""
    parts: tuple[str, ...] = ("backlog", "log")
    """Which parts to run (the module's docstring: 1, and 2 with 3)."""
    amqp_url: str = DEFAULT_AMQP_URL
    management_url: str = DEFAULT_MANAGEMENT_URL

    @classmethod
    def sized(cls, *, quick: bool = False, **settings: Any) -> Config:
        """The full run, or with `quick` a tiny one that still runs every part."""
        if quick:
            tiny = {"participants": 3, "backlog": 12, "concurrent": 3, "log_entries": 1000}
            settings = {**tiny, "early_entries": 1000, "ceiling_seconds": 0.2, **settings}
        return cls(**settings)


@dataclass(frozen=True)
class Spec:
    """A participant of the scaled network."""

    id: str
    role: Role
    country: str
    parent: str | None


# --- the participants ---------------------------------------------------------------------


def scaled_participants(count: int, suffix: str, source: Path = PARTICIPANTS_FILE) -> list[Spec]:
    """`count` participants, missions and NGOs in the proportion of `source`.

    Copy k of a mission or NGO is named ``<id>-<k>-<suffix>``; an NGO's
    parent is a copy of its own mission. At least two missions, so that each
    has another to send to. NGOs whose country has no mission among the
    copies are left out.
    """
    data = json.loads(source.read_text())
    missions, ngos = data["missions"], data["ngos"]
    wanted = max(2, round(count * len(missions) / (len(missions) + len(ngos))))
    wanted = min(wanted, count)
    specs = [
        Spec(f"{m['id']}-{k // len(missions)}-{suffix}", Role.MISSION, m["country"], None)
        for k, m in ((k, missions[k % len(missions)]) for k in range(wanted))
    ]
    by_country = {s.country: s.id for s in reversed(specs)}
    # At a small size not every NGO's country has a mission; those are left out.
    ngos = [n for n in ngos if n["country"] in by_country]
    for k in range(count - wanted):
        ngo = ngos[k % len(ngos)]
        parent = by_country.get(ngo["country"])
        specs.append(
            Spec(f"{ngo['id']}-{k // len(ngos)}-{suffix}", Role.NGO, ngo["country"], parent)
        )
    return specs


@dataclass(frozen=True)
class Plan:
    """Who sends message i to whom, and the message."""

    specs: list[Spec]

    @property
    def senders(self) -> list[Spec]:
        """The missions: every one of them sends."""
        return [s for s in self.specs if s.role is Role.MISSION]

    def route(self, i: int) -> tuple[Spec, Spec]:
        """Sender and recipient of message i: each mission in turn, to every other in turn."""
        senders = self.senders
        sender = senders[i % len(senders)]
        others = [s for s in self.specs if s.id != sender.id]
        return sender, others[(i // len(senders)) % len(others)]


@cache
def _messages(payload_bytes: int) -> dict[Role, Message]:
    return {
        Role.MISSION: crypto.message_of_size(payload_bytes, example(MessageKind.RETURN_REQUEST)),
        Role.NGO: crypto.message_of_size(payload_bytes, example(MessageKind.REFERRAL_REQUEST)),
    }


def _message_to(sender: str, recipient: Spec, payload_bytes: int) -> Message:
    """A case-opening message `recipient`'s role may receive, shared with both."""
    return sharing_with(_messages(payload_bytes)[recipient.role], [sender, recipient.id])


# --- the backlog --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Net:
    """A provisioned scaled network: homes under `root`, on `vhost`."""

    root: Path
    vhost: str
    amqp_url: str
    management_url: str
    specs: list[Spec]

    def as_e2e(self) -> e2e.Network:
        """The same network as `benchmarks.e2e` addresses one, for its helpers."""
        ids = {s.id: s.id for s in self.specs}
        return e2e.Network(self.root, self.vhost, self.amqp_url, self.management_url, ids)


@contextmanager
def scaled_network(
    root: Path, specs: list[Spec], amqp_url: str, management_url: str
) -> Iterator[Net]:
    """Keys valid from before the week, one signed directory, users and queues on a vhost."""
    root.mkdir(parents=True, exist_ok=True)
    start = datetime.now(UTC) - WEEK - timedelta(days=1)
    init_authority(root / "authority")
    cards = [
        init_participant(
            root / s.id,
            participant_id=s.id,
            role=s.role,
            country=s.country,
            parent=s.parent,
            now=start,
        )
        for s in specs
    ]
    body = DirectoryBody(serial=1, issued_at=start, participants=tuple(cards))
    signed = sign_directory(body, load_authority(root / "authority"))
    for s in specs:
        pin_authority(root / s.id, root / "authority" / "authority.pub")
        install_directory(signed, root / s.id)
    client = ManagementClient(management_url)
    with scratch_vhost(management_url, amqp_url, prefix="trm-bench-scale") as vhost:
        try:
            provision(
                client,
                amqp_url,
                vhost,
                [(s.id, str(s.role)) for s in specs],
                keys_root=root,
                routing_queue=False,
            )
            _wait_open(amqp_url, vhost)
            yield Net(root, vhost, amqp_url, management_url, specs)
        finally:
            for s in specs:
                client.delete_user(s.id)


def _wait_open(amqp_url: str, vhost: str, timeout: float = 900.0) -> None:
    """Wait until the vhost takes an AMQP connection.

    RabbitMQ starts a quorum queue's Raft member some time after declaring
    it, and while hundreds just declared start on a busy machine, a
    connection to their vhost hangs in its handshake (seen here with 400).
    """
    settings = AmqpSettings.from_url(amqp_url, vhost=vhost)
    deadline = time.monotonic() + timeout
    while True:
        try:
            pika.BlockingConnection(settings.parameters()).close()
            return
        except Exception as e:  # pika's connector errors share no base with AMQPError
            if time.monotonic() > deadline:
                raise BenchmarkFailed(f"{vhost} took no connection in {timeout:.0f} s") from e
            time.sleep(1.0)


def _seal_backlog(args: tuple[Path, list[Spec], int, int, int, int, float]) -> list[bytes]:
    """Messages `first`..`first + count - 1` of `total`, sealed by their senders.

    Their sent times are spread evenly over the week from `week_start`.
    """
    root, specs, first, count, total, payload_bytes, week_start = args
    plan = Plan(specs)
    out = []
    for i in range(first, first + count):
        sender, recipient = plan.route(i)
        keys, directory = _home(root / sender.id)
        offset = WEEK.total_seconds() * (i + 0.5) / total
        sent = datetime.fromtimestamp(week_start + offset, UTC)
        sealed = seal(
            _message_to(sender.id, recipient, payload_bytes),
            case=f"{sender.id}.W-{i:07d}",
            sender=keys.sender(sent),
            recipients=(recipient.id,),
            directory=directory,
            seq=1,
            now=sent,
        )
        out.append(sealed.raw)
    return out


@cache
def _home(home: Path) -> tuple[Any, Directory]:
    return load_keys(home), load_home_directory(home)


def sealed_in_parallel(
    net: Net, count: int, payload_bytes: int, workers: int, meter: Meter
) -> list[bytes]:
    """The whole backlog, sealed on `workers` processes, in message order."""
    week_start = (datetime.now(UTC) - WEEK).timestamp()
    chunk = 250
    tasks = [
        (net.root, net.specs, first, min(chunk, count - first), count, payload_bytes, week_start)
        for first in range(0, count, chunk)
    ]
    context = multiprocessing.get_context("spawn")
    raws: list[bytes] = []
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for part in pool.map(_seal_backlog, tasks):
            raws.extend(part)
            meter.update(len(raws), note="sealing")
    return raws


def queue_backlog(net: Net, raws: Sequence[bytes], meter: Meter) -> dict[str, int]:
    """Record each envelope as sent in its sender's outbox, publish it; messages per recipient."""
    by_sender: dict[str, list[SealedEnvelope]] = {}
    for raw in raws:
        sealed = SealedEnvelope(read_header(raw), raw)
        by_sender.setdefault(sealed.header.sender, []).append(sealed)
    expected: dict[str, int] = {}
    done = 0
    for sender, envelopes in by_sender.items():
        engine = open_database(net.as_e2e().database_url(sender))
        try:
            with engine.begin() as conn:
                Outbox(engine).add_many(conn, [(e, e.header.sent_at) for e in envelopes])
            Outbox(engine).mark_sent([str(e.id) for e in envelopes])
        finally:
            engine.dispose()
        password = (net.root / sender / "amqp-password").read_text().strip()
        settings = AmqpSettings.from_url(
            net.amqp_url, vhost=net.vhost, username=sender, password=password
        )
        publisher = _publisher(settings, sender)
        try:
            for first in range(0, len(envelopes), PUBLISH_BATCH):
                batch = envelopes[first : first + PUBLISH_BATCH]
                publisher.publish([Outgoing(str(e.id), e.header.recipients, e.raw) for e in batch])
                done += len(batch)
                meter.update(done, note="publishing")
        finally:
            publisher.close()
        for e in envelopes:
            for r in e.header.recipients:
                expected[r] = expected.get(r, 0) + 1
    return expected


def _publisher(settings: AmqpSettings, sender: str, tries: int = 5) -> Publisher:
    """A publisher for `sender`, tried again while a busy broker times the handshake out."""
    for attempt in range(1, tries + 1):
        try:
            return Publisher(settings, sender)
        except TransportError:
            if attempt == tries:
                raise
            time.sleep(attempt)
    raise AssertionError("unreachable")


def drain(net: Net, expected: dict[str, int], concurrent: int, meter: Meter) -> dict[str, float]:
    """Run the recipients' adapters `concurrent` at a time until each applied its backlog."""
    view = net.as_e2e()
    recipients = [s.id for s in net.specs if expected.get(s.id)]
    started = time.monotonic()
    draining = 0.0
    applied_before = 0
    for first in range(0, len(recipients), concurrent):
        group = recipients[first : first + concurrent]
        with _adapters(view, group) as processes:
            for pid in group:
                e2e.wait_for(e2e.consuming(view, inbox_queue(pid)), f"{pid}'s adapter", processes)
            counters = {pid: _applied(view, pid) for pid in group}

            def all_done(
                counters: dict[str, Callable[[], int]] = counters, before: int = applied_before
            ) -> bool:
                counts = {pid: count() for pid, count in counters.items()}
                meter.update(before + sum(counts.values()), note="draining")
                return all(counts[pid] >= expected[pid] for pid in counts)

            e2e.wait_for(all_done, f"the backlog of {', '.join(group)}", processes, poll=0.25)
            # From the group's first envelope applied to its last: an adapter that is up
            # drains while the others of its group still start.
            spans = [e2e.span(view.database_url(pid), inbox_table.c.applied_at) for pid in group]
            draining += max(last for _, last in spans) - min(first for first, _ in spans)
        applied_before += sum(expected[pid] for pid in group)
    return {"wall_seconds": time.monotonic() - started, "drain_seconds": draining}


@contextmanager
def _adapters(net: e2e.Network, group: list[str]) -> Iterator[list[Any]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(e2e.running(net, e2e.adapter_args(net, pid), pid)) for pid in group
        ]


def _applied(net: e2e.Network, pid: str) -> Callable[[], int]:
    """The count of envelopes `pid` applied; BenchmarkFailed once it quarantined one."""
    url = net.database_url(pid)
    open_database(url).dispose()
    applied, refused = e2e.count_rows(url, inbox_table), e2e.count_rows(url, quarantine_table)

    def count() -> int:
        if found := refused():
            raise BenchmarkFailed(f"{pid} quarantined {found} envelope(s) of the backlog")
        return applied()

    return count


def backlog(root: Path, config: Config, meter: Meter) -> dict[str, Any]:
    """The backlog figures (see the module's docstring, 1)."""
    specs = scaled_participants(config.participants, uuid.uuid4().hex[:6])
    with scaled_network(root, specs, config.amqp_url, config.management_url) as net:
        meter.update(0, config.backlog)
        raws = sealed_in_parallel(net, config.backlog, config.payload_bytes, config.workers, meter)
        expected = queue_backlog(net, raws, meter)
        meter.update(0, note="draining")
        times = drain(net, expected, config.concurrent, meter)
    return {
        "participants": len(specs),
        "missions": sum(1 for s in specs if s.role is Role.MISSION),
        "ngos": sum(1 for s in specs if s.role is Role.NGO),
        "messages": config.backlog,
        "recipients": len(expected),
        "concurrent_adapters": config.concurrent,
        **times,
        "applied_per_s": config.backlog / times["drain_seconds"],
    }


# --- a big log ----------------------------------------------------------------------------------


def _seal_entries(args: tuple[Path, str, Spec, int, int, int, float]) -> list[bytes]:
    """Log entries `first`..`first + count - 1`: return requests sealed by the sender."""
    home, _sender_id, recipient, first, count, payload_bytes, at = args
    keys, directory = _home(home)
    sent = datetime.fromtimestamp(at, UTC)
    sender = keys.sender(sent)
    message = _message_to(keys.card.id, recipient, payload_bytes)
    return [
        seal(
            message,
            case=f"{keys.card.id}.G-{i:07d}",
            sender=sender,
            recipients=(recipient.id,),
            directory=directory,
            seq=1,
            now=sent + timedelta(microseconds=i),
        ).raw
        for i in range(first, first + count)
    ]


def generate_log(
    net: e2e.Network, entries: int, payload_bytes: int, workers: int, meter: Meter
) -> str:
    """Fill the routing database of `net` with `entries` log entries; its URL.

    Envelopes are sealed on `workers` processes and appended `LOG_BATCH` to
    a transaction through the log's own `Appender`, a checkpoint signed
    after each batch, as the routing service would have.
    """
    url = net.database_url(net.routing)
    engine = open_database(url)
    log = AuditLog(
        engine, origin=origin_for(net.routing), signer=load_keys(net.home(net.routing)).sender()
    )
    recipient = Spec(net.recipient, Role.MISSION, "UZ", None)
    at = (datetime.now(UTC) - timedelta(minutes=30)).timestamp()
    home = net.home(net.sender)
    tasks = [
        (home, net.sender, recipient, first, min(LOG_BATCH, entries - first), payload_bytes, at)
        for first in range(0, entries, LOG_BATCH)
    ]
    context = multiprocessing.get_context("spawn")
    meter.update(0, entries, note="generating the log")
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            done = 0
            for raws in pool.map(_seal_entries, tasks):
                received = datetime.now(UTC)
                with engine.begin() as conn:
                    appender = log.appender(conn)
                    for raw in raws:
                        appender.append(raw, received_at=received, verification="ok")
                    appender.flush()
                log.checkpoint(received)
                done += len(raws)
                meter.update(done)
    finally:
        engine.dispose()
    return url


def rss_of(pid: int) -> dict[str, int]:
    """Resident memory of process `pid` now and at its peak, in bytes (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return {"rss_bytes": fields.get("VmRSS", 0), "peak_rss_bytes": fields.get("VmHWM", 0)}


def routing_memory(net: e2e.Network, url: str, entries: int, payload_bytes: int) -> dict[str, Any]:
    """RSS of ``trm routing run`` over the generated log, once it logged `ROUTING_EXTRA` more."""
    routing.preload(net, ROUTING_EXTRA, payload_bytes)
    logged = e2e.count_rows(url, log_entries_table)
    args = [*net.command(net.routing, "routing", "run"), "--log-file", str(net.root / "r.log")]
    with e2e.running(net, args, net.routing) as process:
        e2e.wait_for(lambda: logged() >= entries + ROUTING_EXTRA, "the routing log", [process])
        memory = rss_of(process.pid)
    return {"log_entries": entries + ROUTING_EXTRA, **memory}


def _verify_in_process(path: str, home: str, workers: int, results: Any) -> None:
    """Verify the export at `path` in this process; seconds and peak memory, with workers'."""
    try:
        directory = load_home_directory(Path(home))
        began = time.perf_counter()
        report = verify_export(Path(path), directory, workers=workers)
        seconds = time.perf_counter() - began
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        results.put(
            {
                "entries": report.entries,
                "seconds": seconds,
                "peak_rss_bytes": own,
                "worker_peak_rss_bytes": children,
            }
        )
    except Exception as e:
        results.put({"error": f"{type(e).__name__}: {e}"})


def verify_measured(path: Path, home: Path, workers: int) -> dict[str, Any]:
    """`verify_export` of `path` in a fresh process: entries, time, memory, cost per entry."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(
        target=_verify_in_process, args=(str(path), str(home), workers, results)
    )
    process.start()
    value: dict[str, Any] = results.get(timeout=e2e.WAIT_SECONDS * 4)
    process.join(60)
    if "error" in value:
        raise BenchmarkFailed(f"audit verify: {value['error']}")
    value["microseconds_per_entry"] = value["seconds"] / value["entries"] * 1e6
    value["file_bytes"] = path.stat().st_size
    return value


def big_log(root: Path, config: Config, meter: Meter) -> dict[str, Any]:
    """The routing memory and audit figures (the module's docstring, 2 and 3)."""
    with e2e.network(root, config.amqp_url, config.management_url) as net:
        began = time.perf_counter()
        url = generate_log(net, config.log_entries, config.payload_bytes, config.workers, meter)
        generated = time.perf_counter() - began
        meter.update(0, 1, note="routing service memory")
        memory = routing_memory(net, url, config.log_entries, config.payload_bytes)
        meter.update(0, note="exporting")
        export = root / "export.jsonl"
        engine = open_database(url)
        try:
            log = AuditLog(
                engine,
                origin=origin_for(net.routing),
                signer=load_keys(net.home(net.routing)).sender(),
            )
            began = time.perf_counter()
            summary = log.export(
                export,
                directory=load_home_directory(net.home(net.routing)),
                progress=meter.update,
            )
            exported = time.perf_counter() - began
        finally:
            engine.dispose()
        home = net.home(net.routing)
        meter.update(0, 1, note="verifying")
        early_cut = max(
            LOG_BATCH, min(config.early_entries, summary.entries) // LOG_BATCH * LOG_BATCH
        )
        early = verify_measured(audit_bench.prefix(export, early_cut), home, config.workers)
        whole = verify_measured(export, home, config.workers)
    return {
        "generate_seconds": generated,
        "generate_per_s": config.log_entries / generated,
        "routing": memory,
        "export": {"entries": summary.entries, "seconds": exported, "bytes": export.stat().st_size},
        "verify_early": early,
        "verify_all": whole,
        "verify_cost_growth": whole["microseconds_per_entry"] / early["microseconds_per_entry"],
        "workers": config.workers,
    }


# --- the run ------------------------------------------------------------------------------------


def run(config: Config) -> dict[str, Any]:
    """Every scale figure, as a JSON-ready dict."""
    results: dict[str, Any] = {"config": asdict(config)}
    with tempfile.TemporaryDirectory(prefix="trm-bench-scale-") as scratch:
        if "backlog" in config.parts:
            with Meter("scale: backlog", unit="messages") as meter:
                results["backlog"] = backlog(Path(scratch) / "backlog", config, meter)
        if "log" in config.parts:
            with Meter("scale: log", unit="entries") as meter:
                results["log"] = big_log(Path(scratch) / "log", config, meter)
    if "backlog" in results:
        cost = crypto.message_cost(config.payload_bytes)
        rates = crypto.ceiling(cost["steps"], config.workers, config.ceiling_seconds)
        ceiling = rates["all_cores_per_s"]
        results["crypto_ceiling_per_s"] = ceiling
        results["backlog_over_ceiling"] = results["backlog"]["applied_per_s"] / ceiling
    return results


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def table(r: dict[str, Any]) -> str:
    """The scale figures of the parts that ran, one per line."""
    lines = _backlog_lines(r) if "backlog" in r else []
    return "\n".join(lines + (_log_lines(r) if "log" in r else []))


def _backlog_lines(r: dict[str, Any]) -> list[str]:
    b = r["backlog"]
    return [
        f"backlog: {b['messages']:,} messages to {b['recipients']} of {b['participants']} "
        f"participants ({b['missions']} missions, {b['ngos']} NGOs), "
        f"drained {b['concurrent_adapters']} adapters at a time",
        f"  all applied after          {b['wall_seconds']:10.1f} s (start-ups included)",
        f"  draining                   {b['drain_seconds']:10.1f} s = "
        f"{b['applied_per_s']:,.0f} msg/s",
        f"  crypto ceiling             {r['crypto_ceiling_per_s']:10,.0f} msg/s; "
        f"ratio {r['backlog_over_ceiling']:.2f}",
    ]


def _log_lines(r: dict[str, Any]) -> list[str]:
    lg = r["log"]
    early, whole = lg["verify_early"], lg["verify_all"]
    return [
        f"log: {r['config']['log_entries']:,} entries generated in "
        f"{lg['generate_seconds']:.0f} s "
        f"({lg['generate_per_s']:,.0f}/s)",
        f"  routing service RSS after {lg['routing']['log_entries']:,} entries: "
        f"{_mib(lg['routing']['rss_bytes'])} (peak {_mib(lg['routing']['peak_rss_bytes'])})",
        f"  export                     {lg['export']['seconds']:10.1f} s, "
        f"{lg['export']['bytes'] / 1e6:,.0f} MB",
        f"  verify {early['entries']:>9,} entries  {early['seconds']:10.1f} s, "
        f"{early['microseconds_per_entry']:.1f} us/entry, peak {_mib(early['peak_rss_bytes'])}"
        f" (workers {_mib(early['worker_peak_rss_bytes'])})",
        f"  verify {whole['entries']:>9,} entries  {whole['seconds']:10.1f} s, "
        f"{whole['microseconds_per_entry']:.1f} us/entry, peak {_mib(whole['peak_rss_bytes'])}"
        f" (workers {_mib(whole['worker_peak_rss_bytes'])})",
        f"  cost per entry, all / first: {lg['verify_cost_growth']:.2f} (flat is 1.00), "
        f"{lg['workers']} workers",
    ]


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, run, print."""
    parser = argparse.ArgumentParser(prog="benchmarks.scale", description=__doc__)
    defaults = Config()
    parser.add_argument("--participants", type=int, default=defaults.participants)
    parser.add_argument("--backlog", type=int, default=defaults.backlog)
    parser.add_argument("--concurrent", type=int, default=defaults.concurrent)
    parser.add_argument("--log-entries", type=int, default=defaults.log_entries)
    parser.add_argument("--early-entries", type=int, default=defaults.early_entries)
    parser.add_argument("--amqp-url", default=os.environ.get("TRM_AMQP_URL", DEFAULT_AMQP_URL))
    parser.add_argument(
        "--management-url",
        default=os.environ.get("TRM_AMQP_MANAGEMENT_URL", DEFAULT_MANAGEMENT_URL),
    )
    parser.add_argument(
        "--parts", default="backlog,log", help="comma-separated: backlog, log (default both)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    # A SIGTERM ends the run through its finally blocks: the vhost and users go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Logs go to stderr so that stdout carries only the figures.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    config = Config.sized(
        participants=args.participants,
        backlog=args.backlog,
        concurrent=args.concurrent,
        log_entries=args.log_entries,
        early_entries=args.early_entries,
        parts=tuple(p for p in args.parts.split(",") if p),
        amqp_url=args.amqp_url,
        management_url=args.management_url,
    )
    main_with(config, as_json=args.json)


def main_with(config: Config, *, as_json: bool, echo: Callable[[str], None] = print) -> None:
    """Run with `config` and print the figures, or the JSON object with `as_json`."""
    results = run(config)
    echo(json.dumps(results, indent=2) if as_json else table(results))


if __name__ == "__main__":
    main()
