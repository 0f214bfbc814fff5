"""``trm bench``: trm end to end against raw RabbitMQ, measured side by side in one run.

The measuring code lives in the repository's ``benchmarks/`` folder, which is
not part of the installed distribution (it pulls in test-only set-up and is of
no use to a mission running an adapter). The command therefore runs from a
checkout: it imports ``benchmarks.run`` from the current directory, and says so
plainly when started anywhere else.
"""

from __future__ import annotations

import sys
from importlib import import_module
from pathlib import Path
from types import ModuleType

import click

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672/"


def load_runner(root: Path | None = None, name: str = "run") -> ModuleType:
    """The ``benchmarks.<name>`` module, from the path or from the checkout at `root` (cwd)."""
    folder = (root or Path.cwd()).resolve()
    if (folder / "benchmarks" / f"{name}.py").is_file() and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        return import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", f"benchmarks.{name}"):
            raise
        raise click.ClickException(
            f"trm bench runs from a trm checkout (no benchmarks/run.py under {folder}): "
            "cd to the repository root and run `make bench` or `trm bench` there"
        ) from e


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@click.option(
    "--messages",
    type=click.IntRange(min=10),
    default=None,
    help="Messages per throughput run (default 20000; 300 with --quick).",
)
@click.option("--quick", is_flag=True, help="Small sizes: a smoke run of every figure.")
@click.option(
    "--scale",
    is_flag=True,
    help="The scale figures instead: 100 participants' backlog of 50,000 messages, a "
    "1,000,000-entry log's routing memory and audit verify (tiny with --quick).",
)
@click.option(
    "--payload-bytes",
    type=click.IntRange(min=64),
    default=2048,
    show_default=True,
    help="Payload size of every message, trm and raw alike.",
)
@click.option(
    "--amqp-url",
    envvar="TRM_AMQP_URL",
    default=DEFAULT_AMQP_URL,
    show_default=True,
    help="RabbitMQ administrator URL; a scratch vhost is made and deleted.",
)
@click.option(
    "--management-url",
    envvar="TRM_AMQP_MANAGEMENT_URL",
    default=DEFAULT_MANAGEMENT_URL,
    show_default=True,
    help="RabbitMQ management API URL (administrator).",
)
def bench(
    as_json: bool,
    messages: int | None,
    quick: bool,
    scale: bool,
    payload_bytes: int,
    amqp_url: str,
    management_url: str,
) -> None:
    """Measure trm against raw RabbitMQ and print the figures and the ratios."""
    if scale:
        scaling = load_runner(name="scale")
        sized = scaling.Config.sized(
            quick=quick,
            payload_bytes=payload_bytes,
            amqp_url=amqp_url,
            management_url=management_url,
        )
        scaling.main_with(sized, as_json=as_json, echo=click.echo)
        return
    runner = load_runner()
    config = runner.Config.sized(
        quick=quick,
        messages=messages,
        payload_bytes=payload_bytes,
        amqp_url=amqp_url,
        management_url=management_url,
    )
    runner.main_with(config, as_json=as_json, echo=click.echo)
