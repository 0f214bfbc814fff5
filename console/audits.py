"""An auditor's verifications in the console: an uploaded export checked in the background.

`AuditJobs.start` keeps the uploaded export (and the checkpoint the
auditor kept, if any) in a folder of the auditor's home and runs
`services.audit.verify_export` on a thread against the directory installed
in that home, so the page can show its progress while it runs
(`AuditJob.percent`). Once intact, the export is replayed with the same
directory (`services.audit.replay_export`) so that its cases can be browsed:
headers only, which is all an export holds.
"""

from __future__ import annotations

import secrets
import shutil
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from broker.directory import Directory
from broker.errors import LogTampered, TrmError
from services.audit import VerifyReport, replay_export, verify_export
from services.cases import CaseState

UPLOADS = "audit-uploads"
"""The folder of the auditor's home where uploaded exports are kept while verified."""
KEPT_JOBS = 20
"""Verifications remembered by a running console; older ones (and their files) are dropped."""


class JobState(StrEnum):
    """Where a verification stands."""

    RUNNING = "running"
    INTACT = "intact"
    TAMPERED = "tampered"
    FAILED = "failed"
    """The export could not be read or checked at all (not an export, no checkpoint, ...)."""


@dataclass
class AuditJob:
    """One uploaded export and what its verification found so far."""

    id: str
    name: str
    checkpoint_name: str | None
    path: Path
    started_at: datetime
    state: JobState = JobState.RUNNING
    done_bytes: int = 0
    total_bytes: int = 0
    report: VerifyReport | None = None
    index: int | None = None
    """The first bad entry of a tampered export (None when the export as a whole is)."""
    problem: str | None = None
    cases: dict[str, CaseState] = field(default_factory=dict)

    @property
    def percent(self) -> int:
        """How much of the export is verified, 0 to 100."""
        if self.state is not JobState.RUNNING:
            return 100
        if self.total_bytes <= 0:
            return 0
        return min(99, self.done_bytes * 100 // self.total_bytes)

    @property
    def badge(self) -> str:
        """The CSS class of its state."""
        return {JobState.INTACT: "ok", JobState.RUNNING: "warn"}.get(self.state, "bad")


class AuditJobs:
    """The verifications of one console, newest first."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._jobs: dict[str, AuditJob] = {}
        self._lock = threading.Lock()

    def start(
        self,
        name: str,
        export: BinaryIO,
        directory: Directory,
        *,
        checkpoint: bytes | None = None,
        checkpoint_name: str | None = None,
    ) -> AuditJob:
        """Keep a copy of `export` (read to its end) and verify it on a thread; the job."""
        job_id = secrets.token_hex(8)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.folder / f"{job_id}.jsonl"
        with path.open("wb") as kept:
            shutil.copyfileobj(export, kept)
        job = AuditJob(job_id, name[:200], checkpoint_name, path, datetime.now(UTC))
        with self._lock:
            self._jobs[job_id] = job
            self._forget_old()
        thread = threading.Thread(
            target=self._run, args=(job, directory, checkpoint), name=f"audit-{job_id}", daemon=True
        )
        thread.start()
        return job

    def get(self, job_id: str) -> AuditJob | None:
        """The job `job_id`, if this console still remembers it."""
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[AuditJob]:
        """Every remembered job, newest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.started_at, reverse=True)

    def _forget_old(self) -> None:
        for old in sorted(self._jobs.values(), key=lambda j: j.started_at)[:-KEPT_JOBS]:
            if old.state is not JobState.RUNNING:
                old.path.unlink(missing_ok=True)
                del self._jobs[old.id]

    def _run(self, job: AuditJob, directory: Directory, checkpoint: bytes | None) -> None:
        def progress(done: int, total: int) -> None:
            job.done_bytes, job.total_bytes = done, total

        try:
            report = verify_export(
                job.path,
                directory,
                workers=1,
                trusted_checkpoint=checkpoint,
                progress=progress,
            )
            job.cases = replay_export(job.path, roles_from=directory)
        except LogTampered as e:
            job.index, job.problem, job.state = e.index, e.problem, JobState.TAMPERED
        except (TrmError, OSError, ValueError) as e:
            job.problem, job.state = str(e), JobState.FAILED
        else:
            job.report, job.state = report, JobState.INTACT
