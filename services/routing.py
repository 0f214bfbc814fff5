"""The routing service: verify every envelope, log it, track its case, chase deadlines.

The routing service holds no decryption key for anyone's payloads: it sees
every envelope published on ``trm.handoff`` (its queue ``trm.routing`` is
bound with ``#``), checks each one's signature against the trust directory,
and then, for every delivery already waiting (up to a batch), in arrival order
and in one database transaction

1. skips it if the same bytes (by SHA-256) are already logged as verified,
   or as rejected and failing again (a redelivery); a different envelope
   under an id already verified is logged as ``rejected:replayed``,
2. appends it to the audit log with its receive time and verification result
   (``ok`` or ``rejected:<reason>``),
3. for a verified envelope, folds its header into the case's state
   (`services.cases.apply`) and stores the state and any anomaly;

and only then acks the batch with one multiple-ack. A crash anywhere before
the commit leaves nothing behind and the broker redelivers the batch; a crash
between commit and ack makes the redelivery a no-op, envelope by envelope.
One commit (one fsync) per batch rather than per envelope is what lets the
service keep up with a backlog.

Deadlines are polled on a timer: each warning or overdue deadline gets one
signed reminder envelope (no personal data) for the participant who owes the
next step, written to the outbox in the same transaction that records the
reminder's key; the relay publishes it. The log is checkpointed every N
entries, every T seconds and on shutdown, and each checkpoint is sent to the
directory's witnesses to cosign (`services.cosigners`). Participants ask it
for inclusion proofs of their own envelopes (`services.membership`).

Several processes may run on one PostgreSQL database: one leads and does all
of the above, the others stand by until it dies (`services.leadership`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from broker.database import storage_errors
from broker.directory import DIRECTORY_FILE, Directory, reload_home_directory
from broker.envelope import MAX_AGE, CheckedEnvelope, SealedEnvelope, seal
from broker.errors import ConfigError, ReplayedEnvelope, TransportError, TrmError
from broker.keys import ParticipantKeys, load_keys
from broker.metrics import LOGGED, REDELIVERED
from broker.outbox import Outbox, Relay
from broker.topology import ROUTING_QUEUE
from broker.transport import (
    AmqpSettings,
    Consumer,
    Delivery,
    Outgoing,
    Publisher,
    run_with_reconnect,
)
from broker.verifierpool import VerifierPool
from schemas.control import Reminder as ReminderMessage
from schemas.header import EnvelopeHeader
from services import membership
from services.auditlog import REJECTED, VERIFIED, Appender, AuditLog, log_entries_table
from services.cases import Anomaly, Event, Stage, apply
from services.casestore import CaseBatch, CaseCache, CaseStore, key_text
from services.checkpoint import origin_for
from services.cosigners import Cosigners
from services.deadlines import DEFAULT_POLICIES, Policy, Reminder, Status, due_reminders
from services.leadership import Leadership

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
"""The routing service's clock: timezone-aware UTC now."""
DirectorySource = Callable[[], Directory]
"""Gives the directory to verify with; called for every envelope, so it may change."""

# Serialises the routing transaction across processes on PostgreSQL ("trmR");
# SQLite's BEGIN IMMEDIATE already does.
_PG_ROUTING_LOCK = 0x74726D52
TIMER_TICK = 0.5
"""Seconds between checks of the deadline and checkpoint timers."""
DEFAULT_BATCH = 100
"""Deliveries logged in one transaction at most (those the prefetch window already holds)."""
_ID_CHUNK = 500
"""Envelope ids per IN (...) list, well under every backend's parameter limit."""


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Timers:
    """How often the service checkpoints and polls deadlines."""

    checkpoint_every: int = 1000
    """Sign a checkpoint once the log has grown by this many entries."""
    checkpoint_interval: float = 60.0
    """Seconds between checkpoints while the log grows more slowly."""
    deadline_poll: float = 30.0
    """Seconds between deadline polls."""
    witness_resend: float = 30.0
    """Seconds before a witness that has not answered is asked again."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")
        if self.checkpoint_interval <= 0 or self.deadline_poll <= 0:
            raise ConfigError("--checkpoint-interval and --deadline-poll must be positive seconds")


@dataclass(frozen=True)
class Outcome:
    """What handling one delivery did."""

    envelope_id: str | None
    """The header's envelope id (unverified when rejected), None if the bytes do not frame."""
    verification: str
    """``ok`` or ``rejected:<reason>``."""
    index: int | None
    """The audit log index of the new entry; None for a redelivery (nothing was written)."""
    case: str | None = None
    stage: Stage | None = None
    """The case's stage after the envelope (verified envelopes only)."""
    anomaly: Anomaly | None = None

    @property
    def duplicate(self) -> bool:
        """Whether the envelope was already logged, so nothing changed."""
        return self.index is None


@dataclass(frozen=True)
class SentReminder:
    """A reminder recorded by a deadline poll, and the envelope put in the outbox for it."""

    reminder: Reminder
    envelope_id: str | None
    """None when the deadline names no participant who could be reminded."""


@dataclass(frozen=True)
class _Writes:
    """Where one batch's transaction writes: the connection, the log appender, the cases."""

    conn: Connection
    log: Appender
    cases: CaseBatch


class HomeDirectory:
    """A home's installed directory, re-read when the file changes (a new serial)."""

    def __init__(self, home: Path) -> None:
        """Watch ``HOME/directory.json``; the first call loads and verifies it."""
        self.home = home
        self._stamp: tuple[int, int] | None = None
        self._directory: Directory | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Directory:
        """The newest verified directory; an older file is refused and the held one kept."""
        path = self.home / DIRECTORY_FILE
        try:
            info = path.stat()
        except OSError as e:
            raise ConfigError(
                f"{path} cannot be read ({e.strerror}): install a directory with "
                "`trm directory install`"
            ) from e
        stamp = (info.st_mtime_ns, info.st_size)
        with self._lock:
            if self._directory is None or stamp != self._stamp:
                self._directory = reload_home_directory(self.home, self._directory)
                self._stamp = stamp
            return self._directory


class RoutingService:
    """Verifies, logs and tracks every envelope; reminds of deadlines; checkpoints the log."""

    def __init__(
        self,
        home: Path,
        engine: Engine,
        directory: DirectorySource,
        *,
        clock: Clock = utc_now,
        policies: Sequence[Policy] = DEFAULT_POLICIES,
        timers: Timers | None = None,
        max_age: timedelta | None = MAX_AGE,
        keys: ParticipantKeys | None = None,
        batch: int = DEFAULT_BATCH,
        verify_workers: int = 0,
    ) -> None:
        """The routing participant whose key folder is `home`, on the migrated `engine`.

        `batch` caps how many waiting deliveries are logged in one transaction;
        `verify_workers` processes verify a batch's envelopes beside this one
        (`broker.verifierpool`; 0: all in this process).
        """
        if batch < 1:
            raise ConfigError(f"the routing batch must be at least 1, got {batch}")
        if verify_workers < 0:
            raise ConfigError(f"the verify workers must be 0 or more, got {verify_workers}")
        self.keys = keys if keys is not None else load_keys(home)
        self.participant = self.keys.card.id
        self.engine = engine
        self.directory = directory
        self.clock = clock
        self.policies = tuple(policies)
        self.timers = timers or Timers()
        self.max_age = max_age
        self.batch = batch
        self.store = CaseStore(engine)
        self._cases = CaseCache()
        self.outbox = Outbox(engine)
        self.auditlog = AuditLog(
            engine, origin=origin_for(self.participant), signer=self.keys.sender(clock())
        )
        self.relay_wake = threading.Event()
        self._log = log.bind(participant=self.participant)
        self._roles: tuple[int, Mapping[str, str]] = (-1, {})
        self._verifiers = VerifierPool(verify_workers)
        self._appended = 0
        self._counter = threading.Lock()

    # -- deliveries -----------------------------------------------------------------------

    def handle(self, delivery: Delivery) -> None:
        """The consumer's handler: returns once the envelope is committed (then it is acked)."""
        self.receive(delivery.body, user_id=delivery.user_id)

    def handle_batch(self, deliveries: list[Delivery]) -> None:
        """The batch consumer's handler: returns once all are committed (then one ack)."""
        self.receive_batch([(d.body, d.user_id) for d in deliveries])

    def receive(self, raw: bytes, *, user_id: str | None) -> Outcome:
        """Verify, log and apply one envelope as received now; idempotent for the same bytes."""
        [outcome] = self.receive_batch([(raw, user_id)])
        return outcome

    def receive_batch(self, arrivals: Sequence[tuple[bytes, str | None]]) -> list[Outcome]:
        """Verify, log and apply envelopes in arrival order, in one transaction.

        `arrivals` are (exact bytes, broker-validated AMQP user id) pairs. Each is
        verified first (no lock held), then all are checked for redelivery,
        appended and tracked in order inside one transaction, so that a crash
        before the commit leaves nothing and a redelivered batch is absorbed
        entry by entry as duplicates. Returns one outcome per arrival.
        """
        if not arrivals:
            return []
        directory = self.directory()
        stamped = [(raw, self.clock(), user_id) for raw, user_id in arrivals]
        results = self._verifiers.check_batch(directory, stamped, max_age=self.max_age)
        checked = [(r, at) for r, (_, at, _) in zip(results, stamped, strict=True)]
        with storage_errors("recording envelopes"), self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_ROUTING_LOCK)))
            logged = Logged.read(conn, [c for c, _ in checked])
            writes = _Writes(conn, self.auditlog.appender(conn), CaseBatch(conn, self._cases))
            writes.cases.read(h.case for h in (_verified(c) for c, _ in checked) if h is not None)
            outcomes = [self._record(writes, directory, logged, *item) for item in checked]
            writes.log.flush()
            writes.cases.save()
        writes.cases.committed()
        for outcome, (found, _) in zip(outcomes, checked, strict=True):
            header = found.header
            if outcome.duplicate:
                self._log.info("envelope already logged", envelope_id=outcome.envelope_id)
            else:
                self._logged(outcome, header)
        self._count_entries(sum(1 for o in outcomes if not o.duplicate))
        for outcome in outcomes:
            if outcome.duplicate:
                REDELIVERED.inc()
            else:
                LOGGED.labels(result=outcome.verification.partition(":")[0]).inc()
        return outcomes

    def _record(
        self,
        writes: _Writes,
        directory: Directory,
        logged: Logged,
        found: CheckedEnvelope,
        at: datetime,
    ) -> Outcome:
        """Log one verified (or rejected) envelope inside the batch's transaction.

        `logged` holds what the log has for the batch's digests and ids; the
        entries this batch appends are added to it, so a batch holding the
        same bytes twice logs them once.
        """
        header = found.header
        envelope_id = None if header is None else str(header.id)
        verification = VERIFIED if found.error is None else REJECTED + found.error.reason
        before = logged.verdicts.get(found.sha256, set())
        # Bytes logged ok, or logged at all and still failing: a redelivery. Bytes
        # rejected before (say, under another AMQP user) that now verify are logged.
        if VERIFIED in before or (verification != VERIFIED and before):
            return Outcome(envelope_id, "duplicate", None)
        if verification == VERIFIED and envelope_id in logged.verified_ids:
            verification = REJECTED + ReplayedEnvelope.reason
        index = writes.log.append(
            found.raw,
            received_at=at,
            verification=verification,
            envelope_id=envelope_id,
            sha256=found.sha256,
        )
        logged.add(found.sha256, envelope_id, verification)
        if verification == VERIFIED and header is not None:
            return self._track(writes, header, at, directory, index)
        return Outcome(envelope_id, verification, index)

    def _track(
        self,
        writes: _Writes,
        header: EnvelopeHeader,
        at: datetime,
        directory: Directory,
        index: int,
    ) -> Outcome:
        event = Event.from_header(header, at)
        state, anomaly = apply(writes.cases.get(header.case), event, self._role_map(directory))
        writes.cases.put(state)
        if anomaly is not None:
            writes.cases.add_anomaly(header.case, anomaly, at)
        return Outcome(str(header.id), VERIFIED, index, header.case, state.stage, anomaly)

    def _logged(self, outcome: Outcome, header: EnvelopeHeader | None) -> None:
        bound = self._log.bind(
            envelope_id=outcome.envelope_id,
            case=None if header is None else header.case,
            sender=None if header is None else header.sender,
            kind=None if header is None else str(header.kind),
            index=outcome.index,
        )
        if outcome.verification != VERIFIED:
            bound.warning("envelope rejected", verification=outcome.verification)
        elif outcome.anomaly is not None:
            bound.warning(
                "case anomaly",
                reason=str(outcome.anomaly.reason),
                detail=outcome.anomaly.detail,
                stage=None if outcome.stage is None else str(outcome.stage),
            )
        else:
            bound.info(
                "envelope logged", stage=None if outcome.stage is None else str(outcome.stage)
            )

    def _role_map(self, directory: Directory) -> Mapping[str, str]:
        serial, roles = self._roles
        if serial != directory.serial:
            roles = {p.id: str(p.role) for p in directory.participants()}
            self._roles = (directory.serial, roles)
        return roles

    def _count_entries(self, appended: int) -> None:
        """Count new entries; sign a checkpoint once `checkpoint_every` have accumulated.

        A batch commits as a whole, so the checkpoint that the threshold calls
        for covers the entire batch that crossed it.
        """
        if not appended:
            return
        with self._counter:
            self._appended += appended
            due = self._appended >= self.timers.checkpoint_every
        if due:
            self.checkpoint()

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoint(self, now: datetime | None = None) -> bytes | None:
        """Sign a checkpoint if the log grew since the last one; return its note."""
        with self._counter:
            self._appended = 0
        return self.auditlog.checkpoint(now or self.clock())

    # -- deadlines ------------------------------------------------------------------------

    def poll_deadlines(self, now: datetime | None = None) -> list[SentReminder]:
        """Send one reminder per warning or overdue deadline not yet reminded of; return them."""
        at = now or self.clock()
        stages = [p.stage for p in self.policies]
        sent = self.store.sent_keys()
        due = due_reminders(
            self.store.states(stages), at, lambda key: key_text(key) in sent, self.policies
        )
        done = [s for s in (self._remind(reminder, at) for reminder in due) if s is not None]
        if any(s.envelope_id is not None for s in done):
            self.relay_wake.set()
        return done

    def _remind(self, reminder: Reminder, at: datetime) -> SentReminder | None:
        deadline = reminder.deadline
        bound = self._log.bind(
            case=deadline.case,
            stage=str(deadline.stage),
            owed_by=deadline.owed_by,
            due=deadline.due.isoformat(),
            status=str(reminder.status),
        )
        with storage_errors("recording a reminder"), self.engine.begin() as conn:
            if self.store.reminder_sent(conn, reminder.key):
                return None  # another routing process sent it in the meantime
            sealed = self._seal_reminder(conn, reminder, at, bound)
            if sealed is not None:
                self.outbox.add(conn, sealed, now=at)
            envelope_id = None if sealed is None else str(sealed.id)
            self.store.record_reminder(conn, reminder, sent_at=at, envelope_id=envelope_id)
        if reminder.status is Status.OVERDUE:
            bound.warning("handoff overdue", envelope_id=envelope_id)
        else:
            bound.info("handoff due soon", envelope_id=envelope_id)
        return SentReminder(reminder, envelope_id)

    def _seal_reminder(
        self, conn: Connection, reminder: Reminder, at: datetime, bound: structlog.BoundLogger
    ) -> SealedEnvelope | None:
        deadline = reminder.deadline
        if deadline.owed_by is None:
            bound.warning("no participant owes this handoff; reminder recorded, not sent")
            return None
        message = ReminderMessage(
            stage=str(deadline.stage),
            owed_by=deadline.owed_by,
            deadline=deadline.due,
            overdue=reminder.status is Status.OVERDUE,
            about_envelope=UUID(deadline.about_envelope),
        )
        try:
            return seal(
                message,
                case=deadline.case,
                sender=self.keys.sender(at),
                recipients=[deadline.owed_by],
                directory=self.directory(),
                seq=self.outbox.next_seq(conn, self.participant, deadline.case),
                reply_to=UUID(deadline.about_envelope),
                now=at,
            )
        except TrmError as e:
            bound.warning("reminder cannot be sealed; recorded, not sent", reason=e.reason)
            return None

    # -- the process ----------------------------------------------------------------------

    def run_timers(self, stop: threading.Event) -> None:
        """Poll deadlines and checkpoint on their intervals until `stop` is set."""
        next_poll = next_checkpoint = time.monotonic()
        while not stop.wait(TIMER_TICK):
            moment = time.monotonic()
            if moment >= next_poll:
                self._guarded(self.poll_deadlines, "deadline poll")
                next_poll = moment + self.timers.deadline_poll
            if moment >= next_checkpoint:
                self._guarded(self.checkpoint, "checkpoint")
                next_checkpoint = moment + self.timers.checkpoint_interval

    def _guarded(self, action: Callable[[], object], what: str) -> None:
        try:
            action()
        except TrmError as e:
            # The next tick tries again; a database outage must not end the process.
            self._log.error(f"{what} failed; will retry", reason=e.reason, error=str(e))

    def run(
        self,
        settings: AmqpSettings,
        stop: threading.Event,
        leadership: Leadership | None = None,
    ) -> None:
        """Stand by until this process leads, then lead until `stop` is set (`services.leadership`).

        A standby stopped before it leads returns having done nothing.
        Raises the first error that ended a worker thread (after stopping the others).
        """
        held = leadership if leadership is not None else Leadership(self.engine)
        if not held.acquire(stop):
            self._log.info("routing standby stopped")
            return
        try:
            self._lead(settings, stop, held)
        finally:
            held.release()

    def _lead(self, settings: AmqpSettings, stop: threading.Event, held: Leadership) -> None:
        """Consume, relay and run the timers until `stop` is set; then sign a final checkpoint."""
        failures: list[BaseException] = []

        def worker(name: str, body: Callable[[], None]) -> threading.Thread:
            def target() -> None:
                try:
                    body()
                except BaseException as e:
                    failures.append(e)
                    stop.set()

            thread = threading.Thread(target=target, name=f"routing-{name}", daemon=True)
            thread.start()
            return thread

        relay = Relay(self.outbox, LazyPublisher(settings, self.participant))
        resend = self.timers.witness_resend
        cosigners = Cosigners(self.auditlog, self.directory, resend_after=resend)
        threads = [
            worker("leadership", lambda: held.watch(stop)),
            worker("consumer", lambda: self._consume(settings, stop)),
            worker("relay", lambda: relay.run(stop, self.relay_wake)),
            worker("timers", lambda: self.run_timers(stop)),
            # Apart from the others, so that a witness's silence holds back only its cosignature.
            worker("witnesses", lambda: cosigners.run(settings, self.participant, stop)),
            worker(
                "proofs",
                lambda: membership.serve(
                    self.auditlog, self.directory, settings, self.participant, stop
                ),
            ),
        ]
        self._log.info("routing service started", broker=settings.describe())
        while not stop.wait(TIMER_TICK):
            pass  # a short wait, so that the main thread runs signal handlers promptly
        for thread in threads:
            thread.join()
        self._verifiers.close()
        # A leader that lost its lock leaves the last checkpoint to its successor.
        note = self.checkpoint() if held.leading else None
        self._log.info("routing service stopped", checkpoint_signed=note is not None)
        if failures:
            raise failures[0]

    def _consume(self, settings: AmqpSettings, stop: threading.Event) -> None:
        def loop() -> None:
            consumer = Consumer(settings, ROUTING_QUEUE)
            try:
                consumer.run_batches(self.handle_batch, stop, max_batch=self.batch)
            finally:
                consumer.close()

        run_with_reconnect(loop, stop, log=self._log)


class LazyPublisher:
    """A `transport.Publisher` connected on first use, so the relay starts without a broker."""

    def __init__(self, settings: AmqpSettings, participant_id: str) -> None:
        """Publish as `participant_id` with `settings` once something is to be sent."""
        self._settings = settings
        self._participant = participant_id
        self._publisher: Publisher | None = None

    def _connected(self) -> Publisher:
        if self._publisher is None:
            self._publisher = Publisher(self._settings, self._participant)
        return self._publisher

    def publish(self, messages: Sequence[Outgoing], timeout: float = 30) -> None:
        """Publish with confirms (see `transport.Publisher.publish`)."""
        try:
            self._connected().publish(messages, timeout)
        except TransportError:
            self.close()
            raise

    def publish_quarantine(
        self, body: bytes, *, participant_id: str, reason: str, detail: str
    ) -> None:
        """Quarantine a message (see `transport.Publisher.publish_quarantine`)."""
        self._connected().publish_quarantine(
            body, participant_id=participant_id, reason=reason, detail=detail
        )

    def close(self) -> None:
        """Drop the connection; the next publish reconnects."""
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None


def _verified(found: CheckedEnvelope) -> EnvelopeHeader | None:
    """The header of a verified envelope, None for a refused one."""
    return found.header if found.error is None else None


_t = log_entries_table.c
_SAME_BYTES = sa.select(_t.body_sha256, _t.verification).where(
    _t.body_sha256.in_(sa.bindparam("b_ids", expanding=True))
)
_VERIFIED_IDS = sa.select(_t.envelope_id).where(
    _t.envelope_id.in_(sa.bindparam("b_ids", expanding=True)), _t.verification == VERIFIED
)


@dataclass
class Logged:
    """What the log holds that bears on one batch: never a body, only digests and ids.

    Both lookups go through an index and return at most a few rows per
    envelope of the batch (the same bytes are logged at most once verified
    and once refused), however many other entries share its id.
    """

    verdicts: dict[bytes, set[str]]
    """SHA-256 of a body -> the verifications it was logged with."""
    verified_ids: set[str]
    """The batch's envelope ids already logged verified."""

    @classmethod
    def read(cls, conn: Connection, batch: Sequence[CheckedEnvelope]) -> Logged:
        """The entries with the bytes of an envelope of `batch`, and its ids logged verified."""
        digests = sorted({c.sha256 for c in batch})
        ids = sorted({str(h.id) for h in map(_verified, batch) if h is not None})
        verdicts: dict[bytes, set[str]] = {}
        for n in range(0, len(digests), _ID_CHUNK):
            chunk = digests[n : n + _ID_CHUNK]
            for digest, verification in conn.execute(_SAME_BYTES, {"b_ids": chunk}):
                verdicts.setdefault(bytes(digest), set()).add(verification)
        verified: set[str] = set()
        for n in range(0, len(ids), _ID_CHUNK):
            verified.update(
                conn.execute(_VERIFIED_IDS, {"b_ids": ids[n : n + _ID_CHUNK]}).scalars()
            )
        return cls(verdicts, verified)

    def add(self, sha256: bytes, envelope_id: str | None, verification: str) -> None:
        """Count an entry this batch appends."""
        self.verdicts.setdefault(sha256, set()).add(verification)
        if verification == VERIFIED and envelope_id is not None:
            self.verified_ids.add(envelope_id)
