"""The README stays true to the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from trm.reference import END, START

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_opens_with_the_two_commands() -> None:
    """The first code block of the README is `make demo` then `make test`."""
    block = README.read_text(encoding="utf-8").split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands == ["make demo", "make test"]


def test_command_reference_matches_help() -> None:
    """The README's command reference is exactly what `trm --help` prints today.

    Rendered in a fresh interpreter: Click keeps a command's help option once it has built
    it, so a test that ran a subcommand on its own before would change what renders here.
    """
    text = README.read_text(encoding="utf-8")
    block = text.split(START, 1)[1].split(END, 1)[0]
    rendered = subprocess.run(
        [sys.executable, "-c", "from trm.reference import render; print(render())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert block.strip() == rendered.strip(), "run: python -m trm.reference"
