"""Messages that belong to every kind of case: consent, withdrawal, closure,
receipts and reminders.

Delivery receipts and reminders carry no personal data at all: they are
produced by machines about envelopes and deadlines.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Self
from uuid import UUID

from pydantic import AwareDatetime, Field, StringConstraints, model_validator

from schemas.base import Message, MessageKind, ParticipantId
from schemas.person import StaffMember
from schemas.vocabulary import (
    ClosureReason,
    ConsentPurpose,
    Distinct,
    Note,
    RequestWithdrawalReason,
)

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
"""A SHA-256 digest as 64 lowercase hex digits."""

Stage = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z_]{0,31}$")]
"""A case stage name, e.g. ``requested`` or ``travel_arranged``."""


class ConsentWithdrawn(Message):
    """The person has withdrawn (part of) their consent.

    Sent by whoever recorded the withdrawal to every other party to the case;
    the case halts for the purposes withdrawn.
    """

    KIND: ClassVar[MessageKind] = MessageKind.CONSENT_WITHDRAWN

    withdrawn_at: AwareDatetime
    recorded_by: StaffMember
    purposes: Annotated[tuple[ConsentPurpose, ...], Field(min_length=1, max_length=16), Distinct]
    """The purposes the person no longer consents to."""
    delete_data: bool
    """Whether the person asked for their data to be deleted."""
    notes: Note | None = None


class RequestWithdrawn(Message):
    """The sender withdraws a return or referral request it made.

    Sent by the requesting mission or NGO to the parties it asked.
    """

    KIND: ClassVar[MessageKind] = MessageKind.REQUEST_WITHDRAWN

    reason: RequestWithdrawalReason
    note: Note | None = None


class CaseClosed(Message):
    """The case is finished.

    Sent by the mission or NGO that holds the case (usually the origin mission
    once reintegration is complete) to every other party to the case.
    """

    KIND: ClassVar[MessageKind] = MessageKind.CASE_CLOSED

    reason: ClosureReason
    closed_at: AwareDatetime
    note: Note | None = None


class DeliveryReceipt(Message):
    """Proof that an envelope was received and applied; no personal data.

    Sent automatically by a participant's adapter back to an envelope's sender
    once the envelope has been opened and applied.
    """

    KIND: ClassVar[MessageKind] = MessageKind.DELIVERY_RECEIPT

    envelope_id: UUID
    digest: Sha256Hex
    """SHA-256 of the exact envelope bytes received."""
    received_at: AwareDatetime
    applied_at: AwareDatetime

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.applied_at < self.received_at:
            raise ValueError("applied_at must not be before received_at")
        return self


class Reminder(Message):
    """A handoff is due or overdue; no personal data.

    Sent by the routing service to the participant who owes the next step.
    """

    KIND: ClassVar[MessageKind] = MessageKind.REMINDER

    stage: Stage
    owed_by: ParticipantId
    deadline: AwareDatetime
    overdue: bool
    about_envelope: UUID | None = None


class ErasureConfirmed(Message):
    """A recipient erased the case's delivered payloads after a withdrawal with delete_data.

    Sent by each recipient's adapter to the participant that sent the
    withdrawal, once the erasure is done; no personal data.
    """

    KIND: ClassVar[MessageKind] = MessageKind.ERASURE_CONFIRMED

    withdrawal: UUID
    """The envelope id of the consent withdrawal that asked for the erasure."""
    erased_payloads: Annotated[int, Field(ge=0, le=1_000_000)]
    erased_at: AwareDatetime
