"""The participant adapter process: consume the inbox, relay the outbox.

Three threads; the first two each with its own RabbitMQ connection and each
restarted with backoff while the broker is unreachable (`run_with_reconnect`):

- the consumer reads ``trm.inbox.<id>``; each delivery goes through
  `Inbox.handle` (open, deduplicate, apply, receipt: one transaction) and is
  acked only after that transaction committed. An envelope that fails
  opening is recorded, copied to ``trm.quarantine.<id>`` with its reason
  (on the consumer's own publisher) and then acked, so it never blocks the
  queue behind it.
- the relay publishes the outbox with windowed confirms and marks envelopes
  sent only once confirmed; it then awaits each recipient's delivery receipt
  and resends the same bytes to those whose receipt is overdue
  (`broker.reception`), every `resend_after` seconds doubled after each try,
  until `resend_tries` tries are flagged.
- the eraser does the erasures consent withdrawals asked for (`Erasures`):
  at once when the inbox committed one, and every `erasure_retry` seconds
  for one that failed (a read-only case folder, say) or that another
  process recorded.

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

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from adapters.erasure import Erasures
from adapters.home import Home
from broker.errors import StorageError, TrmError
from broker.inbox import Inbox, Outcome
from broker.outbox import Outbox, Relay
from broker.reception import RESEND_AFTER, RESEND_TRIES, ReceptionPolicy
from broker.topology import inbox_queue
from broker.transport import AmqpSettings, Consumer, Delivery, Publisher, run_with_reconnect
from services.witness import Witness, run_witness

log = structlog.get_logger(__name__)

JOIN_SECONDS = 30.0
"""How long a clean shutdown waits for each thread."""
ERASER_TICK_SECONDS = 0.2
"""How often the eraser looks for a stop or a due retry while it waits for a withdrawal."""
RETRY_MAX_SECONDS = 5.0
"""Longest wait between reconnect attempts: back within seconds of the broker's return."""


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
        self.reception = ReceptionPolicy(after=resend_after, tries=resend_tries)
        self.participant_id = home.participant_id
        self.settings: AmqpSettings = home.amqp_settings()
        home.directory()
        self.stats = AdapterStats()
        self._failure: BaseException | None = None
        self._log = log.bind(participant=self.participant_id)

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
            results = inbox.handle_batch(batch)
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
                consumer = Consumer(self.settings, inbox_queue(self.participant_id))
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
                    publisher,
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
