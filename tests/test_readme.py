"""The README stays true to the code."""

from __future__ import annotations

from pathlib import Path

from trm.reference import END, START, render

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_opens_with_the_two_commands() -> None:
    """The first code block of the README is `make demo` then `make test`."""
    block = README.read_text(encoding="utf-8").split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands == ["make demo", "make test"]


def test_command_reference_matches_help() -> None:
    """The README's command reference is exactly what `trm --help` prints today."""
    text = README.read_text(encoding="utf-8")
    block = text.split(START, 1)[1].split(END, 1)[0]
    assert block.strip() == render().strip(), "run: python -m trm.reference"
