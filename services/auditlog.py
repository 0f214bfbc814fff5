"""The routing service's append-only audit log: append, checkpoint, proofs, export.

Every envelope the routing service receives becomes one entry, in arrival
order: the envelope bytes exactly as received, the receive time, the
verification result and the leaf hash of the previous entry. The leaf hashes
form an RFC 9162 Merkle tree (`services.merkle`); the routing service signs
checkpoints of it (`services.checkpoint`). The entry encoding and the export
format are specified in ``docs/audit.md``; `services.audit` is the auditor's
side that checks an export offline.

The log keeps an in-memory tree of the leaf hashes, filled once from the table
and then only with rows committed since, so appends never re-read the table
and proofs cost O(log n).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from broker.database import ENVELOPE_ID, UTCDateTime, metadata, storage_errors
from broker.envelope import read_header
from broker.errors import AuditError, TrmError
from services.checkpoint import Checkpoint, claimed_origin, sign_checkpoint
from services.merkle import EMPTY_ROOT, MerkleTree, leaf_hash

if TYPE_CHECKING:
    from broker.directory import Directory
    from broker.keys import Sender

log = structlog.get_logger(__name__)

HASH_BYTES = 32
ZERO_HASH = bytes(HASH_BYTES)
"""The `prev` of entry 0."""

ENTRY_CONTEXT = b"trm/v1 audit entry\x00"
"""Prefix of every leaf input, so an entry's hash can never collide with another format's."""

VERIFIED = "ok"
REJECTED = "rejected:"
VERIFICATION = re.compile(r"ok|rejected:[a-z][a-z0-9_]{0,62}")
"""``ok``, or ``rejected:<reason>`` with the `TrmError.reason` of the failed check."""

TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
"""Receive times: RFC 3339, UTC, always exactly six fractional digits."""

EXPORT_TYPE = "trm-audit-export"
EXPORT_VERSION = 1

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
# Serialises appenders on PostgreSQL ("trmA"); SQLite's BEGIN IMMEDIATE already does.
_PG_APPEND_LOCK = 0x74726D41
_EXPORT_BATCH = 1000

log_entries_table = sa.Table(
    "log_entries",
    metadata,
    sa.Column("idx", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("envelope_id", sa.String(ENVELOPE_ID), nullable=True),
    sa.Column("received_at", UTCDateTime(), nullable=False),
    sa.Column("verification", sa.String(80), nullable=False),
    sa.Column("prev_hash", sa.LargeBinary(HASH_BYTES), nullable=False),
    sa.Column("leaf_hash", sa.LargeBinary(HASH_BYTES), nullable=False),
    sa.Column("body", sa.LargeBinary(), nullable=False),
    sa.Column("body_sha256", sa.LargeBinary(HASH_BYTES), nullable=False, index=True),
    sa.Index("ix_log_entries_envelope_id_verification", "envelope_id", "verification"),
)
"""One row per envelope received, in arrival order; `body` is the sealed envelope.

`body_sha256` lets the routing service tell a redelivery from another envelope
under the same id by digest, never reading back an earlier body; the index on
(envelope_id, verification) finds the verified entry of an id among any number
of refused ones.
"""

log_checkpoints_table = sa.Table(
    "log_checkpoints",
    metadata,
    sa.Column("size", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("root", sa.LargeBinary(HASH_BYTES), nullable=False),
    sa.Column("time", UTCDateTime(), nullable=False),
    sa.Column("key_name", sa.String(160), nullable=False),
    sa.Column("note", sa.Text(), nullable=False),
)
"""Every checkpoint the routing service signed, as the exact signed-note text."""


# --- the entry encoding ---------------------------------------------------------------


def format_time(moment: datetime) -> str:
    """A receive time as stored in entries: ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise AuditError("a receive time must be timezone-aware (UTC)")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """The datetime of a `format_time` string; AuditError on any other form."""
    if not TIME.fullmatch(text):
        raise AuditError(f"{text!r} is not an RFC 3339 UTC time with six fractional digits")
    try:
        return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)
    except ValueError as e:
        raise AuditError(f"{text!r} is not a real date and time") from e


def check_verification(value: str) -> None:
    """Raise AuditError unless `value` is ``ok`` or ``rejected:<reason>``."""
    if not VERIFICATION.fullmatch(value):
        raise AuditError(f"verification {value!r} is neither 'ok' nor 'rejected:<reason>'")


def key_name_for(log_key: str, kid: str) -> str:
    """The signed-note key name of checkpoints: ``<routing participant id>/<key id>``."""
    return f"{log_key}/{kid}"


@dataclass(frozen=True)
class LogEntry:
    """One entry of the log, as stored and exported."""

    index: int
    received_at: str
    """`format_time` of the routing service's receive time."""
    verification: str
    prev: bytes
    """The leaf hash of the previous entry (`ZERO_HASH` for entry 0)."""
    envelope: bytes
    """The envelope bytes exactly as received."""

    def leaf_input(self) -> bytes:
        """The unambiguous byte string whose RFC 9162 leaf hash is this entry's hash.

        ``ENTRY_CONTEXT || u64 index || u16 len || received_at || u16 len ||
        verification || prev (32) || u32 len || envelope``, big-endian.
        """
        when = self.received_at.encode("ascii")
        verdict = self.verification.encode("ascii")
        return b"".join(
            (
                ENTRY_CONTEXT,
                _U64.pack(self.index),
                _U16.pack(len(when)),
                when,
                _U16.pack(len(verdict)),
                verdict,
                self.prev,
                _U32.pack(len(self.envelope)),
                self.envelope,
            )
        )

    def leaf_hash(self) -> bytes:
        """SHA-256(0x00 || leaf input)."""
        return leaf_hash(self.leaf_input())

    def to_json(self) -> dict[str, Any]:
        """The export line of this entry."""
        return {
            "type": "entry",
            "index": self.index,
            "received_at": self.received_at,
            "verification": self.verification,
            "prev": self.prev.hex(),
            "envelope": base64.b64encode(self.envelope).decode("ascii"),
        }


@dataclass(frozen=True)
class ExportSummary:
    """What an export holds."""

    entries: int
    checkpoints: int
    root: str
    """Hex Merkle root of all exported entries (that of the last checkpoint)."""
    origin: str


_APPEND_LOCK = sa.select(sa.func.pg_advisory_xact_lock(_PG_APPEND_LOCK))
_NEWEST_NOTE = (
    sa.select(log_checkpoints_table.c.note).order_by(log_checkpoints_table.c.size.desc()).limit(1)
)
_TAIL = (
    sa.select(log_entries_table.c.idx, log_entries_table.c.leaf_hash)
    .order_by(log_entries_table.c.idx.desc())
    .limit(1)
)


class Appender:
    """Entries appended in one transaction: numbered and chained at once, inserted together.

    Indices and `prev` links are computed here from the log's tail, read
    once under the append lock (`AuditLog.appender`); `flush` writes every
    pending row with one multi-row insert before the caller commits.
    """

    def __init__(self, conn: Connection, index: int, prev: bytes) -> None:
        """Continue the log after the entry `index - 1`, whose leaf hash is `prev`."""
        self._conn = conn
        self._index = index
        self._prev = prev
        self._rows: list[dict[str, Any]] = []

    def append(
        self,
        raw: bytes,
        *,
        received_at: datetime,
        verification: str,
        envelope_id: str | None = None,
        sha256: bytes | None = None,
    ) -> int:
        """Number and chain one entry; it is written by the next `flush`.

        `envelope_id` and `sha256` are the header's id (None if the bytes do
        not frame) and the SHA-256 of `raw`, as a caller that already parsed
        the envelope knows them; without `sha256` both are read here.
        """
        check_verification(verification)
        if not isinstance(raw, bytes):
            raise AuditError(f"an envelope must be bytes, not {type(raw).__name__}")
        if sha256 is None:
            envelope_id, sha256 = _envelope_id(raw), hashlib.sha256(raw).digest()
        when = format_time(received_at)
        entry = LogEntry(self._index, when, verification, self._prev, raw)
        leaf = entry.leaf_hash()
        self._rows.append(
            {
                "idx": self._index,
                "envelope_id": envelope_id,
                "received_at": parse_time(when),
                "verification": verification,
                "prev_hash": self._prev,
                "leaf_hash": leaf,
                "body": raw,
                "body_sha256": sha256,
            }
        )
        self._index, self._prev = self._index + 1, leaf
        return entry.index

    def flush(self) -> None:
        """Insert every entry appended since the last flush."""
        if not self._rows:
            return
        with storage_errors("appending to the audit log"):
            self._conn.execute(log_entries_table.insert(), self._rows)
        self._rows = []


# --- the log ---------------------------------------------------------------------------


class AuditLog:
    """The routing service's append-only log in the shared database."""

    def __init__(self, engine: Engine, *, origin: str, signer: Sender | None) -> None:
        """The log on `engine`; `signer` is the routing service's key (None: read-only use)."""
        self.engine = engine
        self.origin = origin
        self.signer = signer
        self._tree = MerkleTree()
        self._tree_lock = threading.Lock()

    @classmethod
    def reader(cls, engine: Engine) -> AuditLog:
        """The log on `engine` to read and prove, holding no key: it signs nothing.

        Its origin is the one its newest checkpoint states; AuditError if the
        routing service has signed none yet, as there is nothing to prove then.
        """
        with storage_errors("reading checkpoints"), engine.connect() as conn:
            note = conn.execute(_NEWEST_NOTE).scalar()
        if note is None:
            raise AuditError(
                "the audit log has no signed checkpoint yet: the routing service signs one "
                "as the log grows, on shutdown and with every export"
            )
        return cls(engine, origin=claimed_origin(note.encode()), signer=None)

    # -- appending ----------------------------------------------------------------------

    def append(
        self, conn: Connection, raw: bytes, *, received_at: datetime, verification: str
    ) -> int:
        """Add one entry inside the caller's transaction and return its index."""
        appender = self.appender(conn)
        index = appender.append(raw, received_at=received_at, verification=verification)
        appender.flush()
        return index

    @staticmethod
    def appender(conn: Connection) -> Appender:
        """An `Appender` for several entries in the caller's transaction (one insert for all).

        Appenders are serialised (a transaction-scoped advisory lock on
        PostgreSQL, SQLite's single writer), so indices have no gaps and each
        entry links to the one committed before it.
        """
        with storage_errors("appending to the audit log"):
            if conn.dialect.name == "postgresql":
                conn.execute(_APPEND_LOCK)
            last = conn.execute(_TAIL).first()
        index, prev = (0, ZERO_HASH) if last is None else (last.idx + 1, bytes(last.leaf_hash))
        return Appender(conn, index, prev)

    # -- reading ------------------------------------------------------------------------

    def size(self) -> int:
        """The number of committed entries."""
        with self._tree_lock:
            return self._synced().size

    def root(self, size: int | None = None) -> bytes:
        """The Merkle root of the first `size` entries (default: all)."""
        with self._tree_lock:
            return self._synced().root(size)

    def leaf(self, index: int) -> bytes:
        """The leaf hash of entry `index`."""
        with self._tree_lock:
            return self._synced().leaf(index)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """The RFC 9162 audit path of entry `index` in the tree of `size` entries."""
        with self._tree_lock:
            tree = self._synced()
            return tree.inclusion_proof(index, tree.size if size is None else size)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """The RFC 9162 proof that the tree of `new_size` entries extends that of `old_size`."""
        with self._tree_lock:
            tree = self._synced()
            return tree.consistency_proof(old_size, tree.size if new_size is None else new_size)

    def find(self, envelope_id: str) -> int | None:
        """The index of the first entry holding envelope `envelope_id`, if any."""
        with storage_errors("searching the audit log"), self.engine.connect() as conn:
            found = conn.execute(
                sa.select(sa.func.min(log_entries_table.c.idx)).where(
                    log_entries_table.c.envelope_id == envelope_id
                )
            ).scalar()
        return None if found is None else int(found)

    def entry(self, index: int) -> LogEntry:
        """Entry `index` as stored; AuditError if there is none."""
        with storage_errors("reading the audit log"), self.engine.connect() as conn:
            row = conn.execute(
                sa.select(log_entries_table).where(log_entries_table.c.idx == index)
            ).first()
        if row is None:
            raise AuditError(f"the audit log has no entry {index}")
        return _entry(row)

    def latest_checkpoint(self) -> tuple[int, datetime, bytes] | None:
        """(size, time, note) of the newest checkpoint, if any."""
        with storage_errors("reading checkpoints"), self.engine.connect() as conn:
            row = conn.execute(
                sa.select(log_checkpoints_table)
                .order_by(log_checkpoints_table.c.size.desc())
                .limit(1)
            ).first()
        return None if row is None else (int(row.size), row.time, row.note.encode())

    def checkpoint_note(self, size: int) -> bytes | None:
        """The signed note of the checkpoint of the first `size` entries, if one was signed."""
        with storage_errors("reading checkpoints"), self.engine.connect() as conn:
            note = conn.execute(
                sa.select(log_checkpoints_table.c.note).where(log_checkpoints_table.c.size == size)
            ).scalar()
        return None if note is None else str(note).encode()

    # -- checkpoints ----------------------------------------------------------------------

    def should_checkpoint(self, *, every_entries: int, every: timedelta, now: datetime) -> bool:
        """Whether the log grew by `every_entries`, or grew and `every` has passed since."""
        size = self.size()
        latest = self.latest_checkpoint()
        signed = 0 if latest is None else latest[0]
        if size <= signed:
            return False
        if size - signed >= every_entries:
            return True
        since = self.entry(0).received_at if latest is None else format_time(latest[1])
        return now - parse_time(since) >= every

    def checkpoint(self, now: datetime | None = None) -> bytes | None:
        """Sign (size, root, time) if the log grew since the last checkpoint; return the note.

        The time is `now`, or the receive time of the newest entry covered
        if that is later (a checkpoint never predates what it covers).
        """
        if self.signer is None:
            raise AuditError("this audit log was opened read-only: pass the routing key to sign")
        with self._tree_lock:
            tree = self._synced()
            size, root = tree.size, tree.root()
        if size == 0:
            return None
        moment = datetime.now(UTC) if now is None else now.astimezone(UTC)
        name = key_name_for(self.signer.participant, self.signer.kid)
        with storage_errors("signing a checkpoint"), self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_APPEND_LOCK)))
            signed = conn.execute(sa.select(sa.func.max(log_checkpoints_table.c.size))).scalar()
            if signed is not None and signed >= size:
                return None
            newest = conn.execute(
                sa.select(log_entries_table.c.received_at).where(
                    log_entries_table.c.idx == size - 1
                )
            ).scalar_one()
            moment = max(moment, newest)
            note = sign_checkpoint(
                Checkpoint(self.origin, size, root, moment), self.signer.key, name
            )
            conn.execute(
                log_checkpoints_table.insert().values(
                    size=size, root=root, time=moment, key_name=name, note=note.decode()
                )
            )
        log.info("audit checkpoint signed", size=size, root=root.hex(), key=name)
        return note

    # -- export ----------------------------------------------------------------------------

    def export(
        self,
        out: IO[bytes] | Path,
        *,
        now: datetime | None = None,
        directory: Directory | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ExportSummary:
        """Write the log as JSON lines (see docs/audit.md), signing a checkpoint first if it grew.

        The export ends at the newest checkpoint, so every exported entry is
        covered by a signature. `directory`, when given, is embedded in the
        header (the signed file, verifiable with the authority's key) so that
        a replay knows the participants' roles. `progress`, if given, is
        called with the entries written and the entries to write, after each
        batch read from the database.
        """
        if self.signer is not None:
            self.checkpoint(now)
        if isinstance(out, Path):
            tmp = out.with_name(f".{out.name}.tmp")
            try:
                with tmp.open("wb") as f:
                    summary = self._write(f, directory, progress)
                tmp.replace(out)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise AuditError(f"cannot write the export {out}: {e.strerror}") from e
            return summary
        return self._write(out, directory, progress)

    def _write(
        self,
        out: IO[bytes],
        directory: Directory | None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ExportSummary:
        with storage_errors("exporting the audit log"), self.engine.connect() as conn:
            checkpoints = list(
                conn.execute(
                    sa.select(
                        log_checkpoints_table.c.size,
                        log_checkpoints_table.c.key_name,
                        log_checkpoints_table.c.note,
                        log_checkpoints_table.c.root,
                    ).order_by(log_checkpoints_table.c.size)
                )
            )
        size = checkpoints[-1].size if checkpoints else 0
        if size == 0 and self.size() > 0:
            raise AuditError(
                "the audit log has no checkpoint yet: export with the routing key "
                "so that one is signed first"
            )
        out.write(_line(self._header(checkpoints, directory)))
        by_size = {int(c.size): c for c in checkpoints}
        for entry in self._entries(size):
            out.write(_line(entry.to_json()))
            done = by_size.get(entry.index + 1)
            if done is not None:
                mark = {"type": "checkpoint", "key_name": done.key_name, "note": done.note}
                out.write(_line(mark))
            if progress is not None and (entry.index + 1) % _EXPORT_BATCH == 0:
                progress(entry.index + 1, size)
        if progress is not None:
            progress(size, size)
        root = bytes(checkpoints[-1].root).hex() if checkpoints else EMPTY_ROOT.hex()
        log.info("audit log exported", entries=size, checkpoints=len(checkpoints))
        return ExportSummary(
            entries=size, checkpoints=len(checkpoints), root=root, origin=self.origin
        )

    def _header(self, checkpoints: list[Any], directory: Directory | None) -> dict[str, Any]:
        if self.signer is not None:
            log_key, key_name = (
                self.signer.participant,
                key_name_for(self.signer.participant, self.signer.kid),
            )
        elif checkpoints:
            key_name = checkpoints[-1].key_name
            log_key = key_name.rsplit("/", 1)[0]
        else:
            key_name, log_key = "", self.origin.rsplit("/", 1)[-1]
        return {
            "type": EXPORT_TYPE,
            "version": EXPORT_VERSION,
            "origin": self.origin,
            "log_key": log_key,
            "key_name": key_name,
            "directory": None
            if directory is None
            else base64.b64encode(directory.raw).decode("ascii"),
        }

    def _entries(self, size: int) -> Iterator[LogEntry]:
        """Entries 0..size-1, a batch per short read (SQLite readers must not hold the lock)."""
        start = 0
        while start < size:
            with storage_errors("exporting the audit log"), self.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(log_entries_table)
                    .where(log_entries_table.c.idx >= start, log_entries_table.c.idx < size)
                    .order_by(log_entries_table.c.idx)
                    .limit(_EXPORT_BATCH)
                ).all()
            if not rows:
                raise AuditError(f"the audit log lacks entry {start} below its checkpoint {size}")
            for row in rows:
                yield _entry(row)
            start = int(row.idx) + 1

    # -- the in-memory tree -----------------------------------------------------------------

    def _synced(self) -> MerkleTree:
        """The tree, extended with the leaf hashes committed since it was last read."""
        with storage_errors("reading the audit log"), self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(log_entries_table.c.idx, log_entries_table.c.leaf_hash)
                .where(log_entries_table.c.idx >= self._tree.size)
                .order_by(log_entries_table.c.idx)
            )
            for row in rows:
                if row.idx != self._tree.size:
                    raise AuditError(
                        f"the audit log table has a gap at entry {self._tree.size}: "
                        "it was altered outside trm"
                    )
                self._tree.append(bytes(row.leaf_hash))
        return self._tree


def _entry(row: Any) -> LogEntry:
    return LogEntry(
        index=int(row.idx),
        received_at=format_time(row.received_at),
        verification=row.verification,
        prev=bytes(row.prev_hash),
        envelope=bytes(row.body),
    )


def _envelope_id(raw: bytes) -> str | None:
    """The header's envelope id if the bytes frame as an envelope (unverified, for lookup)."""
    try:
        return str(read_header(raw).id)
    except TrmError:
        return None


def _line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")
