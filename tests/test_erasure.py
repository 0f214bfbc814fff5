"""Erasing a case's payloads after a withdrawal: what goes and what stays."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

from sqlalchemy.engine import Engine

from adapters.casesystem import FileCaseSystem
from adapters.erasure import Erasures
from broker.casegate import erasure_row
from broker.database import erasures_table, inbox_table
from broker.testing import Network
from schemas.base import MessageKind

KZ, UZ = "iom-kz", "iom-uz"
CASE = "iom-kz.KZ-2026-0042"


def _delivered(engine: Engine, cases: FileCaseSystem, sender: str, kind: MessageKind) -> Path:
    """A payload of `kind` from `sender` on CASE, as the inbox leaves it: a file and a row."""
    envelope_id = str(uuid4())
    now = datetime.now(UTC)
    row = {
        "envelope_id": envelope_id,
        "digest": "0" * 64,
        "sender": sender,
        "case_ref": CASE,
        "kind": str(kind),
        "received_at": now,
        "applied_at": now,
    }
    with engine.begin() as conn:
        conn.execute(inbox_table.insert(), [row])
    path = cases.path(envelope_id)
    path.write_text("{}")
    return path


def test_own_erasure_keeps_the_confirmations_that_arrived_before_it(
    engine: Engine, network: Network, tmp_path: Path
) -> None:
    """KZ withdrew with deletion; UZ's confirmation reached KZ before KZ's own erasure ran:
    KZ erases the case's payloads but keeps the confirmation, the record of UZ's erasure."""
    cases = FileCaseSystem(tmp_path / "inbox")
    cases.folder.mkdir()
    request = _delivered(engine, cases, UZ, MessageKind.RETURN_ACCEPTED)
    confirmation = _delivered(engine, cases, UZ, MessageKind.ERASURE_CONFIRMED)
    withdrawal = str(uuid4())
    with engine.begin() as conn:
        conn.execute(
            erasures_table.insert(), [erasure_row(withdrawal, CASE, None, datetime.now(UTC))]
        )
    erasures = Erasures(
        engine, cases, sender=lambda: network.sender(KZ), directory=lambda: network.directory
    )
    assert erasures.run() == 0
    assert not request.exists()
    assert confirmation.exists()
    [status] = erasures.status(CASE)
    assert (status.withdrawal_id, status.erased_payloads, status.last_error) == (
        withdrawal,
        1,
        None,
    )
