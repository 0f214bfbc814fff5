"""API tokens: one per client system (a case management system), each with its scopes.

A token is 256 random bits shown once when it is made (`trm console token
add`); the database keeps its SHA-256 only. A request presents it as
``Authorization: Bearer <token>``; a revoked token is refused like an
unknown one.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from broker.database import storage_errors
from console.accounts import USERNAME_PATTERN, digest
from console.errors import AccountError, NotFound
from console.tables import tokens_table

PREFIX = "trm_"
"""Marks a console token, so that one pasted by mistake is recognised for what it is."""


class Scope(StrEnum):
    """What an API token may do."""

    READ = "read"
    """Deliveries, payloads, cases, envelope status, the outbox and the trail."""
    SEND = "send"
    """Send a message of any kind."""
    RECEIPTS = "receipts"
    """Confirm the reception of a returnee."""
    CONSENT = "consent"
    """Record a withdrawal of consent (and the erasure it asks for)."""
    QUARANTINE = "quarantine"
    """List quarantined envelopes and requeue them."""
    EVENTS = "events"
    """The stream of new events."""


@dataclass(frozen=True)
class ApiToken:
    """A client system's token, as listed: never the token itself."""

    name: str
    scopes: frozenset[Scope]
    created_at: datetime
    revoked_at: datetime | None


def _token(row: Any) -> ApiToken:
    return ApiToken(
        name=row.name,
        scopes=frozenset(Scope(s) for s in row.scopes.split()),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def add_token(
    engine: Engine, name: str, scopes: Iterable[Scope | str], *, now: datetime | None = None
) -> str:
    """Make a token named `name` with `scopes`; the token, to be shown once."""
    if not re.fullmatch(USERNAME_PATTERN, name):
        raise AccountError(f"token name {name!r} is not valid: 2 to 64 of a-z, 0-9, '.', '_', '-'")
    try:
        chosen = sorted({Scope(s) for s in scopes})
    except ValueError as e:
        raise AccountError(f"{e}: scopes are {', '.join(Scope)}") from None
    if not chosen:
        raise AccountError(f"give the token at least one --scope: {', '.join(Scope)}")
    token = PREFIX + secrets.token_urlsafe(32)
    with storage_errors("adding an API token"), engine.begin() as conn:
        taken = conn.execute(
            sa.select(tokens_table.c.name).where(tokens_table.c.name == name)
        ).first()
        if taken is not None:
            raise AccountError(f"a token named {name!r} exists already: revoke it or pick another")
        conn.execute(
            tokens_table.insert().values(
                name=name,
                token_hash=digest(token),
                scopes=" ".join(chosen),
                created_at=now or datetime.now(UTC),
                revoked_at=None,
            )
        )
    return token


def list_tokens(engine: Engine) -> list[ApiToken]:
    """Every token, by name, revoked ones included."""
    with storage_errors("reading the API tokens"), engine.connect() as conn:
        rows = conn.execute(sa.select(tokens_table).order_by(tokens_table.c.name)).all()
    return [_token(r) for r in rows]


def revoke_token(engine: Engine, name: str, *, now: datetime | None = None) -> ApiToken:
    """Revoke the token `name` at once; NotFound if there is none."""
    t = tokens_table.c
    with storage_errors("revoking an API token"), engine.begin() as conn:
        conn.execute(
            tokens_table.update()
            .where(t.name == name, t.revoked_at.is_(None))
            .values(revoked_at=now or datetime.now(UTC))
        )
        row = conn.execute(sa.select(tokens_table).where(t.name == name)).first()
    if row is None:
        raise NotFound(f"no API token {name!r}: see `trm console token list`")
    return _token(row)


def authenticate(engine: Engine, presented: str) -> ApiToken | None:
    """The live token `presented` is, or None (unknown or revoked)."""
    key = digest(presented)
    with storage_errors("reading the API tokens"), engine.connect() as conn:
        row = conn.execute(sa.select(tokens_table).where(tokens_table.c.token_hash == key)).first()
    if row is None or not hmac.compare_digest(row.token_hash, key) or row.revoked_at is not None:
        return None
    return _token(row)
