"""What every trm model shares: strict, frozen, closed to unknown fields."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, StringConstraints


class MessageKind(StrEnum):
    """Every kind of message missions, NGOs and the routing service exchange."""

    RETURN_REQUEST = "return_request"
    RETURN_ACCEPTED = "return_accepted"
    RETURN_DECLINED = "return_declined"
    TRAVEL_ARRANGED = "travel_arranged"
    DEPARTED = "departed"
    RECEPTION_CONFIRMED = "reception_confirmed"
    REINTEGRATION_UPDATE = "reintegration_update"
    CASE_CLOSED = "case_closed"
    REFERRAL_REQUEST = "referral_request"
    REFERRAL_ACCEPTED = "referral_accepted"
    REFERRAL_DECLINED = "referral_declined"
    SERVICE_STARTED = "service_started"
    SERVICE_COMPLETED = "service_completed"
    CONSENT_WITHDRAWN = "consent_withdrawn"
    REQUEST_WITHDRAWN = "request_withdrawn"
    DELIVERY_RECEIPT = "delivery_receipt"
    REMINDER = "reminder"
    ERASURE_CONFIRMED = "erasure_confirmed"


ParticipantId = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$", max_length=63)
]
"""A participant's id, e.g. ``iom-kz`` or ``ngo-uz-istiqbolli-avlod``."""

CaseRef = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{2,63}$", max_length=64)
]
"""A pseudonymous case reference; never a name or a document number.

The case protocol reads the part before the first ``.`` as the id of the
participant that owns the case (`broker.casepolicy.case_owner`).
"""

KeyId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$", max_length=64)]

CountryCode = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")]
"""ISO 3166-1 alpha-2."""


class Strict(BaseModel):
    """Base of every model: strict types, immutable, unknown fields refused.

    A field's docstring becomes its ``description`` in the JSON Schema, so a
    partner reading the schemas (and the console's forms) sees what it means.
    """

    model_config = ConfigDict(
        strict=True, frozen=True, extra="forbid", use_attribute_docstrings=True
    )


class Message(Strict):
    """A payload: what travels encrypted inside an envelope.

    Personal data lives only in payloads. Each subclass names its kind and the
    version of its schema; a change that is not backwards compatible bumps it.
    """

    KIND: ClassVar[MessageKind]
    VERSION: ClassVar[int] = 1
