"""Helpers shared by the console's tests: a home's console in process, row counts, sign-in."""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from broker.database import metadata
from console.auth import CSRF_FIELD, SESSION_COOKIE

PASSWORD = "correct horse battery staple"
INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>|\son[a-z]+\s*=|javascript:", re.I)


def counts(engine: Engine) -> dict[str, int]:
    """Rows in every table of the home's database: what a refused request must not change."""
    found = {}
    with engine.connect() as conn:
        present = set(sa.inspect(conn).get_table_names())
        for name, table in metadata.tables.items():
            if name in present:
                found[name] = conn.execute(
                    sa.select(sa.func.count()).select_from(table)
                ).scalar_one()
    return found


def login_form_token(client: TestClient) -> str:
    """Fetch the sign-in page as a browser does: the token its form carries (and its cookie)."""
    page = client.get("/login")
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found is not None, "the sign-in form carries no token"
    return found.group(1)


def sign_in(
    client: TestClient, username: str, password: str = PASSWORD, next_page: str = "/"
) -> Any:
    """Fetch and post the sign-in form; the response (a redirect), not followed."""
    token = login_form_token(client)
    return client.post(
        "/auth/login",
        data={"username": username, "password": password, "next": next_page, CSRF_FIELD: token},
        follow_redirects=False,
    )


def csrf_of(client: TestClient) -> str:
    """The CSRF token of the client's current session."""
    from console.accounts import csrf_token

    return csrf_token(client.cookies[SESSION_COOKIE])


def form(csrf: str | None, **fields: str) -> dict[str, str]:
    """Form fields with the CSRF field when given."""
    return fields if csrf is None else {CSRF_FIELD: csrf, **fields}
