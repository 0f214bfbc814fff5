"""The command line itself."""

from __future__ import annotations

from click.testing import CliRunner

from trm.cli import cli


def test_help_lists_commands() -> None:
    """`trm --help` exits 0 and lists the demo command."""
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    assert "demo" in result.output
