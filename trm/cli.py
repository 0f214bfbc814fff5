"""The ``trm`` command line: one root group, one module per command group."""

from __future__ import annotations

import sys
from importlib import import_module

import click

from broker.errors import TrmError
from trm import logs

# (command name, module under trm.commands, attribute). Loaded lazily so that
# `trm --help` stays fast and one group's imports never slow another's.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("init", "keys", "init"),
    ("rotate", "keys", "rotate"),
    ("directory", "directory", "directory"),
    ("schemas", "schemas", "schemas"),
    ("broker", "broker", "broker"),
    ("adapter", "adapter", "adapter"),
    ("send", "adapter", "send"),
    ("ack", "adapter", "ack"),
    ("refer", "case", "refer"),
    ("service", "case", "service"),
    ("withdraw", "case", "withdraw"),
    ("case", "case", "case"),
    ("outbox", "adapter", "outbox"),
    ("quarantine", "adapter", "quarantine"),
    ("health", "adapter", "health"),
    ("routing", "routing", "routing"),
    ("cases", "routing", "cases"),
    ("audit", "audit", "audit"),
    ("witness", "witness", "witness"),
    ("console", "console", "console"),
    ("demo", "demo", "demo"),
    ("bench", "bench", "bench"),
)


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, _, _ in COMMANDS]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        for name, module, attribute in COMMANDS:
            if name == cmd_name:
                loaded = import_module(f"trm.commands.{module}")
                command = getattr(loaded, attribute, None)
                return command if isinstance(command, click.Command) else None
        return None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trm-broker")
def cli() -> None:
    """trm: sealed, signed, exactly-once handoffs between missions and NGOs."""
    logs.configure()


def main() -> None:
    """Run the command line; a TrmError ends it with a one-line reason."""
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except TrmError as e:
        click.echo(f"trm: {e.reason}: {e}", err=True)
        sys.exit(1)
    # Without standalone mode click returns, rather than raises, a ctx.exit code.
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
