"""A scratch local network for one campaign run, on SQLite or on fresh PostgreSQL databases."""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from broker.directory import Role
from schemas.base import MessageKind
from trm.localnet import LocalNetwork, create_network

KZ, UZ, NGO, ROUTING = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod", "routing"
PEOPLE: dict[str, tuple[str, Role, str, str | None]] = {
    KZ: (KZ, Role.MISSION, "KZ", None),
    UZ: (UZ, Role.MISSION, "UZ", None),
    NGO: (NGO, Role.NGO, "UZ", UZ),
    ROUTING: (ROUTING, Role.ROUTING, "AT", None),
}
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def flow_message(i: int, cases: int) -> tuple[MessageKind, str]:
    """The kind and case of message i of iom-kz's flow to iom-uz over `cases` of its cases.

    The first message on each case opens it with a return request; every later
    one is a travel arrangement, which the case protocol lets a party send
    again (travel re-arranged), so that many messages still ride on each case.
    """
    kind = MessageKind.RETURN_REQUEST if i < cases else MessageKind.TRAVEL_ARRANGED
    return kind, f"{KZ}.KZ-2026-{i % cases:04d}"


@dataclass(frozen=True)
class Services:
    """Where the campaigns find RabbitMQ and PostgreSQL."""

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    management_url: str = "http://guest:guest@127.0.0.1:15672/"
    postgres_url: str = DEFAULT_POSTGRES


@contextmanager
def postgres_databases(server_url: str, names: Sequence[str]) -> Iterator[dict[str, str]]:
    """Fresh PostgreSQL databases, one per name, dropped afterwards: name -> URL."""
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    tag = secrets.token_hex(4)
    made: dict[str, str] = {}
    try:
        with admin.connect() as conn:
            for name in names:
                database = f"trm_chaos_{tag}_{name.replace('-', '_')}"[:63]
                conn.execute(sa.text(f'CREATE DATABASE "{database}"'))
                made[name] = (
                    sa.make_url(server_url)
                    .set(database=database)
                    .render_as_string(hide_password=False)
                )
        yield made
    finally:
        with admin.connect() as conn:
            for made_url in made.values():
                dropped = sa.make_url(made_url).database
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{dropped}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def scratch_network(
    root: Path, database: str, participants: Sequence[str], services: Services
) -> Iterator[LocalNetwork]:
    """A local network of `participants` on `database` ("sqlite" or "postgres"), closed after."""
    with _databases(database, participants, services) as urls:
        net = create_network(
            root,
            [PEOPLE[p] for p in participants],
            amqp_url=services.amqp_url,
            management_url=services.management_url,
            database_urls=urls,
        )
        try:
            yield net
        finally:
            net.close()


@contextmanager
def _databases(
    database: str, participants: Sequence[str], services: Services
) -> Iterator[dict[str, str]]:
    if database == "sqlite":
        yield {}
        return
    if database != "postgres":
        raise ValueError(f"database must be sqlite or postgres, not {database!r}")
    with postgres_databases(services.postgres_url, participants) as urls:
        yield urls


def sqlite_synchronous(url: str) -> str | None:
    """The ``synchronous`` pragma a trm engine sets on a SQLite URL (None for PostgreSQL).

    Read through the engine trm itself opens, so the value is the one in effect
    for the adapter: 2 is FULL.
    """
    if not url.startswith("sqlite"):
        return None
    from broker.database import open_database

    engine = open_database(url)
    try:
        with engine.connect() as conn:
            value = conn.exec_driver_sql("PRAGMA synchronous").scalar()
    finally:
        engine.dispose()
    return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(int(str(value)), str(value))
