"""A batch gathers every delivery that has arrived, not one socket read's worth."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import pika.spec

from broker.transport import Delivery, _delivery, _gather


class _Channel:
    """pika's channel as `_gather` sees it: each socket read brings the next group."""

    def __init__(self, reads: list[int]) -> None:
        self.reads = deque(reads)
        self.arrived = 0
        self.taken = 0
        self.socket_reads = 0
        self.connection = self

    def get_waiting_message_count(self) -> int:
        return self.arrived - self.taken

    def process_data_events(self, time_limit: float) -> None:
        assert time_limit == 0, "a batch never waits for more deliveries"
        self.socket_reads += 1
        if self.reads:
            self.arrived += self.reads.popleft()

    def stream(self) -> Iterator[tuple[Any, Any, Any]]:
        while True:
            assert self.taken < self.arrived, "took a delivery that had not arrived"
            self.taken += 1
            method = pika.spec.Basic.Deliver(delivery_tag=self.taken)
            yield method, pika.spec.BasicProperties(), b"body"


def _first(channel: _Channel) -> list[Delivery]:
    """The delivery the consumer blocked for, which arrived with the first read."""
    channel.process_data_events(time_limit=0)
    method, properties, body = next(channel.stream())
    return [_delivery(method, properties, body)]


def test_a_batch_reads_the_socket_again_until_nothing_more_has_arrived() -> None:
    # The read after a blocking one may bring nothing though more has arrived.
    channel = _Channel([27, 0, 27, 27, 10])
    batch = _first(channel)
    _gather(channel, channel.stream(), batch, max_batch=500)  # type: ignore[arg-type]
    assert [d.delivery_tag for d in batch] == list(range(1, 92))
    assert channel.socket_reads == 1 + 4 + 2  # the first, the four after it, two idle


def test_a_batch_stops_at_its_limit_and_leaves_the_rest_waiting() -> None:
    channel = _Channel([27, 27, 27])
    batch = _first(channel)
    _gather(channel, channel.stream(), batch, max_batch=40)  # type: ignore[arg-type]
    assert len(batch) == 40
    assert channel.get_waiting_message_count() == 14
    assert channel.socket_reads == 2


def test_a_single_delivery_costs_two_idle_reads_and_no_wait() -> None:
    channel = _Channel([1])
    batch = _first(channel)
    _gather(channel, channel.stream(), batch, max_batch=100)  # type: ignore[arg-type]
    assert len(batch) == 1
    assert channel.socket_reads == 1 + 2
