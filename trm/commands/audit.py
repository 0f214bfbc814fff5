"""``trm audit``: export the routing service's log; verify, replay and prove it offline.

`export` runs on the routing service's home (its keys, directory and
database); `proof` and `consistency` only read its database and the
checkpoints already signed. `verify`, `replay` and `check-proof` are the
auditor's: they need the export or proof file, the directory and the
authority's public key, and trust nothing else the file says.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click
from sqlalchemy.engine import Engine

from broker.database import home_database_url, open_database
from broker.directory import Directory, load_home_directory, read_directory
from broker.errors import AuditError, LogTampered, TrmError
from broker.keys import load_keys, read_pinned_authority
from services.audit import diff_states, replay_export, verify_export
from services.auditlog import AuditLog
from services.cases import CaseState, timeline
from services.casestore import CaseStore
from services.checkpoint import origin_for
from services.proofs import check_proof, consistency_proof, inclusion_proof

P = ParamSpec("P")
R = TypeVar("R")

HOME = click.option(
    "--home",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The routing service's home folder (keys, directory, database).",
)
DATABASE_URL = click.option(
    "--database-url",
    default=None,
    help="The routing database (default: TRM_DATABASE_URL, else HOME/trm.db).",
)
EXPORT_FILE = click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
AUTHORITY_KEY = click.option(
    "--authority-key",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The directory authority's authority.pub.",
)
LOG_ID = click.option(
    "--log-id",
    default=None,
    metavar="ID",
    help="The routing participant whose log this is (default: the one the checkpoints' "
    "origin names); the directory must list it with role routing.",
)


def _directory_option(*, required: bool, help_text: str) -> Callable[[Callable[P, R]], Any]:
    return click.option(
        "--directory",
        "directory_file",
        required=required,
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help=help_text,
    )


NEWEST_DIRECTORY = _directory_option(
    required=True, help_text="The trust directory (the newest: it carries revocations)."
)


def _reasons(command: Callable[P, R]) -> Callable[P, R]:
    """End the command with a one-line reason instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except TrmError as e:
            raise click.ClickException(f"{e.reason}: {e}") from e

    return wrapper


@click.group()
def audit() -> None:
    """Export, verify, replay and prove the routing service's audit log."""


@contextmanager
def _routing_log(home: Path, database_url: str | None) -> Iterator[AuditLog]:
    keys = load_keys(home)
    engine: Engine = open_database(database_url or home_database_url(home))
    try:
        yield AuditLog(engine, origin=origin_for(keys.card.id), signer=keys.sender())
    finally:
        engine.dispose()


@contextmanager
def _stored_log(home: Path, database_url: str | None) -> Iterator[AuditLog]:
    """The routing database's log opened to read: no key loaded, nothing signed."""
    engine: Engine = open_database(home_database_url(home, database_url))
    try:
        yield AuditLog.reader(engine)
    finally:
        engine.dispose()


def _verified_directory(directory_file: Path, authority_key: Path) -> Directory:
    return read_directory(directory_file, authority=read_pinned_authority(authority_key))


@audit.command()
@HOME
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@DATABASE_URL
@JSON
@_reasons
def export(home: Path, out: Path, database_url: str | None, as_json: bool) -> None:
    """Sign a checkpoint if the log grew, then write entries and checkpoints as JSON lines."""
    directory = load_home_directory(home)
    with _routing_log(home, database_url) as log:
        summary = log.export(out, directory=directory)
    if as_json:
        click.echo(json.dumps({"file": str(out), **asdict(summary)}))
    else:
        click.echo(
            f"{out}: {summary.entries} entries, {summary.checkpoints} checkpoints, "
            f"root {summary.root}"
        )


@audit.command()
@EXPORT_FILE
@NEWEST_DIRECTORY
@AUTHORITY_KEY
@LOG_ID
@click.option(
    "--checkpoint",
    "checkpoint_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A signed checkpoint kept from earlier, which the export must extend.",
)
@click.option("--workers", type=click.IntRange(min=1), help="Processes (default: every core).")
@click.option(
    "--quorum",
    type=click.IntRange(min=0),
    default=None,
    help="Witness cosignatures the newest checkpoint needs (default: the directory's quorum); "
    "a lower one is printed as lowered.",
)
@JSON
def verify(
    file: Path,
    directory_file: Path,
    authority_key: Path,
    log_id: str | None,
    checkpoint_file: Path | None,
    workers: int | None,
    quorum: int | None,
    as_json: bool,
) -> None:
    """Check every entry, envelope signature, checkpoint and the witness quorum; exit 1 if bad."""
    try:
        directory = _verified_directory(directory_file, authority_key)
        trusted = checkpoint_file.read_bytes() if checkpoint_file else None
        report = verify_export(
            file,
            directory,
            workers=workers,
            trusted_checkpoint=trusted,
            log_id=log_id,
            quorum=quorum,
        )
    except LogTampered as e:
        if as_json:
            click.echo(json.dumps({"intact": False, "index": e.index, "problem": e.problem}))
        else:
            click.echo(str(e))
        sys.exit(1)
    except (TrmError, OSError) as e:
        reason = e.reason if isinstance(e, TrmError) else "io"
        raise click.ClickException(f"{reason}: {e}") from e
    if as_json:
        click.echo(json.dumps({"intact": True, **asdict(report)}))
    else:
        click.echo(report.summary())


@audit.command()
@EXPORT_FILE
@AUTHORITY_KEY
@_directory_option(
    required=False,
    help_text="Take roles from this directory (default: the one embedded in the export, "
    "which must verify with the authority key).",
)
@click.option("--case", "case", help="Only this case reference.")
@click.option(
    "--against",
    "against",
    metavar="DBURL",
    default=None,
    help="Compare with the routing database at DBURL: exit 0 if it holds exactly the "
    "replayed states, else 1 listing every difference.",
)
@JSON
@_reasons
def replay(
    file: Path,
    authority_key: Path,
    directory_file: Path | None,
    case: str | None,
    against: str | None,
    as_json: bool,
) -> None:
    """Rebuild every case's handoff history from the export alone and print it."""
    authority = read_pinned_authority(authority_key)
    roles = read_directory(directory_file, authority=authority) if directory_file else None
    states = replay_export(file, roles, case=case, authority=authority)
    if against is not None:
        _compare(states, against, case, as_json)
        return
    if case is not None and case not in states:
        raise AuditError(f"case {case!r} does not appear in {file}")
    if as_json:
        click.echo(json.dumps({ref: s.to_dict() for ref, s in sorted(states.items())}))
        return
    for ref, state in sorted(states.items()):
        _print_case(ref, state)


def _compare(states: dict[str, CaseState], url: str, case: str | None, as_json: bool) -> None:
    """Print the differences between replayed states and the routing database's; exit 1 if any."""
    engine = open_database(url)
    try:
        stored = CaseStore(engine).all_states()
    finally:
        engine.dispose()
    if case is not None:
        stored = {ref: s for ref, s in stored.items() if ref == case}
    differences = diff_states(states, stored)
    if as_json:
        click.echo(json.dumps({"cases": len(states), "differences": differences}))
    elif differences:
        for line in differences:
            click.echo(line)
    else:
        click.echo(f"no difference: the {len(states)} case(s) of the log match the database")
    if differences:
        sys.exit(1)


def _print_case(ref: str, state: CaseState) -> None:
    click.echo(f"case {ref}: {state.stage or 'not opened'}")
    for row in timeline(state):
        gap = "" if row.since_previous_handoff is None else f" (+{row.since_previous_handoff})"
        stage = f" -> {row.stage_after}" if row.stage_after else ""
        anomaly = f"  ANOMALY {row.anomaly}" if row.anomaly else ""
        click.echo(
            f"  {row.received_at.isoformat()}{gap}  {row.kind} {row.sender} -> "
            f"{', '.join(row.recipients)}{stage}{anomaly}"
        )


@audit.command()
@HOME
@click.option("--envelope", "envelope_id", required=True, help="The envelope id to prove.")
@DATABASE_URL
@_reasons
def proof(home: Path, envelope_id: str, database_url: str | None) -> None:
    """Print an inclusion proof of an envelope against the newest signed checkpoint (JSON)."""
    with _stored_log(home, database_url) as log:
        out = inclusion_proof(log, envelope_id)
    click.echo(json.dumps(out, indent=2))


@audit.command()
@HOME
@click.option("--old", "old_size", required=True, type=click.IntRange(min=0), help="Older size.")
@DATABASE_URL
@_reasons
def consistency(home: Path, old_size: int, database_url: str | None) -> None:
    """Print a proof that the newest checkpoint extends the tree of --old entries (JSON)."""
    with _stored_log(home, database_url) as log:
        out = consistency_proof(log, old_size)
    click.echo(json.dumps(out, indent=2))


@audit.command("check-proof")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@NEWEST_DIRECTORY
@AUTHORITY_KEY
@LOG_ID
@click.option(
    "--checkpoint",
    "checkpoint_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="For a consistency proof: the older signed checkpoint you kept, which it must start from.",
)
@JSON
@_reasons
def check_proof_command(
    file: Path,
    directory_file: Path,
    authority_key: Path,
    log_id: str | None,
    checkpoint_file: Path | None,
    as_json: bool,
) -> None:
    """Check an inclusion or consistency proof offline against signed checkpoints."""
    directory = _verified_directory(directory_file, authority_key)
    kept = checkpoint_file.read_bytes() if checkpoint_file else None
    report = check_proof(file.read_bytes(), directory, log_id=log_id, kept=kept)
    if as_json:
        click.echo(json.dumps({"holds": True, **asdict(report)}))
    else:
        click.echo(report.summary())
