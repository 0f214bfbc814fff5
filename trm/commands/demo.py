"""``trm demo``: the three stories end to end on a local RabbitMQ."""

from __future__ import annotations

import click


@click.command()
def demo() -> None:
    """Walk one return case through every stage (not yet built)."""
    raise click.ClickException("trm demo is not built yet; see issue 5")
