"""The durable raw baseline: plain pika with trm's durability at both ends, and nothing else.

trm never publishes a message it has not committed, and never acks one it
has not made durable. The plain pika baseline (`benchmarks.raw`) does
neither, so it is a limit no durable design reaches. This one keeps the same
pika processes, queue and confirms, and adds exactly the waits durability
costs, without trm's code, cryptography or case protocol:

- the publisher commits every message to a SQLite database (WAL,
  ``synchronous = FULL``, as `broker.database` configures it) before it
  publishes it: `LOAD_BATCH` messages to a transaction at full speed (as the
  benchmark's loader fills trm's outbox), one message to a transaction at a
  fixed offered rate (as ``trm send`` does);
- the consumer writes each message to a file of its own and ``fsync``s it,
  then commits the ids of every delivery in hand (the burst the prefetch
  window already holds, at most `LOAD_BATCH`, as trm's inbox batches) to its
  SQLite database, then acks them with one multiple-ack.

With ``sync_each=False`` the consumer syncs the files of the deliveries in
hand with one ``syncfs(2)`` before that commit instead of one ``fsync`` per
file, as trm's case system does (`adapters.casesystem`). Every message is
as durable before its ack either way; on a disk where an ``fsync`` costs
about a millisecond the batched sync is the faster, so it is the one a
ceiling has to be measured with.

With `cryptography` (a sender's and a recipient's steps, from
`benchmarks.crypto.message_cost`), the publisher also does, for each
message before its commit, the raw cryptography a trm sender does (seal it,
verify its receipt) and the consumer, before writing its file, what a
recipient does (open it, sign the receipt): durability and cryptography in
the same processes, on the same cores as the broker, and nothing else of
trm. The receipts themselves do not travel, only their signing and checking
is counted.

Throughput and latency are taken exactly as in `benchmarks.raw`, so the two
baselines differ only by those commits and files.

Run alone: ``python -m benchmarks.durable [--messages N] [--rate R] [--json]``.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import multiprocessing
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pika.channel
import pika.spec

from benchmarks import crypto, raw
from benchmarks.crypto import Step

LOAD_BATCH = 100
"""Messages per publisher transaction at full speed, and most per consumer commit."""
Cryptography = tuple[Sequence[Step], Sequence[Step]]
"""What the publisher and what the consumer do to each message (`step_calls`)."""
NO_CRYPTOGRAPHY: Cryptography = ((), ())


class Journal:
    """A SQLite database set up as trm sets up its own: WAL, ``synchronous = FULL``."""

    def __init__(self, path: Path) -> None:
        """Open (or create) the database at `path` and its one table."""
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, body BLOB)")
        self.next_id = 1

    def commit(self, bodies: list[bytes]) -> None:
        """Insert `bodies` in one transaction and wait for it to be durable."""
        first = self.next_id
        self.next_id += len(bodies)
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany(
            "INSERT INTO messages (id, body) VALUES (?, ?)",
            zip(range(first, self.next_id), bodies, strict=True),
        )
        self.db.execute("COMMIT")

    def close(self) -> None:
        """Close the database."""
        self.db.close()


class _DurablePublisher(raw._Publisher):
    """`raw._Publisher`, committing each message to its journal before publishing it."""

    def __init__(self, journal: Journal, work: Sequence[Callable[[], object]], *args: Any) -> None:
        super().__init__(*args)
        self.journal = journal
        self.work = work

    def _fill(self) -> None:
        assert self.channel is not None
        due = self._due()
        batch = 1 if self.rate is not None else LOAD_BATCH
        while self.sent < due and len(self.pending) < self.window:
            take = min(batch, due - self.sent, self.window - len(self.pending))
            bodies = [self._body() for _ in range(take)]
            _do(self.work, take)
            self.journal.commit(bodies)
            for body in bodies:
                self.channel.basic_publish(raw.EXCHANGE, self.queue, body, self.properties)
                self.sent += 1
                self.pending.add(self.sent)

    def _body(self) -> bytes:
        if self.rate is None:
            return self.body
        return raw._STAMP.pack(time.time()) + self.body[raw._STAMP.size :]


class _DurableConsumer(raw._Consumer):
    """`raw._Consumer`, writing and syncing a file per message and committing before acking."""

    def __init__(
        self,
        journal: Journal,
        folder: Path,
        sync_each: bool,
        work: Sequence[Callable[[], object]],
        *args: Any,
    ) -> None:
        super().__init__(*args)
        self.journal, self.folder, self.sync_each = journal, folder, sync_each
        self.work = work
        self.held: list[tuple[int, bytes]] = []
        self.files: list[Path] = []

    def _on_message(
        self,
        channel: pika.channel.Channel,
        method: pika.spec.Basic.Deliver,
        _properties: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        if not self.acked and not self.held:
            self.first_delivery = time.time()
        tag = int(method.delivery_tag or 0)
        _do(self.work, 1)
        path = self.folder / f"{tag}.msg"
        _write(path, body, sync=self.sync_each)
        self.held.append((tag, body))
        self.files.append(path)
        if len(self.held) == 1:
            # Runs once pika has handed over every delivery already read.
            self.connection.ioloop.call_later(0, self._flush)
        elif len(self.held) >= LOAD_BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self.held or self.channel is None:
            return
        held, self.held = self.held, []
        files, self.files = self.files, []
        if not self.sync_each:
            _sync_all(self.folder, files)
        self.journal.commit([body for _, body in held])
        self.channel.basic_ack(held[-1][0], multiple=True)
        now = time.time()
        self.acked += len(held)
        if self.stamped:
            self.latencies.extend(now - raw._STAMP.unpack_from(body)[0] for _, body in held)
        if self.acked >= self.count:
            self.last_ack = now
            self.connection.close()


def _do(work: Sequence[Callable[[], object]], messages: int) -> None:
    """Do `work` once for each of `messages` messages."""
    for _ in range(messages):
        for call in work:
            call()


def _write(path: Path, data: bytes, *, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _sync_all(folder: Path, files: list[Path]) -> None:
    """Make `files` durable: one ``syncfs`` of `folder`'s file system, else an fsync each."""
    syncfs = getattr(_libc(), "syncfs", None)
    if syncfs is not None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _publisher_main(
    folder: Path, steps: Sequence[Step], args: tuple[Any, ...], results: Any
) -> None:
    journal = Journal(folder / "outbox.db")
    try:
        publisher = _DurablePublisher(journal, crypto.step_calls(steps), *args)
        results.put(("publisher", publisher.run()))
    except Exception as e:
        results.put(("publisher", {"error": f"{type(e).__name__}: {e}"}))
    finally:
        journal.close()


def _consumer_main(
    folder: Path,
    sync_each: bool,
    steps: Sequence[Step],
    args: tuple[Any, ...],
    ready: Any,
    results: Any,
) -> None:
    journal = Journal(folder / "inbox.db")
    files = folder / "files"
    files.mkdir(exist_ok=True)
    try:
        work = crypto.step_calls(steps)
        consumer = _DurableConsumer(journal, files, sync_each, work, *args, ready)
        results.put(("consumer", consumer.run()))
    except Exception as e:
        ready.set()
        results.put(("consumer", {"error": f"{type(e).__name__}: {e}"}))
    finally:
        journal.close()


def _run(
    broker: raw.Broker,
    folder: Path,
    count: int,
    *,
    size: int,
    prefetch: int,
    rate: float | None,
    sync_each: bool,
    cryptography: Cryptography = NO_CRYPTOGRAPHY,
) -> dict[str, dict[str, Any]]:
    """One durable publisher and one durable consumer process over a fresh queue."""
    queue = f"bench.durable.{uuid.uuid4().hex[:8]}"
    run_folder = folder / queue
    run_folder.mkdir(parents=True)
    raw.declare_queue(broker, queue)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ready = context.Event()
    consumer = context.Process(
        target=_consumer_main,
        args=(
            run_folder,
            sync_each,
            cryptography[1],
            (broker, queue, count, prefetch, rate is not None),
            ready,
            results,
        ),
        name="bench-durable-consumer",
    )
    consumer.start()
    ready.wait(60)
    publisher = context.Process(
        target=_publisher_main,
        args=(
            run_folder,
            cryptography[0],
            (broker, queue, count, size, raw.CONFIRM_WINDOW, rate),
            results,
        ),
        name="bench-durable-publisher",
    )
    publisher.start()
    try:
        return raw._collect([consumer, publisher], results)
    finally:
        raw.delete_queue(broker, queue)


def throughput(
    broker: raw.Broker,
    folder: Path,
    count: int,
    *,
    size: int = raw.PAYLOAD_BYTES,
    prefetch: int = 200,
    sync_each: bool = True,
    cryptography: Cryptography = NO_CRYPTOGRAPHY,
) -> raw.Throughput:
    """Commit, publish, consume, sync and commit `count` messages at full speed.

    With `cryptography`, each side also does its share of a message's raw
    cryptography (see the module's text).
    """
    out = _run(
        broker,
        folder,
        count,
        size=size,
        prefetch=prefetch,
        rate=None,
        sync_each=sync_each,
        cryptography=cryptography,
    )
    seconds = out["consumer"]["last_ack"] - out["publisher"]["first_publish"]
    return raw.Throughput(messages=count, seconds=seconds, prefetch=prefetch)


def latency(
    broker: raw.Broker,
    folder: Path,
    count: int,
    rate: float,
    *,
    size: int = raw.PAYLOAD_BYTES,
    prefetch: int = 200,
    sync_each: bool = True,
) -> raw.Latency:
    """Percentiles from the time a message is stamped (before its commit) to its ack."""
    out = _run(broker, folder, count, size=size, prefetch=prefetch, rate=rate, sync_each=sync_each)
    seconds = out["consumer"]["last_ack"] - out["publisher"]["first_publish"]
    return raw.latency_of(out["consumer"]["latencies"], rate, seconds)


def main(argv: list[str] | None = None) -> None:
    """Run the durable baseline alone and print its figures."""
    parser = argparse.ArgumentParser(prog="benchmarks.durable", description=__doc__)
    parser.add_argument("--messages", type=int, default=5_000)
    parser.add_argument("--rate", type=float, default=200.0, help="offered rate for latency")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--management-url", default="http://guest:guest@127.0.0.1:15672/")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with (
        raw.scratch_vhost(args.management_url, args.amqp_url) as vhost,
        tempfile.TemporaryDirectory(prefix="trm-bench-durable-") as folder,
    ):
        broker = raw.Broker(args.amqp_url, vhost)
        count = min(args.messages, int(args.rate * 10))
        figures: dict[str, Any] = {}
        for name, each in (("fsync_each", True), ("syncfs_batch", False)):
            done = throughput(broker, Path(folder), args.messages, sync_each=each)
            lat = latency(broker, Path(folder), count, args.rate, sync_each=each)
            figures[name] = {"throughput_per_s": done.per_s, "latency": asdict(lat)}
    print(json.dumps(figures, indent=2) if args.json else figures)


if __name__ == "__main__":
    main()
