"""`trm witness run|status`: cosign the routing log's checkpoints; show what was cosigned."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from types import FrameType

import click

from adapters.home import Home
from broker.errors import TrmError
from services.witness import Witness, run_witness
from trm import logs

_HOME = click.option(
    "--home",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The witness's home folder (keys, directory, amqp-password).",
)
_DATABASE = click.option(
    "--database-url",
    default=None,
    help="Its database [TRM_DATABASE_URL; default sqlite:///HOME/trm.db].",
)


@click.group()
def witness() -> None:
    """A witness of the routing log: cosigns only checkpoints extending what it cosigned."""


@witness.command("run")
@_HOME
@_DATABASE
@click.option("--amqp-url", default=None, help="RabbitMQ host [TRM_AMQP_URL].")
@click.option("--vhost", default=None, help="RabbitMQ vhost [TRM_AMQP_VHOST].")
def run(home: Path, database_url: str | None, amqp_url: str | None, vhost: str | None) -> None:
    """Answer cosignature requests on trm.witness.<id> until SIGTERM or SIGINT.

    An adapter whose participant the directory lists as a witness does this
    itself; run this where the witness runs without an adapter.
    """
    logs.configure()
    try:
        settings = Home.resolve(home, database_url=database_url, amqp_url=amqp_url, vhost=vhost)
        engine = settings.open_database()
        stop = threading.Event()

        def on_signal(_signum: int, _frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            run_witness(
                Witness.of_home(settings, engine),
                settings.amqp_settings(),
                settings.participant_id,
                stop,
            )
        finally:
            engine.dispose()
    except TrmError as e:
        raise click.ClickException(f"{e.reason}: {e}") from e


@witness.command("status")
@_HOME
@_DATABASE
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def status(home: Path, database_url: str | None, as_json: bool) -> None:
    """The checkpoint last cosigned per log, and every fork evidence kept; exit 1 if any."""
    logs.configure()
    try:
        settings = Home.resolve(home, database_url=database_url)
        engine = settings.open_database()
        try:
            shown = Witness.of_home(settings, engine).status()
        finally:
            engine.dispose()
    except TrmError as e:
        raise click.ClickException(f"{e.reason}: {e}") from e
    if as_json:
        click.echo(json.dumps({"witness": settings.participant_id, **shown}))
    else:
        _print(shown)
    if shown["conflicts"]:
        raise SystemExit(1)


def _print(shown: dict[str, list[dict[str, object]]]) -> None:
    for held in shown["logs"]:
        click.echo(
            f"{held['origin']}: cosigned size {held['size']} root {held['root']} "
            f"({held['time']}), at {held['cosigned_at']}"
        )
    if not shown["logs"]:
        click.echo("nothing cosigned yet")
    for conflict in shown["conflicts"]:
        click.echo(
            f"FORK EVIDENCE {conflict['origin']} ({conflict['kind']}, {conflict['detected_at']}): "
            f"{conflict['detail']}"
        )
        for label in ("cosigned_note", "offered_note"):
            click.echo(f"  {label}:")
            for line in str(conflict[label]).splitlines():
                click.echo(f"    {line}")
