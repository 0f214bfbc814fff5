"""``trm refer``, ``trm service``, ``trm withdraw`` and ``trm case``: a participant's cases.

Each sends to, or shows, the case as this home knows it: its owner, its
verified parties, its stage, whether consent was withdrawn and what was
erased. Replies go to the case's parties, never to a list typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from adapters.home import Home
from broker.envelope import SealedEnvelope
from broker.errors import SchemaViolation
from schemas.base import MessageKind
from trm.commands.adapter import _home, _home_options, _print_sent, _reasons, _warn_classical

ALLOW_CLASSICAL = click.option(
    "--allow-classical",
    is_flag=True,
    help="Seal for hybrid and X25519-only parties together; the payload is then only "
    "as strong as X25519 for every party.",
)


@click.command()
@_home_options
@click.option("--to", "to", required=True, help="The organisations asked, comma-separated.")
@click.option(
    "--case", "case", required=True, help="The new case's reference: <your id>.<reference>."
)
@click.option(
    "--payload",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON file with the referral_request (see `trm schemas export`).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_reasons
def refer(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    to: str,
    case: str,
    payload: Path,
    as_json: bool,
) -> None:
    """Open a referral case: ask another organisation to provide services to a person."""
    from adapters.sending import load_payload, send_message

    message = load_payload(MessageKind.REFERRAL_REQUEST, payload)
    sealed = send_message(
        _home(home, database_url, amqp_url, vhost, case_dir), message, to=to.split(","), case=case
    )
    _print_sent(sealed.header.model_dump(mode="json"), as_json)


@click.group()
def service() -> None:
    """Report a referral's services to every other party of the case."""


@service.command("started")
@_home_options
@click.option("--case", "case", required=True, help="The referral case.")
@click.option(
    "--services", required=True, help="The services started, comma-separated (vocabulary)."
)
@click.option("--note", default=None, help="A note (encrypted).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@ALLOW_CLASSICAL
@_reasons
def service_started(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    case: str,
    services: str,
    note: str | None,
    allow_classical: bool,
    as_json: bool,
) -> None:
    """The services accepted have started."""
    from adapters.sending import report_service

    participant = _home(home, database_url, amqp_url, vhost, case_dir)
    sealed = report_service(
        participant,
        case,
        completed=False,
        services=[s.strip() for s in services.split(",") if s.strip()],
        note=note,
        allow_classical=allow_classical,
    )
    _sent(participant, sealed, allow_classical, as_json)


@service.command("completed")
@_home_options
@click.option("--case", "case", required=True, help="The referral case.")
@click.option(
    "--not-done",
    "not_done",
    default=None,
    help="Why the services were not provided (vocabulary); without it they were done.",
)
@click.option("--note", default=None, help="A note (encrypted).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@ALLOW_CLASSICAL
@_reasons
def service_completed(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    case: str,
    not_done: str | None,
    note: str | None,
    allow_classical: bool,
    as_json: bool,
) -> None:
    """The services have ended: done, or not done with the reason."""
    from adapters.sending import report_service

    participant = _home(home, database_url, amqp_url, vhost, case_dir)
    sealed = report_service(
        participant,
        case,
        completed=True,
        not_done_reason=not_done,
        note=note,
        allow_classical=allow_classical,
    )
    _sent(participant, sealed, allow_classical, as_json)


@click.command()
@_home_options
@click.option("--case", "case", required=True, help="The case whose person withdrew consent.")
@click.option(
    "--delete-data/--keep-data",
    required=True,
    default=None,
    help="Whether the person asked for their data to be deleted by every party.",
)
@click.option(
    "--purposes",
    default="",
    help="Purposes withdrawn, comma-separated (default: all the consent covered).",
)
@click.option("--staff-role", default="case manager", show_default=True)
@click.option("--note", default=None, help="A note (encrypted).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@ALLOW_CLASSICAL
@_reasons
def withdraw(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    case: str,
    delete_data: bool | None,
    purposes: str,
    staff_role: str,
    note: str | None,
    allow_classical: bool,
    as_json: bool,
) -> None:
    """Record a withdrawal of consent and send it to every other party: the case halts."""
    from adapters.sending import withdraw_consent

    if delete_data is None:
        raise SchemaViolation("say --delete-data or --keep-data: what did the person ask for?")
    participant = _home(home, database_url, amqp_url, vhost, case_dir)
    sealed = withdraw_consent(
        participant,
        case,
        delete_data=delete_data,
        purposes=[p.strip() for p in purposes.split(",") if p.strip()],
        staff_role=staff_role,
        note=note,
        allow_classical=allow_classical,
    )
    _sent(participant, sealed, allow_classical, as_json)


def _sent(home: Home, sealed: SealedEnvelope, allow_classical: bool, as_json: bool) -> None:
    if allow_classical:
        _warn_classical(home, sealed.header)
    _print_sent(sealed.header.model_dump(mode="json"), as_json)


@click.group()
def case() -> None:
    """A case as this participant knows it."""


@case.command("show")
@_home_options
@click.argument("reference")
@click.option("--json", "as_json", is_flag=True, help="Print the case as JSON.")
@_reasons
def case_show(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    reference: str,
    as_json: bool,
) -> None:
    """Owner, stage, parties, consent scope, halt and erasures of case REFERENCE."""
    from adapters.sending import case_summary

    summary = case_summary(_home(home, database_url, amqp_url, vhost, case_dir), reference)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        click.echo(f"{key}: {_shown(value)}")


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_shown(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return "-" if value is None else str(value)
