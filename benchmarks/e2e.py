"""trm end to end between two real adapter processes: throughput and latency.

A scratch network on a fresh vhost: a directory authority, two missions
(``iom-kz`` sends, ``iom-uz`` receives) and the routing participant, each
with its own home folder and SQLite database, provisioned on RabbitMQ as in
production (own users, quorum inboxes, ``trm.routing`` bound with ``#``).
Both missions run ``trm adapter run`` as separate processes.

Throughput: a loader process seals N messages (2 KiB payloads; a return
request opening each of the sender's cases, then travel arrangements on them,
`CaseMix`) into the sender's outbox, 100 to a transaction; the clock starts
before the first seal. The sender's adapter relays them, the recipient's
adapter opens, applies and answers each with a signed delivery receipt, and
the sender's adapter records the receipts. Two figures: N over the time until
the last envelope was applied at the recipient (the newest
``inbox.applied_at``), and N over the time until the last receipt was recorded
at the sender.

Latency: the loader sends one message per transaction (as ``trm send`` does)
at a fixed offered rate; each envelope's latency is its ``applied_at`` at the
recipient minus its ``created_at`` in the sender's outbox (same clock).

The routing service does not run here (its ingest is measured by
`benchmarks.routing`): its queue still receives a copy of every envelope, as
in production, and is deleted with the vhost.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from benchmarks.crypto import message_of_size
from benchmarks.raw import BenchmarkFailed, latency_of, scratch_vhost
from broker.database import (
    inbox_table,
    open_database,
    outbox_table,
    quarantine_table,
    receipts_table,
)
from broker.directory import DirectoryBody, Role, install_directory, sign_directory
from broker.envelope import SealedEnvelope, seal
from broker.keys import init_authority, init_participant, load_authority, load_keys, pin_authority
from broker.management import ManagementClient
from broker.outbox import Outbox
from broker.topology import inbox_queue, provision
from schemas.base import Message, MessageKind
from schemas.examples import example, sharing_with

ROLES: dict[str, tuple[Role, str]] = {
    "sender": (Role.MISSION, "KZ"),
    "recipient": (Role.MISSION, "UZ"),
    "routing": (Role.ROUTING, "AT"),
}
"""The three participants of a benchmark network: role and country."""
LOAD_BATCH = 100
"""Envelopes per outbox transaction when loading a backlog."""
CASES = 500
"""Distinct case references the messages are spread over."""
WAIT_SECONDS = 900.0


@dataclass(frozen=True)
class CaseMix:
    """The messages of a run, on `CASES` cases of the sender's, every payload of one size.

    Message i < `CASES` opens case i with a return request whose consent
    shares with the recipient; every later message is a travel arrangement
    on its case, a kind the case protocol lets a party send again (travel
    re-arranged). Each envelope costs the same crypto as before: one
    signature, one payload encryption, one key wrap for the one recipient.
    """

    owner: str
    opening: Message
    follow_up: Message

    def case(self, i: int) -> str:
        """The case of message i, named by its owner."""
        return f"{self.owner}.KZ-2026-{i % CASES:04d}"

    def message(self, i: int) -> Message:
        """Message i: its case's opening request, or a travel arrangement on it."""
        return self.opening if i < CASES else self.follow_up


def case_mix(sender: str, recipient: str, payload_bytes: int) -> CaseMix:
    """The messages `sender` sends `recipient`, padded to `payload_bytes` (see `CaseMix`)."""
    opening = sharing_with(example(MessageKind.RETURN_REQUEST), [sender, recipient])
    return CaseMix(
        sender,
        message_of_size(payload_bytes, opening),
        message_of_size(payload_bytes, example(MessageKind.TRAVEL_ARRANGED)),
    )


def rabbitmq_version(management_url: str) -> str:
    """The RabbitMQ version the management API reports."""
    overview = ManagementClient(management_url).request("GET", "/overview")
    return str((overview or {}).get("rabbitmq_version", "unknown"))


@dataclass(frozen=True)
class Network:
    """A provisioned scratch network: homes by participant id, on one vhost."""

    root: Path
    vhost: str
    amqp_url: str
    management_url: str
    ids: dict[str, str]
    """Participant ids by part ("sender", "recipient", "routing"), unique to this network."""

    @property
    def sender(self) -> str:
        """The sending mission's id."""
        return self.ids["sender"]

    @property
    def recipient(self) -> str:
        """The receiving mission's id."""
        return self.ids["recipient"]

    @property
    def routing(self) -> str:
        """The routing service's id."""
        return self.ids["routing"]

    def home(self, participant_id: str) -> Path:
        """The home folder of `participant_id`."""
        return self.root / participant_id

    def database_url(self, participant_id: str) -> str:
        """The SQLite database of `participant_id`."""
        return f"sqlite:///{self.home(participant_id) / 'trm.db'}"

    def command(self, participant_id: str, *args: str) -> list[str]:
        """A ``trm`` command line for `participant_id`'s home on this network."""
        return [
            sys.executable,
            "-m",
            "trm",
            *args,
            "--home",
            str(self.home(participant_id)),
            "--amqp-url",
            self.amqp_url,
            "--vhost",
            self.vhost,
        ]


@contextmanager
def network(root: Path, amqp_url: str, management_url: str) -> Iterator[Network]:
    """Keys, a signed directory and RabbitMQ users and queues on a fresh vhost.

    RabbitMQ users are global to the broker, so the participant ids carry a
    random suffix: the network's users clash with no other network's and are
    deleted with it.
    """
    root.mkdir(parents=True, exist_ok=True)
    suffix = uuid.uuid4().hex[:6]
    ids = {part: f"bench-{part[:4]}-{suffix}" for part in ROLES}
    roles = {ids[part]: value for part, value in ROLES.items()}
    start = datetime.now(UTC) - timedelta(hours=1)
    authority_dir = root / "authority"
    init_authority(authority_dir)
    cards = [
        init_participant(root / pid, participant_id=pid, role=role, country=country, now=start)
        for pid, (role, country) in roles.items()
    ]
    body = DirectoryBody(serial=1, issued_at=start, participants=tuple(cards))
    signed = sign_directory(body, load_authority(authority_dir))
    for pid in roles:
        pin_authority(root / pid, authority_dir / "authority.pub")
        install_directory(signed, root / pid)
    client = ManagementClient(management_url)
    with scratch_vhost(management_url, amqp_url, prefix="trm-bench-net") as vhost:
        try:
            provision(
                client,
                amqp_url,
                vhost,
                [(pid, str(role)) for pid, (role, _) in roles.items()],
                keys_root=root,
            )
            yield Network(root, vhost, amqp_url, management_url, ids)
        finally:
            for pid in roles:
                client.delete_user(pid)


@contextmanager
def running(net: Network, args: list[str], log_name: str) -> Iterator[subprocess.Popen[bytes]]:
    """A ``trm`` process, stopped with SIGTERM (then killed) on the way out."""
    log = (net.root / f"{log_name}.stderr").open("ab")
    process = subprocess.Popen(args, stdout=log, stderr=log)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def adapter_args(net: Network, participant_id: str) -> list[str]:
    """``trm adapter run`` for `participant_id`, logging JSON lines to a file."""
    log_file = net.root / f"{participant_id}.log"
    return [*net.command(participant_id, "adapter", "run"), "--log-file", str(log_file)]


def log_name_of(process: subprocess.Popen[bytes]) -> str:
    """The command words of a ``python -m trm`` process, for messages."""
    args = process.args
    words = [str(a) for a in args] if isinstance(args, list) else [str(args)]
    return " ".join(words[3:5])


def wait_for(
    condition: Callable[[], bool],
    what: str,
    processes: list[subprocess.Popen[bytes]],
    timeout: float = WAIT_SECONDS,
    poll: float = 0.1,
) -> None:
    """Poll `condition` until it holds; `BenchmarkFailed` if a process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        for process in processes:
            if process.poll() is not None:
                raise BenchmarkFailed(
                    f"a trm process ({log_name_of(process)}) exited with {process.returncode} "
                    f"while waiting for {what}"
                )
        if time.monotonic() > deadline:
            raise BenchmarkFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def consuming(net: Network, queue: str) -> Callable[[], bool]:
    """Whether `queue` has a consumer, per the management API."""
    client = ManagementClient(net.management_url)

    def check() -> bool:
        info = client.get_queue(net.vhost, queue)
        return bool(info and info.get("consumers"))

    return check


def all_applied(net: Network, messages: int) -> Callable[[], bool]:
    """Whether the recipient applied `messages` envelopes; `BenchmarkFailed` once it refuses one.

    A refused envelope is never applied, so waiting on would only end in the time-out.
    """
    url = net.database_url(net.recipient)
    applied, refused = count_rows(url, inbox_table), count_rows(url, quarantine_table)

    def check() -> bool:
        if found := refused():
            raise BenchmarkFailed(
                f"{net.recipient} quarantined {found} envelope(s) (see the reason column of its "
                "quarantine table): the benchmark's messages must keep to the case protocol"
            )
        return applied() >= messages

    return check


def count_rows(url: str, table: sa.Table) -> Callable[[], int]:
    """A counter of the rows of `table` in the database at `url`."""
    engine = sa.create_engine(url)

    def count() -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())

    return count


def latest(url: str, column: sa.Column[Any]) -> float:
    """The newest value of a timestamp column, as a Unix time."""
    return span(url, column)[1]


def span(url: str, column: sa.Column[Any]) -> tuple[float, float]:
    """The oldest and the newest value of a timestamp column, as Unix times, in one query."""
    engine = open_database(url)
    try:
        with engine.connect() as conn:
            oldest, newest = conn.execute(sa.select(sa.func.min(column), sa.func.max(column))).one()
    finally:
        engine.dispose()
    return _unix(oldest), _unix(newest)


def _unix(value: Any) -> float:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


# --- the loader ---------------------------------------------------------------------


def load(
    home: Path,
    database_url: str,
    recipient: str,
    count: int,
    payload_bytes: int,
    rate: float | None,
) -> dict[str, Any]:
    """Seal `count` messages for the recipient into `home`'s outbox.

    Without `rate`, as a backlog: `LOAD_BATCH` envelopes sealed, then stored
    in one short transaction, as fast as it goes. With `rate`, one message per
    transaction (as ``trm send`` does) at `rate` messages per second.
    """
    from broker.directory import load_home_directory

    keys = load_keys(home)
    directory = load_home_directory(home)
    engine = open_database(database_url)
    outbox = Outbox(engine)
    me = keys.card.id
    mix = case_mix(me, recipient, payload_bytes)
    started = time.time()
    sizes: list[int] = []

    def sealed_for(i: int, seq: int) -> SealedEnvelope:
        return seal(
            mix.message(i),
            case=mix.case(i),
            sender=keys.sender(),
            recipients=(recipient,),
            directory=directory,
            seq=seq,
        )

    try:
        if rate is not None:
            for i in range(count):
                delay = started + i / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
                with engine.begin() as conn:
                    sealed = sealed_for(i, outbox.next_seq(conn, me, mix.case(i)))
                    outbox.add(conn, sealed)
                sizes.append(len(sealed.raw))
        else:
            for first in range(0, count, LOAD_BATCH):
                chunk = range(first, min(first + LOAD_BATCH, count))
                # This loader is the only writer of its cases, so the sequence
                # numbers are known before the transaction: sealing (the slow
                # part) then holds no database lock that the relay waits for.
                batch = [sealed_for(i, i // CASES + 1) for i in chunk]
                with engine.begin() as conn:
                    for sealed in batch:
                        taken = outbox.next_seq(conn, me, sealed.header.case)
                        if taken != sealed.header.seq:
                            raise BenchmarkFailed("another writer took a sequence number")
                        outbox.add(conn, sealed)
                sizes.append(len(batch[-1].raw))
    finally:
        engine.dispose()
    return {"started": started, "finished": time.time(), "envelope_bytes": max(sizes)}


def _load_main(args: tuple[Path, str, str, int, int, float | None], results: Any) -> None:
    try:
        results.put(load(*args))
    except Exception as e:
        results.put({"error": f"{type(e).__name__}: {e}"})


def _spawn_loader(
    net: Network, count: int, payload_bytes: int, rate: float | None
) -> tuple[Any, Any]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    args = (
        net.home(net.sender),
        net.database_url(net.sender),
        net.recipient,
        count,
        payload_bytes,
        rate,
    )
    process = context.Process(target=_load_main, args=(args, results), name="bench-loader")
    process.start()
    return process, results


def _loader_result(process: Any, results: Any) -> dict[str, Any]:
    value: dict[str, Any] = results.get(timeout=WAIT_SECONDS)
    process.join(30)
    if "error" in value:
        raise BenchmarkFailed(f"loader: {value['error']}")
    return value


@contextmanager
def _two_adapters(net: Network) -> Iterator[list[subprocess.Popen[bytes]]]:
    with (
        running(net, adapter_args(net, net.sender), net.sender) as sender,
        running(net, adapter_args(net, net.recipient), net.recipient) as recipient,
    ):
        processes = [sender, recipient]
        for pid in (net.sender, net.recipient):
            wait_for(consuming(net, inbox_queue(pid)), f"{pid}'s adapter", processes, 120)
        yield processes


def throughput(
    root: Path,
    amqp_url: str,
    management_url: str,
    *,
    messages: int,
    payload_bytes: int,
    prefetch: int,
) -> dict[str, Any]:
    """N messages from a sealed backlog to applied (and to receipts back), per second."""
    with network(root, amqp_url, management_url) as net, _two_adapters(net) as processes:
        # Open (and migrate) both databases before the clock starts.
        for pid in (net.sender, net.recipient):
            open_database(net.database_url(pid)).dispose()
        receipts = count_rows(net.database_url(net.sender), receipts_table)
        process, results = _spawn_loader(net, messages, payload_bytes, None)
        wait_for(all_applied(net, messages), "all envelopes applied", processes, poll=0.25)
        wait_for(lambda: receipts() >= messages, "all receipts back", processes, poll=0.25)
        loaded = _loader_result(process, results)
        applied_end = latest(net.database_url(net.recipient), inbox_table.c.applied_at)
        receipts_end = latest(net.database_url(net.sender), receipts_table.c.received_at)
    start = loaded["started"]
    return {
        "messages": messages,
        "envelope_bytes": loaded["envelope_bytes"],
        "prefetch": prefetch,
        "load_seconds": loaded["finished"] - start,
        "applied_seconds": applied_end - start,
        "applied_per_s": messages / (applied_end - start),
        "receipts_seconds": receipts_end - start,
        "receipts_per_s": messages / (receipts_end - start),
    }


def latency(
    root: Path,
    amqp_url: str,
    management_url: str,
    *,
    messages: int,
    rate: float,
    payload_bytes: int,
    prefetch: int,
) -> dict[str, Any]:
    """Send-to-applied percentiles at `rate` messages per second, one send per transaction."""
    del prefetch  # the adapters use their configured prefetch; recorded by the caller
    with network(root, amqp_url, management_url) as net, _two_adapters(net) as processes:
        process, results = _spawn_loader(net, messages, payload_bytes, rate)
        wait_for(all_applied(net, messages), "all envelopes applied", processes, poll=0.25)
        loaded = _loader_result(process, results)
        samples = _latencies(net)
    seconds = max(loaded["finished"] - loaded["started"], 1e-9)
    figures = latency_of(samples, rate, seconds)
    return {
        "messages": figures.messages,
        "offered_per_s": figures.offered_per_s,
        "achieved_per_s": figures.achieved_per_s,
        "p50": figures.p50,
        "p95": figures.p95,
        "p99": figures.p99,
    }


def _times(url: str, table: sa.Table, column: str) -> dict[str, float]:
    engine = open_database(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(table.c.envelope_id, table.c[column])).all()
    finally:
        engine.dispose()
    return {row[0]: row[1].timestamp() for row in rows if row[1] is not None}


def _latencies(net: Network) -> list[float]:
    sent = _times(net.database_url(net.sender), outbox_table, "created_at")
    applied = _times(net.database_url(net.recipient), inbox_table, "applied_at")
    return [applied[i] - sent[i] for i in applied if i in sent]


def main() -> None:
    """Run both figures alone at a small size and print them."""
    import tempfile

    amqp = os.environ.get("TRM_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    management = os.environ.get("TRM_AMQP_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672/")
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    with tempfile.TemporaryDirectory() as folder:
        figures = throughput(
            Path(folder) / "t", amqp, management, messages=count, payload_bytes=2048, prefetch=200
        )
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
