"""``trm audit``: export the routing service's log; verify, replay and prove it offline.

`export`, `proof` and `consistency` run on the routing service's home (its
keys, directory and database); `verify` and `replay` need only the export
file, and for `verify` the directory and the authority's public key.
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
from broker.directory import load_home_directory, read_directory
from broker.errors import AuditError, LogTampered, TrmError
from broker.keys import load_keys, read_pinned_authority
from services.audit import diff_states, replay_export, verify_export
from services.auditlog import AuditLog
from services.cases import CaseState, timeline
from services.casestore import CaseStore
from services.checkpoint import origin_for

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
@click.option(
    "--directory",
    "directory_file",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The trust directory (the newest: it carries revocations).",
)
@click.option(
    "--authority-key",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The directory authority's authority.pub.",
)
@click.option(
    "--checkpoint",
    "checkpoint_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A signed checkpoint kept from earlier, which the export must extend.",
)
@click.option("--workers", type=click.IntRange(min=1), help="Processes (default: every core).")
@JSON
def verify(
    file: Path,
    directory_file: Path,
    authority_key: Path,
    checkpoint_file: Path | None,
    workers: int | None,
    as_json: bool,
) -> None:
    """Check every entry, envelope signature and checkpoint; exit 1 naming the first bad entry."""
    try:
        directory = read_directory(directory_file, authority=read_pinned_authority(authority_key))
        trusted = checkpoint_file.read_bytes() if checkpoint_file else None
        report = verify_export(file, directory, workers=workers, trusted_checkpoint=trusted)
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
def replay(file: Path, case: str | None, against: str | None, as_json: bool) -> None:
    """Rebuild every case's handoff history from the export alone and print it."""
    states = replay_export(file, case=case)
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
    with _routing_log(home, database_url) as log:
        index = log.find(envelope_id)
        if index is None:
            raise AuditError(f"envelope {envelope_id} is not in the audit log")
        size, note = _signed_size(log)
        if index >= size:
            raise AuditError(f"entry {index} is not covered by a checkpoint yet")
        out: dict[str, Any] = {
            "envelope_id": envelope_id,
            "index": index,
            "size": size,
            "leaf_hash": log.leaf(index).hex(),
            "proof": [h.hex() for h in log.inclusion_proof(index, size)],
            "root": log.root(size).hex(),
            "checkpoint": note,
        }
    click.echo(json.dumps(out, indent=2))


@audit.command()
@HOME
@click.option("--old", "old_size", required=True, type=click.IntRange(min=0), help="Older size.")
@DATABASE_URL
@_reasons
def consistency(home: Path, old_size: int, database_url: str | None) -> None:
    """Print a proof that the newest checkpoint extends the tree of --old entries (JSON)."""
    with _routing_log(home, database_url) as log:
        size, note = _signed_size(log)
        if old_size > size:
            raise AuditError(f"the newest checkpoint covers {size} entries, fewer than {old_size}")
        out = {
            "old_size": old_size,
            "new_size": size,
            "old_root": log.root(old_size).hex(),
            "new_root": log.root(size).hex(),
            "proof": [h.hex() for h in log.consistency_proof(old_size, size)],
            "checkpoint": note,
        }
    click.echo(json.dumps(out, indent=2))


def _signed_size(log: AuditLog) -> tuple[int, str]:
    """Sign a checkpoint if the log grew; the newest checkpoint's size and note."""
    log.checkpoint()
    latest = log.latest_checkpoint()
    if latest is None:
        raise AuditError("the audit log is empty")
    return latest[0], latest[2].decode()
