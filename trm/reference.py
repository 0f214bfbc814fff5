"""The README's command reference, generated from the commands' own help.

`python -m trm.reference` rewrites the block between the markers in
README.md; a test fails when the README and `trm --help` disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from trm.cli import cli

START = "<!-- command-reference:start -->"
END = "<!-- command-reference:end -->"


def _walk(command: click.Command, path: list[str]) -> list[tuple[list[str], click.Command]]:
    found = [(path, command)]
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name=" ".join(path))
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                found.extend(_walk(sub, [*path, name]))
    return found


def _help(path: list[str], command: click.Command) -> str:
    parent: click.Context | None = None
    for depth in range(1, len(path)):
        parent = click.Context(
            click.Command(path[depth - 1]), info_name=path[depth - 1], parent=parent
        )
    ctx = click.Context(
        command,
        info_name=path[-1],
        parent=parent,
        terminal_width=100,
        max_content_width=100,
        help_option_names=["-h", "--help"],
    )
    return command.get_help(ctx)


def render() -> str:
    """Markdown for every command, in the order `trm --help` lists them."""
    parts = []
    for path, command in _walk(cli, ["trm"]):
        title = " ".join(path)
        parts.append(f"### `{title}`\n\n```text\n{_help(path, command).rstrip()}\n```\n")
    return "\n".join(parts)


def rewrite(readme: Path) -> bool:
    """Replace the reference block in `readme`; True if it changed."""
    text = readme.read_text(encoding="utf-8")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    updated = f"{head}{START}\n{render()}\n{END}{tail}"
    if updated == text:
        return False
    readme.write_text(updated, encoding="utf-8")
    return True


def main() -> None:
    """Rewrite README.md's command reference (run from the repository root)."""
    readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    print("updated" if rewrite(readme) else "unchanged", readme)


if __name__ == "__main__":
    main()
