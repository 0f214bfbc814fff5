"""The participant commands: adapter run, send, ack, outbox, quarantine and health.

Every command takes ``--home DIR`` and the settings of `adapters.home.Home`
(flags with ``TRM_*`` environment variables as defaults).
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, ParamSpec, TypeVar

import click
import sqlalchemy as sa

from adapters.home import Home
from broker.database import quarantine_table, storage_errors
from broker.errors import ConfigError, TrmError
from broker.reception import RESEND_AFTER, RESEND_TRIES, Awaiting
from schemas.header import EnvelopeHeader
from trm import logs
from trm.commands.metrics import metrics_options

P = ParamSpec("P")
R = TypeVar("R")


def _home_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The --home option and the settings every adapter command shares."""
    options = [
        click.option(
            "--home",
            required=True,
            type=click.Path(file_okay=False, exists=True, path_type=Path),
            help="The participant's home folder (keys, directory, amqp-password).",
        ),
        click.option(
            "--database-url",
            default=None,
            help="Local database [TRM_DATABASE_URL; default sqlite:///HOME/trm.db].",
        ),
        click.option(
            "--amqp-url",
            default=None,
            help="RabbitMQ host [TRM_AMQP_URL; default amqp://127.0.0.1:5672/].",
        ),
        click.option(
            "--vhost",
            default=None,
            help="RabbitMQ vhost [TRM_AMQP_VHOST; default HOME/amqp-vhost, else /].",
        ),
        click.option(
            "--case-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Where decrypted payloads are written [TRM_CASE_DIR; default HOME/inbox].",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _home(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    case_system: str | None = None,
) -> Home:
    return Home.resolve(
        home,
        database_url=database_url,
        amqp_url=amqp_url,
        vhost=vhost,
        case_dir=case_dir,
        case_system=case_system,
    )


def _reasons(command: Callable[P, R]) -> Callable[P, R]:
    """End the command with a one-line reason instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        # Log lines go to stderr so that stdout stays the command's answer.
        logs.configure()
        try:
            return command(*args, **kwargs)
        except TrmError as e:
            raise click.ClickException(f"{e.reason}: {e}") from e

    return wrapper


# --- trm adapter run -----------------------------------------------------------------


@click.group()
def adapter() -> None:
    """The participant adapter: consume the inbox, relay the outbox."""


@adapter.command("run")
@_home_options
@click.option(
    "--case-system",
    default=None,
    help="Case system as package.module:factory or entry point name [TRM_CASE_SYSTEM].",
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append JSON log lines here instead of stderr.",
)
@click.option(
    "--erasure-retry",
    type=click.FloatRange(min=0.05),
    default=30.0,
    show_default=True,
    envvar="TRM_ERASURE_RETRY_SECONDS",
    help="Seconds between tries of an erasure that failed [TRM_ERASURE_RETRY_SECONDS].",
)
@click.option(
    "--resend-after",
    type=click.FloatRange(min=0, min_open=True),
    default=RESEND_AFTER,
    show_default=True,
    envvar="TRM_RESEND_AFTER_SECONDS",
    help="Seconds before an envelope without a delivery receipt is sent again to the "
    "recipients that did not answer, doubled after each try [TRM_RESEND_AFTER_SECONDS].",
)
@click.option(
    "--resend-tries",
    type=click.IntRange(min=1),
    default=RESEND_TRIES,
    show_default=True,
    envvar="TRM_RESEND_TRIES",
    help="Tries, the first publish included, before a missing receipt is flagged "
    "(logged, shown by trm outbox status) [TRM_RESEND_TRIES].",
)
@metrics_options
@_reasons
def run(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    case_system: str | None,
    log_file: Path | None,
    erasure_retry: float,
    resend_after: float,
    resend_tries: int,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run until SIGTERM or SIGINT: apply each delivery once, publish the outbox."""
    from adapters.adapter import Adapter
    from adapters.metrics import AdapterCollector
    from broker.metrics import serve

    handle = logs.open_log_file(log_file)
    logs.configure(handle)
    try:
        process = Adapter(
            _home(home, database_url, amqp_url, vhost, case_dir, case_system),
            erasure_retry=erasure_retry,
            resend_after=resend_after,
            resend_tries=resend_tries,
        )
        if metrics_port is not None:
            serve(metrics_port, metrics_host, AdapterCollector(process.home))
        stop = threading.Event()

        def on_signal(_signum: int, _frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        process.run(stop)
    finally:
        if handle is not None:
            handle.close()


# --- trm send / trm ack ----------------------------------------------------------------


@click.command()
@click.argument("kind")
@_home_options
@click.option("--to", "to", required=True, help="Recipient ids, comma-separated.")
@click.option(
    "--case",
    "case",
    required=True,
    help="The case reference, <owner>.<reference>; a new case's owner is the sender.",
)
@click.option(
    "--payload",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON file with the message, checked against the kind's schema.",
)
@click.option("--reply-to", default=None, help="Envelope id of the message this answers.")
@click.option(
    "--allow-classical",
    is_flag=True,
    help="Seal for hybrid and X25519-only recipients together; the payload is then only "
    "as strong as X25519 for every recipient.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_reasons
def send(
    kind: str,
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    to: str,
    case: str,
    payload: Path,
    reply_to: str | None,
    allow_classical: bool,
    as_json: bool,
) -> None:
    """Seal a KIND message and queue it; the running adapter publishes it.

    Recipients with hybrid (ML-KEM-768+X25519) keys and recipients with
    X25519 keys only are refused together, unless --allow-classical.
    """
    from uuid import UUID

    from adapters.sending import load_payload, send_message

    message = load_payload(kind, payload)
    answer = None
    if reply_to is not None:
        try:
            answer = UUID(reply_to)
        except ValueError as e:
            raise ConfigError(f"--reply-to {reply_to!r} is not an envelope id (a UUID)") from e
    participant = _home(home, database_url, amqp_url, vhost, case_dir)
    sealed = send_message(
        participant,
        message,
        to=to.split(","),
        case=case,
        reply_to=answer,
        allow_classical=allow_classical,
    )
    if allow_classical:
        _warn_classical(participant, sealed.header)
    _print_sent(sealed.header.model_dump(mode="json"), as_json)


def _warn_classical(home: Home, header: EnvelopeHeader) -> None:
    """Say on stderr what sealing for classical recipients cost, if any was among them."""
    from broker.envelope import classical_recipients

    classical = classical_recipients(home.directory(), header.recipients, header.sent_at)
    if not classical:
        return
    who = (
        f"{classical[0]} holds only a classical X25519 key"
        if len(classical) == 1
        else f"{', '.join(classical)} hold only classical X25519 keys"
    )
    click.echo(
        f"warning: {who}: envelope {header.id} is only as strong as X25519 for every "
        "recipient, the hybrid ones included",
        err=True,
    )


def _print_sent(header: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"envelope_id": header["id"], **header}, indent=2))
    else:
        click.echo(header["id"])


@click.command()
@_home_options
@click.option("--case", "case", required=True, help="The case whose returnee was received.")
@click.option("--place", default=None, help="Where the person was received.")
@click.option("--note", default=None, help="A note on the person's condition (encrypted).")
@click.option(
    "--allow-classical",
    is_flag=True,
    help="Seal for hybrid and X25519-only missions together; the note is then only as "
    "strong as X25519 for every mission.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_reasons
def ack(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    case: str,
    place: str | None,
    note: str | None,
    allow_classical: bool,
    as_json: bool,
) -> None:
    """Confirm reception of a returnee to every mission that is a party to the case."""
    from adapters.sending import confirm_reception

    participant = _home(home, database_url, amqp_url, vhost, case_dir)
    sealed = confirm_reception(
        participant, case, place=place, note=note, allow_classical=allow_classical
    )
    if allow_classical:
        _warn_classical(participant, sealed.header)
    _print_sent(sealed.header.model_dump(mode="json"), as_json)


# --- trm outbox / trm quarantine --------------------------------------------------------


@click.group()
def outbox() -> None:
    """What waits to be published."""


@outbox.command("status")
@_home_options
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_reasons
def outbox_status(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    as_json: bool,
) -> None:
    """Pending and sent envelopes, receipts received, and each receipt still awaited.

    An envelope awaiting receipts is listed with each recipient that has not
    answered: how many times it was published to it, when it is resent next,
    or since when it is flagged (no receipt after every try).
    """
    from broker.outbox import Outbox
    from broker.reception import awaiting

    engine = _home(home, database_url, amqp_url, vhost, case_dir).open_database()
    try:
        status = Outbox(engine).status()
        waits = awaiting(engine)
    finally:
        engine.dispose()
    envelopes = _by_envelope(waits)
    row = {
        "pending": status.pending,
        "sent": status.sent,
        "oldest_pending": _iso(status.oldest_pending),
        "last_error": status.last_error,
        "receipts": status.receipts,
        "awaiting": status.awaiting,
        "flagged": status.flagged,
        "awaiting_receipts": envelopes,
    }
    if as_json:
        click.echo(json.dumps(row, indent=2))
        return
    click.echo(
        f"pending {status.pending}, sent {status.sent}, receipts {status.receipts}, "
        f"awaiting {status.awaiting} (flagged {status.flagged})"
    )
    if status.oldest_pending is not None:
        click.echo(f"oldest pending since {_iso(status.oldest_pending)}")
    if status.last_error:
        click.echo(f"last error: {status.last_error}")
    for envelope in envelopes:
        click.echo(
            f"envelope {envelope['envelope_id']}  {envelope['kind']}  case {envelope['case']}  "
            f"sent {envelope['sent_at']}"
        )
        for wait in envelope["recipients"]:
            when = (
                f"FLAGGED since {wait['flagged_at']}"
                if wait["flagged_at"]
                else f"next resend {wait['next_resend_at']}"
            )
            click.echo(f"  {wait['recipient']:<32} tries {wait['tries']:<3} {when}")


def _by_envelope(waits: list[Awaiting]) -> list[dict[str, Any]]:
    """The awaited receipts grouped by envelope, oldest envelope first, for printing."""
    envelopes: dict[str, dict[str, Any]] = {}
    for wait in waits:
        envelope = envelopes.setdefault(
            wait.envelope_id,
            {
                "envelope_id": wait.envelope_id,
                "case": wait.case,
                "kind": wait.kind,
                "sent_at": _iso(wait.sent_at),
                "recipients": [],
            },
        )
        envelope["recipients"].append(
            {
                "recipient": wait.recipient,
                "tries": wait.tries,
                "next_resend_at": _iso(wait.next_resend_at),
                "flagged_at": _iso(wait.flagged_at),
            }
        )
    return list(envelopes.values())


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


@click.group()
def quarantine() -> None:
    """Envelopes refused on arrival, and why."""


@quarantine.command("list")
@_home_options
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@_reasons
def quarantine_list(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    as_json: bool,
) -> None:
    """Every quarantined envelope: id, time, sender, reason.

    Besides the inbox's records (numbered), the messages the broker moved to
    the quarantine itself (at the delivery limit), listed as b-<digest>.
    """
    from broker.quarantine import entries

    settings = _home(home, database_url, amqp_url, vhost, case_dir)
    held = _broker_messages(settings)
    engine = settings.open_database()
    try:
        found = entries(engine, held)
    finally:
        engine.dispose()
    records = [
        {
            "id": e.id,
            "envelope_id": e.envelope_id,
            "sender": e.sender,
            "reason": e.reason,
            "received_at": _iso(e.received_at),
            "redeliveries": e.redeliveries,
            "requeued_at": _iso(e.requeued_at),
            "in_database": e.in_database,
        }
        for e in found
    ]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    if not records:
        click.echo("the quarantine is empty")
    for rec in records:
        requeued = f"  requeued {rec['requeued_at']}" if rec["requeued_at"] else ""
        click.echo(
            f"{rec['id']:>5}  {rec['received_at'] or 'in the broker only':<32}  "
            f"{rec['reason']:<20} sender {rec['sender'] or '?'}  "
            f"envelope {rec['envelope_id'] or '?'}{requeued}"
        )


def _broker_messages(home: Home) -> list[Any]:
    """The broker quarantine's messages; none, with a warning, if the broker cannot be read."""
    from broker.quarantine import BrokerQuarantine

    try:
        return BrokerQuarantine(home.amqp_settings(), home.participant_id).messages()
    except TrmError as e:
        click.echo(f"warning: the broker quarantine was not read ({e.reason}: {e})", err=True)
        return []


@quarantine.command("requeue")
@click.argument("record_id")
@_home_options
@_reasons
def quarantine_requeue(
    record_id: str,
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
) -> None:
    """Send RECORD_ID back to this inbox with its original bytes, once its cause is fixed.

    The running adapter checks it as on arrival: applies it, absorbs it as a
    duplicate if it was applied meanwhile, or quarantines it again.
    """
    from broker.quarantine import BrokerQuarantine, requeue

    settings = _home(home, database_url, amqp_url, vhost, case_dir)
    broker = BrokerQuarantine(settings.amqp_settings(), settings.participant_id)
    engine = settings.open_database()
    try:
        entry = requeue(engine, broker, record_id)
    finally:
        engine.dispose()
    click.echo(
        f"requeued {entry.id} (envelope {entry.envelope_id or '?'}) to {broker.participant_id}"
    )


@quarantine.command("purge")
@_home_options
@click.option("--yes", is_flag=True, help="Purge without asking.")
@_reasons
def quarantine_purge(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    yes: bool,
) -> None:
    """Delete every quarantine record and empty the broker quarantine; asks first."""
    from broker.quarantine import BrokerQuarantine, purge

    settings = _home(home, database_url, amqp_url, vhost, case_dir)
    if not yes:
        click.confirm(
            f"Delete every quarantined envelope of {settings.participant_id}, here and in "
            "the broker? They cannot be requeued afterwards",
            abort=True,
        )
    broker = BrokerQuarantine(settings.amqp_settings(), settings.participant_id)
    engine = settings.open_database()
    try:
        rows, messages = purge(engine, broker)
    finally:
        engine.dispose()
    click.echo(f"purged {rows} records and {messages} broker messages")


@quarantine.command("show")
@click.argument("record_id", type=int)
@_home_options
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@_reasons
def quarantine_show(
    record_id: int,
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    as_json: bool,
) -> None:
    """One quarantined envelope: reason, detail, sender, time and its header, never its payload."""
    from broker.envelope import read_header

    q = quarantine_table.c
    rows = _query(
        _home(home, database_url, amqp_url, vhost, case_dir),
        sa.select(quarantine_table).where(q.id == record_id),
    )
    if not rows:
        raise ConfigError(f"no quarantine record {record_id}: see `trm quarantine list`")
    r = rows[0]
    header: dict[str, Any] | None
    try:
        header = read_header(r.body).model_dump(mode="json")
    except TrmError:
        header = None
    record = {
        "id": r.id,
        "envelope_id": r.envelope_id,
        "sender": r.sender,
        "reason": r.reason,
        "detail": r.detail,
        "received_at": _iso(r.received_at),
        "redeliveries": r.redeliveries,
        "size": len(r.body),
        "unverified_header": header,
    }
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    for key in ("id", "envelope_id", "sender", "reason", "detail", "received_at", "redeliveries"):
        click.echo(f"{key}: {record[key]}")
    click.echo(f"size: {record['size']} bytes")
    if header is None:
        click.echo("header (UNVERIFIED): unreadable, the envelope's framing is broken")
        return
    click.echo("header (UNVERIFIED: as claimed by the envelope, not checked):")
    for key, value in header.items():
        click.echo(f"  {key}: {value}")


def _query(home: Home, statement: sa.Select[Any]) -> list[Any]:
    engine = home.open_database()
    try:
        with storage_errors("reading the quarantine"), engine.connect() as conn:
            return list(conn.execute(statement).all())
    finally:
        engine.dispose()


# --- trm health -------------------------------------------------------------------------


@click.command()
@_home_options
@click.option("--json", "as_json", is_flag=True, help="Print each check as JSON.")
def health(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    as_json: bool,
) -> None:
    """Check keys, directory, database and broker login; exit 0 if all pass, else 1."""
    from adapters.home import check_health

    results = check_health(_home(home, database_url, amqp_url, vhost, case_dir))
    if as_json:
        click.echo(json.dumps([{"check": c, "ok": ok, "detail": d} for c, ok, d in results]))
    else:
        for check, ok, detail in results:
            click.echo(f"{'ok  ' if ok else 'FAIL'} {check}: {detail}")
    if not all(ok for _, ok, _ in results):
        sys.exit(1)
