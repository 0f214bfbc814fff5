"""The console refuses bad input and bad callers, each with its status and nothing changed:
a payload against its schema, a case-protocol refusal, a missing, revoked or under-scoped
token, a path traversal in any id, an oversize body, a forged or missing CSRF token, a
cross-site post, an expired session, a read-only user posting, a foreign Host header and
too many sign-ins; and every response is no-store with a CSP that allows no inline script."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from broker.testing import DEFAULT_PARTICIPANTS
from console import trail
from console.accounts import Role, Session, SessionPolicy, add_user, digest
from console.app import create_app
from console.auth import SESSION_COOKIE, WRITERS, csrf_protect, current_user
from console.guards import CONTENT_SECURITY_POLICY, MAX_BODY
from console.tables import sessions_table
from console.tokens import add_token, revoke_token
from schemas.base import MessageKind
from schemas.examples import example
from tests.console_support import (
    INLINE_SCRIPT,
    PASSWORD,
    counts,
    csrf_of,
    form,
    login_form_token,
    sign_in,
)
from trm.localnet import LocalNetwork, create_network

pytestmark = pytest.mark.rabbitmq

KZ = "iom-kz"
HOST = "testserver"


@pytest.fixture(scope="module")
def net(
    rabbitmq_urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalNetwork]:
    """A provisioned network (no adapter runs: nothing here should reach another party)."""
    network = create_network(
        tmp_path_factory.mktemp("console-safety"),
        DEFAULT_PARTICIPANTS,
        amqp_url=rabbitmq_urls[0],
        management_url=rabbitmq_urls[1],
    )
    try:
        yield network
    finally:
        network.close()


def _with_test_form(app: FastAPI) -> FastAPI:
    """A state-changing form route guarded as the pages guard theirs: writers, CSRF."""

    @app.post("/test/write")
    def write(session: Annotated[Session, Depends(csrf_protect(*WRITERS))]) -> dict[str, str]:
        trail.record(
            app.state.console.engine, trail.user_actor(session.user.username), trail.Action.SEND
        )
        return {"done": session.user.username}

    @app.get("/test/page")
    def page(session: Annotated[Session, Depends(current_user)]) -> dict[str, str]:
        return {"user": session.user.username}

    return app


@pytest.fixture(scope="module")
def app(net: LocalNetwork) -> FastAPI:
    """KZ's console, with accounts of each role and tokens with one scope each."""
    console = _with_test_form(create_app(net.settings(KZ), allowed_hosts=[HOST]))
    engine = console.state.console.engine
    add_user(engine, "worker", PASSWORD, Role.CASE_WORKER)
    add_user(engine, "reader", PASSWORD, Role.READ_ONLY, "ru")
    return console


@pytest.fixture(scope="module")
def tokens(app: FastAPI) -> dict[str, str]:
    """Bearer tokens by name: `sender` (send), `reader` (read), `revoked` (send, revoked)."""
    engine = app.state.console.engine
    found = {
        "sender": add_token(engine, "sender", ["send", "read"]),
        "reader": add_token(engine, "reader", ["read"]),
        "revoked": add_token(engine, "revoked", ["send", "read"]),
    }
    revoke_token(engine, "revoked")
    return found


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """A fresh browser (no cookies) on KZ's console."""
    with TestClient(app, base_url=f"http://{HOST}") as browser:
        yield browser


def engine_of(app: FastAPI) -> Any:
    return app.state.console.engine


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


_cases = iter(range(1, 10_000))


def new_case() -> str:
    return f"{KZ}.SAFE-{next(_cases):04d}"


def request_body(payload: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A send of KZ's example return request to iom-uz on a new case."""
    message = payload or example(MessageKind.RETURN_REQUEST).model_dump(mode="json")
    return {
        "kind": "return_request",
        "to": ["iom-uz"],
        "case": new_case(),
        "payload": message,
    } | fields


# --- the API ------------------------------------------------------------------------------


def test_payload_violating_its_schema_is_422_with_field_paths_and_nothing_queued(
    app, client, tokens
):
    """A return request without a person and with a bad date gets 422 naming both fields'
    paths (never their values), as `trm send` names them; no row anywhere changes."""
    payload = example(MessageKind.RETURN_REQUEST).model_dump(mode="json")
    del payload["person"]
    payload["travel_window"]["earliest"] = "not a date secret-value"
    before = counts(engine_of(app))
    response = client.post(
        "/api/v1/messages", headers=bearer(tokens["sender"]), json=request_body(payload)
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail["reason"] == "schema_violation"
    locations = {tuple(e["loc"]) for e in detail["errors"]}
    assert ("payload", "person") in locations
    assert ("payload", "travel_window", "earliest") in locations
    assert "secret-value" not in response.text
    assert counts(engine_of(app)) == before


def test_case_protocol_refusal_is_409_with_its_reason_and_nothing_queued(app, client, tokens):
    """A mission answering a return it never received (return_accepted on a new case) gets
    409 with the protocol's reason; nothing is queued."""
    before = counts(engine_of(app))
    payload = example(MessageKind.RETURN_ACCEPTED).model_dump(mode="json")
    response = client.post(
        "/api/v1/messages",
        headers=bearer(tokens["sender"]),
        json=request_body(payload, kind="return_accepted"),
    )
    assert response.status_code == 409
    assert response.json()["detail"]["reason"] == "unknown_case"
    assert counts(engine_of(app)) == before


def test_a_valid_send_is_queued_once_and_the_trail_holds_no_payload(app, client, tokens):
    """The control case: the same token sends a valid request (201, one outbox row, one trail
    entry with its envelope id); no console table holds a word of the payload."""
    before = counts(engine_of(app))
    body = request_body()
    response = client.post("/api/v1/messages", headers=bearer(tokens["sender"]), json=body)
    assert response.status_code == 201, response.text
    after = counts(engine_of(app))
    assert after["outbox"] == before["outbox"] + 1
    assert after["console_trail"] == before["console_trail"] + 1
    newest = trail.entries(engine_of(app), limit=1)[0]
    assert (newest.actor, newest.action) == ("token:sender", "send")
    assert newest.envelope_id == response.json()["envelope_id"]
    name = body["payload"]["person"]["full_name"]
    with engine_of(app).connect() as conn:
        for table in ("console_trail", "console_feed", "console_sessions", "console_tokens"):
            rows = conn.execute(sa.text(f"SELECT * FROM {table}")).all()  # noqa: S608 - fixed names
            assert name not in repr(rows)


@pytest.mark.parametrize(
    ("token", "status", "reason"),
    [
        (None, 401, "not_signed_in"),
        ("trm_forged-token-that-was-never-issued", 401, "not_signed_in"),
        ("revoked", 401, "not_signed_in"),
        ("reader", 403, "forbidden"),
    ],
    ids=["missing", "forged", "revoked", "without-send-scope"],
)
def test_a_send_without_a_live_token_holding_send_is_refused(
    app, client, tokens, token, status, reason
):
    """No token, an unknown one, a revoked one (401) or one without the send scope (403):
    refused before the body is looked at; nothing changes."""
    before = counts(engine_of(app))
    headers = {} if token is None else bearer(tokens.get(token, token))
    response = client.post("/api/v1/messages", headers=headers, json=request_body())
    assert response.status_code == status
    assert response.json()["detail"]["reason"] == reason
    assert counts(engine_of(app)) == before


def test_a_revoked_token_is_refused_for_reading_too(app, client, tokens):
    """Revocation is immediate and covers every scope the token had."""
    response = client.get("/api/v1/outbox", headers=bearer(tokens["revoked"]))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


TRAVERSALS = (
    "..%2f..%2fkeys",
    "..%2F..%2Fdirectory.json",
    "%2e%2e%2f%2e%2e%2fkeys",
    "..",
    "..\\..\\keys",
)
ID_ROUTES = (
    ("GET", "/api/v1/deliveries/{}"),
    ("GET", "/api/v1/envelopes/{}"),
    ("GET", "/api/v1/cases/{}"),
    ("POST", "/api/v1/cases/{}/reception"),
    ("POST", "/api/v1/cases/{}/consent-withdrawal"),
    ("POST", "/api/v1/quarantine/{}/requeue"),
)


@pytest.mark.parametrize(("method", "route"), ID_ROUTES, ids=[r for _, r in ID_ROUTES])
def test_path_traversal_in_any_id_is_refused_and_touches_nothing(net, app, client, method, route):
    """Each id parameter is typed: a traversal gets 404 or 422 from routing or validation,
    with every scope granted; no row, key or case file changes."""
    engine = engine_of(app)
    all_scopes = add_token(
        engine,
        f"trav-{abs(hash(route)) % 10**8}",
        ["read", "send", "receipts", "consent", "quarantine", "events"],
    )
    home = net.home(KZ)
    files = {
        p: p.stat().st_mtime_ns for p in home.rglob("*") if p.is_file() and "trm.db" not in p.name
    }
    before = counts(engine)
    for attempt in TRAVERSALS:
        response = client.request(
            method,
            route.format(attempt),
            headers=bearer(all_scopes),
            json={"delete_data": True} if "consent" in route else {},
        )
        assert response.status_code in (404, 422), (attempt, response.status_code)
    assert counts(engine) == before
    assert {p: p.stat().st_mtime_ns for p in files} == files


def test_an_oversize_body_is_413_declared_or_streamed(app, client, tokens):
    """A body over 1 MiB is refused with 413 whether it declares its length or is streamed
    in chunks without one; nothing is queued."""
    before = counts(engine_of(app))
    big = request_body(notes="x" * (MAX_BODY + 1))
    declared = client.post("/api/v1/messages", headers=bearer(tokens["sender"]), json=big)
    assert declared.status_code == 413
    data = json.dumps(big).encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(data), 64 * 1024):
            yield data[start : start + 64 * 1024]

    streamed = client.post(
        "/api/v1/messages",
        headers=bearer(tokens["sender"]) | {"Content-Type": "application/json"},
        content=chunks(),
    )
    assert streamed.status_code == 413
    assert counts(engine_of(app)) == before


def test_a_foreign_host_header_is_refused(app, client, tokens):
    """DNS rebinding: a page on another name resolving to 127.0.0.1 gets 400, even with a token."""
    response = client.get(
        "/api/v1/outbox", headers=bearer(tokens["reader"]) | {"Host": "attacker.example"}
    )
    assert response.status_code == 400
    assert response.json()["detail"]["reason"] == "host"
    assert response.headers["cache-control"] == "no-store"


# --- sessions and forms -------------------------------------------------------------------


def test_sign_in_sets_a_strict_http_only_cookie_and_stores_only_its_hash(app, client):
    """The cookie is HttpOnly and SameSite=Strict; the database keeps its SHA-256 only."""
    response = sign_in(client, "worker")
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert "httponly" in cookie.lower()
    assert "samesite=strict" in cookie.lower()
    assert "secure" not in cookie.lower()
    token = client.cookies[SESSION_COOKIE]
    with engine_of(app).connect() as conn:
        stored = set(conn.execute(sa.select(sessions_table.c.token_hash)).scalars())
    assert token not in stored
    assert any(len(h) == 64 for h in stored)


def test_the_cookie_is_secure_when_served_behind_tls(net):
    """With the secure-cookie setting the session cookie carries Secure."""
    secure = create_app(
        net.settings(KZ), allowed_hosts=[HOST], policy=SessionPolicy(secure_cookie=True)
    )
    with TestClient(secure, base_url=f"https://{HOST}") as browser:
        response = sign_in(browser, "worker")
    assert "secure" in response.headers["set-cookie"].lower()


def test_a_form_post_with_the_session_csrf_token_is_carried_out(app, client):
    """The control case: a case worker's post with its own CSRF token succeeds (one trail entry)."""
    sign_in(client, "worker")
    before = counts(engine_of(app))
    response = client.post("/test/write", data=form(csrf_of(client)))
    assert response.status_code == 200
    assert counts(engine_of(app))["console_trail"] == before["console_trail"] + 1


@pytest.mark.parametrize(
    "csrf",
    [None, "", "0" * 64, "other-session"],
    ids=["missing", "empty", "forged", "other-session"],
)
def test_a_form_post_without_this_session_csrf_token_is_refused(app, client, csrf):
    """Missing, empty, forged, or another session's CSRF token: 403, nothing changed."""
    if csrf == "other-session":
        with TestClient(app, base_url=f"http://{HOST}") as other:
            sign_in(other, "worker")
            csrf = csrf_of(other)
    sign_in(client, "worker")
    before = counts(engine_of(app))
    response = client.post("/test/write", data=form(csrf))
    assert response.status_code == 403
    assert response.json()["detail"]["reason"] == "csrf"
    assert counts(engine_of(app)) == before


def test_a_cross_site_post_is_refused_even_with_the_csrf_token(app, client):
    """A post whose Origin is another site is refused (403) whatever it carries."""
    sign_in(client, "worker")
    before = counts(engine_of(app))
    response = client.post(
        "/test/write", data=form(csrf_of(client)), headers={"Origin": "https://attacker.example"}
    )
    assert response.status_code == 403
    assert counts(engine_of(app)) == before


def test_a_read_only_user_posting_is_refused(app, client):
    """A read-only account with a valid session and CSRF token gets 403; nothing changed."""
    sign_in(client, "reader")
    before = counts(engine_of(app))
    response = client.post("/test/write", data=form(csrf_of(client)))
    assert response.status_code == 403
    assert response.json()["detail"]["reason"] == "forbidden"
    assert counts(engine_of(app)) == before


@pytest.mark.parametrize("kind", ["idle", "absolute"])
def test_an_expired_session_is_refused_and_removed(app, client, kind):
    """A session idle past its limit, or older than the absolute limit, is refused: a page
    redirects to /login, a post changes nothing, and the session row is gone."""
    sign_in(client, "worker")
    csrf = csrf_of(client)
    engine = engine_of(app)
    policy = app.state.console.policy
    old = (
        datetime.now(UTC)
        - (policy.idle if kind == "idle" else policy.absolute)
        - timedelta(minutes=1)
    )
    column = "last_seen_at" if kind == "idle" else "created_at"
    with engine.begin() as conn:
        conn.execute(sessions_table.update().values({column: old}))
    before = counts(engine)
    response = client.post("/test/write", data=form(csrf), follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?")
    after = counts(engine)
    assert after["console_trail"] == before["console_trail"]
    assert after["console_sessions"] == before["console_sessions"] - 1
    with engine.connect() as conn:
        stored = set(conn.execute(sa.select(sessions_table.c.token_hash)).scalars())
    assert digest(client.cookies[SESSION_COOKIE]) not in stored
    page = client.get("/test/page", follow_redirects=False)
    assert page.status_code == 303


def test_logout_needs_the_csrf_token_then_ends_the_session(app, client):
    """Logout without the token is refused (the session lives on); with it the session ends."""
    sign_in(client, "worker")
    csrf = csrf_of(client)
    assert client.post("/auth/logout", data=form(None), follow_redirects=False).status_code == 403
    assert client.get("/test/page").status_code == 200
    response = client.post("/auth/logout", data=form(csrf), follow_redirects=False)
    assert response.status_code == 303
    assert client.get("/test/page", follow_redirects=False).status_code == 303


def test_sign_in_never_redirects_off_the_console(app, client):
    """`next` pointing at another site is replaced by /."""
    for target in ("https://attacker.example/", "//attacker.example/x", "/\\attacker.example"):
        response = sign_in(client, "worker", next_page=target)
        assert response.headers["location"] == "/"


def test_sign_in_needs_the_form_this_browser_was_given(app, client):
    """A sign-in posted without the form's token, with a forged one or with another browser's
    is refused (403), starts no session and changes nothing: another site cannot sign a
    browser in to an account of its choosing."""
    engine = engine_of(app)
    with TestClient(app, base_url=f"http://{HOST}") as other:
        others = login_form_token(other)
    login_form_token(client)
    before = counts(engine)
    fields = {"username": "worker", "password": PASSWORD, "next": "/"}
    for token in (None, "forged-token", others):
        response = client.post("/auth/login", data=form(token, **fields), follow_redirects=False)
        assert response.status_code == 403
        assert response.json()["detail"]["reason"] == "csrf"
        assert SESSION_COOKIE not in client.cookies
    assert counts(engine) == before
    assert sign_in(client, "worker").status_code == 303
    assert SESSION_COOKIE in client.cookies


def test_sign_in_is_rate_limited_per_username_and_survives_a_restart(net, app):
    """After 5 wrong passwords the right one is refused too (rate_limited, no cookie), and a
    console started again on the same database still refuses it."""
    engine = engine_of(app)
    add_user(engine, "target", PASSWORD, Role.CASE_WORKER)
    with TestClient(app, base_url=f"http://{HOST}") as browser:
        for _ in range(app.state.console.policy.failures_per_user):
            wrong = sign_in(browser, "target", "wrong password 123")
            assert "error=sign_in_refused" in wrong.headers["location"]
        before = counts(engine)
        limited = sign_in(browser, "target")
        assert "error=rate_limited" in limited.headers["location"]
        assert limited.headers["x-trm-refusal"] == "429"
        assert SESSION_COOKIE not in browser.cookies
        assert counts(engine) == before
    restarted = create_app(net.settings(KZ), allowed_hosts=[HOST])
    with TestClient(restarted, base_url=f"http://{HOST}") as browser:
        again = sign_in(browser, "target")
        assert "error=rate_limited" in again.headers["location"]
        assert SESSION_COOKIE not in browser.cookies


def test_sign_in_is_rate_limited_per_client_address(net, app):
    """Wrong passwords for many usernames from one address block that address."""
    engine = engine_of(app)
    add_user(engine, "spread", PASSWORD, Role.CASE_WORKER)
    strict = create_app(
        net.settings(KZ), allowed_hosts=[HOST], policy=SessionPolicy(failures_per_client=3)
    )
    with TestClient(strict, base_url=f"http://{HOST}", client=("203.0.113.9", 5000)) as browser:
        for name in ("nobody-1", "nobody-2", "nobody-3"):
            assert "sign_in_refused" in sign_in(browser, name, "guess 12345678").headers["location"]
        assert "rate_limited" in sign_in(browser, "spread").headers["location"]
    with TestClient(strict, base_url=f"http://{HOST}", client=("203.0.113.10", 5000)) as other:
        assert sign_in(other, "spread").headers["location"] == "/"


# --- headers ------------------------------------------------------------------------------


def test_every_response_is_no_store_with_a_csp_and_no_inline_script(app, client, tokens):
    """API answers, refusals, redirects, the sign-in handler and any page or static file the
    console serves: no-store, the CSP, nosniff, no referrer to other sites, no framing; HTML
    without inline script."""
    sign_in(client, "worker")
    paths = ["/api/v1/outbox", "/api/v1/cases", "/api/v1/trail", "/api/v1/openapi.json"]
    paths += ["/api/v1/deliveries/not-a-uuid", "/nowhere", "/test/page"]
    paths += [
        route.path
        for route in app.routes
        if getattr(route, "methods", None) == {"GET"}
        and "{" not in route.path
        and not route.path.startswith(("/api/v1/events", "/test"))
    ]
    static = Path(__file__).parent.parent / "console" / "static"
    paths += [f"/static/{p.relative_to(static)}" for p in static.rglob("*") if p.is_file()]
    seen = set()
    for path in dict.fromkeys(paths):
        response = client.get(path, headers=bearer(tokens["reader"]), follow_redirects=False)
        seen.add(response.status_code)
        headers = response.headers
        assert headers["cache-control"] == "no-store", path
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "same-origin"
        assert headers["x-frame-options"] == "DENY"
        if "html" in headers.get("content-type", ""):
            assert not INLINE_SCRIPT.search(response.text), path
    assert {200, 404, 422} <= seen
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/deliveries?after=9223372036854775808",
        "/api/v1/events?after=9223372036854775808",
        "/api/v1/trail?before=9223372036854775808",
        "/api/v1/deliveries?after=-1",
    ],
)
def test_a_cursor_out_of_range_is_422_not_a_database_error(app, client, path):
    """A cursor past the columns' range (found by fuzzing: it overflowed SQLite) is refused
    by validation, before any query."""
    token = add_token(engine_of(app), f"cursor-{abs(hash(path)) % 10**8}", ["read", "events"])
    response = client.get(path, headers=bearer(token))
    assert response.status_code == 422
    assert response.json()["detail"]["reason"] == "invalid_request"


def test_metrics_count_requests_by_route_template_never_by_id(app, client, tokens):
    """A request for an envelope id is counted under its route's template; neither the id
    nor a case reference appears in any label; a refused sign-in is counted by reason."""
    from prometheus_client import generate_latest

    from broker.metrics import REGISTRY

    envelope_id = "01a231e0-d0df-7048-8128-e2e80e063535"
    client.get(f"/api/v1/envelopes/{envelope_id}", headers=bearer(tokens["reader"]))
    client.get("/api/v1/cases/iom-kz.METRICS-1", headers=bearer(tokens["reader"]))
    sign_in(client, "worker", "not the password 1")
    text = generate_latest(REGISTRY).decode()
    assert 'route="/api/v1/envelopes/{envelope_id}",status="404"' in text
    assert 'route="/api/v1/cases/{case}",status="404"' in text
    assert 'trm_console_sign_ins_refused_total{reason="sign_in_refused"}' in text
    assert envelope_id not in text
    assert "METRICS-1" not in text


def test_a_route_given_a_larger_upload_limit_takes_it_and_refuses_past_it(net):
    """A path with its own limit (an audit export's) takes a 2 MiB upload; past its 3 MiB
    limit it is 413 whether declared or streamed; every other path keeps 1 MiB."""
    limit = 3 * 1024 * 1024
    uploads = create_app(
        net.settings(KZ), allowed_hosts=[HOST], upload_limits={"/test/upload": limit}
    )

    @uploads.post("/test/upload")
    async def upload(request: Request) -> dict[str, int]:
        form = await request.form()
        return {"size": len(await form["file"].read())}  # type: ignore[union-attr]

    def streamed(size: int) -> Iterator[bytes]:
        boundary = b"--b\r\nContent-Disposition: form-data; name=file; filename=x\r\n\r\n"
        yield boundary
        for _ in range(size // 65536):
            yield b"x" * 65536
        yield b"\r\n--b--\r\n"

    multipart = {"Content-Type": "multipart/form-data; boundary=b"}
    with TestClient(uploads, base_url=f"http://{HOST}") as browser:
        ok = browser.post("/test/upload", files={"file": ("x", b"x" * (2 * 1024 * 1024))})
        assert ok.status_code == 200
        assert ok.json() == {"size": 2 * 1024 * 1024}
        declared = browser.post("/test/upload", files={"file": ("x", b"x" * (limit + 1))})
        assert declared.status_code == 413
        over = browser.post("/test/upload", headers=multipart, content=streamed(limit + 65536))
        assert over.status_code == 413
        assert over.json()["detail"]["reason"] == "too_large"
        elsewhere = browser.post("/api/v1/messages", content=b"x" * (2 * 1024 * 1024))
        assert elsewhere.status_code == 413
