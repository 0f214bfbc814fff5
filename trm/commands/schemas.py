"""``trm schemas``: the message schemas as JSON Schema, for other implementations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from broker.errors import ConfigError
from schemas.base import MessageKind
from schemas.examples import example
from schemas.header import EnvelopeHeader
from schemas.registry import MESSAGE_TYPES

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
KINDS_START = "<!-- message-kinds:start -->"
KINDS_END = "<!-- message-kinds:end -->"


def schema_documents() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, one per message kind plus the envelope header."""
    documents: dict[str, dict[str, Any]] = {}
    for kind, model in MESSAGE_TYPES.items():
        schema = {"$schema": JSON_SCHEMA_DIALECT, **model.model_json_schema()}
        schema["x-trm-kind"] = kind.value
        schema["x-trm-version"] = model.VERSION
        documents[f"{kind.value}.v{model.VERSION}.schema.json"] = schema
    header = {"$schema": JSON_SCHEMA_DIALECT, **EnvelopeHeader.model_json_schema()}
    documents["envelope_header.v1.schema.json"] = header
    return documents


def kinds_table() -> str:
    """Every message kind, who may send it and what it says: the README's table."""
    from broker.casepolicy import RULES

    lines = ["| kind | sent by | what it says |", "| --- | --- | --- |"]
    for kind, model in MESSAGE_TYPES.items():
        summary = (model.__doc__ or "").strip().splitlines()[0]
        senders = ", ".join(sorted(RULES[kind].roles)) if kind in RULES else "-"
        lines.append(f"| `{kind.value}` | {senders} | {summary} |")
    return "\n".join(lines)


@click.group()
def schemas() -> None:
    """The message schemas."""


@schemas.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def export(directory: Path) -> None:
    """Write one JSON Schema per message kind, and one for the envelope header, to DIRECTORY."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, schema in schema_documents().items():
            path = directory / name
            path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            click.echo(f"wrote {path}")
    except OSError as e:
        raise ConfigError(
            f"cannot write schemas to {directory}: {e.strerror}; choose a writable folder"
        ) from e


@schemas.command("example")
@click.argument("kind", metavar="KIND", type=click.Choice([kind.value for kind in MessageKind]))
def example_command(kind: str) -> None:
    """Print a valid, fictional KIND payload as JSON (a start for `trm send --payload`)."""
    click.echo(json.dumps(example(MessageKind(kind)).model_dump(mode="json"), indent=2))
