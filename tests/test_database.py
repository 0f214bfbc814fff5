"""The local database: URLs, connection settings and migrations on both backends."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from broker import database
from broker.database import (
    BUSY_TIMEOUT_MS,
    IN_CHUNK,
    home_database_url,
    inbox_table,
    metadata,
    open_database,
    reading,
    select_in,
    storage_errors,
)
from broker.errors import ConfigError, StorageError

TABLES = {"outbox", "case_sequence", "inbox", "quarantine", "receipts", "alembic_version"}


def test_migrations_create_the_tables(database_url: str) -> None:
    """open_database creates every adapter table and records revision 0001 or later."""
    engine = open_database(database_url)
    try:
        names = set(sa.inspect(engine).get_table_names())
        assert names >= TABLES
        with engine.connect() as conn:
            revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        assert revision is not None and revision >= "0001"
    finally:
        engine.dispose()


def test_migrations_match_the_table_definitions(database_url: str) -> None:
    """The migrated schema has exactly the columns, types and indexes the code declares."""
    engine = open_database(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            differences = [
                d
                for d in compare_metadata(context, metadata)
                # Tables of other components, migrated but declared elsewhere.
                if not (d[0] in ("remove_table", "remove_index") and _undeclared(d[1]))
            ]
        assert differences == []
    finally:
        engine.dispose()


def test_head_revision_is_the_newest_migration() -> None:
    """`HEAD_REVISION`, which lets an up-to-date open skip Alembic, is Alembic's own head."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(database.alembic_config()).get_current_head()
    assert head == database.HEAD_REVISION


def test_an_up_to_date_open_does_not_load_alembic(database_url: str) -> None:
    """Opening a database already at the head leaves Alembic unimported; a new one migrates."""
    open_database(database_url).dispose()
    script = (
        "import sys; from broker.database import open_database; "
        f"open_database({database_url!r}).dispose(); print('alembic' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"


def _undeclared(item: sa.Table | sa.Index) -> bool:
    table = item if isinstance(item, sa.Table) else item.table
    return table is None or table.name not in metadata.tables


def test_open_twice_keeps_data(database_url: str) -> None:
    """Opening an up-to-date database again migrates nothing and loses nothing."""
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    first = open_database(database_url)
    with first.begin() as conn:
        conn.execute(
            inbox_table.insert().values(
                envelope_id="0190c0de-0000-7000-8000-000000000001",
                digest="ab" * 32,
                sender="iom-kz",
                case_ref="iom-kz.KZ-2026-0001",
                kind="return_request",
                received_at=now,
                applied_at=now,
            )
        )
    first.dispose()
    second = open_database(database_url)
    try:
        with second.connect() as conn:
            row = conn.execute(sa.select(inbox_table)).one()
        assert row.sender == "iom-kz"
        assert row.received_at == now
        assert row.redeliveries == 0
    finally:
        second.dispose()


def test_concurrent_first_opens_in_threads(database_url: str) -> None:
    """Several threads opening a fresh database at once all succeed, migrating it once."""
    engines: list[sa.Engine] = []
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            engines.append(open_database(database_url))
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        with engines[0].connect() as conn:
            versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
        assert len(versions) == 1
    finally:
        for engine in engines:
            engine.dispose()


def test_concurrent_first_opens_in_processes(database_url: str) -> None:
    """Several processes opening a fresh database at once all succeed, migrating it once."""
    code = "import sys; from broker.database import open_database; open_database(sys.argv[1])"
    processes = [
        subprocess.Popen([sys.executable, "-c", code, database_url], stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    failures = [p.stderr.read() for p in processes if p.wait(timeout=120) != 0 and p.stderr]
    for p in processes:
        if p.stderr:
            p.stderr.close()
    assert failures == []
    engine = open_database(database_url)
    try:
        with engine.connect() as conn:
            versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
        assert len(versions) == 1
    finally:
        engine.dispose()


def test_sqlite_connection_settings(tmp_path: Path) -> None:
    """Every SQLite connection runs in WAL mode with full sync, foreign keys and a busy timeout."""
    engine = open_database(f"sqlite:///{tmp_path / 'trm.db'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0
    finally:
        engine.dispose()


def test_sqlite_writer_gets_the_lock_when_the_holder_commits(tmp_path: Path) -> None:
    """A second writer waits while the first holds the lock, then writes; the timeout is kept."""
    engine = open_database(f"sqlite:///{tmp_path / 'trm.db'}")
    other = open_database(f"sqlite:///{tmp_path / 'trm.db'}")
    holding, done = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def second_writer() -> None:
        holding.wait()
        try:
            with other.begin() as conn:
                conn.exec_driver_sql("CREATE TABLE second (x INTEGER)")
        except BaseException as e:
            failures.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=second_writer)
    thread.start()
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE first (x INTEGER)")
            holding.set()
            # The second writer cannot have committed while this transaction holds the lock.
            assert not done.wait(0.05)
        thread.join()
        assert failures == []
        with other.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == BUSY_TIMEOUT_MS
        assert {"first", "second"} <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
        other.dispose()


def test_sqlite_writer_gives_up_after_the_busy_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held past the busy timeout, the lock is refused with SQLAlchemy's error, nothing written."""
    engine = open_database(f"sqlite:///{tmp_path / 'trm.db'}")
    other = open_database(f"sqlite:///{tmp_path / 'trm.db'}")
    monkeypatch.setattr(database, "BUSY_TIMEOUT_MS", 50)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE first (x INTEGER)")
            with pytest.raises(sa.exc.OperationalError, match="locked"), other.begin() as late:
                late.exec_driver_sql("CREATE TABLE second (x INTEGER)")
        assert "second" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
        other.dispose()


def test_readers_do_not_wait_for_writers(database_url: str) -> None:
    """A read-only connection sees the last commit while another transaction is writing."""
    engine = open_database(database_url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as writer:
            writer.execute(
                inbox_table.insert().values(
                    envelope_id="0190c0de-0000-7000-8000-000000000003",
                    digest="cd" * 32,
                    sender="iom-kz",
                    case_ref="iom-kz.KZ-2026-0003",
                    kind="return_request",
                    received_at=now,
                    applied_at=now,
                )
            )
            with reading(engine) as reader:
                seen = reader.execute(sa.select(sa.func.count()).select_from(inbox_table))
                assert seen.scalar_one() == 0
        with reading(engine) as reader:
            seen = reader.execute(sa.select(sa.func.count()).select_from(inbox_table))
            assert seen.scalar_one() == 1
    finally:
        engine.dispose()


def test_sqlite_file_is_private(tmp_path: Path) -> None:
    """The SQLite file is created readable by its owner only."""
    path = tmp_path / "trm.db"
    open_database(f"sqlite:///{path}").dispose()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_home_url_default_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A home's database is HOME/trm.db unless TRM_DATABASE_URL names another."""
    monkeypatch.delenv("TRM_DATABASE_URL", raising=False)
    assert home_database_url(tmp_path) == f"sqlite:///{tmp_path / 'trm.db'}"
    monkeypatch.setenv("TRM_DATABASE_URL", "postgresql+psycopg://u@db/trm")
    assert home_database_url(tmp_path) == "postgresql+psycopg://u@db/trm"


def test_home_url_takes_the_password_from_a_file(tmp_path: Path) -> None:
    """TRM_DATABASE_PASSWORD_FILE (a Docker secret) supplies the server URL's password."""
    secret = tmp_path / "pg_password"
    secret.write_text("s3cret/with:chars\n")
    env = {
        "TRM_DATABASE_URL": "postgresql+psycopg://trm@db:5432/trm",
        "TRM_DATABASE_PASSWORD_FILE": str(secret),
    }
    url = sa.make_url(home_database_url(tmp_path, environ=env))
    assert (url.username, url.password, url.host, url.database) == (
        "trm",
        "s3cret/with:chars",
        "db",
        "trm",
    )
    given = home_database_url(tmp_path, "postgresql+psycopg://other@h/x", env)
    assert sa.make_url(given).password == "s3cret/with:chars"


def test_home_url_password_file_missing_is_a_clear_error(tmp_path: Path) -> None:
    """A TRM_DATABASE_PASSWORD_FILE that cannot be read names the setting."""
    env = {
        "TRM_DATABASE_URL": "postgresql+psycopg://trm@db/trm",
        "TRM_DATABASE_PASSWORD_FILE": str(tmp_path / "missing"),
    }
    with pytest.raises(ConfigError, match="TRM_DATABASE_PASSWORD_FILE"):
        home_database_url(tmp_path, environ=env)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("not a url", "not a database URL"),
        ("mysql://u@h/db", "not supported"),
        ("postgresql+psycopg2://u@h/db", "psycopg2. is not supported"),
        ("sqlite:////nonexistent-folder-for-trm/trm.db", "does not exist"),
    ],
)
def test_bad_urls_raise_storage_error(url: str, words: str) -> None:
    """A wrong database URL fails with a StorageError that says what to use."""
    with pytest.raises(StorageError, match=words):
        open_database(url)


@pytest.mark.postgres
def test_unreachable_postgres_is_a_storage_error() -> None:
    """A PostgreSQL server that does not answer is reported as a StorageError."""
    with pytest.raises(StorageError, match="connection"):
        open_database("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2")


def test_driver_errors_hide_parameters(tmp_path: Path) -> None:
    """A constraint violation becomes a StorageError without the stored values in it."""
    engine = open_database(f"sqlite:///{tmp_path / 'trm.db'}")
    now = datetime.now(UTC)
    row = {
        "envelope_id": "0190c0de-0000-7000-8000-000000000002",
        "digest": "secretdigest",
        "sender": "iom-kz",
        "case_ref": "iom-kz.KZ-2026-0002",
        "kind": "return_request",
        "received_at": now,
        "applied_at": now,
    }
    try:
        with (
            pytest.raises(StorageError) as raised,
            storage_errors("recording"),
            engine.begin() as conn,
        ):
            conn.execute(inbox_table.insert().values(**row))
            conn.execute(inbox_table.insert().values(**row))
        assert "UNIQUE" in str(raised.value)
        assert "secretdigest" not in str(raised.value)
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(inbox_table)).scalar() == 0
    finally:
        engine.dispose()


def test_select_in_reads_every_value_across_chunks(tmp_path: Path) -> None:
    """Values beyond one IN list are read in further chunks; none is lost or read twice."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'in.db'}")
    table = sa.Table("t", sa.MetaData(), sa.Column("k", sa.String(8), primary_key=True))
    table.metadata.create_all(engine)
    keys = [f"k{i:05d}" for i in range(2 * IN_CHUNK + 1)]
    query = sa.select(table.c.k).where(table.c.k.in_(sa.bindparam("b_ids", expanding=True)))
    try:
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"k": k} for k in keys])
            assert sorted(row.k for row in select_in(conn, query, keys[::-1])) == keys
            assert select_in(conn, query, []) == []
    finally:
        engine.dispose()
