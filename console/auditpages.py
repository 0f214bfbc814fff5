"""The auditor's pages: an export uploaded, verified in the background with its progress
polled by htmx (`console.audits`), and its cases browsed by their headers.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated

import anyio
from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import UploadFile

from broker.directory import Role as ParticipantRole
from console.accounts import Session
from console.audits import UPLOADS, AuditJob, AuditJobs
from console.auth import console_of
from console.errors import NotFound
from console.i18n import (
    language_of,
    translator,
)
from console.pages import (
    CasePath,
    Reader,
    Writer,
    back_to,
    can_act,
    environment,
    headers_page,
    participant_role,
    render,
    when,
)

router = APIRouter(include_in_schema=False)


# --- the auditor's pages ---------------------------------------------------------------


def _jobs(request: Request) -> AuditJobs:
    state = request.app.state
    jobs: AuditJobs | None = getattr(state, "audit_jobs", None)
    if jobs is None:
        jobs = AuditJobs(console_of(request).home.path / UPLOADS)
        state.audit_jobs = jobs
    return jobs


def _auditor_only(request: Request) -> None:
    if participant_role(request) is not ParticipantRole.AUDITOR:
        raise NotFound("audit pages are served on an auditor's home")


def audit_start(
    request: Request, session: Session, *, error: str | None = None, status: int = 200
) -> HTMLResponse:
    """The auditor's start page: the upload form and the verifications so far."""
    return render(
        request,
        session,
        "audit.html",
        status=status,
        jobs=_jobs(request).all(),
        can_act=can_act(session),
        error=error,
    )


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, session: Reader) -> HTMLResponse:
    """Upload an export to verify; earlier verifications."""
    _auditor_only(request)
    return audit_start(request, session)


@router.post("/audit/verify")
async def audit_verify(request: Request, session: Writer) -> Response:
    """Keep the uploaded export and verify it in the background; to its progress page."""
    _auditor_only(request)
    form = await request.form()
    export, kept = form.get("export"), form.get("checkpoint")
    if not isinstance(export, UploadFile) or not export.filename:
        t = translator(str(session.user.language))
        return audit_start(request, session, error=t("audit.missing"), status=422)
    checkpoint = None
    if isinstance(kept, UploadFile) and kept.filename:
        checkpoint = await kept.read(MAX_CHECKPOINT + 1)
    if checkpoint is not None and len(checkpoint) > MAX_CHECKPOINT:
        t = translator(str(session.user.language))
        return audit_start(request, session, error=t("audit.checkpoint_too_large"), status=413)
    start = partial(
        _jobs(request).start,
        export.filename,
        export.file,
        console_of(request).home.directory(),
        checkpoint=checkpoint or None,
        checkpoint_name=kept.filename if isinstance(kept, UploadFile) and checkpoint else None,
    )
    job = await anyio.to_thread.run_sync(start)  # copying a large export blocks
    return back_to(f"/audit/jobs/{job.id}")


JobPath = Annotated[str, PathParam(pattern=r"^[0-9a-f]{16}$")]
MAX_CHECKPOINT = 64 * 1024
"""Bytes a kept checkpoint (a signed note with its cosignatures) may have."""
UPLOAD_LIMITS = {"/audit/verify": 1 << 30}
"""Paths taking bodies over the console's 1 MiB, and their limits (`console.app`): an
auditor's export of a large log runs to hundreds of MiB; it is spooled to disk as it comes."""


def _job(request: Request, job_id: str) -> AuditJob:
    _auditor_only(request)
    job = _jobs(request).get(job_id)
    if job is None:
        raise NotFound(f"no verification {job_id} in this console")
    return job


@router.get("/audit/jobs/{job_id}", response_class=HTMLResponse)
def audit_job_page(request: Request, job_id: JobPath, session: Reader) -> HTMLResponse:
    """A verification: its progress while it runs, then its verdict and the export's cases."""
    return render(request, session, "audit_job.html", job=_job(request, job_id))


@router.get("/audit/jobs/{job_id}/progress", response_class=HTMLResponse)
def audit_job_progress(request: Request, job_id: JobPath, session: Reader) -> HTMLResponse:
    """The verification's panel alone, which the page fetches again while it runs (htmx)."""
    job = _job(request, job_id)
    lang = language_of(str(session.user.language))
    page = environment.get_template("_audit_progress.html").render(
        t=translator(lang), job=job, when=when
    )
    return HTMLResponse(page)


@router.get("/audit/jobs/{job_id}/cases/{case}", response_class=HTMLResponse)
def audit_case_page(
    request: Request, job_id: JobPath, case: CasePath, session: Reader
) -> HTMLResponse:
    """One case of a verified export: its headers, in log order."""
    job = _job(request, job_id)
    state = job.cases.get(case)
    if state is None:
        raise NotFound(f"the export holds no case {case}")
    return headers_page(request, session, case, state, back=f"/audit/jobs/{job_id}")
