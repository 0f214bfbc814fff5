"""Who is asking: the dependencies every console route declares.

Pages use `current_user` (a signed-in staff member, else a redirect to
``/login``), `require_role` and `csrf_protect` on every state-changing form
post; the API uses `require_scope` (a bearer token with that scope, else 401
or 403). `console_of` gives the `Console` (home, database, session policy)
the app was created with.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine

from adapters.home import Home
from console.accounts import Role, Session, SessionPolicy, check_csrf, session_of
from console.errors import CsrfRefused, Forbidden, NotSignedIn
from console.tokens import ApiToken, Scope, authenticate

SESSION_COOKIE = "trm_session"
CSRF_FIELD = "csrf_token"
"""The hidden form field carrying the session's CSRF token."""
CSRF_HEADER = "x-csrf-token"
"""Where a script's post (htmx) may carry it instead."""


@dataclass(frozen=True)
class Console:
    """What the app serves: held on ``app.state.console``."""

    home: Home
    engine: Engine
    policy: SessionPolicy
    allowed_hosts: frozenset[str]
    """The Host header values the console answers to (``host`` or ``host:port``)."""
    stream_seconds: float = 300.0
    """How long one event stream stays open; the client then resumes with Last-Event-ID."""


def console_of(request: Request) -> Console:
    """The `Console` of the app handling `request`."""
    found: Console = request.app.state.console
    return found


# --- staff sessions (pages) ------------------------------------------------------------


def optional_session(request: Request) -> Session | None:
    """The request's live session, or None."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > 128:
        return None
    console = console_of(request)
    return session_of(console.engine, token, console.policy)


def current_user(request: Request) -> Session:
    """The signed-in staff member's session; NotSignedIn (a redirect to /login for pages)."""
    session = optional_session(request)
    if session is None:
        raise NotSignedIn("sign in first")
    return session


def require_role(*roles: Role) -> Callable[[Request], Session]:
    """A dependency: the session, if its user has one of `roles`; Forbidden otherwise."""
    allowed = frozenset(roles)

    def dependency(request: Request) -> Session:
        session = current_user(request)
        if session.user.role not in allowed:
            raise Forbidden(f"a {session.user.role} account cannot do this")
        return session

    return dependency


WRITERS = (Role.CASE_WORKER, Role.SUPERVISOR)
"""The roles that may send, confirm, withdraw consent."""


def same_origin(request: Request) -> bool:
    """Whether the request's Origin (if any) is the console itself."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    netloc = urlsplit(origin).netloc.lower()
    return netloc in console_of(request).allowed_hosts


def csrf_protect(
    *roles: Role,
) -> Callable[[Request], Awaitable[Session]]:
    """A dependency for a state-changing form post: the session, its role among `roles`
    (any role if none given) and the session's CSRF token in the form or header."""
    check_role = require_role(*(roles or tuple(Role)))

    async def dependency(request: Request) -> Session:
        session = check_role(request)
        if not same_origin(request):
            raise CsrfRefused("the form was posted from another site")
        given = request.headers.get(CSRF_HEADER)
        if given is None:
            form = await request.form()
            field = form.get(CSRF_FIELD)
            given = field if isinstance(field, str) else None
        check_csrf(session, given)
        return session

    return dependency


# --- API tokens ------------------------------------------------------------------------

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description="A token made with `trm console token add NAME --scope ...`.",
)


def require_scope(scope: Scope) -> Callable[..., ApiToken]:
    """A dependency: the request's bearer token, if live and holding `scope`."""

    def dependency(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
    ) -> ApiToken:
        if credentials is None or len(credentials.credentials) > 128:
            raise NotSignedIn("send Authorization: Bearer <token> (`trm console token add`)")
        token = authenticate(console_of(request).engine, credentials.credentials)
        if token is None:
            raise NotSignedIn("the token is unknown or revoked")
        if scope not in token.scopes:
            raise Forbidden(f"the token {token.name!r} has no {scope} scope")
        return token

    # Read by `console.app.openapi_document` to state each operation's scope.
    dependency.scope = scope  # type: ignore[attr-defined]
    return dependency
