"""The messages of a referral: one organisation asking another to provide services.

Referrals run between NGOs across borders and from NGOs or missions to
services, each based on the person's consent.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Self

from pydantic import AwareDatetime, Field, model_validator

from schemas.base import CountryCode, Message, MessageKind
from schemas.person import ConsentAttestation, Person
from schemas.vocabulary import (
    MAX_ITEMS,
    DeclineReason,
    Distinct,
    Note,
    ReferralService,
    ReferrerType,
    ServiceNotDoneReason,
    ShortText,
)


class ReferralRequest(Message):
    """Asks another organisation to provide services to a person.

    Sent by the referring mission or NGO to the organisation that should
    provide the services, once the person has consented. Opens a referral case.
    """

    KIND: ClassVar[MessageKind] = MessageKind.REFERRAL_REQUEST

    consent: ConsentAttestation
    person: Person
    referrer_type: ReferrerType
    """Who first identified and referred the person."""
    services_needed: Annotated[
        tuple[ReferralService, ...], Field(min_length=1, max_length=16), Distinct
    ]
    service_country: CountryCode
    """Where the services are needed."""
    urgent: bool = False
    notes: Note | None = None


class ReferralAccepted(Message):
    """The organisation will provide (some of) the services asked for.

    Sent by the receiving organisation to the referrer in answer to a
    referral request.
    """

    KIND: ClassVar[MessageKind] = MessageKind.REFERRAL_ACCEPTED

    services_offered: Annotated[
        tuple[ReferralService, ...], Field(min_length=1, max_length=16), Distinct
    ]
    conditions: Annotated[tuple[ShortText, ...], Field(max_length=MAX_ITEMS)] = ()
    notes: Note | None = None


class ReferralDeclined(Message):
    """The organisation cannot take the referral.

    Sent by the receiving organisation to the referrer in answer to a
    referral request.
    """

    KIND: ClassVar[MessageKind] = MessageKind.REFERRAL_DECLINED

    reason: DeclineReason
    note: Note | None = None


class ServiceStarted(Message):
    """The receiving organisation has started providing the services it accepted.

    Sent by the organisation that accepted the referral to the referrer and
    every other party to the case.
    """

    KIND: ClassVar[MessageKind] = MessageKind.SERVICE_STARTED

    started_at: AwareDatetime
    services: Annotated[tuple[ReferralService, ...], Field(min_length=1, max_length=16), Distinct]
    notes: Note | None = None


class ServiceCompleted(Message):
    """The services of a referral have ended, provided (`done`) or not, with the reason.

    Sent by the organisation that provided them to every other party to the case.
    """

    KIND: ClassVar[MessageKind] = MessageKind.SERVICE_COMPLETED

    completed_at: AwareDatetime
    done: bool
    """Whether the services were provided, as Primero records a referral's ``done``."""
    not_done_reason: ServiceNotDoneReason | None = None
    notes: Note | None = None

    @model_validator(mode="after")
    def _reason_when_not_done(self) -> Self:
        if self.done and self.not_done_reason is not None:
            raise ValueError("not_done_reason is given only when done is false")
        if not self.done and self.not_done_reason is None:
            raise ValueError("not_done_reason is required when done is false")
        return self
