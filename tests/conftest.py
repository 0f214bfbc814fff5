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
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``pytest -n`` (make test), keep each module on one worker, so that its module
    fixtures (a demo run, a network of adapters) are made once, and every test of the
    local cluster on one, so that only one cluster is started."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        fixtures = getattr(item, "fixturenames", ())
        group = "local_sites" if "local_sites" in fixtures else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))


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
            if user != client.username and not client.user_vhosts(user):
                client.delete_user(user)


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


@dataclass
class LocalSites:
    """A local three-node cluster and a single-node second country broker, and how the
    cluster script's first start and stop went."""

    cluster: Any
    site: Any
    first_cycle: dict[str, Any] = field(default_factory=dict)


def _cluster_script(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(__file__).resolve().parent.parent / "scripts" / "rabbitmq-cluster"
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="session")
def local_sites(rabbitmq_urls: tuple[str, str]) -> Iterator[LocalSites]:
    """A RabbitMQ cluster on 5680-5682 and a second broker on 5690, beside the default one.

    The cluster is started and removed once with scripts/rabbitmq-cluster, then started
    again with it; at the end both are removed and nothing may be left of them, and the
    default broker must still answer.
    """
    from broker.management import ManagementClient
    from trm.localcluster import LocalCluster, free_base_port

    # Free ports from 5680 (else 5700, 5720...): another session may run its own beside.
    cluster_base = free_base_port(3)
    sites = LocalSites(
        LocalCluster(count=3, base_port=cluster_base),
        LocalCluster(count=1, base_port=free_base_port(1, cluster_base + 10)),
    )
    base = str(sites.cluster.base_port)
    started_here: list[Any] = []
    try:
        started = _cluster_script("start", "--base-port", base)
        sites.first_cycle["start"] = (started.returncode, started.stdout, started.stderr)
        assert started.returncode == 0, started.stderr
        # Whatever runs on these ports now is this session's own, until it is stopped.
        started_here.append(sites.cluster)
        sites.first_cycle["running"] = sites.cluster.running()
        stopped = _cluster_script("stop", "--base-port", base)
        started_here.remove(sites.cluster)
        sites.first_cycle["stop"] = (stopped.returncode, stopped.stderr)
        sites.first_cycle["leftovers"] = sites.cluster.leftovers()
        with ThreadPoolExecutor(1) as pool:
            site = pool.submit(sites.site.start)
            again = _cluster_script("start", "--base-port", base)
            if again.returncode == 0:
                started_here.append(sites.cluster)
            site.result()
            started_here.append(sites.site)
        assert again.returncode == 0, again.stderr
        yield sites
    finally:
        # Only what this session started: a cluster that refused to start is another's.
        removed = (
            _cluster_script("stop", "--base-port", base) if sites.cluster in started_here else None
        )
        for cluster in started_here:
            cluster.stop()
        assert removed is None or removed.returncode == 0, removed.stderr
        assert all(cluster.leftovers() == [] for cluster in started_here)
        assert ManagementClient(rabbitmq_urls[1]).request("GET", "/overview") is not None
