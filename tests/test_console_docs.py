"""docs/openapi.json is what `trm console openapi` prints, and docs/console.md's API reference
is what console.reference generates from that file."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from console.reference import END, START, render
from trm.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def test_openapi_file_matches_the_command() -> None:
    """docs/openapi.json is exactly `trm console openapi`, an OpenAPI 3.1 document."""
    result = CliRunner().invoke(cli, ["console", "openapi"])
    assert result.exit_code == 0, result.output
    committed = (ROOT / "docs" / "openapi.json").read_text(encoding="utf-8")
    assert result.stdout == committed, "run: python -m console.reference"
    assert json.loads(committed)["openapi"].startswith("3.1")


def test_console_md_reference_is_generated_from_the_openapi_file() -> None:
    """The block between the markers in docs/console.md is render(docs/openapi.json)."""
    document = json.loads((ROOT / "docs" / "openapi.json").read_text(encoding="utf-8"))
    text = (ROOT / "docs" / "console.md").read_text(encoding="utf-8")
    assert START in text and END in text
    block = text.split(START, 1)[1].split(END, 1)[0]
    assert block.strip() == render(document).strip(), "run: python -m console.reference"
    for path, operations in document["paths"].items():
        for method in operations:
            assert f"### `{method.upper()} {path}`" in block


def test_openapi_out_writes_the_same_document(tmp_path: Path) -> None:
    """`trm console openapi --out FILE` writes what it would print."""
    out = tmp_path / "openapi.json"
    result = CliRunner().invoke(cli, ["console", "openapi", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8") == (ROOT / "docs" / "openapi.json").read_text(
        encoding="utf-8"
    )
