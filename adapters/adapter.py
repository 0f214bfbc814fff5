"""The participant adapter process: consume the inbox, relay the outbox.

Four threads; the first two each with its own RabbitMQ connection and each
restarted with backoff while the broker is unreachable (`run_with_reconnect`):

- the consumer reads ``trm.inbox.<id>``; each delivery goes through
  `Inbox.handle` (open, deduplicate, apply, receipt: one transaction) and is
  acked only after that transaction committed. An envelope that fails
  opening is recorded, copied to ``trm.quarantine.<id>`` with its reason
  (on the consumer's own publisher) and then acked, so it never blocks the
  queue behind it. When the local side fails instead (the database, the case
  system, our own keys), the consumer stops taking deliveries and tries the
  batch in hand again with bounded exponential backoff until it is taken
  (`Consumer`, `LocalUnavailable`); the state is recorded in the status file
  `trm health` reads (`Home.status_path`).
- the relay publishes the outbox with windowed confirms and marks envelopes
  sent only once confirmed; it then awaits each recipient's delivery receipt
  and resends the same bytes to those whose receipt is overdue
  (`broker.reception`), every `resend_after` seconds doubled after each try,
  until `resend_tries` tries are flagged.
- the eraser does the erasures consent withdrawals asked for (`Erasures`):
  at once when the inbox committed one, and every `erasure_retry` seconds
  for one that failed (a read-only case folder, say) or that another
  process recorded.
- the receipt retrier seals the delivery receipts that wait for their
  recipient's encryption key (`Inbox.retry_receipts`): when the installed
  directory changes and every `receipt_retry` seconds.

Deliveries that have already arrived (within the prefetch window) are
applied together: `Inbox.handle_batch` opens each, then applies them all and
queues their receipts in one transaction, and one multiple-ack retires them.
One commit and one case-folder sync per batch instead of per message is what
lets a backlog drain at close to the broker's own rate; a lone delivery is
still applied at once, never held back to fill a batch.

A crash anywhere loses nothing: before the commit the redelivery applies the
envelope, after it the redelivery is absorbed as a duplicate.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from adapters.erasure import Erasures
from adapters.home import LOCAL_DOWN, Home
from broker.errors import (
    BrokerUnavailable,
    LocalUnavailable,
    StorageError,
    TransportError,
    TrmError,
)
from broker.inbox import Inbox, Outcome
from broker.outbox import Outbox, Relay
from broker.quarantine import as_first_published
from broker.reception import RESEND_AFTER, RESEND_TRIES, ReceptionPolicy
from broker.topology import inbox_queue
from broker.transport import (
    AmqpSettings,
    Consumer,
    Delivery,
    Outgoing,
    Publisher,
    run_with_reconnect,
)
from services.witness import Witness, run_witness

log = structlog.get_logger(__name__)

JOIN_SECONDS = 30.0
"""How long a clean shutdown waits for each thread."""
ERASER_TICK_SECONDS = 0.2
"""How often the eraser looks for a stop or a due retry while it waits for a withdrawal."""
RETRY_MAX_SECONDS = 5.0
"""Longest wait between reconnect attempts: back within seconds of the broker's return."""
LOCAL_RETRY_INITIAL_SECONDS = 0.5
"""First wait before a batch the local side failed is tried again; it doubles each time."""
LOCAL_RETRY_MAX_SECONDS = 30.0
"""Longest wait between two tries of a batch while the local side is down."""
RECEIPT_TICK_SECONDS = 0.5
"""How often the receipt retrier looks for a new directory or a due retry."""


class LocalState:
    """Whether the local side takes deliveries, kept in the status file `trm health` reads.

    Written by the consumer thread when the state changes and at each failed
    try; a status file that cannot be written is logged once, never fatal.
    """

    def __init__(self, home: Home, logger: structlog.typing.FilteringBoundLogger) -> None:
        self.home = home
        self._log = logger
        self.state = "starting"
        self.since = _now()
        self.cause: str | None = None
        self.attempts = 0
        self.publishing: dict[str, str] | None = None
        """Since when and why RabbitMQ takes none of the relay's envelopes, if it does not."""
        self._unwritable = False
        self._lock = threading.Lock()

    def running(self) -> None:
        """The local side took a batch (or the adapter started): record it if it was down."""
        if self.state == "running":
            return
        if self.state == LOCAL_DOWN:
            self._log.info(
                "adapter.local_up", down_since=self.since, attempts=self.attempts, cause=self.cause
            )
        self._set("running", None)

    def down(self, cause: str) -> None:
        """A batch failed on the local side with `cause`; count the try and record it."""
        if self.state != LOCAL_DOWN:
            self._log.error("adapter.local_down", cause=cause)
            self.state, self.since, self.attempts = LOCAL_DOWN, _now(), 0
        self.cause = cause
        self.attempts += 1
        self._write()

    def publishing_stalled(self, cause: str) -> None:
        """The relay's publish failed with `cause`: envelopes wait in the outbox."""
        if self.publishing is None:
            self._log.error("adapter.publishing_stalled", cause=cause)
            self.publishing = {"since": _now(), "cause": cause}
        else:
            self.publishing["cause"] = cause
        self._write()

    def publishing_resumed(self) -> None:
        """RabbitMQ confirmed the relay's publish again."""
        if self.publishing is None:
            return
        self._log.info("adapter.publishing_resumed", stalled_since=self.publishing["since"])
        self.publishing = None
        self._write()

    def stopped(self) -> None:
        """The adapter stopped."""
        self._set("stopped", None)

    def _set(self, state: str, cause: str | None) -> None:
        self.state, self.since, self.cause, self.attempts = state, _now(), cause, 0
        self._write()

    def _write(self) -> None:
        status = {
            "participant": self.home.participant_id,
            "pid": os.getpid(),
            "state": self.state,
            "since": self.since,
            "cause": self.cause,
            "attempts": self.attempts,
            "publishing": self.publishing,
            "updated_at": _now(),
        }
        try:
            # The consumer and the relay both record their state here.
            with self._lock:
                self.home.write_status(status)
        except OSError as e:
            if not self._unwritable:
                self._unwritable = True
                self._log.warning(
                    "adapter.status_unwritable",
                    path=str(self.home.status_path),
                    error=e.strerror,
                    hint="set TRM_STATUS_FILE to a writable path for trm health",
                )


class _Reported:
    """The relay's publisher, recording in the status file whether RabbitMQ takes envelopes."""

    def __init__(self, publisher: Publisher, state: LocalState) -> None:
        self._publisher = publisher
        self._state = state

    def publish(self, messages: Sequence[Outgoing], timeout: float = 30) -> None:
        """Publish as `Publisher.publish`; a broker that confirms nothing is recorded."""
        try:
            self._publisher.publish(messages, timeout)
        except BrokerUnavailable as e:
            self._state.publishing_stalled(str(e))
            raise
        self._state.publishing_resumed()

    def publish_quarantine(
        self, body: bytes, *, participant_id: str, reason: str, detail: str
    ) -> None:
        """As `Publisher.publish_quarantine`."""
        self._publisher.publish_quarantine(
            body, participant_id=participant_id, reason=reason, detail=detail
        )


def _now() -> str:
    return datetime.now(UTC).isoformat()


def local_cause(error: Exception) -> str:
    """What failed on the local side, for logs and the status file.

    A trm error's reason and message; for anything else its type and where it
    was raised, never its text (a driver's error may quote data).
    """
    if isinstance(error, TrmError):
        return f"{error.reason}: {error}"
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__} at {frame.filename}:{frame.lineno}"


@dataclass
class AdapterStats:
    """What the adapter did since it started (read by tests and the shutdown log line)."""

    applied: int = 0
    duplicates: int = 0
    quarantined: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, outcome: Outcome) -> None:
        """Count one handled delivery."""
        with self._lock:
            if outcome is Outcome.APPLIED:
                self.applied += 1
            elif outcome is Outcome.DUPLICATE:
                self.duplicates += 1
            else:
                self.quarantined += 1


class Adapter:
    """One participant's adapter: inbox consumer and outbox relay."""

    def __init__(
        self,
        home: Home,
        *,
        relay_batch: int = 500,
        apply_batch: int = 100,
        erasure_retry: float = 30.0,
        receipt_retry: float = 60.0,
        local_retry_max: float = LOCAL_RETRY_MAX_SECONDS,
        resend_after: float = RESEND_AFTER,
        resend_tries: int = RESEND_TRIES,
    ) -> None:
        """Run for `home`; settings are checked here, before any thread starts.

        Up to `apply_batch` deliveries already waiting are applied in one
        inbox transaction and acked with one multiple-ack. An envelope whose
        receipt has not come back is resent after `resend_after` seconds
        (doubling), and flagged after `resend_tries` tries.
        """
        self.home = home
        self.relay_batch = relay_batch
        self.apply_batch = apply_batch
        self.erasure_retry = erasure_retry
        self.receipt_retry = receipt_retry
        self.local_retry_max = local_retry_max
        self.reception = ReceptionPolicy(after=resend_after, tries=resend_tries)
        self.participant_id = home.participant_id
        self.settings: AmqpSettings = home.amqp_settings()
        home.directory()
        self.stats = AdapterStats()
        self._failure: BaseException | None = None
        self._log = log.bind(participant=self.participant_id)
        self.local = LocalState(home, self._log)

    def run(self, stop: threading.Event) -> None:
        """Consume and relay until `stop` is set; then join both threads and return.

        A failure that retrying cannot cure (refused login, missing queue,
        broken database) stops the adapter and is raised here.
        """
        engine = self.home.open_database()
        try:
            outbox = Outbox(engine)
            case_system = self.home.case_system()
            inbox = Inbox(
                engine,
                recipient=self.home.recipient(),
                sender=self.home.sender,
                directory=self.home.directory,
                case_system=case_system,
                outbox=outbox,
            )
            erasures = Erasures(
                engine, case_system, sender=self.home.sender, directory=self.home.directory
            )
            wake = threading.Event()
            threads = [
                self._thread("consumer", lambda: self._consume(inbox, stop, wake), stop),
                self._thread("relay", lambda: self._relay(outbox, stop, wake), stop),
                self._thread(
                    "eraser", lambda: self._erase(erasures, inbox.erasure_wanted, stop, wake), stop
                ),
                self._thread("receipts", lambda: self._retry_receipts(inbox, stop, wake), stop),
            ]
            if self.participant_id in self.home.directory().body.witnesses:
                witness = Witness.of_home(self.home, engine)
                threads.append(
                    self._thread(
                        "witness",
                        lambda: run_witness(witness, self.settings, self.participant_id, stop),
                        stop,
                    )
                )
            self.local.running()
            self._log.info(
                "adapter.started", vhost=self.settings.vhost, queue=inbox_queue(self.participant_id)
            )
            for thread in threads:
                thread.start()
            stop.wait()
            for thread in threads:
                thread.join(JOIN_SECONDS)
        finally:
            engine.dispose()
            self.local.stopped()
        self._log.info(
            "adapter.stopped",
            applied=self.stats.applied,
            duplicates=self.stats.duplicates,
            quarantined=self.stats.quarantined,
        )
        if self._failure is not None:
            raise self._failure

    def _thread(
        self, name: str, target: Callable[[], None], stop: threading.Event
    ) -> threading.Thread:
        def body() -> None:
            try:
                target()
            except BaseException as e:
                self._failure = e
                reason = e.reason if isinstance(e, TrmError) else type(e).__name__
                self._log.error("adapter.failed", thread=name, reason=reason, error=str(e))
            finally:
                stop.set()

        return threading.Thread(target=body, name=f"trm-{name}-{self.participant_id}")

    # --- the consumer ---------------------------------------------------------------

    def _consume(self, inbox: Inbox, stop: threading.Event, wake: threading.Event) -> None:
        state: dict[str, Consumer | Publisher] = {}

        def quarantine_publisher() -> Publisher:
            publisher = state.get("publisher")
            if not isinstance(publisher, Publisher):
                publisher = Publisher(self.settings, self.participant_id)
                state["publisher"] = publisher
            return publisher

        def handle(batch: list[Delivery]) -> None:
            try:
                results = inbox.handle_batch(
                    [as_first_published(delivery, self.participant_id) for delivery in batch]
                )
            except TransportError:
                raise
            except Exception as e:
                # Nothing of the batch was applied: the consumer holds it and tries again.
                cause = local_cause(e)
                self.local.down(cause)
                held = "1 delivery" if len(batch) == 1 else f"{len(batch)} deliveries"
                raise LocalUnavailable(f"cannot apply {held}: {cause}") from e
            self.local.running()
            for delivery, result in zip(batch, results, strict=True):
                self.stats.count(result.outcome)
                if result.outcome is Outcome.QUARANTINED:
                    quarantine_publisher().publish_quarantine(
                        delivery.body,
                        participant_id=self.participant_id,
                        reason=result.reason or "error",
                        detail=result.detail or "",
                    )
            if any(result.outcome is Outcome.APPLIED for result in results):
                # Receipts are waiting in the outbox: let the relay send them now.
                wake.set()

        def once() -> None:
            consumer = state.get("consumer")
            if not isinstance(consumer, Consumer):
                consumer = Consumer(
                    self.settings,
                    inbox_queue(self.participant_id),
                    hold_initial=LOCAL_RETRY_INITIAL_SECONDS,
                    hold_maximum=self.local_retry_max,
                )
                state["consumer"] = consumer
            consumer.run_batches(handle, stop, max_batch=self.apply_batch)

        try:
            run_with_reconnect(once, stop, maximum=RETRY_MAX_SECONDS, log=self._log)
        finally:
            for item in state.values():
                item.close()

    # --- the relay --------------------------------------------------------------------

    def _relay(self, outbox: Outbox, stop: threading.Event, wake: threading.Event) -> None:
        def once() -> None:
            publisher = Publisher(self.settings, self.participant_id)
            try:
                Relay(
                    outbox,
                    _Reported(publisher, self.local),
                    batch=self.relay_batch,
                    max_retry_delay=RETRY_MAX_SECONDS,
                    reception=self.reception,
                ).run(stop, wake)
            finally:
                publisher.close()

        run_with_reconnect(once, stop, maximum=RETRY_MAX_SECONDS, log=self._log)

    # --- the eraser -------------------------------------------------------------------

    def _erase(
        self,
        erasures: Erasures,
        wanted: threading.Event,
        stop: threading.Event,
        wake: threading.Event,
    ) -> None:
        retry_at = time.monotonic()  # erase what a previous run left at once
        while not stop.is_set():
            due = time.monotonic() >= retry_at
            if not (wanted.wait(ERASER_TICK_SECONDS) or due):
                continue
            wanted.clear()
            try:
                erasures.run()
            except StorageError as e:
                self._log.warning("erasure.retrying", reason=e.reason, error=str(e))
            wake.set()  # confirmations may be waiting in the outbox
            # Also looks again after a quiet spell: `trm withdraw` in another process
            # records erasures that this inbox never sees committed.
            retry_at = time.monotonic() + self.erasure_retry

    # --- the receipt retrier ------------------------------------------------------------

    def _retry_receipts(self, inbox: Inbox, stop: threading.Event, wake: threading.Event) -> None:
        """Seal the receipts waiting for a key: at start, on a new directory, now and then."""
        serial: int | None = None
        retry_at = time.monotonic()
        while not stop.wait(RECEIPT_TICK_SECONDS):
            try:
                current: int | None = self.home.directory().serial
            except TrmError as e:
                current = serial  # the directory held before stays in force
                self._log.warning("receipts.directory_unreadable", reason=e.reason, error=str(e))
            if current == serial and time.monotonic() < retry_at:
                continue
            serial = current
            retry_at = time.monotonic() + self.receipt_retry
            try:
                queued = inbox.retry_receipts()
            except TrmError as e:
                self._log.warning("receipts.retrying", reason=e.reason, error=str(e))
                continue
            if queued:
                wake.set()  # the receipts wait in the outbox
