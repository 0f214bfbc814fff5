"""Every endpoint of the console's API fuzzed from its own OpenAPI document (schemathesis),
in process against a real participant home (its database on SQLite, then on PostgreSQL),
with a token holding every scope: no input, valid or not, gets a 5xx."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from broker.testing import DEFAULT_PARTICIPANTS
from console.app import create_app, openapi_document, served_as
from console.tokens import add_token
from trm.localnet import create_network

pytestmark = pytest.mark.rabbitmq

EXAMPLES = 20
"""Examples per operation at most: the 14 operations take about 15 s on each database."""


@pytest.fixture(scope="module")
def database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """iom-kz's database: None for SQLite in its home, else a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
        return
    server = str(request.getfixturevalue("postgres_server_url"))
    name = f"trm_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def served(
    rabbitmq_urls: tuple[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    database: str | None,
) -> Iterator[tuple[Any, str]]:
    """iom-kz's console app (event streams end after a moment) and a token with every scope."""
    network = create_network(
        tmp_path_factory.mktemp("console-fuzz"),
        DEFAULT_PARTICIPANTS,
        amqp_url=rabbitmq_urls[0],
        management_url=rabbitmq_urls[1],
    )
    try:
        app = create_app(
            network.settings("iom-kz", database),
            allowed_hosts=served_as("127.0.0.1", 8470, ["testserver"]),
            stream_seconds=0.05,
        )
        token = add_token(
            app.state.console.engine,
            "fuzzer",
            ["read", "send", "receipts", "consent", "quarantine", "events"],
        )
        yield app, token
        app.state.console.engine.dispose()
    finally:
        network.close()


@pytest.fixture(scope="module")
def api_schema(served: tuple[Any, str]) -> Any:
    """The OpenAPI document the app serves, loaded by schemathesis."""
    return schemathesis.openapi.from_asgi("/api/v1/openapi.json", served[0])


OPERATIONS = [
    (method.upper(), path)
    for path, operations in openapi_document()["paths"].items()
    for method in operations
]


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_input_gets_a_server_error(
    api_schema: Any, served: tuple[Any, str], method: str, path: str
) -> None:
    """Whatever schemathesis sends to this operation, the answer is not a 5xx."""
    operation = api_schema[path][method]
    headers = {"Authorization": f"Bearer {served[1]}"}

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def fuzz(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=[not_a_server_error])

    fuzz()
