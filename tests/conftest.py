"""Fixtures for the real services the integration tests need.

RabbitMQ and PostgreSQL come from TRM_AMQP_URL / TRM_AMQP_MANAGEMENT_URL /
TRM_DATABASE_URL, else the local ones; where neither answers and Docker is
present, testcontainers starts them. A test that needs a service fails loudly
when there is none: it never skips.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from broker.database import open_database
from broker.testing import Network, make_network

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_MANAGEMENT = "http://guest:guest@127.0.0.1:15672/"
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _answers(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def _docker_present() -> bool:
    return shutil.which("docker") is not None and Path("/var/run/docker.sock").exists()


@pytest.fixture(scope="session")
def rabbitmq_urls() -> Iterator[tuple[str, str]]:
    """(AMQP URL, management URL) of a real RabbitMQ, or the test fails."""
    amqp = os.environ.get("TRM_AMQP_URL", DEFAULT_AMQP)
    management = os.environ.get("TRM_AMQP_MANAGEMENT_URL", DEFAULT_MANAGEMENT)
    if _answers(amqp, 5672) and _answers(management, 15672):
        yield amqp, management
        return
    if not _docker_present():
        pytest.fail(
            f"RabbitMQ does not answer at {amqp} / {management} and no Docker is present: "
            "run scripts/ensure-services or set TRM_AMQP_URL and TRM_AMQP_MANAGEMENT_URL"
        )
    from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer("rabbitmq:3.13-management") as container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(5672)
        mport = container.get_exposed_port(15672)
        yield f"amqp://guest:guest@{host}:{port}/", f"http://guest:guest@{host}:{mport}/"


@pytest.fixture
def vhost(rabbitmq_urls: tuple[str, str]) -> Iterator[str]:
    """A fresh RabbitMQ vhost for one test, deleted afterwards with the users only it used."""
    from broker.management import ManagementClient

    client = ManagementClient(rabbitmq_urls[1])
    name = f"trm-test-{uuid.uuid4().hex[:12]}"
    client.create_vhost(name)
    try:
        yield name
    finally:
        users = client.vhost_users(name)
        client.delete_vhost(name)
        for user in users:
            if user != client.username:
                client.delete_user_if_unused(user)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """URL of a real PostgreSQL database we may create databases from."""
    url = os.environ.get("TRM_DATABASE_URL", DEFAULT_POSTGRES)
    if not url.startswith("postgresql"):
        url = DEFAULT_POSTGRES
    if _answers(url, 5432):
        yield url
        return
    if not _docker_present():
        pytest.fail(
            f"PostgreSQL does not answer at {url} and no Docker is present: "
            "run scripts/ensure-services or set TRM_DATABASE_URL"
        )
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16", driver="psycopg") as container:
        yield container.get_connection_url()


@pytest.fixture
def campaign_services(rabbitmq_urls: tuple[str, str], postgres_server_url: str) -> Any:
    """The broker and database servers the campaigns run on (`campaigns.network.Services`)."""
    from campaigns.network import Services

    return Services(rabbitmq_urls[0], rabbitmq_urls[1], postgres_server_url)


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"trm_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(postgres_server_url).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated database, on SQLite and on PostgreSQL (see `database_url`)."""
    db = open_database(database_url)
    yield db
    db.dispose()


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Network:
    """Kazakhstan and Uzbekistan missions and an Uzbek NGO, with real keys valid since a day ago."""
    return make_network(
        tmp_path_factory.mktemp("network"), now=datetime.now(UTC) - timedelta(days=1)
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on the embedded SQLite default and on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'trm.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def network_databases(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[[Sequence[str]], dict[str, str]]]:
    """Per-participant database URLs for a local network: none (SQLite in each home), or a
    fresh PostgreSQL database per participant, dropped afterwards."""
    created: list[str] = []
    if request.param == "sqlite":
        yield lambda _ids: {}
        return
    server = str(request.getfixturevalue("postgres_server_url"))
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")

    def make(ids: Sequence[str]) -> dict[str, str]:
        urls = {}
        for participant_id in ids:
            name = f"trm_net_{uuid.uuid4().hex[:10]}"
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            created.append(name)
            urls[participant_id] = (
                sa.make_url(server).set(database=name).render_as_string(hide_password=False)
            )
        return urls

    try:
        yield make
    finally:
        with admin.connect() as conn:
            for name in created:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def local_network(rabbitmq_urls: tuple[str, str], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """A factory of `trm.localnet` networks on the real RabbitMQ, each closed afterwards."""
    from trm.localnet import DEMO_PARTICIPANTS, LocalNetwork, create_network

    networks: list[LocalNetwork] = []

    def make(
        participants: Sequence[Any] = DEMO_PARTICIPANTS,
        database_urls: dict[str, str] | None = None,
        **options: Any,
    ) -> LocalNetwork:
        net = create_network(
            tmp_path / f"net{len(networks)}",
            participants,
            amqp_url=rabbitmq_urls[0],
            management_url=rabbitmq_urls[1],
            database_urls=database_urls,
            **options,
        )
        networks.append(net)
        return net

    try:
        yield make
    finally:
        for net in networks:
            net.close()
