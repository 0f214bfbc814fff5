"""A participant's local database: the engine, the tables and their migrations.

SQLite is the embedded default (one file in the home folder); PostgreSQL is
selected by URL (``postgresql+psycopg://...``). Either way `open_database`
brings the schema to the newest Alembic revision before returning, so every
process that opens a home sees the same tables.

Only metadata lives here in the clear: envelope ids, case references,
participant ids, times and counters. Envelope bodies are stored sealed, that
is encrypted for their recipients; decrypted payloads never touch this
database.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from broker.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
HEAD_REVISION = "0015"
"""The newest migration (`tests/test_database.py` checks it is Alembic's head)."""
BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for another process's transaction to end."""
IN_CHUNK = 500
"""Values per expanding ``IN (...)`` list, well under every backend's parameter limit."""
_LOCK_RETRY_SECONDS = 0.001
"""Pause between two tries for SQLite's write lock (`_begin_immediate`)."""

ENV_URL = "TRM_DATABASE_URL"
ENV_PASSWORD_FILE = "TRM_DATABASE_PASSWORD_FILE"  # noqa: S105 - a variable name
_MIGRATING = threading.Lock()
_READ_ONLY = "trm_read_only"


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    SQLite keeps no zone, so values are normalised to UTC on the way in and
    marked UTC on the way out; PostgreSQL stores ``timestamptz``.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        """Refuse naive times; store UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise StorageError("a naive datetime reached the database: pass timezone-aware UTC")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        """Return aware UTC datetimes whatever the backend gave back."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)
"""The one MetaData every trm table belongs to (adapter and routing service)."""

ENVELOPE_ID = 36
PARTICIPANT = 63
CASE = 64
KIND = 40
DIGEST = 64
REASON = 64

outbox_table = sa.Table(
    "outbox",
    metadata,
    sa.Column("envelope_id", sa.String(ENVELOPE_ID), primary_key=True),
    sa.Column("case_ref", sa.String(CASE), nullable=False),
    sa.Column("kind", sa.String(KIND), nullable=False),
    sa.Column("recipients", sa.Text(), nullable=False),
    sa.Column("body", sa.LargeBinary(), nullable=False),
    sa.Column("digest", sa.String(DIGEST), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("sent_at", UTCDateTime(), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.Column("reply_to", sa.String(ENVELOPE_ID), nullable=True),
    sa.Index("ix_outbox_sent_at_created_at", "sent_at", "created_at"),
    sa.Index("ix_outbox_reply_to", "reply_to"),
)
"""Sealed envelopes waiting for (or past) the broker's publisher confirm.

``reply_to`` is the envelope the row answers, so that a receipt can be
found and published again when its envelope arrives again."""

case_sequence_table = sa.Table(
    "case_sequence",
    metadata,
    sa.Column("sender", sa.String(PARTICIPANT), primary_key=True),
    sa.Column("case_ref", sa.String(CASE), primary_key=True),
    sa.Column("last_seq", sa.BigInteger(), nullable=False),
)
"""The last sequence number each local sender used on each case."""

inbox_table = sa.Table(
    "inbox",
    metadata,
    sa.Column("envelope_id", sa.String(ENVELOPE_ID), primary_key=True),
    sa.Column("digest", sa.String(DIGEST), nullable=False),
    sa.Column("sender", sa.String(PARTICIPANT), nullable=False),
    sa.Column("case_ref", sa.String(CASE), nullable=False),
    sa.Column("kind", sa.String(KIND), nullable=False),
    sa.Column("received_at", UTCDateTime(), nullable=False),
    sa.Column("applied_at", UTCDateTime(), nullable=False),
    sa.Column("redeliveries", sa.Integer(), nullable=False, server_default="0"),
)
"""Every envelope applied here, by id: the exactly-once record."""

quarantine_table = sa.Table(
    "quarantine",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("envelope_id", sa.String(ENVELOPE_ID), nullable=True, index=True),
    sa.Column("sender", sa.String(PARTICIPANT), nullable=True),
    sa.Column("reason", sa.String(REASON), nullable=False),
    sa.Column("detail", sa.Text(), nullable=False),
    sa.Column("received_at", UTCDateTime(), nullable=False),
    sa.Column("body", sa.LargeBinary(), nullable=False),
    sa.Column("redeliveries", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("requeued_at", UTCDateTime(), nullable=True),
)
"""Envelopes refused on arrival, kept as received; `requeued_at` once sent back to the inbox."""

receipts_table = sa.Table(
    "receipts",
    metadata,
    sa.Column("envelope_id", sa.String(ENVELOPE_ID), primary_key=True),
    sa.Column("recipient", sa.String(PARTICIPANT), primary_key=True),
    sa.Column("receipt_envelope_id", sa.String(ENVELOPE_ID), nullable=False),
    sa.Column("received_at", UTCDateTime(), nullable=False),
)
"""Delivery receipts for our envelopes: one per (our envelope, recipient)."""

pending_receipts_table = sa.Table(
    "pending_receipts",
    metadata,
    sa.Column("envelope_id", sa.String(ENVELOPE_ID), primary_key=True),
    sa.Column("case_ref", sa.String(CASE), nullable=False),
    sa.Column("recipient", sa.String(PARTICIPANT), nullable=False),
    sa.Column("digest", sa.String(DIGEST), nullable=False),
    sa.Column("received_at", UTCDateTime(), nullable=False),
    sa.Column("applied_at", UTCDateTime(), nullable=False),
    sa.Column("reason", sa.String(REASON), nullable=False),
    sa.Column("last_error", sa.Text(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("queued_at", UTCDateTime(), nullable=True),
    sa.Column("receipt_id", sa.String(ENVELOPE_ID), nullable=True),
    sa.Index("ix_pending_receipts_queued_at", "queued_at"),
)
"""Envelopes applied here whose receipt could not be sealed: their sender (`recipient` of
the receipt) had no valid encryption key. Kept until a key appears, then sealed and queued
(`queued_at`, `receipt_id`)."""

awaiting_receipts_table = sa.Table(
    "awaiting_receipts",
    metadata,
    sa.Column("envelope_id", sa.String(ENVELOPE_ID), primary_key=True),
    sa.Column("recipient", sa.String(PARTICIPANT), primary_key=True),
    sa.Column("tries", sa.Integer(), nullable=False),
    sa.Column("next_resend_at", UTCDateTime(), nullable=False),
    sa.Column("flagged_at", UTCDateTime(), nullable=True),
    sa.Index("ix_awaiting_receipts_flagged_at_next_resend_at", "flagged_at", "next_resend_at"),
)
"""Our envelopes confirmed by the broker whose recipient's receipt has not come back."""


case_views_table = sa.Table(
    "case_views",
    metadata,
    sa.Column("case_ref", sa.String(CASE), primary_key=True),
    sa.Column("owner", sa.String(PARTICIPANT), nullable=False),
    sa.Column("stage", sa.String(KIND), nullable=True),
    sa.Column("parties", sa.Text(), nullable=False),
    sa.Column("addressees", sa.Text(), nullable=True),
    sa.Column("share_with", sa.Text(), nullable=True),
    sa.Column("purposes", sa.Text(), nullable=True),
    sa.Column("halted_by", sa.String(ENVELOPE_ID), nullable=True),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)
"""Each case as this participant knows it (`broker.casepolicy.CaseView`): ids, vocabulary."""

erasures_table = sa.Table(
    "erasures",
    metadata,
    sa.Column("withdrawal_id", sa.String(ENVELOPE_ID), primary_key=True),
    sa.Column("case_ref", sa.String(CASE), nullable=False, index=True),
    sa.Column("confirm_to", sa.String(PARTICIPANT), nullable=True),
    sa.Column("requested_at", UTCDateTime(), nullable=False),
    sa.Column("erased_at", UTCDateTime(), nullable=True),
    sa.Column("erased_payloads", sa.Integer(), nullable=True),
    sa.Column("confirmation_id", sa.String(ENVELOPE_ID), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text(), nullable=True),
)
"""Erasures a consent withdrawal asked for: pending until the case system removed the payloads."""


def home_database_url(
    home: Path, given: str | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """The database URL of a home: `given`, else ``TRM_DATABASE_URL``, else ``HOME/trm.db``.

    ``TRM_DATABASE_PASSWORD_FILE``, when set, supplies the password of a server
    URL, so that the password can come from a secret file rather than the
    environment (docker/compose.yml).
    """
    env = os.environ if environ is None else environ
    url = given or env.get(ENV_URL)
    if not url:
        return f"sqlite:///{Path(home) / 'trm.db'}"
    password_file = env.get(ENV_PASSWORD_FILE)
    if not password_file:
        return url
    try:
        parsed = sa.make_url(url)
    except ArgumentError as e:
        raise ConfigError(
            f"{ENV_URL} / --database-url is not a database URL: "
            "use e.g. postgresql+psycopg://user@host/db"
        ) from e
    try:
        secret = Path(password_file).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(
            f"cannot read {ENV_PASSWORD_FILE} file {password_file}: {e.strerror}"
        ) from e
    if not secret:
        raise ConfigError(
            f"{ENV_PASSWORD_FILE} file {password_file} is empty: put the password in it"
        )
    return parsed.set(password=secret).render_as_string(hide_password=False)


def open_database(url: str) -> Engine:
    """An engine on `url` whose schema is at the newest migration.

    Safe to call from several processes and any number of times: migrating an
    up-to-date database does nothing.
    """
    try:
        parsed = sa.make_url(url)
    except ArgumentError as e:
        raise StorageError(
            f"{url!r} is not a database URL: set {ENV_URL} to e.g. "
            "sqlite:///path/trm.db or postgresql+psycopg://user@host/db"
        ) from e
    with storage_errors(f"opening the database {parsed.render_as_string()}"):
        engine = _engine(parsed)
        try:
            # Alembic costs a third of a second to import and 25 ms to find
            # nothing to do: a database already at the head skips it.
            if _revision(engine) != HEAD_REVISION:
                migrate(engine)
        except BaseException:
            engine.dispose()
            raise
    return engine


def _revision(engine: Engine) -> str | None:
    """The Alembic revision `engine`'s schema is at; None for a new database.

    Any other failure (the server unreachable, say) is raised, not taken for
    a new database and met again by the migration.
    """
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine: Engine, revision: str = "head") -> None:
    """Run the Alembic migrations on `engine` up to `revision`."""
    from alembic import command

    config = alembic_config()
    # Alembic's migration context is process-global: one migration per process
    # at a time. Other processes are held off by the database's own locks.
    with _MIGRATING, storage_errors("migrating the database"), engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def alembic_config() -> Config:
    """The Alembic configuration, built in code: no alembic.ini needed."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    return config


def select_in(conn: sa.Connection, statement: sa.Executable, values: Sequence[str]) -> list[Any]:
    """The rows of `statement` for `values`, its expanding ``b_ids``, a chunk at a time."""
    rows: list[Any] = []
    for start in range(0, len(values), IN_CHUNK):
        rows.extend(conn.execute(statement, {"b_ids": list(values[start : start + IN_CHUNK])}))
    return rows


@contextmanager
def storage_errors(action: str) -> Iterator[None]:
    """Translate any SQLAlchemy error raised inside into a StorageError."""
    try:
        yield
    except SQLAlchemyError as e:
        # The driver's own first line names the problem; SQL parameters are
        # hidden by the engine so no stored value reaches the message.
        cause = str(getattr(e, "orig", None) or e).strip().splitlines()
        first = cause[0] if cause else type(e).__name__
        raise StorageError(f"{action} failed: {first}") from e


@contextmanager
def reading(engine: Engine) -> Iterator[sa.Connection]:
    """A connection for reads only: on SQLite it takes no write lock."""
    with engine.connect() as conn:
        yield conn.execution_options(**{_READ_ONLY: True})


def _engine(url: sa.URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    if url.get_backend_name() == "postgresql":
        if url.get_driver_name() not in ("psycopg", ""):
            raise StorageError(
                f"PostgreSQL driver {url.get_driver_name()!r} is not supported: "
                "use a postgresql+psycopg:// URL"
            )
        return sa.create_engine(
            url.set(drivername="postgresql+psycopg"), hide_parameters=True, pool_pre_ping=True
        )
    raise StorageError(
        f"database backend {url.get_backend_name()!r} is not supported: "
        "use sqlite:///path/trm.db or postgresql+psycopg://..."
    )


def _sqlite_engine(url: sa.URL) -> Engine:
    if url.database and url.database != ":memory:":
        path = Path(url.database)
        if not path.parent.is_dir():
            raise StorageError(f"the folder of the database {path} does not exist: create it")
        # Create the file private before SQLite does; its -wal and -shm files
        # inherit this mode.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    engine = sa.create_engine(url, hide_parameters=True)

    @sa.event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        # Take the write lock up front: a read-then-write transaction (the
        # sequence counter, the inbox check) then waits for another process
        # instead of failing when it tries to upgrade its lock. Readers that
        # say so read a snapshot without the lock.
        if conn.get_execution_options().get(_READ_ONLY):
            conn.exec_driver_sql("BEGIN")
        else:
            _begin_immediate(conn)

    return engine


def _begin_immediate(conn: sa.Connection) -> None:
    """BEGIN IMMEDIATE, tried again every millisecond while another writer holds the lock.

    SQLite's own busy handler sleeps up to 100 ms between tries, so a writer
    waiting beside a steady stream of short transactions (one `trm send` per
    message) can lose the lock many times running: the relay marking a window
    sent waited up to 0.7 s at 240 sends a second. Trying every millisecond
    keeps the wait close to the other transactions' own length. After
    `BUSY_TIMEOUT_MS`, or on any other error, a last try through SQLAlchemy
    raises the error in SQLAlchemy's form, as every other statement does.
    """
    raw: Any = conn.connection.driver_connection
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    raw.execute("PRAGMA busy_timeout = 0")
    try:
        while time.monotonic() < deadline:
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if not _busy(e):
                    break
            time.sleep(_LOCK_RETRY_SECONDS)
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    finally:
        raw.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


def _busy(error: sqlite3.OperationalError) -> bool:
    return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
