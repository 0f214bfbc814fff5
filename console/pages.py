"""What every page of the console shares: the templates, the bar, the words, the guards.

`render` fills a template (`console/templates/`, autoescaped, one per page)
with what every page needs: the user's language (`console.i18n`), the
session's CSRF token for its forms, the bar's links for this kind of home
and the helpers templates call. The annotated dependencies say who may
open or post a page (`console.auth`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

import jinja2
from fastapi import Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.datastructures import FormData

from broker.directory import Role as ParticipantRole
from console import actions, forms
from console.accounts import Role, Session
from console.auth import WRITERS, console_of, csrf_protect, current_user
from console.i18n import (
    field_label,
    language_of,
    translator,
    value_label,
)
from schemas.base import MessageKind

TEMPLATES = Path(__file__).parent / "templates"
CASE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{2,63}$"
"""`schemas.base.CaseRef`'s pattern: case references in paths and typed in forms."""
CASE_REF = re.compile(CASE_PATTERN)
CASE_PARTIES = frozenset(
    {ParticipantRole.MISSION, ParticipantRole.NGO, ParticipantRole.STATE_SERVICE}
)

environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)

CasePath = Annotated[str, PathParam(pattern=CASE_PATTERN, max_length=64)]
KindPath = Annotated[MessageKind, PathParam()]
Reader = Annotated[Session, Depends(current_user)]
Writer = Annotated[Session, Depends(csrf_protect(*WRITERS))]
Supervisor = Annotated[Session, Depends(csrf_protect(Role.SUPERVISOR))]
AnySigned = Annotated[Session, Depends(csrf_protect())]


# --- rendering ---------------------------------------------------------------------


@dataclass(frozen=True)
class NavItem:
    """One link of the bar."""

    href: str
    label: str
    current: bool = False


def when(moment: datetime | None) -> str:
    """A moment as pages show it, in UTC to the minute."""
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M UTC")


def item_label(lang: str, item: forms.Field | forms.Group) -> str:
    """A form field's label, or a list row's (the list's label and the row's number)."""
    if isinstance(item, forms.Group) and item.row_of is not None:
        return f"{field_label(lang, item.row_of)} {int(item.name.rsplit('.', 1)[1]) + 1}"
    return field_label(lang, item.name)


def case_url(case: str) -> str:
    """The path of a case's page."""
    return f"/cases/{quote(case, safe='')}"


def participant_role(request: Request) -> ParticipantRole | None:
    """This home's participant's role in the installed directory."""
    home = console_of(request).home
    return actions.role_of(home, home.participant_id)


def _nav(request: Request, session: Session | None) -> list[NavItem]:
    if session is None:
        return []
    role = participant_role(request)
    here = request.url.path
    if role is ParticipantRole.ROUTING:
        items = [NavItem("/", "nav.cases")]
    elif role is ParticipantRole.AUDITOR:
        items = [NavItem("/", "nav.audit")]
    else:
        items = [NavItem("/", "nav.inbox")]
        if session.user.role in WRITERS:
            items += [NavItem(f"/new/{k}", f"nav.new.{k}") for k in actions.opening_kinds(role)]
        items += [NavItem("/outbox", "nav.outbox"), NavItem("/quarantine", "nav.quarantine")]
    return [NavItem(i.href, i.label, i.href == here) for i in items]


def render(
    request: Request,
    session: Session | None,
    template: str,
    *,
    status: int = 200,
    language: str | None = None,
    **context: Any,
) -> HTMLResponse:
    """`template` in the user's language with what every page needs."""
    lang = language_of(language or (str(session.user.language) if session else None))
    home = console_of(request).home
    notices = [n for n in (context.pop("notice", None),) if n]
    page = environment.get_template(template).render(
        t=translator(lang),
        lang=lang,
        user=None if session is None else session.user,
        csrf=None if session is None else session.csrf_token,
        participant={"id": home.participant_id, "role": participant_role(request)},
        nav=_nav(request, session),
        here=request.url.path,
        notices=notices,
        static=lambda name: f"/static/{name}",
        when=when,
        label=lambda name: field_label(lang, name),
        item_label=lambda item: item_label(lang, item),
        choice_label=lambda value: value_label(lang, value),
        case_url=case_url,
        **context,
    )
    return HTMLResponse(page, status_code=status)


def can_act(session: Session) -> bool:
    """Whether the user's role may send, confirm, withdraw or upload."""
    return session.user.role in WRITERS


def back_to(path: str, **query: str) -> RedirectResponse:
    """A 303 redirect to `path` with `query` (after a post)."""
    suffix = f"?{urlencode(query)}" if query else ""
    return RedirectResponse(path + suffix, status_code=303)


def form_text(form: FormData, name: str) -> str | None:
    """The text field `name` of a posted form, None if absent or a file."""
    value = form.get(name)
    return value if isinstance(value, str) else None


def headers_page(
    request: Request, session: Session, case: str, state: Any, *, back: str
) -> HTMLResponse:
    """A case by its headers only (the routing operator's and the auditor's view)."""
    rows = [
        {
            "envelope_id": e.event.envelope_id,
            "kind": str(e.event.kind),
            "sender": e.event.sender,
            "recipients": e.event.recipients,
            "received_at": e.event.received_at,
            "stage_after": None if e.stage_after is None else str(e.stage_after),
            "anomaly": None if e.anomaly is None else e.anomaly.reason,
        }
        for e in state.entries
    ]
    return render(
        request,
        session,
        "headers.html",
        case=case,
        stage=None if state.stage is None else str(state.stage),
        parties=sorted(state.parties),
        rows=rows,
        back=back,
    )
