"""The console's trail: who did what, when, on which envelope or case; never what it said.

Each action the console carries out for a user or a client system is
recorded once it succeeded, in the participant's own database. A refused
request records nothing (the refusal is answered and, for sign-ins,
counted in `console.accounts`). Read with ``GET /api/v1/trail`` or
`trm console trail`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from broker.database import reading, storage_errors
from console.tables import trail_table


class Action(StrEnum):
    """What was done."""

    SIGN_IN = "sign_in"
    SIGN_OUT = "sign_out"
    SEND = "send"
    CONFIRM_RECEPTION = "confirm_reception"
    WITHDRAW_CONSENT = "withdraw_consent"
    READ_PAYLOAD = "read_payload"
    REQUEUE = "requeue"
    USER_ADD = "user_add"
    USER_DISABLE = "user_disable"
    TOKEN_ADD = "token_add"  # noqa: S105 - an action name
    TOKEN_REVOKE = "token_revoke"  # noqa: S105 - an action name


@dataclass(frozen=True)
class TrailEntry:
    """One recorded action."""

    id: int
    at: datetime
    actor: str
    """``user:NAME``, ``token:NAME`` or ``cli:`` for the command line."""
    action: str
    envelope_id: str | None
    case: str | None


def user_actor(username: str) -> str:
    """How a staff member appears in the trail."""
    return f"user:{username}"


def token_actor(name: str) -> str:
    """How a client system appears in the trail."""
    return f"token:{name}"


CLI_ACTOR = "cli:"


def record(
    db: Engine | Connection,
    actor: str,
    action: Action,
    *,
    envelope_id: str | None = None,
    case: str | None = None,
    at: datetime | None = None,
) -> None:
    """Record that `actor` did `action`; inside `db`'s transaction when it is a connection."""
    row = {
        "at": at or datetime.now(UTC),
        "actor": actor[:72],
        "action": str(action),
        "envelope_id": envelope_id,
        "case_ref": case,
    }
    if isinstance(db, Connection):
        db.execute(trail_table.insert().values(row))
        return
    with storage_errors("recording the console trail"), db.begin() as conn:
        conn.execute(trail_table.insert().values(row))


def entries(
    engine: Engine,
    *,
    limit: int = 100,
    before: int | None = None,
    case: str | None = None,
    envelope_id: str | None = None,
) -> list[TrailEntry]:
    """The newest `limit` entries (before id `before`), newest first, optionally of one case."""
    t = trail_table.c
    query = sa.select(trail_table).order_by(t.id.desc()).limit(limit)
    if before is not None:
        query = query.where(t.id < before)
    if case is not None:
        query = query.where(t.case_ref == case)
    if envelope_id is not None:
        query = query.where(t.envelope_id == envelope_id)
    with storage_errors("reading the console trail"), reading(engine) as conn:
        rows = conn.execute(query).all()
    return [TrailEntry(r.id, r.at, r.actor, r.action, r.envelope_id, r.case_ref) for r in rows]


def count(engine: Engine) -> int:
    """How many entries the trail holds."""
    with storage_errors("reading the console trail"), reading(engine) as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(trail_table)).scalar_one())
