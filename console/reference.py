"""docs/console.md's API reference, generated from the OpenAPI document (docs/openapi.json).

`python -m console.reference` writes docs/openapi.json from the app
(`console.app.openapi_document`, as `trm console openapi` prints it) and
rewrites the block between the markers in docs/console.md from that file;
tests fail when either differs from what the code generates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

START = "<!-- api-reference:start -->"
END = "<!-- api-reference:end -->"
OPENAPI_FILE = Path("docs/openapi.json")
CONSOLE_DOC = Path("docs/console.md")
_METHODS = ("get", "post", "put", "patch", "delete")


def openapi_text() -> str:
    """The OpenAPI document as written to docs/openapi.json and by `trm console openapi`."""
    from console.app import openapi_document

    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(schema: dict[str, Any]) -> str:
    """A short, readable type for a JSON schema."""
    if "$ref" in schema:
        return f"[{_ref_name(schema['$ref'])}](#{_ref_name(schema['$ref']).lower()})"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(_type(s) for s in schema[key])
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        return "object"
    if kind == "string" and "format" in schema:
        return f"string ({schema['format']})"
    if kind == "string" and "pattern" in schema:
        return f"string `{schema['pattern']}`"
    if kind == "integer":
        bounds = [
            f"{word} {schema[key]}"
            for key, word in (("minimum", "min"), ("maximum", "max"), ("default", "default"))
            if key in schema
        ]
        return f"integer ({', '.join(bounds)})" if bounds else "integer"
    return str(kind)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _response_row(status: str, response: dict[str, Any]) -> str:
    content: dict[str, Any] = response.get("content", {})
    shown = ""
    for media, body in content.items():
        shown = _type(body.get("schema", {})) if media == "application/json" else f"`{media}`"
        break
    return f"| {status} | {_cell(response.get('description', ''))} | {shown} |"


_RESPONSES = "| status | meaning | body |\n| --- | --- | --- |"


def _common(operations: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The responses every operation documents identically."""
    first = operations[0].get("responses", {})
    return {
        status: response
        for status, response in first.items()
        if all(op.get("responses", {}).get(status) == response for op in operations)
    }


def _operation(
    method: str, path: str, op: dict[str, Any], common: dict[str, dict[str, Any]]
) -> str:
    lines = [f"### `{method.upper()} {path}`", "", f"**{op.get('summary', '')}.**"]
    if op.get("description"):
        lines += ["", " ".join(op["description"].split())]
    scopes = op.get("x-trm-scopes") or []
    lines += ["", f"Token scope: {', '.join(f'`{s}`' for s in scopes) or 'none'}."]
    parameters = op.get("parameters", [])
    if parameters:
        lines += [
            "",
            "| parameter | in | type | required | description |",
            "| --- | --- | --- | --- | --- |",
        ]
        for p in parameters:
            description = p.get("description") or p["schema"].get("description", "")
            lines.append(
                f"| `{p['name']}` | {p['in']} | {_cell(_type(p['schema']))} | "
                f"{'yes' if p.get('required') else 'no'} | {_cell(description)} |"
            )
    body = op.get("requestBody")
    if body:
        schema = body["content"]["application/json"]["schema"]
        lines += ["", f"Request body (JSON): {_type(schema)}."]
    own = {s: r for s, r in op.get("responses", {}).items() if s not in common}
    lines += ["", _RESPONSES]
    lines += [_response_row(status, response) for status, response in sorted(own.items())]
    return "\n".join(lines) + "\n"


def _schema(name: str, schema: dict[str, Any]) -> str:
    lines = [f"### {name}", ""]
    if schema.get("description"):
        lines += [" ".join(schema["description"].split()), ""]
    if "enum" in schema:
        lines.append("One of: " + ", ".join(f"`{v}`" for v in schema["enum"]) + ".")
        return "\n".join(lines) + "\n"
    required = set(schema.get("required", []))
    lines += ["| field | type | required | description |", "| --- | --- | --- | --- |"]
    for field, spec in schema.get("properties", {}).items():
        lines.append(
            f"| `{field}` | {_cell(_type(spec))} | {'yes' if field in required else 'no'} | "
            f"{_cell(spec.get('description', ''))} |"
        )
    return "\n".join(lines) + "\n"


def render(document: dict[str, Any]) -> str:
    """Markdown for every operation, in the document's order, then every schema by name."""
    found = [
        (method, path, operations[method])
        for path, operations in document["paths"].items()
        for method in _METHODS
        if method in operations
    ]
    common = _common([op for _, _, op in found])
    parts = ["## Operations", "", "Every operation may also answer:", "", _RESPONSES]
    parts += [_response_row(status, response) for status, response in sorted(common.items())]
    parts.append("")
    parts += [_operation(method, path, op, common) for method, path, op in found]
    parts += ["## Schemas", ""]
    for name, schema in sorted(document.get("components", {}).get("schemas", {}).items()):
        parts.append(_schema(name, schema))
    return "\n".join(parts).rstrip() + "\n"


def rewrite(doc: Path, openapi_file: Path) -> bool:
    """Replace the reference block in `doc` from `openapi_file`; True if it changed."""
    document = json.loads(openapi_file.read_text(encoding="utf-8"))
    text = doc.read_text(encoding="utf-8")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    updated = f"{head}{START}\n\n{render(document)}\n{END}{tail}"
    if updated == text:
        return False
    doc.write_text(updated, encoding="utf-8")
    return True


def main() -> None:
    """Write docs/openapi.json, then docs/console.md's reference (from the repository root)."""
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    (root / OPENAPI_FILE).write_text(openapi_text(), encoding="utf-8")
    changed = rewrite(root / CONSOLE_DOC, root / OPENAPI_FILE)
    print("updated" if changed else "unchanged", root / CONSOLE_DOC)


if __name__ == "__main__":
    main()
