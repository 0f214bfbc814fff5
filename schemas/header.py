"""The envelope header: metadata in the clear, never personal data."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import Field, GetCoreSchemaHandler, field_validator
from pydantic_core import CoreSchema, core_schema

from schemas.base import CaseRef, KeyId, MessageKind, ParticipantId, Strict

MAX_RECIPIENTS = 32


class _OffsetZero:
    """A timezone-aware datetime at UTC offset zero, checked inside pydantic-core.

    A Python validator would cost a call out of pydantic-core for every
    header parsed: a sixth of the header's validation.
    """

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.datetime_schema(tz_constraint=0)


UtcDatetime = Annotated[datetime, _OffsetZero]
"""Refused with ``timezone_aware`` when naive, ``timezone_offset`` when not at UTC."""


class EnvelopeHeader(Strict):
    """Who sent what kind of message about which case, to whom, and when.

    The routing service and auditors read only this; it is the AEAD's
    associated data and is covered by the sender's signature.
    """

    v: Literal[1] = 1
    id: UUID
    """Time-ordered (UUIDv7) envelope id; the unit of deduplication."""
    kind: MessageKind
    schema_version: int = Field(ge=1, le=1000)
    case: CaseRef
    sender: ParticipantId
    sender_key: KeyId
    """The key id of the sender's Ed25519 key that signed this envelope."""
    recipients: tuple[ParticipantId, ...] = Field(
        min_length=1, max_length=MAX_RECIPIENTS, json_schema_extra={"uniqueItems": True}
    )
    sent_at: UtcDatetime
    seq: int = Field(ge=1, le=2**53)
    """Per sender, per case: 1 for the sender's first message on the case."""
    reply_to: UUID | None = None
    """The envelope id of the message this one answers."""

    @field_validator("recipients")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("recipients must be distinct")
        return value
