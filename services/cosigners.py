"""The routing service's side of witnessing: ask each witness to cosign, keep what comes back.

For the newest checkpoint the log signed, each witness the directory lists
that has not cosigned it yet gets an add-checkpoint request
(`services.witness.format_request`) on its queue ``trm.witness.<id>``: the
signed note and a consistency proof from the size that witness last
cosigned. Its answer comes back on the routing participant's own queue
``trm.witness.<routing id>`` as JSON (`answer_body`): a cosignature, which
is verified against the witness's key in the directory, kept in
``log_cosignatures`` and appended to the checkpoint's note (so every export
carries it), or a refusal with its reason. A ``conflict`` answer names the
size the witness holds, and the next request proves from there.

Each witness has at most one request outstanding, sent again after
`resend_after` seconds without an answer, so a witness that is down only
has its own cosignature wait; when it is back, it answers the request
waiting in its queue and is asked for the newest checkpoint then.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import structlog

from broker.database import UTCDateTime, metadata, storage_errors
from broker.directory import Directory
from broker.errors import AuditError, BrokerUnavailable, TrmError
from broker.topology import WITNESS_EXCHANGE, witness_queue
from broker.transport import (
    AmqpSettings,
    Consumer,
    Delivery,
    Outgoing,
    Publisher,
    run_with_reconnect,
)
from services.auditlog import AuditLog, log_checkpoints_table
from services.cosignature import CosignatureInvalid, check_cosignatures, with_cosignature
from services.witness import ANSWER_TYPE, format_request

log = structlog.get_logger(__name__)

log_cosignatures_table = sa.Table(
    "log_cosignatures",
    metadata,
    sa.Column("size", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("witness", sa.String(63), primary_key=True),
    sa.Column("cosigned_at", UTCDateTime(), nullable=False),
    sa.Column("line", sa.Text(), nullable=False),
)
"""Every verified cosignature a witness returned, by checkpoint size."""


@dataclass
class _Asked:
    size: int
    at: float


class Cosigners:
    """Collects witness cosignatures for one routing service's log."""

    def __init__(
        self,
        auditlog: AuditLog,
        directory: Callable[[], Directory],
        *,
        resend_after: float = 30.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """Ask the witnesses of `directory()` to cosign `auditlog`'s checkpoints."""
        self.auditlog = auditlog
        self.directory = directory
        self.resend_after = resend_after
        self.clock = clock
        self._known: dict[str, int] = {}
        self._asked: dict[str, _Asked] = {}
        self._lock = threading.Lock()
        self._log = log.bind(origin=auditlog.origin)

    # -- asking -----------------------------------------------------------------------------

    def due(self) -> list[Outgoing]:
        """The requests to send now: the newest checkpoint, to each witness that lacks it."""
        latest = self.auditlog.latest_checkpoint()
        if latest is None:
            return []
        size, _, note = latest
        now = time.monotonic()
        due = []
        with self._lock:
            for witness in self.directory().body.witnesses:
                known = self._cosigned_size(witness)
                asked = self._asked.get(witness)
                if known >= size or (asked is not None and now - asked.at < self.resend_after):
                    continue
                proof = [] if known == 0 else self.auditlog.consistency_proof(known, size)
                body = format_request(known, proof, note)
                due.append(Outgoing(f"checkpoint-{size}-{witness}", (witness,), body))
                self._asked[witness] = _Asked(size, now)
        return due

    def _cosigned_size(self, witness: str) -> int:
        if witness not in self._known:
            t = log_cosignatures_table
            with storage_errors("reading cosignatures"), self.auditlog.engine.connect() as conn:
                found = conn.execute(
                    sa.select(sa.func.max(t.c.size)).where(t.c.witness == witness)
                ).scalar()
            self._known[witness] = int(found or 0)
        return self._known[witness]

    # -- answers ----------------------------------------------------------------------------

    def take(self, body: bytes, user_id: str | None) -> None:
        """Handle one witness's answer; an answer that does not check is logged and dropped."""
        try:
            answer = _answer(body)
            witness = answer["witness"]
            if user_id != witness or witness not in self.directory().body.witnesses:
                raise AuditError(f"an answer from {user_id!r} for witness {witness!r}: ignored")
            if answer["origin"] != self.auditlog.origin:
                raise AuditError(f"an answer about another log {answer['origin']!r}")
            if answer["cosignature"] is not None:
                self._cosigned(witness, int(answer["size"]), answer["cosignature"].encode())
            else:
                self._refused(witness, answer)
        except (TrmError, KeyError, TypeError, ValueError) as e:
            self._log.warning("witness answer dropped", witness=user_id, error=str(e))

    def _cosigned(self, witness: str, size: int, line: bytes) -> None:
        note = self.auditlog.checkpoint_note(size)
        if note is None:
            raise AuditError(f"{witness} cosigned checkpoint {size}, which this log never signed")
        cosigned = with_cosignature(note, line)
        found = [c for c in check_cosignatures(cosigned, self.directory()) if c.witness == witness]
        if not found:
            raise CosignatureInvalid(f"the answer of {witness} holds no cosignature of theirs")
        t, c = log_cosignatures_table, log_checkpoints_table
        with storage_errors("storing a cosignature"), self.auditlog.engine.begin() as conn:
            held = conn.execute(
                sa.select(t.c.size).where(t.c.size == size, t.c.witness == witness)
            ).first()
            if held is None:
                conn.execute(
                    t.insert().values(
                        size=size, witness=witness, cosigned_at=found[0].time, line=line.decode()
                    )
                )
                current = conn.execute(sa.select(c.c.note).where(c.c.size == size)).scalar_one()
                updated = with_cosignature(str(current).encode(), line)
                conn.execute(c.update().where(c.c.size == size).values(note=updated.decode()))
        with self._lock:
            self._known[witness] = max(self._cosigned_size(witness), size)
            self._asked.pop(witness, None)
        self._log.info("checkpoint cosigned", witness=witness, size=size)

    def _refused(self, witness: str, answer: dict[str, Any]) -> None:
        """A `conflict` naming a size this log signed is asked again from it at once; any
        other refusal waits `resend_after` (the request stays outstanding), so a witness
        that refuses a fork is not asked again on every tick."""
        why, held = answer["refused"], answer.get("cosigned_size")
        bound = self._log.bind(witness=witness, size=answer["size"], why=why)
        if why == "conflict" and isinstance(held, int):
            if held == 0 or self.auditlog.checkpoint_note(held) is not None:
                with self._lock:
                    self._asked.pop(witness, None)
                    self._known[witness] = held
                bound.info("witness holds another size; asking again from it", cosigned_size=held)
                return
            bound.error("the witness holds a checkpoint this log never signed", cosigned_size=held)
            return
        bound.error("witness refused the checkpoint", detail=answer.get("detail"))

    # -- the process --------------------------------------------------------------------------

    def run(self, settings: AmqpSettings, participant: str, stop: threading.Event) -> None:
        """Consume answers and send requests until `stop` is set.

        A lost broker is waited for (`run_with_reconnect`); any other failure
        (a witness queue not provisioned yet, say) is logged and tried again
        after `_RETRY` seconds: witnessing never stops the routing service.
        """

        def answers() -> None:
            consumer = Consumer(settings, witness_queue(participant))
            try:
                consumer.run(self._handle, stop)
            finally:
                consumer.close()

        thread = threading.Thread(
            target=lambda: self._persist(answers, stop),
            name="routing-witness-answers",
            daemon=True,
        )
        thread.start()
        self._persist(lambda: self._ask(settings, participant, stop), stop)
        thread.join()

    def _persist(self, loop: Callable[[], None], stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                run_with_reconnect(loop, stop, log=self._log)
            except TrmError as e:
                self._log.error("witnessing failed; will retry", reason=e.reason, error=str(e))
                stop.wait(_RETRY)

    def _handle(self, delivery: Delivery) -> None:
        self.take(delivery.body, delivery.user_id)

    def _ask(self, settings: AmqpSettings, participant: str, stop: threading.Event) -> None:
        publisher = Publisher(settings, participant, exchange=WITNESS_EXCHANGE)
        try:
            while not stop.wait(_TICK):
                try:
                    requests = self.due()
                except TrmError as e:
                    self._log.error("cosignature requests failed; will retry", error=str(e))
                    continue
                if not requests:
                    continue
                try:
                    publisher.publish(requests)
                except BrokerUnavailable:
                    raise
                except TrmError as e:
                    # A witness queue missing (not provisioned yet) holds back only its witness.
                    self._log.error("cosignature request not delivered", error=str(e))
        finally:
            publisher.close()


_TICK = 0.2
_RETRY = 15.0


def _answer(body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    if not isinstance(data, dict) or data.get("type") != ANSWER_TYPE:
        raise AuditError("not a witness answer")
    return data
