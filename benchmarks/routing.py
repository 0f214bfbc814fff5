"""Routing ingest: envelopes per second the routing service verifies, logs and tracks.

On a scratch network (see `benchmarks.e2e`), N envelopes (2 KiB payloads, the
messages of `benchmarks.e2e.CaseMix`) are sealed by the sending mission and
published as that mission, with confirms, so that ``trm.routing`` holds all N
before the service starts (each envelope also lands in the recipient's inbox,
which nobody reads here). Then ``trm routing run`` starts and drains the
queue: each envelope is verified, appended to the hash-chained audit log and
folded into its case's state, one transaction and one multiple-ack per batch
of the deliveries waiting.

The rate is N over the time from the first log entry's receive time to the
last one's, the same span as the raw baseline's drain (first delivery to last
ack, `benchmarks.raw.consume_rate`), so process start-up counts in neither.

With `hostile_every` = 10, every tenth envelope of the N is replaced by junk a
participant could publish cheaply: the header and key entries of envelope 0
(so every junk envelope claims one and the same verified id), a 512 KiB random
ciphertext and a random signature, refused as ``rejected:bad_signature`` and
logged. The rate is then that of the clean envelopes over the same span, and
its ratio to the clean run's says how much the junk slows honest traffic.
"""

from __future__ import annotations

import os
import struct
import time
from datetime import UTC
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from benchmarks.e2e import CASES, Network, case_mix, count_rows, network, running, wait_for
from broker.database import open_database
from broker.directory import load_home_directory
from broker.envelope import seal
from broker.keys import load_keys
from broker.topology import ROUTING_QUEUE, queue_depths
from broker.transport import AmqpSettings, Outgoing, Publisher
from services.auditlog import log_entries_table

PUBLISH_BATCH = 500
HOSTILE_BYTES = 512 * 1024
"""Ciphertext size of a hostile envelope, half the 1 MiB limit."""


def junk_like(raw: bytes, size: int = HOSTILE_BYTES) -> bytes:
    """The header and key entries of `raw`, then `size` random bytes and a random signature."""
    (header_len,) = struct.unpack_from(">I", raw, 4)
    pos = 8 + header_len + 2
    for _ in range(struct.unpack_from(">H", raw, 8 + header_len)[0]):
        pos += raw[pos] + 1
        pos += raw[pos] + 1
        pos += 2 + struct.unpack_from(">H", raw, pos)[0]
    return raw[:pos] + struct.pack(">I", size) + os.urandom(size) + os.urandom(64)


def preload(net: Network, count: int, payload_bytes: int, hostile_every: int = 0) -> int:
    """Seal `count` envelopes and publish them as the sender; the envelope size in bytes.

    With `hostile_every` n, envelope i is junk (`junk_like` envelope 0) when
    i % n == n - 1.
    """
    home = net.home(net.sender)
    keys = load_keys(home)
    directory = load_home_directory(home)
    mix = case_mix(net.sender, net.recipient, payload_bytes)
    password = (home / "amqp-password").read_text().strip()
    settings = AmqpSettings.from_url(
        net.amqp_url, vhost=net.vhost, username=net.sender, password=password
    )
    publisher = Publisher(settings, net.sender)
    size = 0
    model = b""
    try:
        sender = keys.sender()
        for first in range(0, count, PUBLISH_BATCH):
            batch = []
            for i in range(first, min(first + PUBLISH_BATCH, count)):
                if hostile_every and i % hostile_every == hostile_every - 1:
                    batch.append(Outgoing(f"junk-{i}", (net.recipient,), junk_like(model)))
                    continue
                sealed = seal(
                    mix.message(i),
                    case=mix.case(i),
                    sender=sender,
                    recipients=(net.recipient,),
                    directory=directory,
                    seq=i // CASES + 1,
                )
                size = len(sealed.raw)
                model = model or sealed.raw
                batch.append(Outgoing(str(sealed.id), sealed.header.recipients, sealed.raw))
            publisher.publish(batch)
    finally:
        publisher.close()
    return size


def _span(url: str) -> float:
    """Seconds from the first log entry's receive time to the last one's."""
    engine = open_database(url)
    try:
        with engine.connect() as conn:
            first, last = conn.execute(
                sa.select(
                    sa.func.min(log_entries_table.c.received_at),
                    sa.func.max(log_entries_table.c.received_at),
                )
            ).one()
    finally:
        engine.dispose()
    values = [v.replace(tzinfo=v.tzinfo or UTC).timestamp() for v in (first, last)]
    return float(max(values[1] - values[0], 1e-9))


def ingest(
    root: Path,
    amqp_url: str,
    management_url: str,
    *,
    messages: int,
    payload_bytes: int,
    prefetch: int,
    hostile_every: int = 0,
    verify_workers: int = 0,
) -> dict[str, Any]:
    """Pre-load `messages` envelopes into ``trm.routing``, run the service, time the drain.

    With `hostile_every` (see `preload`), ``clean_per_s`` counts the clean
    envelopes only. `verify_workers` is the service's ``--verify-workers``.
    """
    with network(root, amqp_url, management_url) as net:
        envelope_bytes = preload(net, messages, payload_bytes, hostile_every)
        admin = AmqpSettings.from_url(amqp_url, vhost=net.vhost)
        depth = queue_depths(admin, [ROUTING_QUEUE])[ROUTING_QUEUE]
        url = f"sqlite:///{net.home(net.routing) / 'trm.db'}"
        open_database(url).dispose()
        logged = count_rows(url, log_entries_table)
        args = [
            *net.command(net.routing, "routing", "run"),
            "--log-file",
            str(root / "routing.log"),
            "--verify-workers",
            str(verify_workers),
        ]
        started = time.monotonic()
        with running(net, args, net.routing) as process:
            wait_for(
                lambda: logged() >= messages, "the routing queue drained", [process], poll=0.25
            )
        wall = time.monotonic() - started
        seconds = _span(url)
    hostile = messages // hostile_every if hostile_every else 0
    return {
        "messages": messages,
        "hostile": hostile,
        "hostile_bytes": HOSTILE_BYTES if hostile else 0,
        "clean_per_s": (messages - hostile) / seconds,
        "preloaded": depth,
        "envelope_bytes": envelope_bytes,
        "prefetch": prefetch,
        "verify_workers": verify_workers,
        "seconds": seconds,
        "ingest_per_s": messages / seconds,
        "wall_seconds_with_startup": wall,
    }
