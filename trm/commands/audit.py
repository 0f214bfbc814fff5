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
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click
from sqlalchemy.engine import Engine

from broker.database import home_database_url, open_database
from broker.directory import Directory, Role, load_home_directory, read_directory
from broker.errors import AuditError, LogTampered, TrmError
from broker.keys import load_keys, read_pinned_authority
from services.audit import diff_states, replay_export, verify_export
from services.auditlog import AuditLog
from services.cases import CaseState, timeline
from services.casestore import CaseStore
from services.checkpoint import origin_for
from services.proofs import check_proof, consistency_proof, inclusion_proof
from trm.progress import Meter

if TYPE_CHECKING:
    from services.membership import MembershipReport

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
    with _routing_log(home, database_url) as log, Meter("export") as meter:
        summary = log.export(out, directory=directory, progress=meter.update)
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
        with Meter("verify", unit="bytes") as meter:
            report = verify_export(
                file,
                directory,
                workers=workers,
                trusted_checkpoint=trusted,
                log_id=log_id,
                quorum=quorum,
                progress=meter.update,
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
    with Meter("replay", unit="bytes") as meter:
        states = replay_export(file, roles, case=case, authority=authority, progress=meter.update)
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


@audit.command("check-mine")
@click.option(
    "--home",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The mission's or NGO's home folder.",
)
@click.option("--since", default=None, help="Only envelopes since this ISO 8601 time (with zone).")
@click.option("--database-url", default=None, help="Its database [TRM_DATABASE_URL].")
@click.option("--amqp-url", default=None, help="RabbitMQ host [TRM_AMQP_URL].")
@click.option("--vhost", default=None, help="RabbitMQ vhost [TRM_AMQP_VHOST].")
@click.option(
    "--log-id",
    default=None,
    metavar="ID",
    help="The routing participant to ask (default: the directory's only one).",
)
@click.option(
    "--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
    help="Seconds to wait for the routing service's answer.",
)  # fmt: skip
@JSON
def check_mine(
    home: Path,
    since: str | None,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    log_id: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Prove each envelope this home sent or received is in a witnessed checkpoint; exit 1 if not.

    The routing service is asked over the network for inclusion proofs; each is
    checked against the installed directory, its checkpoint must carry the
    witness quorum, and its entry the very bytes this home holds.
    """
    from adapters.home import Home
    from services import membership

    try:
        settings = Home.resolve(home, database_url=database_url, amqp_url=amqp_url, vhost=vhost)
        directory = settings.directory()
        routing_id = log_id or _only_routing(directory)
        engine = settings.open_database()
        try:
            held = membership.held_since(engine, _since(since))
        finally:
            engine.dispose()
        report = membership.MembershipReport()
        for start in range(0, len(held), membership.MAX_ENVELOPES):
            part = held[start : start + membership.MAX_ENVELOPES]
            request_id = membership.new_request_id()
            answer = membership.ask(
                settings.amqp_settings(),
                settings.participant_id,
                routing_id,
                membership.request_body(request_id, part),
                request_id,
                timeout=timeout,
            )
            found = membership.check_answer(part, answer, directory, request_id=request_id)
            report.proven += found.proven
            report.missing += found.missing
            report.size = found.size or report.size
    except (TrmError, ValueError) as e:
        reason = e.reason if isinstance(e, TrmError) else "bad_input"
        raise click.ClickException(f"{reason}: {e}") from e
    _show_mine(report, as_json)
    if not report.complete:
        sys.exit(1)


def _only_routing(directory: Directory) -> str:
    routing = [p.id for p in directory.participants() if p.role is Role.ROUTING]
    if len(routing) != 1:
        raise AuditError(
            f"the directory lists {len(routing)} routing participants: name one with --log-id"
        )
    return routing[0]


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"--since {text!r} needs a time zone, e.g. 2026-03-01T00:00:00Z")
    return moment


def _show_mine(report: MembershipReport, as_json: bool) -> None:
    missing = [
        {"envelope_id": h.envelope_id, "how": h.how, "problem": why} for h, why in report.missing
    ]
    if as_json:
        click.echo(
            json.dumps({"proven": len(report.proven), "size": report.size, "missing": missing})
        )
        return
    size = "" if report.size is None else f" (witnessed checkpoint of size {report.size})"
    click.echo(f"{len(report.proven)} envelopes proven in the audit log{size}")
    for item in missing:
        click.echo(f"NOT PROVEN {item['envelope_id']} ({item['how']}): {item['problem']}")


@audit.command("forks")
@click.option(
    "--home",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The auditor's home folder (keys, directory, amqp-password).",
)
@click.option("--amqp-url", default=None, help="RabbitMQ host [TRM_AMQP_URL].")
@click.option("--vhost", default=None, help="RabbitMQ vhost [TRM_AMQP_VHOST].")
@JSON
def forks(home: Path, amqp_url: str | None, vhost: str | None, as_json: bool) -> None:
    """Take the witnesses' fork reports from trm.witness.<id>, verify and keep them; exit 1 if any.

    Each report must be signed by a witness of the installed directory (and
    sent by it), carry two checkpoints signed by the routing participant
    their origin names, and the two must conflict. Verified reports are kept
    in HOME/fork-reports.jsonl and listed with those kept before; a report
    that fails is listed as refused, with the reason, and dropped.
    """
    from adapters.home import Home
    from services import forkreport

    try:
        settings = Home.resolve(home, amqp_url=amqp_url, vhost=vhost)
        directory = settings.directory()
        outcome = forkreport.take(
            home, settings.amqp_settings(), settings.participant_id, directory
        )
        kept, refused = _kept_forks(home, directory), outcome.refused
    except TrmError as e:
        raise click.ClickException(f"{e.reason}: {e}") from e
    if as_json:
        shown = {
            "forks": [r.shown() for r in kept],
            "refused": [{"sent_by": who, "reason": why} for who, why in refused],
            "new": len(outcome.verified),
        }
        click.echo(json.dumps(shown))
    else:
        _print_forks(kept, refused)
    if kept:
        sys.exit(1)


def _kept_forks(home: Path, directory: Directory) -> list[Any]:
    """The kept reports, verified again with the directory (a kept one never fails silently)."""
    from services import forkreport

    return [
        forkreport.verify_report(wire, directory, sent_by=forkreport.sender_of(wire))
        for wire in forkreport.stored(home)
    ]


def _print_forks(kept: list[Any], refused: list[tuple[str | None, str]]) -> None:
    for report in kept:
        click.echo(
            f"FORK {report.origin} reported by {report.witness} ({report.kind}, {report.strength}, "
            f"sizes {report.sizes[0]} and {report.sizes[1]}, {report.detected_at}): {report.detail}"
        )
        for label, note in (("cosigned", report.cosigned_note), ("offered", report.offered_note)):
            click.echo(f"  {label} note:")
            for line in note.splitlines():
                click.echo(f"    {line}")
    for who, why in refused:
        click.echo(f"REFUSED a report sent by {who}: {why}")
    if not kept:
        click.echo("no fork reported")
