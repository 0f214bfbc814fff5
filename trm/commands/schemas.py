"""``trm schemas``: the message schemas as JSON Schema, for other implementations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from broker.errors import ConfigError
from schemas.header import EnvelopeHeader
from schemas.registry import MESSAGE_TYPES

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


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
