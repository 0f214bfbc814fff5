"""``trm routing run`` (the routing service process) and ``trm cases list|show``."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import click
import structlog
from sqlalchemy.engine import Engine

from broker.database import home_database_url, open_database
from broker.errors import ConfigError, KeyFileError, TrmError
from broker.keys import load_keys
from broker.metrics import serve
from broker.topology import PASSWORD_FILE
from broker.transport import AmqpSettings
from services.cases import CaseState, timeline
from services.casestore import CaseStore, ReminderRecord
from services.deadlines import DEFAULT_POLICIES, Deadline, Policy, deadline_for, load_policies
from services.deadlines import status as deadline_status
from services.leadership import members
from services.metrics import RoutingCollector
from services.routing import HomeDirectory, RoutingService, Timers
from trm import logs
from trm.commands.metrics import metrics_options

PASSWORD_FILE_ENV = "TRM_AMQP_PASSWORD_FILE"  # noqa: S105 - the name of a variable, not a secret
DEFAULT_BROKER = "amqp://127.0.0.1:5672/"
"""Host and port only: the routing service logs in as itself, never as an administrator."""

_HOME = click.option(
    "--home",
    required=True,
    envvar="TRM_HOME",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The routing service's home folder (keys, directory.json, trm.db) [TRM_HOME].",
)
_DATABASE = click.option(
    "--database-url",
    default=None,
    help="Database URL [TRM_DATABASE_URL; default: sqlite in HOME/trm.db].",
)
_POLICIES = click.option(
    "--policies",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Deadline policies file (JSON or TOML) replacing the defaults stage by stage.",
)
_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
_AT = click.option(
    "--at",
    "at_text",
    default=None,
    help="Judge deadlines at this time (ISO 8601 with a zone) instead of now.",
)


def _fail(error: TrmError) -> click.ClickException:
    return click.ClickException(f"{error.reason}: {error}")


def _engine(home: Path, url: str | None) -> Engine:
    return open_database(url or home_database_url(home))


def _policies(path: Path | None) -> tuple[Policy, ...]:
    return DEFAULT_POLICIES if path is None else load_policies(path)


def _at(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as e:
        raise click.BadParameter(f"{text!r} is not an ISO 8601 time", param_hint="--at") from e
    if moment.tzinfo is None:
        raise click.BadParameter("give a time zone, e.g. 2026-03-01T08:00:00Z", param_hint="--at")
    return moment.astimezone(UTC)


# --- trm routing ---------------------------------------------------------------------


@click.group()
def routing() -> None:
    """The routing service: verify and log every envelope, track cases and deadlines."""


def amqp_password(home: Path) -> str:
    """The routing user's RabbitMQ password: TRM_AMQP_PASSWORD_FILE, else HOME/amqp-password."""
    path = Path(os.environ.get(PASSWORD_FILE_ENV) or home / PASSWORD_FILE)
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise KeyFileError(
            f"cannot read the RabbitMQ password {path} ({e.strerror}): run "
            f"`trm broker provision --keys-root ...` or set {PASSWORD_FILE_ENV}"
        ) from e
    if not secret:
        raise KeyFileError(f"the RabbitMQ password file {path} is empty")
    return secret


@routing.command("run")
@_HOME
@_DATABASE
@click.option(
    "--amqp-url",
    envvar="TRM_AMQP_URL",
    default=DEFAULT_BROKER,
    show_default=True,
    help="RabbitMQ host and port [TRM_AMQP_URL]; credentials in it are ignored: the "
    "service logs in as its participant id with HOME/amqp-password.",
)
@click.option("--vhost", envvar="TRM_AMQP_VHOST", default=None, help="RabbitMQ vhost.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--checkpoint-interval", type=click.FloatRange(min=0.01), default=60.0, show_default=True
)
@click.option("--deadline-poll", type=click.FloatRange(min=0.01), default=30.0, show_default=True)
@click.option(
    "--verify-workers",
    envvar="TRM_VERIFY_WORKERS",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Processes that verify envelopes beside the service's own [TRM_VERIFY_WORKERS]; "
    "0 verifies all in the service's process.",
)
@_POLICIES
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append JSON log lines here instead of standard error.",
)
@metrics_options
def run(
    home: Path,
    database_url: str | None,
    amqp_url: str,
    vhost: str | None,
    checkpoint_every: int,
    checkpoint_interval: float,
    deadline_poll: float,
    verify_workers: int,
    policies: Path | None,
    log_file: Path | None,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run the routing service until SIGTERM or SIGINT; sign a final checkpoint; exit 0."""
    handle = logs.open_log_file(log_file)
    logs.configure(handle)
    try:
        keys = load_keys(home)
        settings = AmqpSettings.from_url(
            amqp_url, vhost=vhost, username=keys.card.id, password=amqp_password(home)
        )
        timers = Timers(checkpoint_every, checkpoint_interval, deadline_poll)
        engine = _engine(home, database_url)
        service = RoutingService(
            home,
            engine,
            HomeDirectory(home),
            policies=_policies(policies),
            timers=timers,
            keys=keys,
            verify_workers=verify_workers,
        )
        service.directory()  # refuse to start without a verified directory
        if metrics_port is not None:
            serve(metrics_port, metrics_host, RoutingCollector(engine, service.policies))
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            service.run(settings, stop)
        finally:
            engine.dispose()
    except TrmError as e:
        structlog.get_logger(__name__).error("routing service failed", reason=e.reason)
        raise _fail(e) from e
    finally:
        if handle is not None:
            handle.close()


@routing.command("status")
@_HOME
@_DATABASE
@_JSON
def status(home: Path, database_url: str | None, as_json: bool) -> None:
    """Which routing processes run on the database, leader and standbys; exit 1 if none leads."""
    try:
        engine = _engine(home, database_url)
        try:
            found = members(engine)
        finally:
            engine.dispose()
    except TrmError as e:
        raise _fail(e) from e
    if as_json:
        click.echo(json.dumps({"members": [{"role": m.role, "pid": m.pid} for m in found]}))
    elif not found:
        click.echo("no routing service runs on this database")
    for m in [] if as_json else found:
        click.echo(f"{m.role:<8} pid {m.pid}")
    if not any(m.role == "leader" for m in found):
        raise click.exceptions.Exit(1)


# --- trm cases -------------------------------------------------------------------------


@click.group()
def cases() -> None:
    """The cases the routing service tracks: stages, deadlines, timelines."""


def _deadline_json(deadline: Deadline | None, at: datetime) -> dict[str, Any] | None:
    if deadline is None:
        return None
    return {
        "stage": str(deadline.stage),
        "owed_by": deadline.owed_by,
        "warn_at": deadline.warn_at.isoformat(),
        "due": deadline.due.isoformat(),
        "status": str(deadline_status(deadline, at)),
        "about_envelope": deadline.about_envelope,
    }


def case_summary(state: CaseState, policies: Sequence[Policy], at: datetime) -> dict[str, Any]:
    """One case as `trm cases list --json` prints it."""
    deadline = deadline_for(state, policies)
    return {
        "case": state.case,
        "stage": None if state.stage is None else str(state.stage),
        "since": None if state.stage_entered_at is None else state.stage_entered_at.isoformat(),
        "updated_at": state.updated_at.isoformat(),
        "deadline": _deadline_json(deadline, at),
        "owed_by": None if deadline is None else deadline.owed_by,
        "anomalies": len(state.anomalies),
    }


def _short_time(text: str | None) -> str:
    return "-" if text is None else text[:19].replace("T", " ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


@cases.command("list")
@_HOME
@_DATABASE
@_POLICIES
@click.option("--overdue", is_flag=True, help="Only cases whose deadline has passed.")
@click.option(
    "--needs-action",
    "needs_action",
    metavar="ID",
    default=None,
    help="Only cases where participant ID owes the next step.",
)
@_AT
@_JSON
def list_cases(
    home: Path,
    database_url: str | None,
    policies: Path | None,
    overdue: bool,
    needs_action: str | None,
    at_text: str | None,
    as_json: bool,
) -> None:
    """Every case: stage, since when, deadline status and who owes the next step."""
    at = _at(at_text)
    try:
        chosen = _policies(policies)
        engine = _engine(home, database_url)
        try:
            states = CaseStore(engine).states()
        finally:
            engine.dispose()
    except TrmError as e:
        raise _fail(e) from e
    rows = [case_summary(s, chosen, at) for s in states]
    if overdue:
        rows = [r for r in rows if r["deadline"] and r["deadline"]["status"] == "overdue"]
    if needs_action is not None:
        rows = [r for r in rows if r["owed_by"] == needs_action]
    if as_json:
        click.echo(json.dumps({"at": at.isoformat(), "cases": rows}, indent=2))
        return
    if not rows:
        click.echo("no cases")
        return
    table = [
        [
            r["case"],
            r["stage"] or "-",
            _short_time(r["since"]),
            "-" if r["deadline"] is None else _short_time(r["deadline"]["due"]),
            "-" if r["deadline"] is None else r["deadline"]["status"],
            r["owed_by"] or "-",
            str(r["anomalies"]),
        ]
        for r in rows
    ]
    headers = ["CASE", "STAGE", "SINCE (UTC)", "DUE (UTC)", "STATUS", "OWED BY", "ANOMALIES"]
    click.echo(_table(headers, table))


def case_detail(
    state: CaseState,
    anomalies: Sequence[Any],
    reminders: Sequence[ReminderRecord],
    policies: Sequence[Policy],
    at: datetime,
) -> dict[str, Any]:
    """One case as `trm cases show --json` prints it: summary, timeline, anomalies, reminders."""
    detail = case_summary(state, policies, at)
    detail["origin"] = state.origin
    detail["parties"] = sorted(state.parties)
    detail["timeline"] = [
        {
            "envelope_id": row.envelope_id,
            "kind": str(row.kind),
            "sender": row.sender,
            "recipients": list(row.recipients),
            "sent_at": row.sent_at.isoformat(),
            "received_at": row.received_at.isoformat(),
            "stage_after": None if row.stage_after is None else str(row.stage_after),
            "gap_seconds": None
            if row.since_previous_handoff is None
            else row.since_previous_handoff.total_seconds(),
            "anomaly": row.anomaly,
            "awaiting_receipt": list(row.awaiting_receipt),
        }
        for row in timeline(state)
    ]
    detail["anomaly_details"] = [
        {
            "envelope_id": a.envelope_id,
            "reason": a.reason,
            "detail": a.detail,
            "recorded_at": a.recorded_at.isoformat(),
        }
        for a in anomalies
    ]
    detail["reminders"] = [
        {
            "stage": r.stage,
            "status": r.status,
            "owed_by": r.owed_by,
            "due": r.due.isoformat(),
            "sent_at": r.sent_at.isoformat(),
            "envelope_id": r.envelope_id,
        }
        for r in reminders
    ]
    return detail


def _gap(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    span = timedelta(seconds=round(seconds))
    days, rest = span.days, span.seconds
    hours, minutes = rest // 3600, rest % 3600 // 60
    return f"{days}d{hours:02d}h{minutes:02d}m" if days else f"{hours}h{minutes:02d}m"


@cases.command("show")
@click.argument("ref")
@_HOME
@_DATABASE
@_POLICIES
@_AT
@_JSON
def show_case(
    ref: str,
    home: Path,
    database_url: str | None,
    policies: Path | None,
    at_text: str | None,
    as_json: bool,
) -> None:
    """The case's timeline: who sent what to whom, when, the stage after, gaps, anomalies."""
    at = _at(at_text)
    try:
        chosen = _policies(policies)
        engine = _engine(home, database_url)
        try:
            store = CaseStore(engine)
            state = store.get(ref)
            anomalies = store.anomalies(ref)
            reminders = store.reminders(ref)
        finally:
            engine.dispose()
    except TrmError as e:
        raise _fail(e) from e
    if state is None:
        raise _fail(ConfigError(f"no case {ref!r} in the routing database: check the reference"))
    detail = case_detail(state, anomalies, reminders, chosen, at)
    if as_json:
        click.echo(json.dumps(detail, indent=2))
        return
    _print_detail(detail)


def _print_detail(detail: dict[str, Any]) -> None:
    deadline = detail["deadline"]
    click.echo(f"case     {detail['case']}")
    click.echo(f"stage    {detail['stage'] or '-'} since {_short_time(detail['since'])} UTC")
    click.echo(f"origin   {detail['origin'] or '-'}")
    click.echo(f"parties  {', '.join(detail['parties']) or '-'}")
    if deadline is None:
        click.echo("deadline none at this stage")
    else:
        click.echo(
            f"deadline {deadline['status']}: {deadline['owed_by'] or 'nobody named'} owes the "
            f"next step by {_short_time(deadline['due'])} UTC"
        )
    click.echo("")
    rows = [
        [
            _short_time(t["received_at"]),
            t["kind"],
            t["sender"],
            ",".join(t["recipients"]),
            t["stage_after"] or "-",
            _gap(t["gap_seconds"]),
            t["anomaly"] or "",
        ]
        for t in detail["timeline"]
    ]
    headers = ["RECEIVED (UTC)", "KIND", "FROM", "TO", "STAGE AFTER", "GAP", "ANOMALY"]
    click.echo(_table(headers, rows))
    if detail["anomaly_details"]:
        click.echo("\nanomalies")
        for a in detail["anomaly_details"]:
            click.echo(f"  {a['envelope_id']}  {a['reason']}: {a['detail']}")
    if detail["reminders"]:
        click.echo("\nreminders sent")
        for r in detail["reminders"]:
            click.echo(
                f"  {_short_time(r['sent_at'])}  {r['status']} {r['stage']} "
                f"to {r['owed_by'] or '-'} (due {_short_time(r['due'])})"
            )
