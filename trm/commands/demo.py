"""``trm demo``: the three stories end to end on a local RabbitMQ."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from broker.management import DEFAULT_MANAGEMENT_URL
from broker.transport import DEFAULT_AMQP_URL
from trm.demo import run_demo


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-run"),
    show_default=True,
    help="Where everything is left for inspection; a previous demo's folder is wiped first.",
)
@click.option("--amqp-url", envvar="TRM_AMQP_URL", default=DEFAULT_AMQP_URL, show_default=True)
@click.option(
    "--management-url",
    envvar="TRM_AMQP_MANAGEMENT_URL",
    default=DEFAULT_MANAGEMENT_URL,
    show_default=True,
    help="RabbitMQ management API, used to create the demo's vhost, users and permissions.",
)
@click.option(
    "--console",
    "console",
    is_flag=True,
    help="After the story, leave the consoles of iom-kz, iom-uz, the NGO and the auditor "
    "running (adapters too), print their addresses and a login for each, until Ctrl-C.",
)
def demo(workdir: Path, amqp_url: str, management_url: str, console: bool) -> None:
    """Walk a return KZ -> UZ -> NGO and a referral to its withdrawal, then audit them.

    Creates the directory authority and the participants iom-kz, iom-uz,
    ngo-uz-istiqbolli-avlod, ngo-kz-rodnik, routing and auditor on the vhost
    trm-demo; starts the four adapters and the routing service as separate
    processes; sends each handoff of the return; refers a person from the
    Kazakh NGO to the Uzbek one until consent is withdrawn with deletion,
    showing each party halt and erase and a later send refused; exports,
    verifies and replays the audit log; prints the return's timeline. Exits
    non-zero naming the step that failed.
    """
    run_demo(
        workdir.resolve(),
        sys.stdout,
        amqp_url=amqp_url,
        management_url=management_url,
        console=console,
    )
