"""Every message kind mapped to its model, and the one way payloads become bytes.

`decode_payload` is the boundary where decrypted bytes from another
participant meet our models: it refuses anything too large, not UTF-8, nested
too deep or not matching the kind's schema, always with `SchemaViolation`,
and its messages name field locations but never the values (values may be
personal data).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from pydantic import ValidationError

from broker.errors import SchemaViolation
from schemas.base import Message, MessageKind
from schemas.control import (
    CaseClosed,
    ConsentWithdrawn,
    DeliveryReceipt,
    ErasureConfirmed,
    Reminder,
    RequestWithdrawn,
)
from schemas.referrals import (
    ReferralAccepted,
    ReferralDeclined,
    ReferralRequest,
    ServiceCompleted,
    ServiceStarted,
)
from schemas.returns import (
    Departed,
    ReceptionConfirmed,
    ReintegrationUpdate,
    ReturnAccepted,
    ReturnDeclined,
    ReturnRequest,
    TravelArranged,
)

MAX_PAYLOAD_BYTES: int = 256 * 1024
MAX_JSON_DEPTH: int = 32
MAX_REPORTED_ERRORS = 10

MESSAGE_TYPES: Mapping[MessageKind, type[Message]] = MappingProxyType(
    {
        model.KIND: model
        for model in (
            ReturnRequest,
            ReturnAccepted,
            ReturnDeclined,
            TravelArranged,
            Departed,
            ReceptionConfirmed,
            ReintegrationUpdate,
            CaseClosed,
            ReferralRequest,
            ReferralAccepted,
            ReferralDeclined,
            ServiceStarted,
            ServiceCompleted,
            ConsentWithdrawn,
            RequestWithdrawn,
            DeliveryReceipt,
            Reminder,
            ErasureConfirmed,
        )
    }
)

# A JSON string, possibly unterminated (then it runs to the end of the input).
# Possessive quantifiers keep the scan linear on any input.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\Z)', re.DOTALL)
_NOT_A_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_SAFE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")


def model_for(kind: MessageKind | str, schema_version: int) -> type[Message]:
    """The model for a kind and schema version, or SchemaViolation if unsupported."""
    try:
        model = MESSAGE_TYPES[MessageKind(kind)]
    except ValueError as e:
        raise SchemaViolation(
            "unknown message kind; expected one of: " + ", ".join(k.value for k in MessageKind)
        ) from e
    if type(schema_version) is not int or schema_version != model.VERSION:
        raise SchemaViolation(
            f"unsupported schema version for {model.KIND.value}; this build reads "
            f"version {model.VERSION} only"
        )
    return model


def encode_payload(message: Message) -> bytes:
    """Compact UTF-8 JSON of a message; SchemaViolation if it exceeds MAX_PAYLOAD_BYTES."""
    data = message.model_dump_json().encode("utf-8")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise SchemaViolation(
            f"{message.KIND.value} payload is {len(data)} bytes, more than the "
            f"{MAX_PAYLOAD_BYTES} allowed; shorten the free-text fields"
        )
    return data


def decode_payload(kind: MessageKind | str, schema_version: int, data: bytes) -> Message:
    """Parse and validate a payload of the given kind and version, or raise SchemaViolation."""
    model = model_for(kind, schema_version)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise SchemaViolation(
            f"payload is {len(data)} bytes, more than the {MAX_PAYLOAD_BYTES} allowed"
        )
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SchemaViolation(f"payload is not valid UTF-8 (first bad byte at {e.start})") from e
    _check_depth(data)
    try:
        return model.model_validate_json(data)
    except ValidationError as e:
        raise SchemaViolation(_describe(model, e)) from None


def _check_depth(data: bytes) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH, before any parser recurses into it."""
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_A_BRACKET)
    depth = 0
    for byte in brackets:
        if byte in b"[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise SchemaViolation(f"payload JSON is nested deeper than {MAX_JSON_DEPTH} levels")
        else:
            depth -= 1


def _describe(model: type[Message], error: ValidationError) -> str:
    """Field locations and error types only: the input values never appear."""
    problems = error.errors(include_url=False, include_input=False, include_context=False)
    if any(p["type"] == "json_invalid" for p in problems):
        return f"{model.KIND.value} payload is not valid JSON"
    shown = [f"{_location(p['loc'])}: {p['type']}" for p in problems[:MAX_REPORTED_ERRORS]]
    more = len(problems) - len(shown)
    suffix = f"; and {more} more" if more > 0 else ""
    return (
        f"{model.KIND.value} v{model.VERSION} payload does not match its schema: "
        + "; ".join(shown)
        + suffix
    )


def _location(loc: tuple[int | str, ...]) -> str:
    # An unknown key comes from the input and could itself be personal data;
    # only identifier-like keys are echoed.
    parts = [
        str(part) if isinstance(part, int) or _SAFE_KEY.match(part) else "<key>" for part in loc
    ]
    return ".".join(parts) or "(payload)"
