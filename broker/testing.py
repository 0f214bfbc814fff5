"""Test doubles shipped with trm: an in-memory broker with fault injection, a
small network of participants with real keys, log capture.

`MemoryBroker` stands in for RabbitMQ wherever a test needs a transport but
not a real broker: publishes go to per-participant queues, and a test can make
the next publishes fail (before or after the messages reached the queues, as
when a confirm is lost) or deliver them twice. `MemoryPublisher` implements
`broker.outbox.Publisher`. `make_network` creates participants with real keys
and a directory signed by a throwaway authority, for tests that seal and open
real envelopes. `read_only` makes a folder unwritable, root included, for the
length of a block.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from broker import _crypto
from broker.directory import Directory, DirectoryBody, Role, load_directory, sign_directory
from broker.envelope import Recipient
from broker.errors import BrokerUnavailable, TransportError
from broker.keys import ParticipantKeys, Sender, init_participant, load_keys
from broker.transport import Delivery, Outgoing

__all__ = [
    "DEFAULT_PARTICIPANTS",
    "MemoryBroker",
    "MemoryPublisher",
    "Network",
    "Quarantined",
    "capture_logs",
    "make_network",
]

DEFAULT_PARTICIPANTS: tuple[tuple[str, Role, str, str | None], ...] = (
    ("iom-kz", Role.MISSION, "KZ", None),
    ("iom-uz", Role.MISSION, "UZ", None),
    ("ngo-uz-istiqbolli-avlod", Role.NGO, "UZ", "iom-uz"),
)
"""(id, role, country, parent mission) of the Kazakhstan-to-Uzbekistan story."""


@dataclass(frozen=True)
class Network:
    """Participants with real private keys and the signed directory listing them."""

    keys: Mapping[str, ParticipantKeys]
    authority: Ed25519PrivateKey
    directory: Directory

    def sender(self, participant: str, at: datetime | None = None) -> Sender:
        """`participant`'s signing identity at `at`."""
        return self.keys[participant].sender(at)

    def recipient(self, participant: str) -> Recipient:
        """`participant`'s decryption identity."""
        return Recipient(participant, self.keys[participant].decryption)


def make_network(
    root: Path,
    *,
    now: datetime,
    participants: Sequence[tuple[str, Role, str, str | None]] = DEFAULT_PARTICIPANTS,
    suite: _crypto.Suite = _crypto.Suite.MLKEM768_X25519,
) -> Network:
    """Key folders under `root` for each participant (valid from `now`) and their directory."""
    cards = [
        init_participant(
            root / pid,
            participant_id=pid,
            role=role,
            country=country,
            parent=parent,
            suite=suite,
            now=now,
        )
        for pid, role, country, parent in participants
    ]
    authority = _crypto.new_signing_key()
    body = DirectoryBody(serial=1, issued_at=now, participants=tuple(cards))
    directory = load_directory(sign_directory(body, authority), authority=authority.public_key())
    keys = {pid: load_keys(root / pid) for pid, *_ in participants}
    return Network(keys, authority, directory)


@dataclass(frozen=True)
class Quarantined:
    """A message put in a participant's quarantine."""

    participant_id: str
    body: bytes
    reason: str
    detail: str


@dataclass
class _Fault:
    remaining: int
    error: TransportError
    after_delivery: bool


class MemoryBroker:
    """In-memory queues per participant, with injectable failures and duplicates."""

    def __init__(self) -> None:
        """An empty broker that delivers everything once and fails nothing."""
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Delivery]] = {}
        self._tags = itertools.count(1)
        self._fault: _Fault | None = None
        self._duplicates = 0
        self.confirmed: list[Outgoing] = []
        """Every message whose publish returned normally, in order."""
        self.attempts = 0
        """How many times `publish` was called."""
        self.quarantine: list[Quarantined] = []

    def publisher(self, participant: str) -> MemoryPublisher:
        """A publisher logged in as `participant` (its user id is set on every message)."""
        return MemoryPublisher(self, participant)

    def fail_next(
        self, count: int, error: TransportError | None = None, *, after_delivery: bool = False
    ) -> None:
        """Make the next `count` publishes raise `error` (default BrokerUnavailable).

        With `after_delivery` the messages reach the queues first, as when the
        broker took them but the confirm was lost.
        """
        self._fault = _Fault(
            count,
            error or BrokerUnavailable("the memory broker is down (injected)"),
            after_delivery,
        )

    def duplicate_next(self, count: int) -> None:
        """Deliver the next `count` messages twice, the second copy marked redelivered."""
        self._duplicates = count

    def get(self, participant: str) -> Delivery | None:
        """Take the next delivery from `participant`'s queue, if any."""
        with self._lock:
            queue = self._queues.get(participant)
            return queue.popleft() if queue else None

    def drain(self, participant: str) -> list[Delivery]:
        """Take every delivery waiting in `participant`'s queue."""
        with self._lock:
            queue = self._queues.pop(participant, deque())
        return list(queue)

    def depth(self, participant: str) -> int:
        """How many deliveries wait in `participant`'s queue."""
        with self._lock:
            return len(self._queues.get(participant, ()))

    def _publish(self, user_id: str, messages: Sequence[Outgoing]) -> None:
        with self._lock:
            self.attempts += 1
            fault = self._fault
            if fault is not None and fault.remaining > 0:
                fault.remaining -= 1
                if fault.after_delivery:
                    self._enqueue(user_id, messages)
                raise fault.error
            self._enqueue(user_id, messages)
            self.confirmed.extend(messages)

    def _enqueue(self, user_id: str, messages: Sequence[Outgoing]) -> None:
        for message in messages:
            copies = 1
            if self._duplicates > 0:
                self._duplicates -= 1
                copies = 2
            for copy in range(copies):
                for recipient in message.recipients:
                    self._queues.setdefault(recipient, deque()).append(
                        Delivery(
                            body=message.body,
                            user_id=user_id,
                            message_id=message.envelope_id,
                            redelivered=copy > 0,
                            headers={},
                            delivery_tag=next(self._tags),
                        )
                    )

    def _quarantine(self, item: Quarantined) -> None:
        with self._lock:
            self.quarantine.append(item)


class MemoryPublisher:
    """A `broker.outbox.Publisher` on a `MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, participant: str) -> None:
        """Publish to `broker` as `participant`."""
        self.broker = broker
        self.participant = participant

    def publish(self, messages: Sequence[Outgoing], timeout: float = 30) -> None:
        """Deliver every message to each of its recipients, or raise the injected failure."""
        self.broker._publish(self.participant, messages)

    def publish_quarantine(
        self, body: bytes, *, participant_id: str, reason: str, detail: str
    ) -> None:
        """Keep the message in the broker's quarantine list."""
        self.broker._quarantine(Quarantined(participant_id, body, reason, detail))


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` unwritable inside the block, then writable again.

    Root ignores permission bits, so for root the folder is made immutable
    (``chattr +i``); anyone else gets mode 0500.
    """
    root = os.geteuid() == 0
    if root:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o500)
    try:
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o700)
