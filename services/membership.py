"""Every party proves its own envelopes were logged: inclusion proofs asked over the network.

A mission or NGO sends the routing service a request naming envelopes it sent
or received, each by id and SHA-256 of its bytes (``trm-membership-request``),
on the routing participant's queue ``trm.proofs.<routing id>`` (exchange
``trm.witness``, key ``proofs.<routing id>``). The routing service answers
on ``trm.proofs.<requester>``, the requester being the broker-validated AMQP
user, with, for each envelope whose logged bytes name the requester as
sender or recipient, an inclusion proof (the `services.proofs` document)
into the newest checkpoint its witnesses cosigned to the directory's quorum;
``null`` for an envelope it does not hold (or holds under other bytes, or
not as the requester's), and ``pending`` for one logged after that
checkpoint.

The requester trusts none of it but what verifies: each proof must be
checked by `services.proofs.check_proof` against the directory, lead to a
checkpoint carrying the quorum of verified witness cosignatures, and hold the
very bytes (digest) it has. So an envelope the routing service received but
left out of the log cannot be proven, and is reported: `trm audit check-mine`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pika.exceptions
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine

from broker.database import inbox_table, outbox_table, storage_errors
from broker.directory import Directory
from broker.envelope import read_header
from broker.errors import AuditError, TrmError
from broker.topology import WITNESS_EXCHANGE, proofs_key, proofs_queue
from broker.transport import (
    AmqpSettings,
    Consumer,
    Delivery,
    Outgoing,
    Publisher,
    open_connection,
    run_with_reconnect,
    translate,
)
from services.auditlog import AuditLog, log_checkpoints_table, log_entries_table
from services.cosignature import require_quorum
from services.proofs import INCLUSION_TYPE, PROOF_VERSION, check_proof

log = structlog.get_logger(__name__)

REQUEST_TYPE = "trm-membership-request"
ANSWER_TYPE = "trm-membership-answer"
PENDING = "pending"
MAX_ENVELOPES = 1000
"""Envelopes per request; a requester with more sends several."""
_SCAN_CHECKPOINTS = 100


@dataclass(frozen=True)
class Held:
    """One envelope a participant holds: its id, the SHA-256 of its bytes, and how."""

    envelope_id: str
    digest: str
    """Lowercase hex SHA-256 of the envelope bytes."""
    how: str
    """``sent`` or ``received``."""


# --- the routing side ----------------------------------------------------------------


def request_body(request_id: str, held: Sequence[Held]) -> bytes:
    """A membership request for `held`."""
    items = [{"envelope_id": h.envelope_id, "digest": h.digest} for h in held]
    data = {"type": REQUEST_TYPE, "version": 1, "request_id": request_id, "envelopes": items}
    return json.dumps(data, separators=(",", ":")).encode()


def answer(auditlog: AuditLog, directory: Directory, requester: str, body: bytes) -> bytes:
    """The routing service's answer to `requester`'s request `body`."""
    data = json.loads(body)
    if not isinstance(data, dict) or data.get("type") != REQUEST_TYPE:
        raise AuditError("not a membership request")
    items = data["envelopes"]
    if not isinstance(items, list) or len(items) > MAX_ENVELOPES:
        raise AuditError(f"a membership request names at most {MAX_ENVELOPES} envelopes")
    witnessed = _witnessed(auditlog, directory)
    proofs: dict[str, Any] = {}
    for item in items:
        envelope_id, digest = str(item["envelope_id"]), str(item["digest"])
        proofs[envelope_id] = _proof(auditlog, witnessed, requester, envelope_id, digest)
    out = {"type": ANSWER_TYPE, "version": 1, "request_id": data["request_id"], "proofs": proofs}
    return json.dumps(out, separators=(",", ":")).encode()


def _witnessed(auditlog: AuditLog, directory: Directory) -> tuple[int, bytes] | None:
    """The newest checkpoint carrying the directory's quorum of witness cosignatures."""
    t = log_checkpoints_table
    with storage_errors("reading checkpoints"), auditlog.engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.size, t.c.note).order_by(t.c.size.desc()).limit(_SCAN_CHECKPOINTS)
        ).all()
    for row in rows:
        note = str(row.note).encode()
        try:
            require_quorum(note, directory, directory.body.quorum)
        except TrmError:
            continue
        return int(row.size), note
    return None


def _proof(
    auditlog: AuditLog,
    witnessed: tuple[int, bytes] | None,
    requester: str,
    envelope_id: str,
    digest: str,
) -> object:
    try:
        raw_digest = bytes.fromhex(digest)
    except ValueError:
        return None
    e = log_entries_table.c
    with storage_errors("searching the audit log"), auditlog.engine.connect() as conn:
        index = conn.execute(
            sa.select(sa.func.min(e.idx)).where(
                e.body_sha256 == raw_digest, e.envelope_id == envelope_id
            )
        ).scalar()
    if index is None:
        return None
    entry = auditlog.entry(int(index))
    try:
        header = read_header(entry.envelope)
    except TrmError:
        return None
    if requester != header.sender and requester not in header.recipients:
        return None  # another party's envelope: the same answer as one not logged
    if witnessed is None or entry.index >= witnessed[0]:
        return PENDING
    size, note = witnessed
    return {
        "type": INCLUSION_TYPE,
        "version": PROOF_VERSION,
        "envelope_id": envelope_id,
        "index": entry.index,
        "entry": entry.to_json(),
        "leaf_hash": auditlog.leaf(entry.index).hex(),
        "size": size,
        "proof": [h.hex() for h in auditlog.inclusion_proof(entry.index, size)],
        "root": auditlog.root(size).hex(),
        "checkpoint": note.decode(),
    }


# --- the participant's side -----------------------------------------------------------


def held_since(engine: Engine, since: datetime | None) -> list[Held]:
    """The envelopes this participant's outbox sent and its inbox applied since `since`."""
    o, i = outbox_table.c, inbox_table.c
    sent = sa.select(o.envelope_id, o.digest).where(o.sent_at.is_not(None))
    received = sa.select(i.envelope_id, i.digest)
    if since is not None:
        sent = sent.where(o.created_at >= since)
        received = received.where(i.received_at >= since)
    with storage_errors("reading the outbox and inbox"), engine.connect() as conn:
        held = [Held(r.envelope_id, r.digest, "sent") for r in conn.execute(sent)]
        held += [Held(r.envelope_id, r.digest, "received") for r in conn.execute(received)]
    return held


@dataclass
class MembershipReport:
    """What the routing service proved of a participant's envelopes."""

    proven: list[Held] = field(default_factory=list)
    missing: list[tuple[Held, str]] = field(default_factory=list)
    """Envelopes the log is not shown to hold, with why."""
    size: int | None = None
    """The witnessed checkpoint the proofs lead to."""

    @property
    def complete(self) -> bool:
        """Whether every envelope was proven in a witnessed checkpoint."""
        return not self.missing


def check_answer(
    held: Sequence[Held], answer_body: bytes, directory: Directory, *, request_id: str
) -> MembershipReport:
    """Check the routing service's answer about `held`; every proof verified, never trusted."""
    data = json.loads(answer_body)
    if not isinstance(data, dict) or data.get("type") != ANSWER_TYPE:
        raise AuditError("not a membership answer")
    if data.get("request_id") != request_id:
        raise AuditError("an answer to another request")
    proofs = data.get("proofs")
    if not isinstance(proofs, dict):
        raise AuditError("the answer holds no proofs")
    report = MembershipReport()
    for item in held:
        problem = _judge(item, proofs.get(item.envelope_id), directory, report)
        if problem is None:
            report.proven.append(item)
        else:
            report.missing.append((item, problem))
    return report


def _judge(item: Held, proof: object, directory: Directory, report: MembershipReport) -> str | None:
    if proof is None:
        return "not in the audit log"
    if proof == PENDING:
        return "not yet in a checkpoint the witnesses cosigned; ask again later"
    if not isinstance(proof, dict):
        return "its proof is not a proof document"
    try:
        shown = check_proof(json.dumps(proof).encode(), directory)
        require_quorum(str(proof["checkpoint"]).encode(), directory, directory.body.quorum)
        envelope = base64.b64decode(str(proof["entry"]["envelope"]), validate=True)
    except (TrmError, KeyError, TypeError, ValueError) as e:
        return f"its proof does not hold: {e}"
    if hashlib.sha256(envelope).hexdigest() != item.digest:
        return "the log holds other bytes under its id"
    if shown.envelope_id != item.envelope_id:
        return "the proof is for another envelope"
    report.size = shown.size
    return None


def new_request_id() -> str:
    """A fresh id to match an answer to its request."""
    return str(uuid.uuid4())


# --- over the broker ---------------------------------------------------------------------


def serve(
    auditlog: AuditLog,
    directory: Callable[[], Directory],
    settings: AmqpSettings,
    participant: str,
    stop: threading.Event,
) -> None:
    """The routing service's side: answer requests on its proofs queue until `stop` is set."""

    def loop() -> None:
        consumer = Consumer(settings, proofs_queue(participant))
        publisher = Publisher(settings, participant, exchange=WITNESS_EXCHANGE)
        try:

            def handle(delivery: Delivery) -> None:
                requester = delivery.user_id
                if requester is None:
                    return
                try:
                    body = answer(auditlog, directory(), requester, delivery.body)
                except (AuditError, KeyError, TypeError, ValueError) as e:
                    log.warning("membership request dropped", requester=requester, error=str(e))
                    return
                publisher.publish([Outgoing("membership", (proofs_key(requester),), body)])

            consumer.run(handle, stop)
        finally:
            consumer.close()
            publisher.close()

    bound = log.bind(participant=participant)
    while not stop.is_set():
        try:
            run_with_reconnect(loop, stop, log=bound)
        except TrmError as e:
            bound.error("membership proofs failed; will retry", reason=e.reason, error=str(e))
            stop.wait(_RETRY_SECONDS)


def ask(
    settings: AmqpSettings,
    participant: str,
    routing_id: str,
    body: bytes,
    request_id: str,
    *,
    timeout: float,
) -> bytes:
    """Send a request to the routing service; its answer, or AuditError after `timeout` s."""
    publisher = Publisher(settings, participant, exchange=WITNESS_EXCHANGE)
    try:
        publisher.publish([Outgoing("membership", (proofs_key(routing_id),), body)])
    finally:
        publisher.close()
    deadline = time.monotonic() + timeout
    connection = open_connection(settings)
    try:
        channel = connection.channel()
        while time.monotonic() < deadline:
            method, _, found = channel.basic_get(proofs_queue(participant), auto_ack=True)
            if method is None or found is None:
                connection.sleep(_POLL_SECONDS)
                continue
            if _answers(found, request_id):
                return bytes(found)
    except (pika.exceptions.AMQPError, OSError) as e:
        raise translate(e, settings, "awaiting the routing service's proofs") from e
    finally:
        if connection.is_open:
            connection.close()
    raise AuditError(
        f"the routing service {routing_id!r} sent no proofs within {timeout:g} s: is it running?"
    )


def _answers(body: bytes, request_id: str) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("request_id") == request_id


_RETRY_SECONDS = 15.0
_POLL_SECONDS = 0.05
