"""The console's web pages for a participant's staff (mounted by `console.app`).

Server-rendered Jinja2 pages, one template per page, in the user's
language (`console.i18n`). Routes are thin: they read through
`console.readmodel`, ask `console.actions` what the case policy allows,
send with `adapters.sending` exactly as ``trm send`` and ``trm ack`` do,
and record what they did in the trail. Every form that changes anything
carries the session's CSRF token and is checked by `console.auth.csrf_protect`
with the roles that may do it, so a read-only account that crafts a post
is refused like one that clicks.

What a home shows first depends on its participant's role in the
directory: a mission's or NGO's inbox, the routing operator's cases
(overdue first), or the auditor's verification page. This module holds
the sign-in page, the language choice and that start page, and mounts the
rest: `console.casepages` (cases, forms, outbox, quarantine, routing) and
`console.auditpages`, both built on `console.pages`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from broker.directory import Role as ParticipantRole
from console import auditpages, casepages
from console.auth import console_of
from console.i18n import (
    language_from_header,
    language_of,
    set_language,
    translator,
)
from console.pages import (
    AnySigned,
    Reader,
    back_to,
    form_text,
    participant_role,
    render,
)
from console.signin import new_login_token, safe_next, set_login_cookie

LOGIN_REASONS = {"sign_in_refused": "login.refused", "rate_limited": "login.limited"}

router = APIRouter(include_in_schema=False)
router.include_router(casepages.router)
router.include_router(auditpages.router)
UPLOAD_LIMITS = auditpages.UPLOAD_LIMITS
"""Paths taking bodies over the console's 1 MiB, and their limits (read by `console.app`)."""


# --- signing in, language ----------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    """The sign-in form; it posts to ``/auth/login`` (`console.signin`)."""
    asked = request.query_params.get("lang")
    lang = (
        language_of(asked)
        if asked
        else language_from_header(request.headers.get("accept-language"))
    )
    reason = LOGIN_REASONS.get(request.query_params.get("error", ""))
    t = translator(lang)
    token = new_login_token()
    login_form = render(
        request,
        None,
        "login.html",
        language=lang,
        status=401 if reason else 200,
        error=t(reason) if reason else None,
        next_page=request.query_params.get("next", "/"),
        login_token=token,
    )
    set_login_cookie(request, login_form, token)
    return login_form


@router.post("/language")
async def choose_language(request: Request, session: AnySigned) -> RedirectResponse:
    """Set the user's language; back to the page it was chosen on."""

    form = await request.form()
    chosen = language_of(form_text(form, "language"))
    set_language(console_of(request).engine, session.user.username, chosen)
    return back_to(safe_next(form_text(form, "next")))


# --- the start page of each kind of home -------------------------------------------


@router.get("/", response_class=HTMLResponse)
def home_page(request: Request, session: Reader) -> HTMLResponse:
    """The inbox, the routing operator's cases, or the auditor's page."""
    role = participant_role(request)
    if role is ParticipantRole.ROUTING:
        return casepages.routed_cases(request, session)
    if role is ParticipantRole.AUDITOR:
        return auditpages.audit_start(request, session)
    return casepages.inbox(request, session)
