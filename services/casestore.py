"""Where the routing service keeps its view of the cases: states, anomalies, reminders.

Four tables beside the audit log, in the same database, written in the same
transaction as the log entry that caused the change:

- ``cases``: one row per case, its current stage and its `CaseState` as JSON
  but for the entries (`CaseState.summary_dict`: header metadata only; the
  routing service never sees a payload, so there is no personal data to
  store). It holds nothing that grows with the case: the receipts still
  owed follow from the entries;
- ``case_entries``: the entries of each case, one row each in arrival order,
  only ever appended, so that storing a case costs the same at any length;
- ``anomalies``: every impossible or out-of-order event, with its reason;
- ``reminders``: the key of every reminder sent, so that a deadline gets one
  reminder per status however often it is polled and across restarts.

Everything here can be rebuilt from the audit log (`trm audit replay`); the
tables exist so the service and `trm cases` need not replay it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from broker.database import (
    CASE,
    ENVELOPE_ID,
    PARTICIPANT,
    REASON,
    UTCDateTime,
    metadata,
    select_in,
    storage_errors,
)
from broker.errors import CaseStateInvalid, StorageError
from services.cases import Anomaly, CaseState, Stage, entry_to_dict
from services.deadlines import Reminder, ReminderKey

STAGE = 32
STATUS = 16

cases_table = sa.Table(
    "cases",
    metadata,
    sa.Column("case_ref", sa.String(CASE), primary_key=True),
    sa.Column("stage", sa.String(STAGE), nullable=True, index=True),
    sa.Column("state", sa.JSON(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False, server_default="0"),
)
"""Each case's current stage and header-derived state but its entries (`CaseState.summary_dict`).

`version` grows by one with every write, so that a process holding a state
in memory can tell with one small read whether it is still the stored one.
"""

case_entries_table = sa.Table(
    "case_entries",
    metadata,
    sa.Column("case_ref", sa.String(CASE), primary_key=True),
    sa.Column("position", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("entry", sa.JSON(), nullable=False),
)
"""Entry `position` (0, 1, ...) of each case, as `entry_to_dict` writes it."""

anomalies_table = sa.Table(
    "anomalies",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("case_ref", sa.String(CASE), nullable=False, index=True),
    sa.Column("envelope_id", sa.String(ENVELOPE_ID), nullable=False),
    sa.Column("reason", sa.String(REASON), nullable=False),
    sa.Column("detail", sa.Text(), nullable=False),
    sa.Column("recorded_at", UTCDateTime(), nullable=False),
)
"""Events that did not fit their case, kept with the reason (they are never dropped)."""

reminders_table = sa.Table(
    "reminders",
    metadata,
    sa.Column("key", sa.Text(), primary_key=True),
    sa.Column("case_ref", sa.String(CASE), nullable=False, index=True),
    sa.Column("stage", sa.String(STAGE), nullable=False),
    sa.Column("owed_by", sa.String(PARTICIPANT), nullable=True),
    sa.Column("status", sa.String(STATUS), nullable=False),
    sa.Column("due", UTCDateTime(), nullable=False),
    sa.Column("sent_at", UTCDateTime(), nullable=False),
    sa.Column("envelope_id", sa.String(ENVELOPE_ID), nullable=True),
)
"""One row per reminder sent; `envelope_id` is None when no participant could be named."""


CACHED_CASES = 10_000
"""Case states the routing service keeps in memory (`CaseCache`)."""
_c = cases_table.c
_LOAD_MANY = sa.select(_c.case_ref, _c.version, _c.state).where(
    _c.case_ref.in_(sa.bindparam("b_ids", expanding=True))
)
_VERSIONS = sa.select(_c.case_ref, _c.version).where(
    _c.case_ref.in_(sa.bindparam("b_ids", expanding=True))
)
_e = case_entries_table.c
_ENTRIES_OF = (
    sa.select(_e.case_ref, _e.position, _e.entry)
    .where(_e.case_ref.in_(sa.bindparam("b_ids", expanding=True)))
    .order_by(_e.case_ref, _e.position)
)
_ADD_ENTRIES = case_entries_table.insert()
_ADD_ANOMALY = anomalies_table.insert()
_UPDATE_AT = (
    cases_table.update()
    .where(_c.case_ref == sa.bindparam("ref"), _c.version == sa.bindparam("old_version"))
    .values(
        stage=sa.bindparam("new_stage"),
        state=sa.bindparam("new_state", type_=sa.JSON()),
        updated_at=sa.bindparam("new_updated_at", type_=UTCDateTime()),
        version=sa.bindparam("new_version"),
    )
)
_INSERT = cases_table.insert()


def key_text(key: ReminderKey) -> str:
    """The stored form of a reminder key: its parts joined by ``|`` (no part contains one)."""
    return "|".join(key)


@dataclass(frozen=True)
class AnomalyRecord:
    """A stored anomaly."""

    case: str
    envelope_id: str
    reason: str
    detail: str
    recorded_at: datetime


@dataclass(frozen=True)
class ReminderRecord:
    """A stored reminder: which deadline, its status when sent, and the envelope sent."""

    key: str
    case: str
    stage: str
    owed_by: str | None
    status: str
    due: datetime
    sent_at: datetime
    envelope_id: str | None


@dataclass(frozen=True)
class CaseWrite:
    """One case to store: its new state, the version it was read at, and its entries stored."""

    state: CaseState
    version: int | None
    """None for a case not stored yet."""
    stored: int
    """How many of the state's entries are stored (it only grows by appending)."""


class CaseCache:
    """The newest case states this process stored or read, with their versions.

    A case's state holds every entry of the case, so parsing it costs in
    proportion to the case's size. The routing service keeps the states it
    last wrote and re-reads one only when the stored version has moved (some
    other process wrote it). Only committed states enter the cache.
    """

    def __init__(self, size: int = CACHED_CASES) -> None:
        """Keep at most `size` cases, the least recently used leaving first."""
        self.size = size
        self._states: OrderedDict[str, tuple[int, CaseState]] = OrderedDict()

    def get(self, case: str, version: int) -> CaseState | None:
        """The cached state of `case` if it is at `version`, else None."""
        found = self._states.get(case)
        if found is None or found[0] != version:
            return None
        self._states.move_to_end(case)
        return found[1]

    def keep(self, states: dict[str, tuple[int, CaseState]]) -> None:
        """Remember committed `states` (case -> (version, state))."""
        for case, item in states.items():
            self._states[case] = item
            self._states.move_to_end(case)
        while len(self._states) > self.size:
            self._states.popitem(last=False)


class CaseBatch:
    """The cases one transaction touches: each read at most once and written once, at the end.

    A batch of envelopes on a few busy cases pays for reading and writing
    each case's state once instead of once per envelope; with a `CaseCache`
    a case this process wrote last is not even parsed again. `read` takes
    the whole batch's cases in three queries, and the anomalies found wait for
    `save`, which inserts them at once.
    """

    def __init__(self, conn: Connection, cache: CaseCache | None = None) -> None:
        """Read and write through `conn`, inside its transaction."""
        self._conn = conn
        self._cache = cache
        self._states: dict[str, tuple[int | None, CaseState | None]] = {}
        self._changed: set[str] = set()
        self._written: dict[str, tuple[int, CaseState]] = {}
        self._anomalies: list[dict[str, object]] = []
        self._stored: dict[str, int] = {}
        """How many entries of each case read are stored: `save` appends the rest."""

    def read(self, cases: Iterable[str]) -> None:
        """Read every case of `cases` not read yet: their versions, then the states not cached."""
        wanted = sorted(set(cases) - self._states.keys())
        if not wanted:
            return
        with storage_errors("reading cases"):
            rows = select_in(self._conn, _VERSIONS, wanted)
        versions: dict[str, int] = {row.case_ref: row.version for row in rows}
        stale = []
        for case in wanted:
            version = versions.get(case)
            cached = None
            if version is not None and self._cache is not None:
                cached = self._cache.get(case, version)
            self._states[case] = (version, cached)
            if version is not None and cached is None:
                stale.append(case)
        self._states.update(CaseStore.load_many(self._conn, stale))
        for case in wanted:
            state = self._states[case][1]
            self._stored[case] = 0 if state is None else len(state.entries)

    def get(self, case: str) -> CaseState | None:
        """The state of `case` as this batch left it (stored state the first time), or None."""
        if case not in self._states:
            self.read([case])
        return self._states[case][1]

    def put(self, state: CaseState) -> None:
        """Make `state` its case's current state; stored by `save`.

        A state only grows by entries appended, so what was stored is a prefix.
        """
        self.read([state.case])
        self._states[state.case] = (self._states[state.case][0], state)
        self._changed.add(state.case)

    def add_anomaly(self, case: str, anomaly: Anomaly, recorded_at: datetime) -> None:
        """Record that `anomaly` was found on `case` at `recorded_at`; stored by `save`."""
        self._anomalies.append(_anomaly_row(case, anomaly, recorded_at))

    def save(self) -> None:
        """Store every case this batch changed and every anomaly it found."""
        writes = []
        for case in sorted(self._changed):
            version, state = self._states[case]
            if state is not None:
                writes.append(CaseWrite(state, version, self._stored[case]))
        for write, version in zip(writes, CaseStore.save_all(self._conn, writes), strict=True):
            self._states[write.state.case] = (version, write.state)
            self._written[write.state.case] = (version, write.state)
            self._stored[write.state.case] = len(write.state.entries)
        self._changed.clear()
        if self._anomalies:
            with storage_errors("recording anomalies"):
                self._conn.execute(_ADD_ANOMALY, self._anomalies)
            self._anomalies.clear()

    def committed(self) -> None:
        """Tell the batch its transaction committed: the states it wrote join the cache."""
        if self._cache is not None:
            self._cache.keep(self._written)


def _columns(state: CaseState) -> dict[str, Any]:
    """The cases row of `state` but its key and version."""
    return {
        "stage": None if state.stage is None else str(state.stage),
        "state": state.summary_dict(),
        "updated_at": state.updated_at,
    }


def _new_entries(write: CaseWrite) -> list[dict[str, Any]]:
    """The case_entries rows of the write's entries not stored yet."""
    state, stored = write.state, write.stored
    if not 0 <= stored <= len(state.entries):
        raise ValueError(f"{stored} entries stored, but case {state.case} has {len(state.entries)}")
    return [
        {"case_ref": state.case, "position": position, "entry": entry_to_dict(entry)}
        for position, entry in enumerate(state.entries[stored:], start=stored)
    ]


def _entries_of(conn: Connection, cases: list[str]) -> dict[str, list[Any]]:
    """The stored entries of each case of `cases`, in order; CaseStateInvalid if one is missing."""
    found: dict[str, list[Any]] = {}
    with storage_errors("reading case entries"):
        rows = select_in(conn, _ENTRIES_OF, cases)
    for ref, position, entry in rows:
        entries = found.setdefault(ref, [])
        if position != len(entries):
            raise CaseStateInvalid(
                f"case {ref} has no stored entry {len(entries)}; rebuild it from the "
                "audit log with `trm audit replay`"
            )
        entries.append(entry)
    return found


def _anomaly_row(case: str, anomaly: Anomaly, recorded_at: datetime) -> dict[str, object]:
    return {
        "case_ref": case,
        "envelope_id": anomaly.envelope_id,
        "reason": str(anomaly.reason),
        "detail": anomaly.detail,
        "recorded_at": recorded_at,
    }


class CaseStore:
    """The case tables of one (already migrated) database."""

    def __init__(self, engine: Engine) -> None:
        """Use the database behind `engine`."""
        self.engine = engine

    # -- inside the caller's transaction ---------------------------------------------

    @staticmethod
    def load(conn: Connection, case: str) -> CaseState | None:
        """The stored state of `case`, or None if it was never seen."""
        stored = CaseStore.load_many(conn, [case]).get(case)
        return None if stored is None else stored[1]

    @staticmethod
    def load_many(conn: Connection, cases: list[str]) -> dict[str, tuple[int, CaseState]]:
        """The stored version and state of each case of `cases` that was ever seen."""
        with storage_errors("reading cases"):
            rows = select_in(conn, _LOAD_MANY, cases)
        entries = _entries_of(conn, [row.case_ref for row in rows])
        return {
            row.case_ref: (
                row.version,
                CaseState.from_summary(row.state, entries.get(row.case_ref, [])),
            )
            for row in rows
        }

    @staticmethod
    def save(conn: Connection, state: CaseState, stored: int) -> int:
        """Store `state` with `stored` of its entries stored already; its new version."""
        with storage_errors(f"reading case {state.case}"):
            found = select_in(conn, _VERSIONS, [state.case])
        version = int(found[0].version) if found else None
        [saved] = CaseStore.save_all(conn, [CaseWrite(state, version, stored)])
        return saved

    @staticmethod
    def save_all(conn: Connection, writes: Sequence[CaseWrite]) -> list[int]:
        """Store every write, one statement per table for all of them; their new versions.

        A case is updated only where its version is still the one it was read
        at (the routing service holds the write lock, so it is); one that
        moved meanwhile fails the transaction (StorageError).
        """
        updates: list[dict[str, Any]] = []
        inserts: list[dict[str, Any]] = []
        entries: list[dict[str, Any]] = []
        for write in writes:
            columns = _columns(write.state)
            if write.version is None:
                inserts.append({"case_ref": write.state.case, **columns, "version": 1})
            else:
                new = {f"new_{name}": value for name, value in columns.items()}
                keys = {"ref": write.state.case, "old_version": write.version}
                updates.append({**keys, **new, "new_version": write.version + 1})
            entries += _new_entries(write)
        with storage_errors("storing cases"):
            updated = conn.execute(_UPDATE_AT, updates).rowcount if updates else 0
            if updated != len(updates):
                raise StorageError(
                    f"{len(updates) - updated} of this batch's cases were written by another "
                    "process meanwhile; the batch is rolled back and will be applied again"
                )
            for rows, statement in ((inserts, _INSERT), (entries, _ADD_ENTRIES)):
                if rows:
                    conn.execute(statement, rows)
        return [1 if w.version is None else w.version + 1 for w in writes]

    @staticmethod
    def add_anomaly(conn: Connection, case: str, anomaly: Anomaly, recorded_at: datetime) -> None:
        """Record that `anomaly` was found on `case` at `recorded_at`."""
        with storage_errors(f"recording an anomaly on case {case}"):
            conn.execute(_ADD_ANOMALY, _anomaly_row(case, anomaly, recorded_at))

    @staticmethod
    def reminder_sent(conn: Connection, key: ReminderKey) -> bool:
        """Whether the reminder with `key` was already recorded."""
        with storage_errors("reading reminders"):
            found = conn.execute(
                sa.select(reminders_table.c.key).where(reminders_table.c.key == key_text(key))
            ).first()
        return found is not None

    @staticmethod
    def record_reminder(
        conn: Connection, reminder: Reminder, *, sent_at: datetime, envelope_id: str | None
    ) -> None:
        """Record `reminder` as sent; its envelope, if any, joins the outbox in this transaction."""
        deadline = reminder.deadline
        with storage_errors(f"recording a reminder on case {deadline.case}"):
            conn.execute(
                reminders_table.insert().values(
                    key=key_text(reminder.key),
                    case_ref=deadline.case,
                    stage=str(deadline.stage),
                    owed_by=deadline.owed_by,
                    status=str(reminder.status),
                    due=deadline.due,
                    sent_at=sent_at,
                    envelope_id=envelope_id,
                )
            )

    # -- reading, each on its own connection -------------------------------------------

    def get(self, case: str) -> CaseState | None:
        """The stored state of `case`, or None."""
        with storage_errors(f"reading case {case}"), self.engine.connect() as conn:
            return self.load(conn, case)

    def states(self, stages: Iterable[Stage] | None = None) -> list[CaseState]:
        """Every stored case (only those at one of `stages`, if given), by case reference."""
        query = sa.select(cases_table.c.case_ref).order_by(cases_table.c.case_ref)
        if stages is not None:
            query = query.where(cases_table.c.stage.in_([str(s) for s in stages]))
        with storage_errors("reading cases"), self.engine.connect() as conn:
            refs = list(conn.execute(query).scalars())
            found = self.load_many(conn, refs)
        return [found[ref][1] for ref in refs]

    def all_states(self) -> dict[str, CaseState]:
        """Every stored case's state, keyed by case reference."""
        return {state.case: state for state in self.states()}

    def anomalies(self, case: str | None = None) -> list[AnomalyRecord]:
        """Stored anomalies (of `case`, if given) in the order they were recorded."""
        t = anomalies_table.c
        query = sa.select(anomalies_table).order_by(t.id)
        if case is not None:
            query = query.where(t.case_ref == case)
        with storage_errors("reading anomalies"), self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            AnomalyRecord(r.case_ref, r.envelope_id, r.reason, r.detail, r.recorded_at)
            for r in rows
        ]

    def reminders(self, case: str | None = None) -> list[ReminderRecord]:
        """Stored reminders (of `case`, if given), oldest first."""
        t = reminders_table.c
        query = sa.select(reminders_table).order_by(t.sent_at, t.key)
        if case is not None:
            query = query.where(t.case_ref == case)
        with storage_errors("reading reminders"), self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            ReminderRecord(
                r.key, r.case_ref, r.stage, r.owed_by, r.status, r.due, r.sent_at, r.envelope_id
            )
            for r in rows
        ]

    def sent_keys(self) -> set[str]:
        """The stored keys (`key_text`) of every reminder sent."""
        with storage_errors("reading reminders"), self.engine.connect() as conn:
            return set(conn.execute(sa.select(reminders_table.c.key)).scalars())
