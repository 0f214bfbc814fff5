"""Erasing a case's payloads after the person withdrew consent and asked for deletion.

The inbox records a pending erasure in the transaction that applies the
withdrawal (``erasures``), so a withdrawal is never lost to a case folder
that cannot be written. `Erasures.run` then removes the case's delivered
payloads through the case system and, in a second step, queues a signed
`ErasureConfirmed` for the participant that withdrew. A step that fails is
logged with its cause, counted and retried on the next run; the erasure is
idempotent and its count is recorded before the confirmation is sealed, so
a retry never reports fewer payloads than were removed.

What stays: the sealed envelopes in outboxes, queues and the audit log,
which no one but their recipients can open, the metadata rows (ids, kinds,
times) that prove the handoff happened, and the erasure confirmations
delivered here, which hold no personal data and are the record that the
other parties erased theirs: they may arrive before this participant's own
erasure runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine

from adapters.casesystem import CaseSystem
from broker.database import erasures_table, inbox_table, storage_errors
from broker.directory import Directory
from broker.envelope import seal
from broker.errors import TrmError
from broker.keys import Sender
from broker.outbox import Outbox
from schemas.base import MessageKind
from schemas.control import ErasureConfirmed

log = structlog.get_logger(__name__)

_e = erasures_table.c
_TO_ERASE = sa.select(_e.withdrawal_id, _e.case_ref).where(_e.erased_at.is_(None))
_TO_CONFIRM = sa.select(
    _e.withdrawal_id, _e.case_ref, _e.confirm_to, _e.erased_at, _e.erased_payloads
).where(_e.erased_at.is_not(None), _e.confirm_to.is_not(None), _e.confirmation_id.is_(None))


@dataclass(frozen=True)
class ErasureStatus:
    """One erasure as `trm` shows it."""

    withdrawal_id: str
    case: str
    erased_payloads: int | None
    """None while the erasure is pending."""
    confirmed_to: str | None
    attempts: int
    last_error: str | None


class Erasures:
    """The erasures of one participant's home: run the pending ones, list them."""

    def __init__(
        self,
        engine: Engine,
        case_system: CaseSystem,
        *,
        sender: Callable[[], Sender],
        directory: Callable[[], Directory],
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """Erase through `case_system`; confirm as `sender()`."""
        self.engine = engine
        self.case_system = case_system
        self.sender = sender
        self.directory = directory
        self.outbox = Outbox(engine)
        self.clock = clock or (lambda: datetime.now(UTC))

    def erase(self, withdrawal_id: str, case: str) -> bool:
        """Do one erasure now (`trm withdraw` erasing at home); False if it failed."""
        return self._erase(withdrawal_id, case)

    def run(self) -> int:
        """Do every pending erasure and confirmation; return how many steps are still pending."""
        with storage_errors("reading the pending erasures"), self.engine.connect() as conn:
            to_erase = conn.execute(_TO_ERASE).all()
        left = sum(not self._erase(row.withdrawal_id, row.case_ref) for row in to_erase)
        with storage_errors("reading the erasures to confirm"), self.engine.connect() as conn:
            to_confirm = conn.execute(_TO_CONFIRM).all()
        return left + sum(not self._confirm(row) for row in to_confirm)

    def _erase(self, withdrawal_id: str, case: str) -> bool:
        ids = self._delivered(case)
        try:
            removed = self.case_system.erase(case, ids)
        except TrmError as e:
            return self._failed(withdrawal_id, case, e)
        values = {"erased_at": self.clock(), "erased_payloads": removed, "last_error": None}
        self._update(withdrawal_id, values)
        log.info("erasure.done", case=case, envelope_id=withdrawal_id, erased_payloads=removed)
        return True

    def _confirm(self, row: Any) -> bool:
        confirmation = ErasureConfirmed(
            withdrawal=UUID(row.withdrawal_id),
            erased_payloads=row.erased_payloads,
            erased_at=row.erased_at,
        )
        sender, directory = self.sender(), self.directory()
        try:
            with storage_errors("queueing an erasure confirmation"), self.engine.begin() as conn:
                sealed = seal(
                    confirmation,
                    case=row.case_ref,
                    sender=sender,
                    recipients=(row.confirm_to,),
                    directory=directory,
                    seq=self.outbox.next_seq(conn, sender.participant, row.case_ref),
                    reply_to=UUID(row.withdrawal_id),
                )
                claimed = conn.execute(
                    erasures_table.update()
                    .where(_e.withdrawal_id == row.withdrawal_id, _e.confirmation_id.is_(None))
                    .values(confirmation_id=str(sealed.id))
                ).rowcount
                if not claimed:
                    conn.rollback()  # another process confirmed it first
                    return True
                self.outbox.add(conn, sealed)
        except TrmError as e:
            return self._failed(row.withdrawal_id, row.case_ref, e)
        log.info(
            "erasure.confirmed",
            case=row.case_ref,
            envelope_id=str(sealed.id),
            recipient=row.confirm_to,
        )
        return True

    def _delivered(self, case: str) -> list[str]:
        t = inbox_table.c
        query = sa.select(t.envelope_id).where(
            t.case_ref == case, t.kind != str(MessageKind.ERASURE_CONFIRMED)
        )
        with storage_errors(f"reading case {case}'s deliveries"), self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [row.envelope_id for row in rows]

    def _failed(self, withdrawal_id: str, case: str, error: TrmError) -> bool:
        self._update(withdrawal_id, {"attempts": _e.attempts + 1, "last_error": str(error)[:1000]})
        log.warning(
            "erasure.failed",
            case=case,
            envelope_id=withdrawal_id,
            reason=error.reason,
            error=str(error),
        )
        return False

    def _update(self, withdrawal_id: str, values: dict[str, Any]) -> None:
        with storage_errors("recording an erasure"), self.engine.begin() as conn:
            conn.execute(
                erasures_table.update().where(_e.withdrawal_id == withdrawal_id).values(values)
            )

    def status(self, case: str | None = None) -> list[ErasureStatus]:
        """Every erasure recorded here (of `case`, if given), oldest first."""
        query = sa.select(erasures_table).order_by(_e.requested_at, _e.withdrawal_id)
        if case is not None:
            query = query.where(_e.case_ref == case)
        with storage_errors("reading the erasures"), self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            ErasureStatus(
                withdrawal_id=row.withdrawal_id,
                case=row.case_ref,
                erased_payloads=row.erased_payloads,
                confirmed_to=row.confirm_to if row.confirmation_id else None,
                attempts=row.attempts,
                last_error=row.last_error,
            )
            for row in rows
        ]
