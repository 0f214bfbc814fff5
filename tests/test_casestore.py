"""The routing service's case tables on SQLite and PostgreSQL: schema, round trips, refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from broker.database import alembic_config, metadata, migrate
from broker.errors import CaseStateInvalid, StorageError
from schemas.base import MessageKind
from services.cases import CaseState, Event, Stage, apply
from services.casestore import (
    CaseBatch,
    CaseCache,
    CaseStore,
    CaseWrite,
    anomalies_table,
    case_entries_table,
    cases_table,
    reminders_table,
)
from services.deadlines import deadline_for, due_reminders

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
ROLES = {"iom-kz": "mission", "iom-uz": "mission"}
MINE = {cases_table.name, case_entries_table.name, anomalies_table.name, reminders_table.name}


def event(
    kind: MessageKind, n: int, sender: str = "iom-kz", recipient: str = "iom-uz", seq: int = 1
) -> Event:
    return Event(
        envelope_id=f"019c0000-0000-7000-8000-{n:012d}",
        kind=kind,
        case="iom-kz.KZ-2026-0001",
        sender=sender,
        recipients=(recipient,),
        sent_at=T0 + timedelta(minutes=n),
        received_at=T0 + timedelta(minutes=n, seconds=1),
        seq=seq,
    )


def test_migration_matches_the_table_definitions(engine: sa.Engine) -> None:
    """Migration 0003 creates exactly the columns, types and indexes casestore declares."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = [d for d in compare_metadata(context, metadata) if _table_name(d) in MINE]
    assert differences == []
    assert set(sa.inspect(engine).get_table_names()) >= MINE


def _table_name(diff: object) -> str | None:
    """The table an Alembic comparison result is about."""
    # Modifications come as a list of tuples (op, schema, table, column, ...);
    # the rest as (op, Table | Index | ...) or (op, schema, table, Column).
    first = diff[0] if isinstance(diff, list) else diff
    assert isinstance(first, tuple)
    if len(first) >= 3 and isinstance(first[2], str):
        return first[2]
    item = first[1]
    table = item if isinstance(item, sa.Table) else getattr(item, "table", None)
    return table.name if isinstance(table, sa.Table) else None


def test_state_round_trips_and_is_replaced(engine: sa.Engine) -> None:
    """A saved state loads back equal; saving the next state replaces it, with its stage."""
    store = CaseStore(engine)
    first, _ = apply(None, event(MessageKind.RETURN_REQUEST, 1), ROLES)
    with engine.begin() as conn:
        store.save(conn, first, 0)
    assert store.get(first.case) == first
    second, anomaly = apply(first, event(MessageKind.RETURN_ACCEPTED, 2, "iom-uz", "iom-kz"), ROLES)
    assert anomaly is None
    with engine.begin() as conn:
        store.save(conn, second, len(first.entries))
    assert store.get(first.case) == second
    assert [s.stage for s in store.states([Stage.ACCEPTED])] == [Stage.ACCEPTED]
    assert store.states([Stage.REQUESTED]) == []
    with engine.connect() as conn:
        assert conn.execute(sa.select(cases_table.c.stage)).scalars().all() == ["accepted"]


def test_anomaly_and_reminder_records(engine: sa.Engine) -> None:
    """Anomalies and reminders are stored and listed; a reminder key cannot be recorded twice."""
    store = CaseStore(engine)
    state, _ = apply(None, event(MessageKind.RETURN_REQUEST, 1), ROLES)
    _, anomaly = apply(state, event(MessageKind.DEPARTED, 2, seq=2), ROLES)
    assert anomaly is not None
    [reminder] = due_reminders([state], T0 + timedelta(days=4), set())
    with engine.begin() as conn:
        store.add_anomaly(conn, state.case, anomaly, T0)
        store.record_reminder(conn, reminder, sent_at=T0, envelope_id=None)
        assert store.reminder_sent(conn, reminder.key)
    [stored] = store.anomalies(state.case)
    assert (stored.reason, stored.envelope_id) == ("out_of_order", anomaly.envelope_id)
    [sent] = store.reminders()
    deadline = deadline_for(state)
    assert deadline is not None and (sent.due, sent.owed_by) == (deadline.due, "iom-uz")
    assert store.sent_keys() == {sent.key}
    with pytest.raises(StorageError), engine.begin() as conn:
        store.record_reminder(conn, reminder, sent_at=T0, envelope_id=None)
    assert len(store.reminders()) == 1


def test_corrupt_stored_state_is_a_clear_error(engine: sa.Engine) -> None:
    """A state row altered outside trm raises CaseStateInvalid pointing at the audit replay."""
    with engine.begin() as conn:
        conn.execute(
            cases_table.insert().values(
                case_ref="iom-kz.KZ-2026-0009",
                stage="requested",
                state={"format": 1},
                updated_at=T0,
            )
        )
    with pytest.raises(CaseStateInvalid, match="trm audit replay"):
        CaseStore(engine).get("iom-kz.KZ-2026-0009")


@contextmanager
def _statements(engine: sa.Engine, verb: str) -> Iterator[list[str]]:
    """The `verb` statements (SELECT, UPDATE, ...) run on `engine` while the block runs."""
    seen: list[str] = []

    def note(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().upper().startswith(verb):
            seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)


def test_batch_reads_its_cases_at_once_and_rereads_only_what_moved(engine: sa.Engine) -> None:
    """Three queries read a batch's cases; a cached state serves until another writer moves it."""
    cache = CaseCache()
    first, _ = apply(None, event(MessageKind.RETURN_REQUEST, 1), ROLES)
    second = "iom-kz.KZ-2026-0002"
    other, _ = apply(None, replace(event(MessageKind.RETURN_REQUEST, 1), case=second), ROLES)
    with engine.begin() as conn:
        batch = CaseBatch(conn, cache)
        for state in (first, other):
            batch.get(state.case)
            batch.put(state)
        batch.save()
    batch.committed()
    accepted = event(MessageKind.RETURN_ACCEPTED, 2, "iom-uz", "iom-kz")
    moved, _ = apply(other, replace(accepted, case=second), ROLES)
    with engine.begin() as conn:
        CaseStore.save(conn, moved, len(other.entries))  # another process writes it
        # The first case's stored JSON is broken but its version is not: only the cache can answer.
        broken = cases_table.update().where(cases_table.c.case_ref == first.case)
        conn.execute(broken.values(state={}))
    with engine.begin() as conn, _statements(engine, "SELECT") as selects:
        batch = CaseBatch(conn, cache)
        batch.read([first.case, other.case, "iom-kz.KZ-2026-0003"])
        assert len(selects) == 3  # versions, then the states not cached and their entries
        assert batch.get(first.case) == first
        assert batch.get(other.case) == moved
        assert batch.get("iom-kz.KZ-2026-0003") is None
        assert len(selects) == 3


def test_batch_anomalies_are_stored_with_the_batch(engine: sa.Engine) -> None:
    """Anomalies found in a batch are inserted by its save, all of them, in the same transaction."""
    state, _ = apply(None, event(MessageKind.RETURN_REQUEST, 1), ROLES)
    found = [apply(state, event(MessageKind.DEPARTED, n, seq=n), ROLES)[1] for n in (2, 3)]
    with pytest.raises(RuntimeError), engine.begin() as conn:
        batch = CaseBatch(conn)
        for anomaly in found:
            assert anomaly is not None
            batch.add_anomaly(state.case, anomaly, T0)
        batch.save()
        raise RuntimeError("the batch's transaction fails after save")
    assert CaseStore(engine).anomalies(state.case) == []
    with engine.begin() as conn:
        batch = CaseBatch(conn)
        for anomaly in found:
            assert anomaly is not None
            batch.add_anomaly(state.case, anomaly, T0)
        batch.save()
    stored = CaseStore(engine).anomalies(state.case)
    assert [a.envelope_id for a in stored] == [a.envelope_id for a in found if a is not None]


def _grown_state() -> CaseState:
    """A case with three entries, the last an anomaly."""
    state, _ = apply(None, event(MessageKind.RETURN_REQUEST, 1), ROLES)
    state, _ = apply(state, event(MessageKind.RETURN_ACCEPTED, 2, "iom-uz", "iom-kz"), ROLES)
    state, anomaly = apply(state, event(MessageKind.RETURN_REQUEST, 3, seq=2), ROLES)
    assert anomaly is not None and len(state.entries) == 3
    return state


def test_migration_moves_each_cases_entries_into_rows_and_back(database_url: str) -> None:
    """A state stored whole (up to 0004) reads back equal after 0005; 0004 again restores it."""
    state = _grown_state()
    engine = sa.create_engine(database_url)
    try:
        migrate(engine, "0004")
        with engine.begin() as conn:
            conn.execute(
                cases_table.insert().values(
                    case_ref=state.case, stage="accepted", state=_format_1(state), updated_at=T0
                )
            )
        migrate(engine)
        assert CaseStore(engine).get(state.case) == state
        with engine.connect() as conn:
            stored = conn.execute(sa.select(cases_table.c.state)).scalar_one()
            rows = conn.execute(sa.select(sa.func.count()).select_from(case_entries_table))
            assert "entries" not in stored and rows.scalar_one() == 3
        with engine.begin() as conn:
            config = alembic_config()
            config.attributes["connection"] = conn
            command.downgrade(config, "0004")
        with engine.connect() as conn:
            assert conn.execute(sa.select(cases_table.c.state)).scalar_one() == _format_1(state)
    finally:
        engine.dispose()


def _format_1(state: CaseState) -> dict[str, Any]:
    """`state.to_dict` as trm wrote it up to 0012: format 1, with its pending receipts."""
    pending = {k: sorted(v) for k, v in sorted(state.pending_receipts.items())}
    return {**state.to_dict(), "format": 1, "pending_receipts": pending}


def test_migration_leaves_pending_receipts_to_the_entries_and_writes_them_back(
    database_url: str,
) -> None:
    """0013 drops a format-1 summary's pending receipts, read back equal; 0012 restores them."""
    state = _grown_state()
    receipt = replace(
        event(MessageKind.DELIVERY_RECEIPT, 4, "iom-uz", "iom-kz", seq=2),
        reply_to=state.entries[0].event.envelope_id,
    )
    state, anomaly = apply(state, receipt, ROLES)
    assert anomaly is None and len(state.pending_receipts) == 2
    old = _format_1(state)
    summary = {k: v for k, v in old.items() if k != "entries"}
    engine = sa.create_engine(database_url)
    try:
        migrate(engine, "0012")
        with engine.begin() as conn:
            row = {"case_ref": state.case, "stage": "accepted", "state": summary, "updated_at": T0}
            conn.execute(cases_table.insert().values(**row))
            conn.execute(
                case_entries_table.insert(),
                [
                    {"case_ref": state.case, "position": i, "entry": e}
                    for i, e in enumerate(old["entries"])
                ],
            )
        migrate(engine)
        assert CaseStore(engine).get(state.case) == state
        with engine.connect() as conn:
            stored = conn.execute(sa.select(cases_table.c.state)).scalar_one()
        assert stored == state.summary_dict() and "pending_receipts" not in stored
        with engine.begin() as conn:
            config = alembic_config()
            config.attributes["connection"] = conn
            command.downgrade(config, "0012")
        with engine.connect() as conn:
            assert conn.execute(sa.select(cases_table.c.state)).scalar_one() == summary
    finally:
        engine.dispose()


def _long_state(case: str, length: int) -> CaseState:
    """Case `case` with `length` entries, each still owed a delivery receipt."""
    state, _ = apply(None, replace(event(MessageKind.RETURN_REQUEST, 1), case=case), ROLES)
    accepted = event(MessageKind.RETURN_ACCEPTED, 2, "iom-uz", "iom-kz")
    state, _ = apply(state, replace(accepted, case=case), ROLES)
    for n in range(3, length + 1):
        travel = replace(event(MessageKind.TRAVEL_ARRANGED, n, seq=n - 1), case=case)
        state, anomaly = apply(state, travel, ROLES)
        assert anomaly is None
    return state


Written = tuple[str, int, int]
"""A statement's verb, how many rows it carries, and the length of their parameters."""


def _writes_per_event(engine: sa.Engine, length: int) -> list[Written]:
    """Every statement the routing service's batches run for five events on a case of `length`.

    A batch per event, the case cached as the service caches it; each
    statement as the driver receives it.
    """
    case = f"iom-kz.KZ-2026-{length:04d}"
    state = _long_state(case, length)
    assert len(state.pending_receipts) == length
    with engine.begin() as conn:
        [version] = CaseStore.save_all(conn, [CaseWrite(state, None, 0)])
    cache = CaseCache()
    cache.keep({case: (version, state)})
    seen: list[Written] = []

    def note(*args: Any) -> None:
        statement, params, many = args[2], args[3], args[5]
        rows = list(params) if many else [params]
        seen.append((statement.split()[0].upper(), len(rows), sum(map(_size, rows))))

    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        for n in range(length + 1, length + 6):
            with engine.begin() as conn:
                batch = CaseBatch(conn, cache)
                travel = replace(event(MessageKind.TRAVEL_ARRANGED, n, seq=n - 1), case=case)
                state, anomaly = apply(batch.get(case), travel, ROLES)
                assert anomaly is None
                batch.put(state)
                batch.save()
            batch.committed()
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)
    assert CaseStore(engine).get(case) == state
    return seen


def _size(row: Any) -> int:
    """The length of a statement's parameters as JSON (psycopg wraps a JSON value in `.obj`)."""
    values = row.values() if isinstance(row, dict) else row
    return len(json.dumps([getattr(v, "obj", v) for v in values], default=str))


def test_an_event_writes_the_same_rows_and_bytes_at_2k_and_8k_entries(engine: sa.Engine) -> None:
    """Storing an event on a case of 8k entries runs the statements, rows and bytes of one of 2k.

    Nothing the case row holds grows with the envelopes still owed a receipt
    (they follow from the entries), so a save writes the same at any length.
    """
    short, long = (_writes_per_event(engine, length) for length in (2_000, 8_000))
    assert [verb for verb, *_ in short] == ["SELECT", "UPDATE", "INSERT"] * 5
    assert short == long


def test_save_appends_only_the_new_entries(engine: sa.Engine) -> None:
    """Saving a grown state appends its new entries; a wrong count of stored ones is caught."""
    state = _grown_state()
    shorter = replace(state, entries=state.entries[:1])
    with engine.begin() as conn:
        CaseStore.save(conn, shorter, 0)
        CaseStore.save(conn, state, 1)
    assert CaseStore(engine).get(state.case) == state
    with pytest.raises(StorageError), engine.begin() as conn:
        CaseStore.save(conn, state, 2)  # entry 2 is stored already: the key refuses it twice
    with pytest.raises(ValueError, match="4 entries stored"), engine.begin() as conn:
        CaseStore.save(conn, state, 4)
    other = replace(state, case="iom-kz.KZ-2026-0007", entries=state.entries)
    with engine.begin() as conn:
        CaseStore.save(conn, other, 1)  # claims entry 0 is stored: it is not
    with pytest.raises(CaseStateInvalid, match="no stored entry 0"):
        CaseStore(engine).get(other.case)


def test_save_all_updates_every_case_at_once_and_refuses_a_moved_one(engine: sa.Engine) -> None:
    """One UPDATE stores every known case; a case whose version moved fails the transaction."""
    state = _grown_state()
    first = replace(state, entries=state.entries[:1])
    cases = [replace(first, case=f"iom-kz.KZ-2026-{n:04d}") for n in (11, 12)]
    with engine.begin() as conn:
        assert CaseStore.save_all(conn, [CaseWrite(c, None, 0) for c in cases]) == [1, 1]
    grown = [replace(state, case=c.case) for c in cases]
    with engine.begin() as conn, _statements(engine, "UPDATE") as updates:
        assert CaseStore.save_all(conn, [CaseWrite(g, 1, 1) for g in grown]) == [2, 2]
    assert len(updates) == 1
    assert [CaseStore(engine).get(c.case) for c in cases] == grown
    moved = "written by another process meanwhile"
    with pytest.raises(StorageError, match=moved), engine.begin() as conn:
        CaseStore.save_all(conn, [CaseWrite(grown[0], 1, 3)])
    with engine.connect() as conn:
        query = sa.select(cases_table.c.version).where(cases_table.c.case_ref == cases[0].case)
        assert conn.execute(query).scalar_one() == 2
