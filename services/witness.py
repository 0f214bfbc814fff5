"""A witness of the routing service's log: cosign a checkpoint only if it extends the last one.

Requests are c2sp.org/tlog-witness ``add-checkpoint`` bodies (``old <size>``,
the consistency proof, one hash a line in base64, a blank line, then the
signed checkpoint). For each, the witness

1. checks the checkpoint's signature as an auditor does
   (`services.checkpoint.open_log_checkpoint`): a routing participant of the
   verified directory, named by the origin, signed with one of its keys
   valid at the checkpoint's time (``unknown_log``, ``bad_signature``);
2. compares it with the checkpoint it last cosigned for that origin, read
   and replaced in one transaction, so two requests can never both move it:
   a smaller size is refused (``stale`` if the checkpoint is no newer than
   the one cosigned, a replay; ``shrinks`` if it is newer, which a log never
   signs); the same size with another root is a ``fork``; an ``old`` size
   other than the one cosigned is a ``conflict`` that names the cosigned
   size, so the routing service can send the right proof;
3. verifies the proof from the cosigned root to the new one
   (``inconsistent`` if it does not);

and then records the new checkpoint and returns its cosignature
(`services.cosignature`). Every validly signed checkpoint it refuses as
``fork``, ``shrinks`` or ``inconsistent`` is kept with the one it
contradicts in ``witness_conflicts``, logged as an error and shown by ``trm
witness status``: the two signed notes are the evidence, checkable by anyone
with the directory. A damaged proof is also ``inconsistent``: the two notes
alone do not prove a fork then, only a log that could not show it extends
what was cosigned.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from broker.database import UTCDateTime, metadata, storage_errors
from broker.directory import Directory, Role
from broker.errors import AuditError, CheckpointInvalid, ProofInvalid, TrmError
from broker.keys import Sender
from broker.transport import AmqpSettings, Delivery, Outgoing

if TYPE_CHECKING:
    from adapters.home import Home
from services.checkpoint import Checkpoint, claimed_origin, named_log, open_log_checkpoint
from services.cosignature import cosign, witness_key_name
from services.merkle import EMPTY_ROOT, verify_consistency

log = structlog.get_logger(__name__)

MAX_PROOF_LINES = 63
RETRY_SECONDS = 15.0
_OLD = re.compile(rb"old (0|[1-9][0-9]{0,19})")

witness_checkpoints_table = sa.Table(
    "witness_checkpoints",
    metadata,
    sa.Column("origin", sa.String(200), primary_key=True),
    sa.Column("size", sa.BigInteger(), nullable=False),
    sa.Column("root", sa.LargeBinary(32), nullable=False),
    sa.Column("time", UTCDateTime(), nullable=False),
    sa.Column("note", sa.Text(), nullable=False),
    sa.Column("cosigned_at", UTCDateTime(), nullable=False),
)
"""Per log origin, the newest checkpoint this witness cosigned: only ever moved forward."""

witness_conflicts_table = sa.Table(
    "witness_conflicts",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("origin", sa.String(200), nullable=False),
    sa.Column("detected_at", UTCDateTime(), nullable=False),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("detail", sa.Text(), nullable=False),
    sa.Column("cosigned_note", sa.Text(), nullable=False),
    sa.Column("offered_note", sa.Text(), nullable=False),
    sa.Column("offered_sha256", sa.LargeBinary(32), nullable=False),
    sa.Column("reported_at", UTCDateTime(), nullable=True),
    sa.UniqueConstraint("origin", "offered_sha256"),
)
"""Validly signed checkpoints refused because they contradict the cosigned one: fork evidence."""

CONFLICT_KINDS = ("fork", "shrinks", "inconsistent")
ANSWER_TYPE = "trm-witness-answer"


class WitnessRefused(AuditError):
    """A witness would not cosign a checkpoint; `why` says which check failed."""

    reason = "witness_refused"

    def __init__(self, why: str, message: str, cosigned_size: int | None = None) -> None:
        super().__init__(f"{why}: {message}")
        self.why = why
        self.cosigned_size = cosigned_size


@dataclass(frozen=True)
class Request:
    """An add-checkpoint request: the size the proof starts from, the proof, the signed note."""

    old_size: int
    proof: tuple[bytes, ...]
    note: bytes


@dataclass(frozen=True)
class Cosigned:
    """The witness's answer to a checkpoint it cosigned."""

    origin: str
    size: int
    root: bytes
    line: bytes
    """The cosignature line, ending in a newline."""


def format_request(old_size: int, proof: list[bytes], note: bytes) -> bytes:
    """The add-checkpoint body for `note`, proved from `old_size`."""
    lines = [f"old {old_size}".encode(), *(base64.b64encode(h) for h in proof)]
    return b"\n".join(lines) + b"\n\n" + note


def parse_request(body: bytes) -> Request:
    """Read an add-checkpoint body; WitnessRefused (``bad_request``) if it is not one."""
    head, sep, note = body.partition(b"\n\n")
    lines = head.split(b"\n")
    match = _OLD.fullmatch(lines[0])
    if not sep or match is None:
        raise WitnessRefused("bad_request", "the request does not start with 'old <size>'")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise WitnessRefused("bad_request", f"more than {MAX_PROOF_LINES} proof lines")
    proof = []
    for line in lines[1:]:
        try:
            node = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError) as e:
            raise WitnessRefused("bad_request", "a proof line is not base64") from e
        if len(node) != 32:
            raise WitnessRefused("bad_request", "a proof line is not a 32-byte hash")
        proof.append(node)
    return Request(int(match.group(1)), tuple(proof), note)


class Witness:
    """One participant's witness over its own database."""

    @classmethod
    def of_home(cls, home: Home, engine: Engine) -> Witness:
        """The witness of `home`'s participant: its signing key, its installed directory."""
        return cls(
            engine,
            sender=lambda at: home.keys().sender(at, home.directory()),
            directory=home.directory,
        )

    def __init__(
        self,
        engine: Engine,
        *,
        sender: Callable[[datetime], Sender],
        directory: Callable[[], Directory],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """Cosign with the key `sender(now)` returns; verify with `directory()`."""
        self.engine = engine
        self.sender = sender
        self.directory = directory
        self.clock = clock

    def add_checkpoint(self, body: bytes) -> Cosigned:
        """Check the request and cosign its checkpoint, or raise WitnessRefused with the reason."""
        request = parse_request(body)
        checkpoint = self._opened(request.note)
        if request.old_size > checkpoint.size:
            raise WitnessRefused(
                "bad_request",
                f"old size {request.old_size} exceeds the checkpoint size {checkpoint.size}",
            )
        now = self.clock()
        with storage_errors("recording a cosigned checkpoint"), self.engine.begin() as conn:
            held = _held(conn, checkpoint.origin)
            problem = _check(request, checkpoint, held)
            if problem is None:
                line = self._cosign(request.note, now)
                _store(conn, checkpoint, request.note, now, replace=held is not None)
        if problem is not None:
            self._refused(problem, checkpoint, request.note, held, now)
        log.info("checkpoint cosigned", origin=checkpoint.origin, size=checkpoint.size)
        return Cosigned(checkpoint.origin, checkpoint.size, checkpoint.root, line)

    def _opened(self, note: bytes) -> Checkpoint:
        directory = self.directory()
        try:
            log_id = named_log(note, directory)
        except CheckpointInvalid as e:
            raise WitnessRefused("unknown_log", str(e)) from e
        try:
            return open_log_checkpoint(note, directory, log_id=log_id)
        except TrmError as e:
            raise WitnessRefused(
                "bad_signature", f"not signed by a key of routing participant {log_id!r}: {e}"
            ) from e

    def _cosign(self, note: bytes, now: datetime) -> bytes:
        signer = self.sender(now)
        return cosign(note, signer.key, witness_key_name(signer.participant, signer.kid), at=now)

    def _refused(
        self,
        problem: WitnessRefused,
        checkpoint: Checkpoint,
        note: bytes,
        held: Any,
        now: datetime,
    ) -> NoReturn:
        bound = log.bind(origin=checkpoint.origin, size=checkpoint.size, why=problem.why)
        if problem.why in CONFLICT_KINDS and held is not None:
            _record_conflict(self.engine, checkpoint.origin, problem, held.note, note, now)
            bound.error(
                "checkpoint contradicts the cosigned one; kept as evidence", error=str(problem)
            )
        else:
            bound.warning("checkpoint refused", error=str(problem))
        raise problem

    # -- what `trm witness status` shows ---------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Every origin's cosigned checkpoint and every conflict kept, as JSON-ready data."""
        with storage_errors("reading the witness state"), self.engine.connect() as conn:
            held = conn.execute(
                sa.select(witness_checkpoints_table).order_by(witness_checkpoints_table.c.origin)
            ).all()
            conflicts = conn.execute(
                sa.select(witness_conflicts_table).order_by(witness_conflicts_table.c.id)
            ).all()
        return {
            "logs": [
                {
                    "origin": r.origin,
                    "size": int(r.size),
                    "root": base64.b64encode(bytes(r.root)).decode(),
                    "time": r.time.isoformat(),
                    "cosigned_at": r.cosigned_at.isoformat(),
                }
                for r in held
            ],
            "conflicts": [
                {
                    "origin": c.origin,
                    "kind": c.kind,
                    "detected_at": c.detected_at.isoformat(),
                    "detail": c.detail,
                    "cosigned_note": c.cosigned_note,
                    "offered_note": c.offered_note,
                    "reported_at": None if c.reported_at is None else c.reported_at.isoformat(),
                }
                for c in conflicts
            ],
        }


def _held(conn: Connection, origin: str) -> Any:
    query = sa.select(witness_checkpoints_table).where(witness_checkpoints_table.c.origin == origin)
    if conn.dialect.name == "postgresql":
        # Serialises witnesses on one database: the check and the update are one step.
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_WITNESS_LOCK)))
    return conn.execute(query).first()


_PG_WITNESS_LOCK = 0x74726D57  # "trmW"


def _check(request: Request, checkpoint: Checkpoint, held: Any) -> WitnessRefused | None:
    size, root = (0, EMPTY_ROOT) if held is None else (int(held.size), bytes(held.root))
    if checkpoint.size < size:
        if held is not None and checkpoint.time <= held.time:
            return WitnessRefused(
                "stale",
                f"checkpoint {checkpoint.size} of {checkpoint.time.isoformat()} is older than "
                f"the cosigned {size} of {held.time.isoformat()}: replayed",
                size,
            )
        return WitnessRefused(
            "shrinks", f"checkpoint {checkpoint.size} is smaller than the cosigned {size}", size
        )
    if checkpoint.size == size:
        if checkpoint.root != root:
            return WitnessRefused(
                "fork", f"checkpoint {size} has another root than the cosigned one", size
            )
        return None
    if request.old_size != size:
        return WitnessRefused(
            "conflict", f"the proof starts at {request.old_size}; the cosigned size is {size}", size
        )
    if held is not None and checkpoint.time < held.time:
        return WitnessRefused(
            "stale", f"checkpoint {checkpoint.size} is dated before the cosigned {size}", size
        )
    try:
        verify_consistency(size, checkpoint.size, root, checkpoint.root, list(request.proof))
    except ProofInvalid as e:
        return WitnessRefused(
            "inconsistent",
            f"the proof does not link the cosigned {size} to checkpoint {checkpoint.size}: {e}",
            size,
        )
    return None


def _store(
    conn: Connection, checkpoint: Checkpoint, note: bytes, now: datetime, *, replace: bool
) -> None:
    values = {
        "size": checkpoint.size,
        "root": checkpoint.root,
        "time": checkpoint.time,
        "note": note.decode(),
        "cosigned_at": now,
    }
    t = witness_checkpoints_table
    if replace:
        conn.execute(t.update().where(t.c.origin == checkpoint.origin).values(**values))
    else:
        conn.execute(t.insert().values(origin=checkpoint.origin, **values))


def _record_conflict(
    engine: Engine,
    origin: str,
    problem: WitnessRefused,
    cosigned: str,
    offered: bytes,
    now: datetime,
) -> None:
    digest = hashlib.sha256(offered).digest()
    t = witness_conflicts_table
    with storage_errors("recording fork evidence"), engine.begin() as conn:
        seen = conn.execute(
            sa.select(t.c.id).where(t.c.origin == origin, t.c.offered_sha256 == digest)
        ).first()
        if seen is None:
            conn.execute(
                t.insert().values(
                    origin=origin,
                    detected_at=now,
                    kind=problem.why,
                    detail=str(problem),
                    cosigned_note=cosigned,
                    offered_note=offered.decode(),
                    offered_sha256=digest,
                )
            )


def answer_body(
    *,
    witness: str,
    origin: str,
    size: int,
    line: bytes | None = None,
    why: str | None = None,
    detail: str = "",
    cosigned_size: int | None = None,
) -> bytes:
    """A witness's answer: its cosignature line, or why it refused (and the size it holds)."""
    data = {
        "type": ANSWER_TYPE,
        "version": 1,
        "witness": witness,
        "origin": origin,
        "size": size,
        "cosignature": None if line is None else line.decode(),
        "refused": why,
        "detail": detail,
        "cosigned_size": cosigned_size,
    }
    return json.dumps(data, separators=(",", ":")).encode()


# --- the process ------------------------------------------------------------------------


def run_witness(
    witness: Witness, settings: AmqpSettings, participant: str, stop: threading.Event
) -> None:
    """Answer the requests on ``trm.witness.<participant>`` until `stop` is set.

    Each answer goes to the routing participant the checkpoint's origin names
    (only a routing participant of the directory), and the request is acked
    once the answer is confirmed: a crash in between asks again, and the
    witness cosigns the same checkpoint again, never another. A lost broker
    is waited for; any other failure (its database down, a queue missing) is
    logged and tried again after `RETRY_SECONDS`, the request left unacked:
    witnessing never stops the adapter it runs in.
    """
    from broker.topology import WITNESS_EXCHANGE, witness_queue
    from broker.transport import Consumer, Publisher, run_with_reconnect

    def loop() -> None:
        consumer = Consumer(settings, witness_queue(participant))
        publisher = Publisher(settings, participant, exchange=WITNESS_EXCHANGE)
        try:
            report_conflicts(witness, publisher.publish)

            def handle(delivery: Delivery) -> None:
                answer = _answer(witness, participant, delivery.body)
                if answer is not None:
                    log_id, body = answer
                    publisher.publish([Outgoing(f"answer-{participant}", (log_id,), body)])
                report_conflicts(witness, publisher.publish)

            consumer.run(handle, stop)
        finally:
            consumer.close()
            publisher.close()

    bound = log.bind(participant=participant)
    while not stop.is_set():
        try:
            run_with_reconnect(loop, stop, log=bound)
        except TrmError as e:
            bound.error("witness failed; will retry", reason=e.reason, error=str(e))
            stop.wait(RETRY_SECONDS)


def report_conflicts(witness: Witness, publish: Callable[[list[Outgoing]], None]) -> int:
    """Send each conflict not yet reported to every auditor; how many went.

    Each is marked ``reported_at`` once `publish` returned (RabbitMQ
    confirmed it). A failure is logged and leaves the rest for the next call:
    reporting never stops the witness.
    """
    from services.forkreport import report_body

    t = witness_conflicts_table
    try:
        with storage_errors("reading unreported fork evidence"), witness.engine.connect() as conn:
            pending = conn.execute(sa.select(t).where(t.c.reported_at.is_(None))).all()
        if not pending:
            return 0
        directory = witness.directory()
        auditors = tuple(p.id for p in directory.participants() if p.role is Role.AUDITOR)
        for row in pending:
            now = witness.clock()
            if auditors:
                body = report_body(
                    witness.sender(now),
                    origin=row.origin,
                    kind=row.kind,
                    detail=row.detail,
                    detected_at=row.detected_at,
                    cosigned_note=row.cosigned_note,
                    offered_note=row.offered_note,
                )
                publish([Outgoing(f"fork-report-{row.id}", auditors, body)])
            with storage_errors("marking fork evidence reported"), witness.engine.begin() as conn:
                conn.execute(t.update().where(t.c.id == row.id).values(reported_at=now))
            log.info("fork evidence reported", origin=row.origin, auditors=list(auditors))
    except TrmError as e:
        log.warning("fork evidence not reported yet; will retry", reason=e.reason, error=str(e))
        return 0
    return len(pending)


def _answer(witness: Witness, participant: str, body: bytes) -> tuple[str, bytes] | None:
    try:
        request = parse_request(body)
        origin = claimed_origin(request.note)
        log_id = named_log(request.note, witness.directory())
    except TrmError as e:
        log.warning("witness request dropped: it names no log", error=str(e))
        return None
    try:
        done = witness.add_checkpoint(body)
    except WitnessRefused as e:
        size = _claimed_size(request.note)
        return log_id, answer_body(
            witness=participant,
            origin=origin,
            size=size,
            why=e.why,
            detail=str(e),
            cosigned_size=e.cosigned_size,
        )
    return log_id, answer_body(witness=participant, origin=origin, size=done.size, line=done.line)


def _claimed_size(note: bytes) -> int:
    lines = note.split(b"\n")
    return int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else -1
