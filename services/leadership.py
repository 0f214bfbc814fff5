"""Which of several routing processes on one database leads; the others stand by.

Only the leader consumes ``trm.routing``, appends to the log, relays, polls
deadlines, checkpoints, collects cosignatures and answers proof requests; a
standby does none of these and holds no delivery, so the broker keeps every
waiting envelope for whoever leads.

On PostgreSQL the leader holds a session-level advisory lock on a connection
of its own for as long as it runs. A lease row would need a lease length, a
renewal thread and clocks that agree, and a leader that stalls past its lease
would keep appending beside its successor; the advisory lock needs none of
that, and the server drops it the moment the leader's session ends, SIGKILL
included, so a standby polling for it takes over within one poll. Should the
leader lose the lock's connection it steps down at once (the process exits
with an error, for its supervisor to restart it as a standby). Appends stay
serialised by a transaction-level lock and the log index is the table's
primary key, so even two processes believing they lead could not fork it.

SQLite lives on one machine: a standby there protects against nothing a
supervisor's restart does not, so a second routing process on the same file
refuses to start (an exclusive ``flock`` on ``<database>.routing-lock``,
dropped by the kernel when the holder dies).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from broker.database import storage_errors
from broker.errors import ConfigError, StorageError

log = structlog.get_logger(__name__)

LEADER_LOCK = 0x74726D4C
"""The advisory lock key the leader holds ("trmL"); appends use another ("trmR")."""
STANDBY_POLL = 1.0
"""Seconds between a standby's attempts to take the lock, and the leader's checks of it."""
LEADER_EVENT = "routing.leader"
STANDBY_EVENT = "routing.standby"

_TRY = sa.select(sa.func.pg_try_advisory_lock(LEADER_LOCK))
_UNLOCK = sa.select(sa.func.pg_advisory_unlock(LEADER_LOCK))
_APPLICATION = "trm routing"
_SET_NAME = sa.select(sa.func.set_config("application_name", sa.bindparam("name"), False))
_MEMBERS = sa.text(
    "SELECT application_name FROM pg_stat_activity "
    "WHERE datname = current_database() AND application_name LIKE 'trm routing %'"
)
_HOLDER = sa.text(
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
    "AND classid = 0 AND objid = :key AND objsubid = 1 AND database = "
    "(SELECT oid FROM pg_database WHERE datname = current_database())"
)


class Leadership:
    """The right to lead the routing service on one database, held for the process's life."""

    def __init__(self, engine: Engine, *, poll: float = STANDBY_POLL) -> None:
        """Leadership over `engine`'s database; `poll` is the standby's and watchdog's period."""
        self.engine = engine
        self.poll = poll
        self._conn: Connection | None = None
        self._file: IO[bytes] | None = None
        self.leading = False

    def acquire(self, stop: threading.Event) -> bool:
        """Wait until this process leads (True) or `stop` is set first (False).

        Logs ``routing.standby`` once while another process leads and
        ``routing.leader`` once it takes over. On SQLite, raises ConfigError if
        another process holds the database.
        """
        if self.engine.dialect.name != "postgresql":
            self._lock_file()
            self._lead()
            return True
        announced = False
        while not stop.is_set():
            if self._try_lock():
                self._lead()
                return True
            if not announced:
                log.info(STANDBY_EVENT, leader_backend_pid=self._holder(), poll_seconds=self.poll)
                announced = True
            stop.wait(self.poll)
        return False

    def watch(self, stop: threading.Event) -> None:
        """Until `stop`, check every poll that the lock's session lives; StorageError if not."""
        while not stop.wait(self.poll):
            self.check()

    def check(self) -> None:
        """Raise StorageError if this leader's lock connection is gone (the lock with it)."""
        conn = self._conn
        if conn is None:
            return
        try:
            with storage_errors("checking the routing leader's lock"):
                conn.execute(sa.select(1))
        except StorageError as e:
            self.leading = False
            raise StorageError(f"lost the routing leader's lock; stepping down ({e})") from e

    def release(self) -> None:
        """Give up leadership (a standby then takes over); safe to call more than once."""
        self.leading = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                conn.execute(_UNLOCK)
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                conn.close()
        handle, self._file = self._file, None
        if handle is not None:
            handle.close()

    def _lead(self) -> None:
        self.leading = True
        log.info(LEADER_EVENT, pid=os.getpid())

    def _try_lock(self) -> bool:
        """One attempt at the lock; a database outage counts as not yet (and is logged)."""
        try:
            with storage_errors("taking the routing leader's lock"):
                if self._conn is None:
                    self._conn = self.engine.connect().execution_options(
                        isolation_level="AUTOCOMMIT"
                    )
                    _name(self._conn, "standby")
                if bool(self._conn.execute(_TRY).scalar()):
                    _name(self._conn, "leader")
                    return True
        except StorageError as e:
            log.error("routing standby cannot reach the database; will retry", error=str(e))
            self.release()
        return False

    def _holder(self) -> int | None:
        conn = self._conn
        if conn is None:
            return None
        try:
            with storage_errors("reading the routing leader's lock"):
                found = conn.execute(_HOLDER, {"key": LEADER_LOCK}).scalar()
        except StorageError:
            return None
        return None if found is None else int(found)

    def _lock_file(self) -> None:
        path = _lock_path(self.engine)
        if path is None:
            return
        database = self.engine.url.database
        handle = path.open("a+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().decode("ascii", "replace").strip() or "unknown"
            handle.close()
            raise ConfigError(
                f"another routing service (pid {holder}) already runs on {database}; "
                "a standby routing service needs PostgreSQL (--database-url postgresql+psycopg://...)"
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()).encode("ascii"))
        handle.flush()
        self._file = handle


@dataclass(frozen=True)
class Member:
    """A routing process seen on the database: its role and its operating-system pid."""

    role: str
    """``leader`` or ``standby``."""
    pid: int


def members(engine: Engine) -> list[Member]:
    """The routing processes running on `engine`'s database now, the leader first.

    On PostgreSQL, from the sessions the processes name ``trm routing ROLE PID``;
    on SQLite, the holder of the database's routing lock file, if any.
    """
    if engine.dialect.name != "postgresql":
        pid = _sqlite_holder(engine)
        return [] if pid is None else [Member("leader", pid)]
    with storage_errors("listing the routing processes"), engine.connect() as conn:
        names = conn.execute(_MEMBERS).scalars().all()
    found = []
    for name in names:
        _, _, role, pid = name.split(" ")
        if pid.isdigit() and role in ("leader", "standby"):
            found.append(Member(role, int(pid)))
    return sorted(found, key=lambda m: (m.role != "leader", m.pid))


def _name(conn: Connection, role: str) -> None:
    """Name the lock's session so that `members` (and pg_stat_activity) tell the roles apart."""
    conn.execute(_SET_NAME, {"name": f"{_APPLICATION} {role} {os.getpid()}"})


def _lock_path(engine: Engine) -> Path | None:
    database = engine.url.database
    if not database or database == ":memory:":
        return None  # a private in-memory database: nobody else can open it
    return Path(f"{database}.routing-lock")


def _sqlite_holder(engine: Engine) -> int | None:
    path = _lock_path(engine)
    if path is None or not path.exists():
        return None
    with path.open("rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = handle.read().decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def leader_pid(engine: Engine) -> int | None:
    """The server process id of the session leading routing on `engine` (PostgreSQL), if any."""
    if engine.dialect.name != "postgresql":
        return None
    with storage_errors("reading the routing leader's lock"), engine.connect() as conn:
        found = conn.execute(_HOLDER, {"key": LEADER_LOCK}).scalar()
    return None if found is None else int(found)
