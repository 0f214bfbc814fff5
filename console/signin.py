"""Signing staff in and out: ``POST /auth/login`` and ``POST /auth/logout``.

The sign-in form itself is a page (``GET /login``, `console.web`); it
posts ``username``, ``password`` and optionally ``next`` here. Success sets
the session cookie (HttpOnly, SameSite=Strict, Secure behind TLS) and
redirects to ``next``; a refusal redirects back to ``/login?error=REASON``
(``sign_in_refused`` or ``rate_limited``) with the status of the refusal
in ``X-Trm-Refusal``, and sets no cookie.

Before any session exists, the form is tied to the browser that fetched it:
the page sets a random token in an HttpOnly cookie (`LOGIN_COOKIE`) and in the
form's CSRF field, and a post whose two differ is refused, so another site
cannot sign a browser in to an account of its choosing.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from console import trail
from console.accounts import Session, sign_in, sign_out
from console.auth import CSRF_FIELD, SESSION_COOKIE, console_of, csrf_protect, same_origin
from console.errors import ConsoleError, CsrfRefused
from console.metrics import SIGN_INS_REFUSED

router = APIRouter(prefix="/auth", tags=["sign-in"], include_in_schema=False)

LOGIN_PAGE = "/login"
LOGIN_COOKIE = "trm_login"


def new_login_token() -> str:
    """A fresh token for one sign-in form."""
    return secrets.token_urlsafe(32)


def set_login_cookie(request: Request, response: Response, token: str) -> None:
    """Keep the form's `token` in the browser (`LOGIN_COOKIE`, sent to ``/auth`` only)."""
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=console_of(request).policy.secure_cookie,
        path=router.prefix,
    )


def _login_token_matches(request: Request, given: str | None) -> bool:
    kept = request.cookies.get(LOGIN_COOKIE)
    if not kept or not given:
        return False
    return hmac.compare_digest(kept.encode(), given.encode())


def safe_next(target: str | None) -> str:
    """`target` if it is a path on this console, else ``/``: never a redirect elsewhere."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


@router.post("/login")
def login(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    next_page: Annotated[str | None, Form(alias="next", max_length=2000)] = None,
    form_token: Annotated[str | None, Form(alias=CSRF_FIELD, max_length=100)] = None,
) -> RedirectResponse:
    """Start a session, or go back to the sign-in page saying why not."""
    console = console_of(request)
    if not same_origin(request):
        raise CsrfRefused("the sign-in form was posted from another site")
    if not _login_token_matches(request, form_token):
        raise CsrfRefused("the sign-in form was not the one this console gave this browser")
    try:
        session = sign_in(console.engine, username, password, _client(request), console.policy)
    except ConsoleError as e:
        SIGN_INS_REFUSED.labels(reason=e.reason).inc()
        query = urlencode({"error": e.reason, "next": safe_next(next_page)})
        refused = RedirectResponse(f"{LOGIN_PAGE}?{query}", status_code=303)
        refused.headers["X-Trm-Refusal"] = str(e.status)
        return refused
    trail.record(console.engine, trail.user_actor(username), trail.Action.SIGN_IN)
    response = RedirectResponse(safe_next(next_page), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session.token,
        httponly=True,
        samesite="strict",
        secure=console.policy.secure_cookie,
        path="/",
    )
    response.delete_cookie(LOGIN_COOKIE, path=router.prefix, httponly=True, samesite="strict")
    return response


@router.post("/logout")
def logout(
    request: Request, session: Annotated[Session, Depends(csrf_protect())]
) -> RedirectResponse:
    """End the session (the form must carry its CSRF token)."""
    console = console_of(request)
    sign_out(console.engine, session.token)
    trail.record(console.engine, trail.user_actor(session.user.username), trail.Action.SIGN_OUT)
    response = RedirectResponse(LOGIN_PAGE, status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
