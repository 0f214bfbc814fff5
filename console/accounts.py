"""Local accounts of the participant's staff, their sessions and the sign-in rate limit.

Passwords are kept as argon2id hashes (`argon2-cffi`). A session is a random
256-bit token in an HttpOnly, SameSite=Strict cookie; the database keeps
only its SHA-256, so a copy of the database signs nobody in. A session ends
after `SessionPolicy.idle` without a request or `SessionPolicy.absolute`
after sign-in, whichever comes first. Refused sign-ins are counted in the
database per username and per client address, so a restart does not reset
the limit. The CSRF token of a session is an HMAC of its cookie: nothing
more to store, and it changes with every sign-in.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.engine import Engine

from broker.database import storage_errors
from console.errors import AccountError, CsrfRefused, NotFound, SignInRefused, TooManyAttempts
from console.tables import login_failures_table, sessions_table, users_table

USERNAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{1,63}$"
MIN_PASSWORD = 12
"""Characters a password must have at least."""
_TOUCH_EVERY = timedelta(seconds=60)
"""How stale a session's last-seen time may be before a request writes it again."""
_hasher = PasswordHasher()
_NOBODY = _hasher.hash(secrets.token_hex(16))
"""Verified against when the username is unknown, so both answers take as long."""


class Role(StrEnum):
    """What a staff member may do in the console."""

    CASE_WORKER = "case_worker"
    """Reads cases and payloads, sends, confirms reception, withdraws consent."""
    SUPERVISOR = "supervisor"
    """A case worker who may also requeue quarantined envelopes and read the trail."""
    READ_ONLY = "read_only"
    """Reads only."""


class Language(StrEnum):
    """The languages of the console's pages."""

    EN = "en"
    RU = "ru"


@dataclass(frozen=True)
class User:
    """A local account (never its password hash)."""

    username: str
    role: Role
    language: Language
    created_at: datetime
    disabled_at: datetime | None


@dataclass(frozen=True)
class SessionPolicy:
    """How long sessions last, how sign-ins are limited and how the cookie is sent."""

    idle: timedelta = timedelta(minutes=30)
    absolute: timedelta = timedelta(hours=12)
    secure_cookie: bool = False
    """Mark the cookie Secure: set when the console is reached over TLS."""
    failures_per_user: int = 5
    failures_per_client: int = 20
    failure_window: timedelta = timedelta(minutes=15)


@dataclass(frozen=True)
class Session:
    """A signed-in browser: its user and the cookie's token (known only while handling it)."""

    token: str
    user: User

    @property
    def csrf_token(self) -> str:
        """The token every state-changing form of this session must carry."""
        return csrf_token(self.token)


def digest(token: str) -> str:
    """The SHA-256 (hex) a session or API token is stored as."""
    return hashlib.sha256(token.encode()).hexdigest()


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC)


def _user(row: Any) -> User:
    return User(
        username=row.username,
        role=Role(row.role),
        language=Language(row.language),
        created_at=row.created_at,
        disabled_at=row.disabled_at,
    )


# --- accounts ----------------------------------------------------------------------


def add_user(
    engine: Engine,
    username: str,
    password: str,
    role: Role | str,
    language: Language | str = Language.EN,
    *,
    now: datetime | None = None,
) -> User:
    """Create an account; AccountError if the name is taken or invalid or the password short."""
    if not re.fullmatch(USERNAME_PATTERN, username):
        raise AccountError(
            f"username {username!r} is not valid: 2 to 64 of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password must have at least {MIN_PASSWORD} characters")
    try:
        chosen_role, chosen_language = Role(role), Language(language)
    except ValueError as e:
        raise AccountError(
            f"{e}: roles are {', '.join(Role)}; languages {', '.join(Language)}"
        ) from None
    created = _now(now)
    row = {
        "username": username,
        "password_hash": _hasher.hash(password),
        "role": str(chosen_role),
        "language": str(chosen_language),
        "created_at": created,
        "disabled_at": None,
    }
    with storage_errors("adding a console user"), engine.begin() as conn:
        taken = conn.execute(
            sa.select(users_table.c.username).where(users_table.c.username == username)
        ).first()
        if taken is not None:
            raise AccountError(f"user {username!r} exists already")
        conn.execute(users_table.insert().values(row))
    return User(username, chosen_role, chosen_language, created, None)


def list_users(engine: Engine) -> list[User]:
    """Every account, by username."""
    with storage_errors("reading the console users"), engine.connect() as conn:
        rows = conn.execute(sa.select(users_table).order_by(users_table.c.username)).all()
    return [_user(r) for r in rows]


def get_user(engine: Engine, username: str) -> User:
    """The account `username`; NotFound if there is none."""
    with storage_errors("reading a console user"), engine.connect() as conn:
        row = conn.execute(sa.select(users_table).where(users_table.c.username == username)).first()
    if row is None:
        raise NotFound(f"no console user {username!r}: see `trm console user list`")
    return _user(row)


def disable_user(engine: Engine, username: str, *, now: datetime | None = None) -> User:
    """Disable `username` and end its sessions; NotFound if there is no such account."""
    get_user(engine, username)
    at = _now(now)
    u = users_table.c
    with storage_errors("disabling a console user"), engine.begin() as conn:
        conn.execute(
            users_table.update()
            .where(u.username == username, u.disabled_at.is_(None))
            .values(disabled_at=at)
        )
        conn.execute(sessions_table.delete().where(sessions_table.c.username == username))
    return get_user(engine, username)


# --- signing in and out -------------------------------------------------------------


def sign_in(
    engine: Engine,
    username: str,
    password: str,
    client: str,
    policy: SessionPolicy,
    *,
    now: datetime | None = None,
) -> Session:
    """A new session for `username`, or SignInRefused / TooManyAttempts.

    The rate limit is checked before the password, so a limited username
    or address learns nothing more; a refusal never says whether the
    username exists.
    """
    at = _now(now)
    client = client[:63]
    _check_rate(engine, username, client, policy, at)
    with storage_errors("reading a console user"), engine.connect() as conn:
        row = conn.execute(sa.select(users_table).where(users_table.c.username == username)).first()
    if not _password_matches(row.password_hash if row else _NOBODY, password) or (
        row is None or row.disabled_at is not None
    ):
        _record_failure(engine, username, client, at)
        raise SignInRefused("wrong username or password, or the account is disabled")
    token = secrets.token_urlsafe(32)
    with storage_errors("starting a console session"), engine.begin() as conn:
        conn.execute(
            login_failures_table.delete().where(login_failures_table.c.username == username)
        )
        conn.execute(
            sessions_table.insert().values(
                token_hash=digest(token), username=username, created_at=at, last_seen_at=at
            )
        )
    return Session(token, _user(row))


def _password_matches(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def _check_rate(
    engine: Engine, username: str, client: str, policy: SessionPolicy, at: datetime
) -> None:
    f = login_failures_table.c
    since = at - policy.failure_window
    count = sa.select(sa.func.count()).select_from(login_failures_table)
    with storage_errors("reading the sign-in failures"), engine.connect() as conn:
        by_user = conn.execute(count.where(f.username == username, f.at > since)).scalar_one()
        by_client = conn.execute(count.where(f.client == client, f.at > since)).scalar_one()
    if by_user >= policy.failures_per_user or by_client >= policy.failures_per_client:
        minutes = int(policy.failure_window.total_seconds() // 60)
        raise TooManyAttempts(
            f"too many refused sign-ins lately: wait {minutes} minutes, or ask a supervisor"
        )


def _record_failure(engine: Engine, username: str, client: str, at: datetime) -> None:
    with storage_errors("recording a sign-in failure"), engine.begin() as conn:
        conn.execute(
            login_failures_table.insert().values(username=username[:64], client=client, at=at)
        )
        # Old failures no longer count: keep the table small.
        conn.execute(
            login_failures_table.delete().where(login_failures_table.c.at < at - timedelta(days=1))
        )


def session_of(
    engine: Engine, token: str, policy: SessionPolicy, *, now: datetime | None = None
) -> Session | None:
    """The live session whose cookie is `token`, or None (unknown, expired, user disabled)."""
    at = _now(now)
    s = sessions_table.c
    key = digest(token)
    with storage_errors("reading a console session"), engine.connect() as conn:
        row = conn.execute(
            sa.select(s.token_hash, s.created_at, s.last_seen_at, users_table)
            .join(users_table, users_table.c.username == s.username)
            .where(s.token_hash == key)
        ).first()
    if row is None or not hmac.compare_digest(row.token_hash, key):
        return None
    expired = at - row.last_seen_at > policy.idle or at - row.created_at > policy.absolute
    if expired or row.disabled_at is not None:
        sign_out(engine, token)
        return None
    if at - row.last_seen_at > _TOUCH_EVERY:
        with storage_errors("touching a console session"), engine.begin() as conn:
            conn.execute(sessions_table.update().where(s.token_hash == key).values(last_seen_at=at))
    return Session(token, _user(row))


def sign_out(engine: Engine, token: str) -> None:
    """End the session whose cookie is `token` (nothing if there is none)."""
    with storage_errors("ending a console session"), engine.begin() as conn:
        conn.execute(sessions_table.delete().where(sessions_table.c.token_hash == digest(token)))


# --- CSRF ----------------------------------------------------------------------------


def csrf_token(session_token: str) -> str:
    """The CSRF token of the session whose cookie is `session_token`."""
    return hmac.new(session_token.encode(), b"trm-console-csrf", hashlib.sha256).hexdigest()


def check_csrf(session: Session, given: str | None) -> None:
    """Nothing if `given` is the session's CSRF token; CsrfRefused otherwise."""
    if not given or not hmac.compare_digest(given.encode(), session.csrf_token.encode()):
        raise CsrfRefused("the form's CSRF token is missing or wrong: reload the page and retry")
