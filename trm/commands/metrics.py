"""The metrics options of ``trm adapter run`` and ``trm routing run``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from broker.metrics import DEFAULT_METRICS_HOST, METRICS_HOST_ENV, METRICS_PORT_ENV

F = TypeVar("F", bound=Callable[..., Any])


def metrics_options(command: F) -> F:
    """Add ``--metrics-port`` (off by default) and ``--metrics-host`` to `command`."""
    port = click.option(
        "--metrics-port",
        type=click.IntRange(1, 65535),
        default=None,
        envvar=METRICS_PORT_ENV,
        help="Serve Prometheus metrics on this port at /metrics; off when not given "
        f"[{METRICS_PORT_ENV}].",
    )
    host = click.option(
        "--metrics-host",
        default=DEFAULT_METRICS_HOST,
        show_default=True,
        envvar=METRICS_HOST_ENV,
        help=f"Address the metrics endpoint listens on [{METRICS_HOST_ENV}].",
    )
    return port(host(command))
