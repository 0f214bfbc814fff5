"""The message schemas: strict, closed, frozen models and a decoder that fails only one way."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from broker.errors import SchemaViolation
from schemas.base import Message, MessageKind
from schemas.examples import EXAMPLE_PERSON_NAME, example, example_payload_bytes
from schemas.registry import (
    MAX_JSON_DEPTH,
    MAX_PAYLOAD_BYTES,
    MESSAGE_TYPES,
    decode_payload,
    encode_payload,
)
from schemas.returns import ReturnRequest, TravelArranged, TravelWindow
from trm.commands.schemas import (
    KINDS_END,
    KINDS_START,
    kinds_table,
    schema_documents,
)
from trm.commands.schemas import schemas as schemas_command

ALL_KINDS = list(MessageKind)


def _request_dict() -> dict[str, object]:
    return json.loads(example_payload_bytes(MessageKind.RETURN_REQUEST))  # type: ignore[no-any-return]


def _decode_request(document: object) -> Message:
    return decode_payload(MessageKind.RETURN_REQUEST, 1, json.dumps(document).encode())


def test_registry_covers_every_kind() -> None:
    """MESSAGE_TYPES maps every MessageKind to a model that declares that kind."""
    assert set(MESSAGE_TYPES) == set(MessageKind)
    for kind, model in MESSAGE_TYPES.items():
        assert model.KIND is kind
        assert model.VERSION >= 1


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_models_are_strict_frozen_closed_and_documented(kind: MessageKind) -> None:
    """Every model refuses coercion and unknown fields, is immutable and says who sends it."""
    model = MESSAGE_TYPES[kind]
    assert model.model_config.get("strict") is True
    assert model.model_config.get("frozen") is True
    assert model.model_config.get("extra") == "forbid"
    assert model.__doc__ is not None
    assert "Sent" in model.__doc__


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_kind_round_trips(kind: MessageKind) -> None:
    """Encoding then decoding the example of every kind gives back an equal message."""
    message = example(kind)
    assert message.KIND is kind
    data = encode_payload(message)
    assert data == example_payload_bytes(kind)
    assert b"\n" not in data and b": " not in data  # compact
    decoded = decode_payload(kind, message.VERSION, data)
    assert decoded == message
    assert type(decoded) is MESSAGE_TYPES[kind]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_example_validates_in_python_mode(kind: MessageKind) -> None:
    """Each example re-validates from its own field values under strict validation."""
    message = example(kind)
    fields = {name: getattr(message, name) for name in type(message).model_fields}
    assert type(message).model_validate(fields) == message


def test_kind_given_as_string_is_accepted() -> None:
    """decode_payload takes the kind as the plain string found in a header."""
    message = decode_payload("reminder", 1, example_payload_bytes(MessageKind.REMINDER))
    assert message.KIND is MessageKind.REMINDER


def test_unknown_field_is_rejected() -> None:
    """A field the schema does not define is refused at the top level and nested."""
    top = _request_dict() | {"extra": 1}
    with pytest.raises(SchemaViolation, match=r"extra: extra_forbidden"):
        _decode_request(top)
    nested = _request_dict()
    nested["person"] = {**nested["person"], "passport_number": "AA1234567"}  # type: ignore[dict-item]
    with pytest.raises(SchemaViolation, match=r"person\.passport_number: extra_forbidden") as info:
        _decode_request(nested)
    assert "AA1234567" not in str(info.value)


def test_unknown_key_that_is_not_an_identifier_is_not_echoed() -> None:
    """An unknown key that could be personal data is reported as <key>, not repeated."""
    document = _request_dict() | {EXAMPLE_PERSON_NAME: True}
    with pytest.raises(SchemaViolation, match=r"<key>: extra_forbidden") as info:
        _decode_request(document)
    assert EXAMPLE_PERSON_NAME not in str(info.value)


def test_strict_types_refuse_coercion() -> None:
    """A string where an int or bool belongs is refused, not converted."""
    document = _request_dict() | {"accompanying_children": "1"}
    with pytest.raises(SchemaViolation, match=r"accompanying_children: int_type"):
        _decode_request(document)
    withdrawn = json.loads(example_payload_bytes(MessageKind.CONSENT_WITHDRAWN))
    withdrawn["delete_data"] = "true"
    with pytest.raises(SchemaViolation, match=r"delete_data: bool_type"):
        decode_payload(MessageKind.CONSENT_WITHDRAWN, 1, json.dumps(withdrawn).encode())
    with pytest.raises(ValidationError):
        ReturnRequest.model_validate(
            example(MessageKind.RETURN_REQUEST).model_dump() | {"accompanying_children": "1"}
        )


def test_naive_datetime_is_rejected() -> None:
    """A datetime without a UTC offset is refused, in JSON and in Python."""
    document = json.loads(example_payload_bytes(MessageKind.DEPARTED))
    document["departed_at"] = "2026-03-20T14:41:00"
    with pytest.raises(SchemaViolation, match=r"departed_at: timezone_aware"):
        decode_payload(MessageKind.DEPARTED, 1, json.dumps(document).encode())
    reminder = example(MessageKind.REMINDER)
    with pytest.raises(ValidationError):
        type(reminder).model_validate({**dict(reminder), "deadline": datetime(2026, 3, 5, 7, 0)})


def test_messages_are_frozen() -> None:
    """Assigning to a field of a message raises instead of changing it."""
    message = example(MessageKind.RETURN_REQUEST)
    assert isinstance(message, ReturnRequest)
    with pytest.raises(ValidationError):
        message.notes = "changed"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        message.person.full_name = "someone else"  # type: ignore[misc]
    assert message == example(MessageKind.RETURN_REQUEST)


def test_travel_window_must_be_ordered() -> None:
    """A travel window whose earliest date is after its latest is refused; equal dates pass."""
    assert TravelWindow(earliest=date(2026, 3, 16), latest=date(2026, 3, 16))
    with pytest.raises(ValidationError, match="earliest must be on or before latest"):
        TravelWindow(earliest=date(2026, 3, 31), latest=date(2026, 3, 16))
    document = _request_dict()
    document["travel_window"] = {"earliest": "2026-03-31", "latest": "2026-03-16"}
    with pytest.raises(SchemaViolation, match=r"travel_window: value_error"):
        _decode_request(document)


def test_itinerary_legs_must_connect() -> None:
    """A leg that arrives before it departs, or departs before the previous arrives, is refused."""
    document = json.loads(example_payload_bytes(MessageKind.TRAVEL_ARRANGED))
    leg = document["legs"][0]
    backwards = leg | {"arrives_at": leg["departs_at"]}
    with pytest.raises(SchemaViolation, match=r"legs\.0: value_error"):
        decode_payload(
            MessageKind.TRAVEL_ARRANGED, 1, json.dumps(document | {"legs": [backwards]}).encode()
        )
    with pytest.raises(ValidationError, match="must depart after the previous one arrives"):
        TravelArranged.model_validate_json(json.dumps(document | {"legs": [leg, leg]}))


def test_return_must_cross_a_border() -> None:
    """A return request whose origin and destination countries are the same is refused."""
    document = _request_dict() | {"origin_country": "KZ"}
    with pytest.raises(SchemaViolation, match=r"return_request v1 .*value_error"):
        _decode_request(document)


def test_repeated_list_entries_are_rejected() -> None:
    """A list of services naming the same service twice is refused."""
    document = _request_dict() | {"transport_needs": ["escort", "escort"]}
    with pytest.raises(SchemaViolation, match=r"transport_needs: value_error"):
        _decode_request(document)


def test_consent_is_required() -> None:
    """A return request without a consent attestation, or with consent not given, is refused."""
    document = _request_dict()
    consent = document.pop("consent")
    with pytest.raises(SchemaViolation, match=r"consent: missing"):
        _decode_request(document)
    refused = consent | {"informed_and_voluntary": False}  # type: ignore[operator]
    with pytest.raises(SchemaViolation, match=r"consent\.informed_and_voluntary: literal_error"):
        _decode_request(document | {"consent": refused})


def test_receipts_and_reminders_carry_only_machine_fields() -> None:
    """Delivery receipts and reminders define no field that could hold personal data."""
    receipt = MESSAGE_TYPES[MessageKind.DELIVERY_RECEIPT]
    reminder = MESSAGE_TYPES[MessageKind.REMINDER]
    assert set(receipt.model_fields) == {"envelope_id", "digest", "received_at", "applied_at"}
    assert set(reminder.model_fields) == {
        "stage",
        "owed_by",
        "deadline",
        "overdue",
        "about_envelope",
    }
    document = json.loads(example_payload_bytes(MessageKind.DELIVERY_RECEIPT))
    with pytest.raises(SchemaViolation, match=r"digest: string_pattern_mismatch"):
        decode_payload(
            MessageKind.DELIVERY_RECEIPT, 1, json.dumps(document | {"digest": "AB" * 32}).encode()
        )


def test_non_utf8_is_rejected() -> None:
    """Bytes that are not UTF-8 raise SchemaViolation saying so."""
    data = example_payload_bytes(MessageKind.RETURN_REQUEST).replace(b"Dilnoza", b"Diln\xff\xfea")
    with pytest.raises(SchemaViolation, match="not valid UTF-8") as info:
        decode_payload(MessageKind.RETURN_REQUEST, 1, data)
    assert "Diln" not in str(info.value)


def test_deep_nesting_is_rejected_before_parsing() -> None:
    """10,000 nested lists raise SchemaViolation about depth, not a RecursionError."""
    data = b"[" * 10_000 + b"]" * 10_000
    with pytest.raises(SchemaViolation, match=f"nested deeper than {MAX_JSON_DEPTH}"):
        decode_payload(MessageKind.RETURN_REQUEST, 1, data)
    objects = b'{"a":' * 5_000 + b"1" + b"}" * 5_000
    with pytest.raises(SchemaViolation, match="nested deeper"):
        decode_payload(MessageKind.REMINDER, 1, objects)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    """Brackets and escaped quotes inside a text field do not trip the depth limit."""
    note = '[{"quoted\\" ' + "[" * 200 + "{" * 200
    message = example(MessageKind.RETURN_REQUEST).model_copy(update={"notes": note})
    decoded = decode_payload(MessageKind.RETURN_REQUEST, 1, encode_payload(message))
    assert decoded.notes == note  # type: ignore[attr-defined]


def test_oversize_payload_is_rejected() -> None:
    """A payload over MAX_PAYLOAD_BYTES is refused on decode and on encode."""
    data = b" " * (MAX_PAYLOAD_BYTES + 1)
    with pytest.raises(SchemaViolation, match="more than the 262144 allowed"):
        decode_payload(MessageKind.REMINDER, 1, data)
    notes = (EXAMPLE_PERSON_NAME + " ") * 200
    big = example(MessageKind.REINTEGRATION_UPDATE)
    # model_construct skips the field limits so only the size check stands in the way.
    huge = type(big).model_construct(**{**dict(big), "notes": notes * 100})
    with pytest.raises(SchemaViolation, match="shorten the free-text fields") as info:
        encode_payload(huge)
    assert EXAMPLE_PERSON_NAME not in str(info.value)


def test_unknown_kind_is_rejected() -> None:
    """A kind the registry does not know raises SchemaViolation listing the known kinds."""
    with pytest.raises(SchemaViolation, match="unknown message kind") as info:
        decode_payload("victim_profile_dump", 1, b"{}")
    assert "victim_profile_dump" not in str(info.value)
    assert "return_request" in str(info.value)


@pytest.mark.parametrize("version", [0, 2, 999])
def test_unknown_version_is_rejected(version: int) -> None:
    """A schema version other than the model's raises SchemaViolation naming what is readable."""
    with pytest.raises(SchemaViolation, match="reads version 1 only"):
        decode_payload(MessageKind.REMINDER, version, example_payload_bytes(MessageKind.REMINDER))


def test_invalid_json_is_rejected() -> None:
    """Bytes that are not JSON raise SchemaViolation without echoing them."""
    with pytest.raises(SchemaViolation, match="not valid JSON") as info:
        decode_payload(MessageKind.REMINDER, 1, b'{"stage": "Dilnoza Yusupova')
    assert EXAMPLE_PERSON_NAME not in str(info.value)


@pytest.mark.parametrize(
    "bad_name",
    [
        EXAMPLE_PERSON_NAME * 20,  # too long
        EXAMPLE_PERSON_NAME + "\n",  # control character
        "",
    ],
)
def test_bad_name_is_not_echoed(bad_name: str) -> None:
    """The SchemaViolation for a bad name field names the field, never the name."""
    document = _request_dict()
    document["person"] = {**document["person"], "full_name": bad_name}  # type: ignore[dict-item]
    with pytest.raises(SchemaViolation, match=r"person\.full_name: string_") as info:
        _decode_request(document)
    assert EXAMPLE_PERSON_NAME not in str(info.value)
    assert "Dilnoza" not in repr(info.value.args)


def test_bad_birth_date_is_not_echoed() -> None:
    """A malformed date of birth is reported by location only."""
    document = _request_dict()
    document["person"] = {**document["person"], "date_of_birth": "14.07.2001"}  # type: ignore[dict-item]
    with pytest.raises(SchemaViolation, match=r"person\.date_of_birth: date_") as info:
        _decode_request(document)
    assert "14.07.2001" not in str(info.value)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(ALL_KINDS), data=st.binary(max_size=2048))
def test_random_bytes_raise_only_schema_violation(kind: MessageKind, data: bytes) -> None:
    """Arbitrary bytes either decode or raise SchemaViolation, nothing else."""
    try:
        decode_payload(kind, 1, data)
    except SchemaViolation as e:
        assert str(e)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(ALL_KINDS), value=_json_values)
def test_random_json_raises_only_schema_violation(kind: MessageKind, value: object) -> None:
    """Arbitrary JSON documents either decode or raise SchemaViolation, nothing else."""
    try:
        decode_payload(kind, 1, json.dumps(value).encode())
    except SchemaViolation as e:
        assert str(e)


def test_export_writes_a_json_schema_per_kind(tmp_path: Path) -> None:
    """`trm schemas export DIR` writes a parseable JSON Schema for every kind and the header."""
    result = CliRunner().invoke(schemas_command, ["export", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    expected = {
        f"{kind.value}.v{model.VERSION}.schema.json" for kind, model in MESSAGE_TYPES.items()
    }
    expected.add("envelope_header.v1.schema.json")
    written = {path.name for path in (tmp_path / "out").iterdir()}
    assert written == expected
    for name in expected:
        assert name in result.output
        schema = json.loads((tmp_path / "out" / name).read_text(encoding="utf-8"))
        assert schema["$schema"].startswith("https://json-schema.org/")
        assert schema["type"] == "object"
        assert schema["properties"]
        assert schema.get("additionalProperties") is False
    request = json.loads((tmp_path / "out" / "return_request.v1.schema.json").read_text())
    assert request["title"] == "ReturnRequest"
    assert "consent" in request["required"]
    header = json.loads((tmp_path / "out" / "envelope_header.v1.schema.json").read_text())
    assert header["title"] == "EnvelopeHeader"
    assert "recipients" in header["properties"]


def test_export_to_unwritable_place_fails_with_a_reason(tmp_path: Path) -> None:
    """Exporting onto an existing file fails with a message naming the folder."""
    target = tmp_path / "a-file"
    target.write_text("x")
    result = CliRunner().invoke(schemas_command, ["export", str(target / "sub")])
    assert result.exit_code != 0
    assert "cannot write schemas" in str(result.exception)


# --- the exported schemas, read by a standard Draft 2020-12 validator -----------------

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: object) -> Mutation:
    """A mutation putting `value` at the dotted `path` (list indexes as numbers)."""
    *parents, last = path.split(".")

    def mutate(document: dict[str, Any]) -> None:
        node: Any = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _drop(field: str) -> Mutation:
    return lambda document: document.pop(field) and None


K = MessageKind
INVALID: list[tuple[str, MessageKind, Mutation]] = [
    ("too many items", K.RETURN_ACCEPTED, _set("conditions", [f"c{i}" for i in range(33)])),
    (
        "too many items, all distinct",
        K.RETURN_REQUEST,
        _set("consent.scope.share_with", [f"ngo-{i:02d}" for i in range(33)]),
    ),
    ("duplicate enum entries", K.RETURN_REQUEST, _set("transport_needs", ["escort", "escort"])),
    ("duplicate strings", K.RETURN_REQUEST, _set("person.languages", ["ru", "ru"])),
    ("duplicate purposes", K.CONSENT_WITHDRAWN, _set("purposes", ["referral", "referral"])),
    ("empty where at least one", K.RETURN_REQUEST, _set("consent.scope.purposes", [])),
    ("empty services", K.SERVICE_STARTED, _set("services", [])),
    ("empty legs", K.TRAVEL_ARRANGED, _set("legs", [])),
    ("escort stages beyond four", K.RETURN_REQUEST, _set("escort", {"stages": ["arrival"] * 5})),
    ("wrong enum value", K.RETURN_REQUEST, _set("travel_documents", "stolen")),
    ("wrong enum value in a list", K.REFERRAL_REQUEST, _set("services_needed", ["massage"])),
    ("extra field", K.RETURN_DECLINED, _set("nickname", "x")),
    ("extra nested field", K.RETURN_REQUEST, _set("person.nickname", "x")),
    ("string too long", K.RETURN_REQUEST, _set("person.full_name", "a" * 201)),
    ("note too long", K.CASE_CLOSED, _set("notes", "a" * 4001)),
    ("empty string", K.RETURN_REQUEST, _set("person.full_name", "")),
    ("control character", K.RETURN_REQUEST, _set("person.full_name", "a\x01b")),
    ("bad country code", K.RETURN_REQUEST, _set("origin_country", "uz")),
    ("bad participant id", K.RETURN_REQUEST, _set("receiving_ngo", "NGO UZ")),
    ("number above its maximum", K.RETURN_REQUEST, _set("accompanying_children", 21)),
    ("negative number", K.ERASURE_CONFIRMED, _set("erased_payloads", -1)),
    ("number as a string", K.RETURN_REQUEST, _set("accompanying_children", "2")),
    ("boolean as a string", K.REMINDER, _set("overdue", "true")),
    ("null where required", K.RETURN_REQUEST, _set("person", None)),
    ("missing required field", K.RETURN_REQUEST, _drop("consent")),
    ("missing machine field", K.DELIVERY_RECEIPT, _drop("digest")),
    ("naive date-time", K.REMINDER, _set("deadline", "2026-03-05T07:00:00")),
    ("impossible date", K.RETURN_REQUEST, _set("travel_window.earliest", "2026-02-30")),
    ("not a uuid", K.REMINDER, _set("about_envelope", "not-a-uuid")),
    ("list where an object", K.RETURN_REQUEST, _set("travel_window", [])),
]
"""Payloads trm refuses, each a kind's example with one thing wrong."""

CROSS_FIELD: list[tuple[str, MessageKind, Mutation]] = [
    ("window out of order", K.RETURN_REQUEST, _set("travel_window.latest", "2000-01-01")),
    ("no border crossed", K.RETURN_REQUEST, _set("origin_country", "KZ")),
]
"""Rules across fields: trm checks them, JSON Schema cannot say them (README says so)."""


def _document(kind: MessageKind) -> dict[str, Any]:
    document: dict[str, Any] = example(kind).model_dump(mode="json")
    return document


def _validator(kind: MessageKind) -> Draft202012Validator:
    model = MESSAGE_TYPES[kind]
    schema = schema_documents()[f"{kind.value}.v{model.VERSION}.schema.json"]
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _trm_accepts(kind: MessageKind, document: dict[str, Any]) -> bool:
    try:
        decode_payload(kind, MESSAGE_TYPES[kind].VERSION, json.dumps(document).encode())
    except SchemaViolation:
        return False
    return True


def test_every_exported_schema_is_a_valid_draft_2020_12_schema() -> None:
    """Every exported document is itself valid against the Draft 2020-12 metaschema."""
    for name, schema in schema_documents().items():
        assert schema["$schema"] == Draft202012Validator.META_SCHEMA["$id"], name
        Draft202012Validator.check_schema(schema)


def test_no_array_carries_a_string_length_keyword() -> None:
    """Arrays are bounded with minItems/maxItems (minLength means nothing to an array) and
    every distinct list says uniqueItems."""
    seen: list[str] = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "array":
                assert not {"minLength", "maxLength"} & node.keys(), where
                if node.get("uniqueItems"):
                    seen.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")

    for name, schema in schema_documents().items():
        walk(schema, name)
    assert "return_request.v1.schema.json/$defs/EscortNeed/properties/stages" in seen
    assert "envelope_header.v1.schema.json/properties/recipients" in seen


@pytest.mark.parametrize("kind", list(MessageKind))
def test_every_example_validates_against_its_exported_schema(kind: MessageKind) -> None:
    """The example of every kind is valid for the standard validator and for trm alike."""
    document = _document(kind)
    assert not list(_validator(kind).iter_errors(document))
    assert _trm_accepts(kind, document)


@pytest.mark.parametrize(("label", "kind", "mutate"), INVALID, ids=[i[0] for i in INVALID])
def test_the_schema_refuses_what_trm_refuses(
    label: str, kind: MessageKind, mutate: Mutation
) -> None:
    """For each invalid payload the standard validator and decode_payload agree: refused."""
    document = _document(kind)
    mutate(document)
    errors = list(_validator(kind).iter_errors(document))
    assert not _trm_accepts(kind, document), label
    assert errors, f"the exported schema accepts a payload trm refuses: {label}"


@pytest.mark.parametrize(("label", "kind", "mutate"), CROSS_FIELD, ids=[i[0] for i in CROSS_FIELD])
def test_rules_across_fields_are_trms_alone(
    label: str, kind: MessageKind, mutate: Mutation
) -> None:
    """A rule across fields is refused by trm while the schema, which cannot say it, accepts."""
    document = _document(kind)
    mutate(document)
    assert not list(_validator(kind).iter_errors(document)), label
    assert not _trm_accepts(kind, document), label


def test_envelope_header_schema_refuses_repeated_recipients() -> None:
    """The header's recipients are distinct in its exported schema, as EnvelopeHeader says."""
    schema = schema_documents()["envelope_header.v1.schema.json"]
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    header = {
        "id": "0195a3c2-7d10-7c4e-9b2a-5f0e8d1c2b3a",
        "kind": "return_request",
        "schema_version": 1,
        "case": "iom-kz.KZ-2026-0417",
        "sender": "iom-kz",
        "sender_key": "iom-kz-1",
        "recipients": ["iom-uz"],
        "sent_at": "2026-03-02T07:00:00Z",
        "seq": 1,
    }
    assert not list(validator.iter_errors(header))
    assert list(validator.iter_errors({**header, "recipients": ["iom-uz", "iom-uz"]}))


@pytest.mark.parametrize("kind", list(MessageKind))
def test_schemas_example_prints_a_valid_payload(kind: MessageKind) -> None:
    """`trm schemas example KIND` prints JSON that the schema and decode_payload accept."""
    result = CliRunner().invoke(schemas_command, ["example", kind.value])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert not list(_validator(kind).iter_errors(document))
    assert _trm_accepts(kind, document)


def test_schemas_example_refuses_an_unknown_kind() -> None:
    """An unknown kind is refused with the list of kinds."""
    result = CliRunner().invoke(schemas_command, ["example", "gossip"])
    assert result.exit_code != 0
    assert "return_request" in result.output


def test_readme_lists_every_kind() -> None:
    """The README's table of message kinds is `kinds_table()`: every kind, one line each."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split(KINDS_START, 1)[1].split(KINDS_END, 1)[0]
    assert block.strip() == kinds_table(), "paste kinds_table() into README.md"
    for kind in MessageKind:
        assert block.count(f"| `{kind.value}` |") == 1
