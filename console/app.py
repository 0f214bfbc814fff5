"""`create_app`: the console's FastAPI application over one participant's home.

What the pages (`console.web`, mounted when present) build on:

- ``request.app.state.console``: the `console.auth.Console`, with ``home``
  (`adapters.home.Home`), ``engine`` (the home's database, migrated) and
  ``policy``; `console.auth.console_of(request)` returns it.
- `console.auth.current_user` (a dependency: the `Session`, whose ``user``
  has ``username``, ``role``, ``language``; a page without one is
  redirected to ``/login?next=...``), `console.auth.require_role(...)`,
  and `console.auth.csrf_protect(*roles)` for every state-changing form
  post: the form carries ``session.csrf_token`` in a hidden field named
  `console.auth.CSRF_FIELD` (or a script sends it as ``X-CSRF-Token``).
- Bodies are limited to 1 MiB; a page route taking larger uploads declares
  ``UPLOAD_LIMITS = {"/its/path": bytes}`` in `console.web`.
- `console.readmodel`: deliveries (read or unread per user, `mark_read`),
  payloads, cases and timelines, envelope status, outbox, quarantine,
  routed cases; `console.trail.record` for what a page does.
- Sign-in: the page ``GET /login`` posts to ``/auth/login``
  (`console.signin`); logout posts to ``/auth/logout``.
- Static files from ``console/static/`` under ``/static``.

Every response carries the headers of `console.guards` (no-store, a CSP
with no inline script); the Host header must be one the console is served
as; bodies over 1 MiB are refused with 413.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from adapters.home import Home
from broker.errors import (
    CaseSystemError,
    ConfigError,
    DirectoryError,
    ProtocolViolation,
    SchemaViolation,
    StorageError,
    TransportError,
    TrmError,
    UnknownParticipant,
)
from console import api, signin
from console.accounts import SessionPolicy
from console.auth import Console
from console.errors import ConsoleError, NotSignedIn
from console.guards import MAX_BODY, BodyLimit, HostCheck, SecurityHeaders
from console.metrics import RequestMetrics

log = structlog.get_logger(__name__)

STATIC = Path(__file__).parent / "static"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470
API_VERSION = "1.0.0"
API_DESCRIPTION = (
    "JSON over HTTP for the participant's case management system, served on the machine "
    "that holds the participant's keys. Every request carries `Authorization: Bearer TOKEN` "
    "(`trm console token add NAME --scope ...`); each route names the scope it needs. "
    'Refusals are `{"detail": {"reason": ..., "message": ...}}` with a stable '
    "`reason`; a payload refused by its schema adds `errors`, each with the field's `loc`."
)


def served_as(host: str, port: int, extra: Collection[str] = ()) -> frozenset[str]:
    """The Host header values of a console bound to `host`:`port`, plus `extra` names."""
    names = {f"{host}:{port}", host}
    if host in ("127.0.0.1", "::1", "localhost"):
        names |= {f"localhost:{port}", "localhost", f"[::1]:{port}"}
    return frozenset(n.lower() for n in names | set(extra))


def create_app(
    home: Home,
    *,
    allowed_hosts: Collection[str] | None = None,
    policy: SessionPolicy | None = None,
    max_body: int = MAX_BODY,
    upload_limits: Mapping[str, int] | None = None,
    stream_seconds: float = 300.0,
) -> FastAPI:
    """The console of `home`: API, sign-in and (when installed) pages, behind the guards.

    `allowed_hosts` defaults to the names of ``127.0.0.1:8470``. `upload_limits` gives
    paths that take bodies over `max_body` their own limit; by default the pages'
    ``console.web.UPLOAD_LIMITS``, if they declare one.
    """
    engine = home.open_database()
    console = Console(
        home=home,
        engine=engine,
        policy=policy or SessionPolicy(),
        allowed_hosts=frozenset(allowed_hosts or served_as(DEFAULT_HOST, DEFAULT_PORT)),
        stream_seconds=stream_seconds,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = application(lifespan)
    app.state.console = console
    # Added innermost first: the headers wrap every refusal of the other two.
    uploads = app.state.upload_limits if upload_limits is None else upload_limits
    app.add_middleware(BodyLimit, limit=max_body, uploads=uploads)
    app.add_middleware(HostCheck, allowed=console.allowed_hosts)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(RequestMetrics)
    return app


def application(lifespan: Any = None) -> FastAPI:
    """The console's routes and error handling, without a home: what the OpenAPI describes."""
    app = FastAPI(
        title="trm console",
        version=API_VERSION,
        openapi_url="/api/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.include_router(api.router)
    app.include_router(signin.router)
    _mount_pages(app)
    _handle_errors(app)
    # The document describes /api/v1 only, whatever pages are mounted beside it.
    app.openapi_schema = openapi_document()
    return app


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the console's API (`trm console openapi`)."""
    document = get_openapi(
        title="trm console",
        version=API_VERSION,
        summary="The participant console's API for case management systems.",
        description=API_DESCRIPTION,
        routes=api.router.routes,
    )
    for route in api.router.routes:
        if not isinstance(route, APIRoute):
            continue
        scopes = [
            str(scope)
            for dependency in route.dependant.dependencies
            if (scope := getattr(dependency.call, "scope", None)) is not None
        ]
        for method in route.methods or ():
            document["paths"][route.path][method.lower()]["x-trm-scopes"] = scopes
    return document


def _mount_pages(app: FastAPI) -> None:
    """The web pages' router and static files, when `console.web` is present."""
    try:
        web = importlib.import_module("console.web")
    except ModuleNotFoundError as e:
        if e.name != "console.web":
            raise
        web = None
    app.state.upload_limits = dict(getattr(web, "UPLOAD_LIMITS", {}))
    if web is not None:
        app.include_router(web.router)
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")


def status_of(error: TrmError) -> int:
    """The HTTP status a refusal is answered with."""
    if isinstance(error, ConsoleError):
        return error.status
    if isinstance(error, ProtocolViolation):
        return 409
    if isinstance(error, SchemaViolation | UnknownParticipant | ConfigError):
        return 422
    if isinstance(error, StorageError | TransportError | CaseSystemError | DirectoryError):
        return 503
    return 422


def _handle_errors(app: FastAPI) -> None:
    @app.exception_handler(TrmError)
    async def refused(request: Request, error: TrmError) -> Response:
        if isinstance(error, NotSignedIn) and not request.url.path.startswith("/api/"):
            query = urlencode({"next": request.url.path})
            return RedirectResponse(f"{signin.LOGIN_PAGE}?{query}", status_code=303)
        status = status_of(error)
        if status >= 500:
            log.warning("console.unavailable", reason=error.reason, path=request.url.path)
        detail: dict[str, Any] = {"reason": error.reason, "message": str(error)}
        errors = getattr(error, "errors", None)
        if isinstance(errors, list):
            detail["errors"] = errors
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        # Where and what only: the client's values are not echoed back.
        errors = [
            {"loc": list(e.get("loc", ())), "type": e.get("type"), "msg": e.get("msg")}
            for e in error.errors()
        ]
        detail = {"reason": "invalid_request", "message": "the request is not valid"}
        return JSONResponse({"detail": detail | {"errors": errors}}, status_code=422)
