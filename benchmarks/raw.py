"""The raw RabbitMQ baseline: plain pika, no trm code, as fast as pika goes.

The physical limit every trm figure is divided by. Publisher and consumer are
separate processes running at the same time, each on its own connection driven
by pika's asynchronous `SelectConnection` (the fastest I/O loop pika has):

- the publisher sends pre-made bytes as persistent messages to a topic
  exchange bound to one durable quorum queue, with publisher confirms in a
  window (up to ``window`` unconfirmed messages in flight, retired by the
  broker's multiple-acks);
- the consumer reads that queue with a prefetch window and acks every message
  by hand.

Throughput is messages divided by the time from the first publish to the last
ack at the consumer. Latency is measured at a fixed offered rate: each body
starts with its publish time, and the consumer takes the difference once it
has acked. `consume_rate` drains a pre-loaded queue, the baseline of the
routing service's ingest.

Run alone: ``python -m benchmarks.raw [--messages N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import struct
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing.context import SpawnProcess
from typing import Any

import pika
import pika.channel
import pika.frame
import pika.spec

from broker.management import ManagementClient
from broker.transport import AmqpSettings

PAYLOAD_BYTES = 2048
PREFETCHES = (100, 200, 300)
CONFIRM_WINDOW = 500
EXCHANGE = "bench.raw"
_STAMP = struct.Struct(">d")
_TICK = 0.002
"""Seconds between pacing ticks of a publisher at a fixed offered rate."""
_TIMEOUT = 600.0
"""Longest a benchmark process may run before the run is declared failed."""


class BenchmarkFailed(RuntimeError):
    """A benchmark process failed or did not finish in time."""


@dataclass(frozen=True)
class Broker:
    """Where the benchmark runs: an administrator AMQP URL and a vhost."""

    amqp_url: str
    vhost: str

    def parameters(self) -> pika.ConnectionParameters:
        """pika parameters for the administrator on the vhost."""
        return AmqpSettings.from_url(self.amqp_url, vhost=self.vhost).parameters()


@dataclass(frozen=True)
class Throughput:
    """Messages moved and the seconds from the first publish to the last ack."""

    messages: int
    seconds: float
    prefetch: int

    @property
    def per_s(self) -> float:
        """Messages per second."""
        return self.messages / self.seconds


@dataclass(frozen=True)
class Latency:
    """Latency percentiles (seconds) at an offered rate (messages per second)."""

    messages: int
    offered_per_s: float
    achieved_per_s: float
    p50: float
    p95: float
    p99: float


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100) of `values`, nearest rank."""
    if not values:
        raise ValueError("no values to take a percentile of")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def latency_of(samples: Sequence[float], offered: float, seconds: float) -> Latency:
    """Percentiles of `samples` taken at `offered` messages per second over `seconds`."""
    return Latency(
        messages=len(samples),
        offered_per_s=offered,
        achieved_per_s=len(samples) / seconds,
        p50=percentile(samples, 50),
        p95=percentile(samples, 95),
        p99=percentile(samples, 99),
    )


@contextmanager
def scratch_vhost(management_url: str, amqp_url: str, prefix: str = "trm-bench") -> Iterator[str]:
    """A fresh vhost the administrator may use, deleted with everything in it afterwards."""
    client = ManagementClient(management_url)
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    user = AmqpSettings.from_url(amqp_url).username
    client.create_vhost(name)
    try:
        client.set_permissions(name, user, configure=".*", write=".*", read=".*")
        yield name
    finally:
        client.delete_vhost(name)


def declare_queue(broker: Broker, name: str) -> None:
    """A fresh durable quorum queue bound to the benchmark's topic exchange by its name."""
    connection = pika.BlockingConnection(broker.parameters())
    try:
        channel = connection.channel()
        channel.exchange_declare(EXCHANGE, "topic", durable=True)
        channel.queue_delete(name)
        channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(name, EXCHANGE, routing_key=name)
    finally:
        connection.close()


def delete_queue(broker: Broker, name: str) -> None:
    """Delete a benchmark queue and whatever is left in it."""
    connection = pika.BlockingConnection(broker.parameters())
    try:
        connection.channel().queue_delete(name)
    finally:
        connection.close()


# --- the two processes ----------------------------------------------------------


class _Publisher:
    """Publishes `count` messages with windowed confirms, optionally at a fixed rate."""

    def __init__(
        self, broker: Broker, queue: str, count: int, size: int, window: int, rate: float | None
    ) -> None:
        self.queue, self.count, self.window, self.rate = queue, count, window, rate
        self.body = os.urandom(max(size, _STAMP.size))
        self.properties = pika.BasicProperties(
            delivery_mode=2, content_type="application/octet-stream"
        )
        self.sent = self.confirmed = self.nacked = 0
        self.lowest = 1
        self.pending: set[int] = set()
        self.first_publish = self.last_confirm = 0.0
        self.started = 0.0
        self.channel: pika.channel.Channel | None = None
        self.connection = pika.SelectConnection(
            broker.parameters(),
            on_open_callback=self._opened,
            on_open_error_callback=lambda _c, e: self._fail(e),
            on_close_callback=lambda _c, _e: self.connection.ioloop.stop(),
        )
        self.error: str | None = None

    def run(self) -> dict[str, Any]:
        self.connection.ioloop.start()
        if self.error:
            raise BenchmarkFailed(self.error)
        return {
            "first_publish": self.first_publish,
            "last_confirm": self.last_confirm,
            "nacked": self.nacked,
        }

    def _fail(self, error: object) -> None:
        self.error = f"publisher: {error}"
        self.connection.ioloop.stop()

    def _opened(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._channel_open)

    def _channel_open(self, channel: pika.channel.Channel) -> None:
        self.channel = channel
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._selected)

    def _selected(self, _frame: pika.frame.Method[Any]) -> None:
        self.started = time.time()
        self.first_publish = self.started
        if self.rate is None:
            self._fill()
        else:
            self._tick()

    def _due(self) -> int:
        if self.rate is None:
            return self.count
        return min(self.count, int((time.time() - self.started) * self.rate) + 1)

    def _fill(self) -> None:
        assert self.channel is not None
        due = self._due()
        while self.sent < due and len(self.pending) < self.window:
            body = self.body
            if self.rate is not None:
                body = _STAMP.pack(time.time()) + body[_STAMP.size :]
            self.channel.basic_publish(EXCHANGE, self.queue, body, self.properties)
            self.sent += 1
            self.pending.add(self.sent)

    def _tick(self) -> None:
        self._fill()
        if self.sent < self.count:
            self.connection.ioloop.call_later(_TICK, self._tick)

    def _on_confirm(self, frame: pika.frame.Method[Any]) -> None:
        method = frame.method
        tag = int(method.delivery_tag)
        if isinstance(method, pika.spec.Basic.Nack):
            self.nacked += 1
        if method.multiple:
            for done in range(self.lowest, tag + 1):
                self.pending.discard(done)
            self.lowest = tag + 1
        else:
            self.pending.discard(tag)
        if not self.pending and self.sent >= self.count:
            self.last_confirm = time.time()
            self.connection.close()
            return
        if self.rate is None:
            self._fill()


class _Consumer:
    """Acks every message of a queue by hand until `count` were acked."""

    def __init__(
        self, broker: Broker, queue: str, count: int, prefetch: int, stamped: bool, ready: Any
    ) -> None:
        self.queue, self.count, self.prefetch = queue, count, prefetch
        self.stamped, self.ready = stamped, ready
        self.acked = 0
        self.first_delivery = self.last_ack = 0.0
        self.latencies: list[float] = []
        self.error: str | None = None
        self.channel: pika.channel.Channel | None = None
        self.connection = pika.SelectConnection(
            broker.parameters(),
            on_open_callback=lambda c: c.channel(on_open_callback=self._channel_open),
            on_open_error_callback=lambda _c, e: self._fail(e),
            on_close_callback=lambda _c, _e: self.connection.ioloop.stop(),
        )

    def run(self) -> dict[str, Any]:
        self.connection.ioloop.start()
        if self.error:
            raise BenchmarkFailed(self.error)
        return {
            "first_delivery": self.first_delivery,
            "last_ack": self.last_ack,
            "latencies": self.latencies,
        }

    def _fail(self, error: object) -> None:
        self.error = f"consumer: {error}"
        self.connection.ioloop.stop()

    def _channel_open(self, channel: pika.channel.Channel) -> None:
        self.channel = channel
        channel.basic_qos(prefetch_count=self.prefetch, callback=self._qos_ok)

    def _qos_ok(self, _frame: pika.frame.Method[Any]) -> None:
        assert self.channel is not None
        self.channel.basic_consume(
            self.queue, self._on_message, auto_ack=False, callback=lambda _f: self.ready.set()
        )

    def _on_message(
        self,
        channel: pika.channel.Channel,
        method: pika.spec.Basic.Deliver,
        _properties: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        if not self.acked:
            self.first_delivery = time.time()
        channel.basic_ack(int(method.delivery_tag or 0))
        self.acked += 1
        now = time.time()
        if self.stamped:
            self.latencies.append(now - _STAMP.unpack_from(body)[0])
        if self.acked >= self.count:
            self.last_ack = now
            self.connection.close()


def _publisher_main(
    broker: Broker,
    queue: str,
    count: int,
    size: int,
    window: int,
    rate: float | None,
    results: Any,
) -> None:
    try:
        results.put(("publisher", _Publisher(broker, queue, count, size, window, rate).run()))
    except Exception as e:
        results.put(("publisher", {"error": f"{type(e).__name__}: {e}"}))


def _consumer_main(
    broker: Broker,
    queue: str,
    count: int,
    prefetch: int,
    stamped: bool,
    ready: Any,
    results: Any,
) -> None:
    try:
        consumer = _Consumer(broker, queue, count, prefetch, stamped, ready)
        results.put(("consumer", consumer.run()))
    except Exception as e:
        ready.set()
        results.put(("consumer", {"error": f"{type(e).__name__}: {e}"}))


def _collect(processes: Sequence[SpawnProcess], results: Any) -> dict[str, dict[str, Any]]:
    """The result of every process, or `BenchmarkFailed` naming the one that failed."""
    collected: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + _TIMEOUT
    try:
        while len(collected) < len(processes):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchmarkFailed(f"raw benchmark did not finish in {_TIMEOUT:.0f} s")
            try:
                name, value = results.get(timeout=min(remaining, 1.0))
            except Exception:
                if any(p.exitcode not in (None, 0) for p in processes):
                    raise BenchmarkFailed("a raw benchmark process died") from None
                continue
            if "error" in value:
                raise BenchmarkFailed(f"raw {name}: {value['error']}")
            collected[name] = value
    finally:
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
    return collected


def _run(
    broker: Broker,
    count: int,
    *,
    size: int,
    prefetch: int,
    window: int,
    rate: float | None,
) -> dict[str, dict[str, Any]]:
    """One publisher and one consumer process, concurrently, over a fresh queue."""
    queue = f"bench.raw.{uuid.uuid4().hex[:8]}"
    declare_queue(broker, queue)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ready = context.Event()
    consumer = context.Process(
        target=_consumer_main,
        args=(broker, queue, count, prefetch, rate is not None, ready, results),
        name="bench-raw-consumer",
    )
    consumer.start()
    ready.wait(60)
    publisher = context.Process(
        target=_publisher_main,
        args=(broker, queue, count, size, window, rate, results),
        name="bench-raw-publisher",
    )
    publisher.start()
    try:
        return _collect([consumer, publisher], results)
    finally:
        delete_queue(broker, queue)


def throughput(
    broker: Broker,
    count: int,
    *,
    size: int = PAYLOAD_BYTES,
    prefetch: int = 200,
    window: int = CONFIRM_WINDOW,
) -> Throughput:
    """Publish and consume `count` messages at full speed; first publish to last ack."""
    out = _run(broker, count, size=size, prefetch=prefetch, window=window, rate=None)
    seconds = out["consumer"]["last_ack"] - out["publisher"]["first_publish"]
    return Throughput(messages=count, seconds=seconds, prefetch=prefetch)


def best_throughput(
    broker: Broker,
    count: int,
    *,
    size: int = PAYLOAD_BYTES,
    prefetches: Sequence[int] = PREFETCHES,
    window: int = CONFIRM_WINDOW,
) -> tuple[Throughput, list[Throughput]]:
    """The fastest of one run per prefetch setting, and every run."""
    runs = [throughput(broker, count, size=size, prefetch=p, window=window) for p in prefetches]
    return max(runs, key=lambda r: r.per_s), runs


def latency(
    broker: Broker,
    count: int,
    rate: float,
    *,
    size: int = PAYLOAD_BYTES,
    prefetch: int = 200,
    window: int = CONFIRM_WINDOW,
) -> Latency:
    """Publish `count` stamped messages at `rate` per second; publish-to-ack percentiles."""
    out = _run(broker, count, size=size, prefetch=prefetch, window=window, rate=rate)
    seconds = out["consumer"]["last_ack"] - out["publisher"]["first_publish"]
    return latency_of(out["consumer"]["latencies"], rate, seconds)


def consume_rate(
    broker: Broker, count: int, *, size: int = PAYLOAD_BYTES, prefetch: int = 200
) -> Throughput:
    """Drain `count` pre-loaded messages with manual acks: first delivery to last ack."""
    queue = f"bench.drain.{uuid.uuid4().hex[:8]}"
    declare_queue(broker, queue)
    try:
        fill = _Publisher(broker, queue, count, size, CONFIRM_WINDOW, None).run()
        if fill["nacked"]:
            raise BenchmarkFailed(f"the broker nacked {fill['nacked']} pre-loaded messages")
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        ready = context.Event()
        consumer = context.Process(
            target=_consumer_main,
            args=(broker, queue, count, prefetch, False, ready, results),
            name="bench-raw-drain",
        )
        consumer.start()
        out = _collect([consumer], results)["consumer"]
    finally:
        delete_queue(broker, queue)
    return Throughput(
        messages=count, seconds=out["last_ack"] - out["first_delivery"], prefetch=prefetch
    )


def main(argv: list[str] | None = None) -> None:
    """Run the raw baseline alone and print its figures."""
    parser = argparse.ArgumentParser(prog="benchmarks.raw", description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="offered rate for latency")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--management-url", default="http://guest:guest@127.0.0.1:15672/")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with scratch_vhost(args.management_url, args.amqp_url) as vhost:
        broker = Broker(args.amqp_url, vhost)
        best, runs = best_throughput(broker, args.messages)
        drain = consume_rate(broker, args.messages)
        lat = latency(broker, min(args.messages, int(args.rate * 10)), args.rate)
    figures = {
        "throughput": [{**asdict(r), "per_s": r.per_s} for r in runs],
        "best_prefetch": best.prefetch,
        "consume_per_s": drain.per_s,
        "latency": asdict(lat),
    }
    print(json.dumps(figures, indent=2) if args.json else figures)


if __name__ == "__main__":
    main()
