"""The person a case is about, their consent, and the staff who record things.

These parts appear only inside payloads, which travel encrypted: the header
and everything else outside a payload carry a pseudonymous case reference.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field

from schemas.base import CountryCode, ParticipantId, Strict
from schemas.vocabulary import (
    ConsentPurpose,
    DataCategory,
    Distinct,
    DocumentStatus,
    Sex,
    ShortText,
)

LanguageCode = Annotated[str, Field(pattern=r"^[a-z]{2,3}$")]
"""ISO 639-1 or 639-3 language code, e.g. ``uz`` or ``kaa``."""


class StaffMember(Strict):
    """Who did something: a role, an organisation's staff id, optionally a name."""

    role: ShortText
    staff_id: ShortText | None = None
    name: ShortText | None = None


class Person(Strict):
    """The person being returned or referred, as far as the receiver needs to know."""

    full_name: ShortText
    date_of_birth: date | None = None
    sex: Sex
    nationality: CountryCode
    identity_document: DocumentStatus
    languages: Annotated[tuple[LanguageCode, ...], Field(max_length=8), Distinct] = ()


class ConsentScope(Strict):
    """Which of the person's data may go to whom, for which purposes."""

    data: Annotated[tuple[DataCategory, ...], Field(min_length=1, max_length=16), Distinct]
    share_with: Annotated[tuple[ParticipantId, ...], Field(min_length=1, max_length=32), Distinct]
    purposes: Annotated[tuple[ConsentPurpose, ...], Field(min_length=1, max_length=16), Distinct]


class ConsentAttestation(Strict):
    """The sender's attestation that the person gave informed, voluntary consent."""

    informed_and_voluntary: Literal[True]
    given_at: AwareDatetime
    recorded_by: StaffMember
    language: LanguageCode
    """The language the person was informed in."""
    scope: ConsentScope
