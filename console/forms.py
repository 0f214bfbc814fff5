"""HTML forms generated from the message schemas, and the payloads read back from them.

`form_for` reads a kind's JSON Schema (the one `trm schemas export` writes)
and makes one `Field` per leaf: a text box, a date, a choice among an
enumeration's values, a set of boxes for a list of values; nested objects
become `Group`s (fieldsets) and lists of objects a few numbered rows. Help
text is the schema's description of the field, else of its type.

`read_payload` turns the submitted form back into the payload's JSON
object, leaving out what was left empty, and `check_payload` validates it
with the same decoder `trm send --payload` uses (`schemas.registry`),
reporting each problem at the field it concerns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from broker.errors import SchemaViolation
from schemas.base import Message, MessageKind
from schemas.registry import MESSAGE_TYPES, decode_payload

ROWS_BEYOND_MINIMUM = 1
"""Empty rows offered for a list of objects beyond those it requires (an empty row is left out)."""
LONG_TEXT = 1000
"""A string allowed this long or longer is a textarea."""
PARTICIPANT_PATTERN = r"^[a-z0-9][a-z0-9-]{1,62}$"
"""The pattern of a participant id in the schemas: such lists are chosen from the directory."""
FORM_ERROR = ""
"""The key of problems that concern the whole payload rather than one field."""


class Widget(StrEnum):
    """How a field is entered."""

    TEXT = "text"
    TEXTAREA = "textarea"
    NUMBER = "number"
    DATE = "date"
    DATETIME = "datetime"
    """A date and time in UTC (the browser's datetime-local, read as UTC)."""
    SELECT = "select"
    CHOICES = "choices"
    """Several values of an enumeration (check boxes)."""
    LINES = "lines"
    """A list of free values, one a line."""
    CHECKBOX = "checkbox"


@dataclass(frozen=True)
class Field:
    """One input; `name` is its dotted path in the payload (``person.full_name``)."""

    name: str
    label: str
    widget: Widget
    required: bool
    help: str = ""
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    max_length: int | None = None
    minimum: int | None = None
    maximum: int | None = None

    @property
    def element_id(self) -> str:
        """The HTML id of the input (dots are awkward in CSS selectors)."""
        return "f-" + self.name.replace(".", "-")


@dataclass(frozen=True)
class Group:
    """A nested object (a fieldset), or one row of a list of objects."""

    name: str
    label: str
    required: bool
    help: str = ""
    children: tuple[Field | Group, ...] = ()
    row_of: str | None = None
    """For a row of a list of objects: the list's name."""

    @property
    def element_id(self) -> str:
        """The HTML id of the fieldset."""
        return "f-" + self.name.replace(".", "-")


@dataclass(frozen=True)
class Form:
    """The form of one message kind."""

    kind: MessageKind
    title: str
    help: str
    children: tuple[Field | Group, ...]

    def names(self) -> frozenset[str]:
        """The name of every field and group, to place an error."""
        found: set[str] = set()
        stack: list[Field | Group] = list(self.children)
        while stack:
            item = stack.pop()
            found.add(item.name)
            if isinstance(item, Group):
                found.add(item.row_of or item.name)
                stack.extend(item.children)
        return frozenset(found)


@dataclass
class Checked:
    """A submitted form: the payload if it is valid, else the problems by field name."""

    values: dict[str, list[str]]
    payload: Message | None = None
    errors: dict[str, list[str]] = field(default_factory=dict)


def form_for(kind: MessageKind, choices: Mapping[str, Sequence[str]] | None = None) -> Form:
    """The form of `kind`; `choices` lists the allowed ids for fields of participant ids."""
    model = MESSAGE_TYPES[kind]
    schema = model.model_json_schema()
    reader = _SchemaReader(schema.get("$defs", {}), choices or {})
    title, _, rest = (schema.get("description") or "").partition("\n")
    return Form(kind, title.strip(), rest.strip(), reader.children(schema, ""))


class _SchemaReader:
    """Walks one JSON Schema, resolving its local ``$ref``s."""

    def __init__(self, defs: Mapping[str, Any], choices: Mapping[str, Sequence[str]]) -> None:
        self.defs = defs
        self.choices = choices

    def resolve(self, node: Mapping[str, Any]) -> Mapping[str, Any]:
        ref = node.get("$ref")
        if isinstance(ref, str):
            return dict(self.defs[ref.rsplit("/", 1)[-1]])
        return node

    def children(self, schema: Mapping[str, Any], prefix: str) -> tuple[Field | Group, ...]:
        required = set(schema.get("required", ()))
        return tuple(
            self.item(f"{prefix}{name}", name, node, name in required)
            for name, node in schema.get("properties", {}).items()
        )

    def item(self, path: str, key: str, node: Mapping[str, Any], required: bool) -> Field | Group:
        help_text = node.get("description", "")
        options = node.get("anyOf")
        if isinstance(options, list):
            concrete = [o for o in options if o.get("type") != "null"]
            required = required and len(concrete) == len(options)
            node = concrete[0] if len(concrete) == 1 else node
        target = self.resolve(node)
        help_text = help_text or _first_line(target.get("description", ""))
        label = key.replace("_", " ").capitalize()
        if target.get("type") == "object":
            return Group(path, label, required, help_text, self.children(target, f"{path}."))
        if target.get("type") == "array":
            return self.array(path, label, target, required, help_text)
        return self.leaf(path, label, target, required, help_text)

    def array(
        self, path: str, label: str, node: Mapping[str, Any], required: bool, help_text: str
    ) -> Field | Group:
        items = self.resolve(node.get("items", {}))
        needed = int(node.get("minItems", 0))
        required = required or needed > 0
        if items.get("type") == "object":
            count = min(int(node.get("maxItems", 32)), max(needed, 1) + ROWS_BEYOND_MINIMUM)
            rows = tuple(
                Group(
                    f"{path}.{i}",
                    f"{label} {i + 1}",
                    i < needed,
                    children=self.children(items, f"{path}.{i}."),
                    row_of=path,
                )
                for i in range(count)
            )
            return Group(path, label, required, help_text, rows)
        if "enum" in items:
            values = tuple(str(v) for v in items["enum"])
            return Field(path, label, Widget.CHOICES, required, help_text, values)
        if items.get("pattern") == PARTICIPANT_PATTERN and self.choices.get("participants"):
            listed = tuple(self.choices["participants"])
            return Field(path, label, Widget.CHOICES, required, help_text, listed)
        return Field(path, label, Widget.LINES, required, help_text, pattern=items.get("pattern"))

    def leaf(
        self, path: str, label: str, node: Mapping[str, Any], required: bool, help_text: str
    ) -> Field:
        kind = node.get("type")
        if "enum" in node:
            values = tuple(str(v) for v in node["enum"])
            return Field(path, label, Widget.SELECT, required, help_text, values)
        if kind == "boolean":
            return Field(path, label, Widget.CHECKBOX, required, help_text)
        if kind == "integer":
            return Field(
                path,
                label,
                Widget.NUMBER,
                required,
                help_text,
                minimum=node.get("minimum"),
                maximum=node.get("maximum"),
            )
        widget = {"date": Widget.DATE, "date-time": Widget.DATETIME}.get(node.get("format", ""))
        longest = node.get("maxLength")
        if widget is None:
            long = isinstance(longest, int) and longest >= LONG_TEXT
            widget = Widget.TEXTAREA if long else Widget.TEXT
        if node.get("pattern") == PARTICIPANT_PATTERN and self.choices.get("participants"):
            listed = tuple(self.choices["participants"])
            return Field(path, label, Widget.SELECT, required, help_text, listed)
        return Field(
            path,
            label,
            widget,
            required,
            help_text,
            pattern=node.get("pattern"),
            max_length=longest,
        )


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0]


# --- reading a submitted form back ---------------------------------------------------


def read_payload(form: Form, values: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The payload's JSON object from submitted `values` (name -> every value sent).

    Empty optional fields, groups and rows are left out, so that the schema's
    defaults apply; a value that is not of its field's type is passed on as
    typed, for the schema to refuse at that field.
    """
    return _read_children(form.children, values)


def _read_children(
    children: Sequence[Field | Group], values: Mapping[str, Sequence[str]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for child in children:
        key = child.name.rsplit(".", 1)[-1]
        if isinstance(child, Field):
            found = _read_field(child, values)
        elif child.children and all(
            isinstance(c, Group) and c.row_of == child.name for c in child.children
        ):
            rows = [row for row in child.children if row.required or entered(row, values)]
            found = [_read_children(_kids(row), values) for row in rows] or None
        elif child.required or entered(child, values):
            found = _read_children(child.children, values)
        else:
            found = None
        if found is not None:
            out[key] = found
    return out


def _kids(item: Field | Group) -> tuple[Field | Group, ...]:
    return item.children if isinstance(item, Group) else ()


def entered(item: Field | Group, values: Mapping[str, Sequence[str]]) -> bool:
    """Whether anything was typed or ticked in `item` (an optional group left blank is absent)."""
    if isinstance(item, Field):
        return any(v.strip() for v in values.get(item.name, ()))
    return any(entered(child, values) for child in item.children)


def _read_field(spec: Field, values: Mapping[str, Sequence[str]]) -> Any:
    sent = [v for v in values.get(spec.name, ()) if v.strip()]
    if spec.widget is Widget.CHECKBOX:
        return bool(sent) if sent or spec.required else None
    if spec.widget is Widget.CHOICES:
        return list(dict.fromkeys(v.strip() for v in sent)) if sent or spec.required else None
    if spec.widget is Widget.LINES:
        lines = [line.strip() for v in sent for line in v.splitlines() if line.strip()]
        return lines if lines or spec.required else None
    if not sent:
        return None
    text = sent[0] if spec.widget is Widget.TEXTAREA else sent[0].strip()
    if spec.widget is Widget.NUMBER:
        try:
            return int(text)
        except ValueError:
            return text
    if spec.widget is Widget.DATETIME:
        return _utc(text)
    return text


def _utc(text: str) -> str:
    """A browser's ``YYYY-MM-DDTHH:MM`` read as UTC; anything else as typed."""
    if len(text) == len("2026-01-31T12:00") and text[10:11] == "T":
        return f"{text}:00Z"
    return text


def check_payload(form: Form, values: Mapping[str, Sequence[str]]) -> Checked:
    """Validate the submitted form as `trm send --payload` validates a file."""
    kept = {k: list(v) for k, v in values.items()}
    document = read_payload(form, values)
    return check_document(form, document, kept)


def check_document(
    form: Form, document: Mapping[str, Any], values: dict[str, list[str]] | None = None
) -> Checked:
    """Validate a payload's JSON object; problems placed at the fields of `form`."""
    model = MESSAGE_TYPES[form.kind]
    data = json.dumps(document, ensure_ascii=False).encode("utf-8")
    checked = Checked(values or {})
    try:
        checked.payload = decode_payload(form.kind, model.VERSION, data)
    except SchemaViolation as e:
        checked.errors = _placed(form, model, data) or {FORM_ERROR: [str(e)]}
    return checked


def _placed(form: Form, model: type[Message], data: bytes) -> dict[str, list[str]]:
    """Each schema problem under the deepest field or group of `form` it concerns."""
    try:
        model.model_validate_json(data)
    except ValidationError as e:
        problems = e.errors(include_url=False, include_input=False, include_context=False)
    else:
        return {}
    names = form.names()
    placed: dict[str, list[str]] = {}
    for problem in problems:
        loc = [str(p) for p in problem["loc"]]
        where = FORM_ERROR
        for end in range(len(loc), 0, -1):
            candidate = ".".join(loc[:end])
            if candidate in names:
                where = candidate
                break
        message = problem["msg"].removeprefix("Value error, ")
        placed.setdefault(where, []).append(message)
    return placed
