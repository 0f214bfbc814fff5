"""The console's tables in the participant's database: accounts, sessions, tokens, trail, feed.

They sit beside the adapter's tables (`broker.database.metadata`) and are
created by migration 0015. None holds a payload or a password: passwords
are argon2 hashes, session and API tokens SHA-256 digests, and the trail
and the feed only ids, kinds, case references and times.
"""

from __future__ import annotations

import sqlalchemy as sa

from broker.database import CASE, ENVELOPE_ID, KIND, PARTICIPANT, UTCDateTime, metadata

USERNAME = 64
DIGEST = 64
ROLE = 16

users_table = sa.Table(
    "console_users",
    metadata,
    sa.Column("username", sa.String(USERNAME), primary_key=True),
    sa.Column("password_hash", sa.Text(), nullable=False),
    sa.Column("role", sa.String(ROLE), nullable=False),
    sa.Column("language", sa.String(2), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("disabled_at", UTCDateTime(), nullable=True),
)
"""Local accounts of the participant's staff (`console.accounts`)."""

sessions_table = sa.Table(
    "console_sessions",
    metadata,
    sa.Column("token_hash", sa.String(DIGEST), primary_key=True),
    sa.Column("username", sa.String(USERNAME), nullable=False, index=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("last_seen_at", UTCDateTime(), nullable=False),
)
"""Signed-in browsers: the SHA-256 of each session cookie, never the cookie itself."""

login_failures_table = sa.Table(
    "console_login_failures",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("username", sa.String(USERNAME), nullable=False),
    sa.Column("client", sa.String(PARTICIPANT), nullable=False),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Index("ix_console_login_failures_username_at", "username", "at"),
    sa.Index("ix_console_login_failures_client_at", "client", "at"),
)
"""Refused logins, counted per username and per client address for the rate limit."""

tokens_table = sa.Table(
    "console_tokens",
    metadata,
    sa.Column("name", sa.String(USERNAME), primary_key=True),
    sa.Column("token_hash", sa.String(DIGEST), nullable=False, unique=True),
    sa.Column("scopes", sa.Text(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("revoked_at", UTCDateTime(), nullable=True),
)
"""API tokens of the participant's case systems: name, SHA-256 of the token, scopes."""

trail_table = sa.Table(
    "console_trail",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("at", UTCDateTime(), nullable=False, index=True),
    sa.Column("actor", sa.String(USERNAME + 8), nullable=False),
    sa.Column("action", sa.String(KIND), nullable=False),
    sa.Column("envelope_id", sa.String(ENVELOPE_ID), nullable=True),
    sa.Column("case_ref", sa.String(CASE), nullable=True),
)
"""Who did what through the console (`console.trail`): never what a payload said."""

feed_table = sa.Table(
    "console_feed",
    metadata,
    sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("event", sa.String(ROLE), nullable=False),
    sa.Column("ref", sa.String(ENVELOPE_ID), nullable=False),
    sa.Column("party", sa.String(PARTICIPANT), nullable=False),
    sa.Column("envelope_id", sa.String(ENVELOPE_ID), nullable=True),
    sa.Column("case_ref", sa.String(CASE), nullable=True),
    sa.Column("kind", sa.String(KIND), nullable=True),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("event", "ref", "party"),
    sqlite_autoincrement=True,
)
"""Every delivery, receipt and quarantine record in the order the console first saw it.

`seq` is the cursor API clients resume from: numbered when seen, a row
committed late by the adapter still gets a number after every one already
handed out, so a client reading "since N" never misses it."""

reads_table = sa.Table(
    "console_reads",
    metadata,
    sa.Column("username", sa.String(USERNAME), primary_key=True),
    sa.Column("envelope_id", sa.String(ENVELOPE_ID), primary_key=True),
    sa.Column("read_at", UTCDateTime(), nullable=False),
)
"""Which delivered payloads each user has opened (read or unread in the web pages)."""
