"""Alembic environment: run the migrations on the connection `open_database` hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, text

from broker.database import metadata

# Any number of processes may open the same PostgreSQL database at once; one
# migrates while the others wait, then find nothing left to do.
_PG_LOCK = 0x74726D  # "trm"


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url or pass a connection in config.attributes")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("trm migrations run online only, through broker.database.open_database")
_main()
