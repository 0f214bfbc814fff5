"""The messages of a return, from the request to reintegration.

A return runs between the mission in the destination country (where the
person was exploited, e.g. ``iom-kz``), the mission in the country of origin
(``iom-uz``) and the partner NGO that receives the person there.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, ClassVar, Self

from pydantic import AwareDatetime, Field, model_validator

from schemas.base import CountryCode, Message, MessageKind, ParticipantId, Strict
from schemas.person import ConsentAttestation, Person, StaffMember
from schemas.vocabulary import (
    MAX_ITEMS,
    DeclineReason,
    Distinct,
    DocumentStatus,
    JourneyStage,
    Note,
    PreDepartureAssistance,
    ReceptionAssistance,
    ReintegrationService,
    ReintegrationStatus,
    ShortText,
    TransportAssistance,
    TransportMode,
    TravelDocumentType,
)

MAX_LEGS = 12


class TravelWindow(Strict):
    """The dates between which the person could travel, both inclusive."""

    earliest: date
    latest: date

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.earliest > self.latest:
            raise ValueError("earliest must be on or before latest")
        return self


class EscortNeed(Strict):
    """Where on the journey the person needs an escort, and why."""

    stages: Annotated[tuple[JourneyStage, ...], Field(min_length=1, max_length=4), Distinct]
    note: Note | None = None


class ReturnRequest(Message):
    """Asks the origin country's mission to receive a person and arrange their return.

    Sent by the mission in the destination country to the mission in the
    country of origin (and the receiving NGO, if one is named) once the person
    has given informed, voluntary consent. Opens a return case.
    """

    KIND: ClassVar[MessageKind] = MessageKind.RETURN_REQUEST

    consent: ConsentAttestation
    person: Person
    accompanying_children: int = Field(default=0, ge=0, le=20)
    destination_country: CountryCode
    """Where the person is now (the country of exploitation)."""
    origin_country: CountryCode
    """Where the person returns to."""
    assistance_before_departure: Annotated[
        tuple[PreDepartureAssistance, ...], Field(max_length=16), Distinct
    ] = ()
    transport_needs: Annotated[tuple[TransportAssistance, ...], Field(max_length=16), Distinct] = ()
    reception_needs: Annotated[tuple[ReceptionAssistance, ...], Field(max_length=16), Distinct] = ()
    travel_documents: DocumentStatus
    escort: EscortNeed | None = None
    """None when no escort is needed."""
    travel_window: TravelWindow
    receiving_ngo: ParticipantId | None = None
    notes: Note | None = None

    @model_validator(mode="after")
    def _crosses_a_border(self) -> Self:
        if self.destination_country == self.origin_country:
            raise ValueError("destination_country and origin_country must differ")
        return self


class ReturnAccepted(Message):
    """The origin country's mission agrees to receive the person.

    Sent by the origin mission to the requesting mission (and the receiving
    NGO) in answer to a return request.
    """

    KIND: ClassVar[MessageKind] = MessageKind.RETURN_ACCEPTED

    receiving_ngo: ParticipantId | None = None
    conditions: Annotated[tuple[ShortText, ...], Field(max_length=MAX_ITEMS)] = ()
    notes: Note | None = None


class ReturnDeclined(Message):
    """The origin country's mission cannot take the return.

    Sent by the origin mission to the requesting mission in answer to a
    return request; ends the return case unless a new request follows.
    """

    KIND: ClassVar[MessageKind] = MessageKind.RETURN_DECLINED

    reason: DeclineReason
    note: Note | None = None


class Leg(Strict):
    """One leg of the journey: a flight, train or road transfer."""

    mode: TransportMode
    depart_from: ShortText
    """City, station or airport (IATA code or name)."""
    arrive_at: ShortText
    carrier: ShortText
    service_number: ShortText | None = None
    """Flight or train number, e.g. ``HY 766``."""
    departs_at: AwareDatetime
    arrives_at: AwareDatetime

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.arrives_at <= self.departs_at:
            raise ValueError("arrives_at must be after departs_at")
        return self


class IssuedDocument(Strict):
    """A travel or identity document issued for the journey."""

    type: TravelDocumentType
    issuing_authority: ShortText
    valid_until: date


class EscortArrangement(Strict):
    """Who escorts the person over which part of the journey."""

    stage: JourneyStage
    escort_role: ShortText
    organisation: ShortText | None = None
    handover_place: ShortText | None = None


class TravelArranged(Message):
    """The journey is booked and the documents are ready.

    Sent by the mission in the destination country to the origin mission and
    the receiving NGO, so they can meet the person on arrival.
    """

    KIND: ClassVar[MessageKind] = MessageKind.TRAVEL_ARRANGED

    itinerary_ref: ShortText
    legs: Annotated[tuple[Leg, ...], Field(min_length=1, max_length=MAX_LEGS)]
    documents_issued: Annotated[tuple[IssuedDocument, ...], Field(max_length=MAX_ITEMS)] = ()
    escorts: Annotated[tuple[EscortArrangement, ...], Field(max_length=MAX_LEGS)] = ()
    planned_arrival: AwareDatetime
    notes: Note | None = None

    @model_validator(mode="after")
    def _connected(self) -> Self:
        for before, after in zip(self.legs, self.legs[1:], strict=False):
            if after.departs_at < before.arrives_at:
                raise ValueError("each leg must depart after the previous one arrives")
        if self.planned_arrival < self.legs[-1].arrives_at:
            raise ValueError("planned_arrival must not be before the last leg arrives")
        return self


class Departed(Message):
    """The person has left the destination country.

    Sent by the mission in the destination country to the origin mission and
    the receiving NGO when the person boards the first leg.
    """

    KIND: ClassVar[MessageKind] = MessageKind.DEPARTED

    departed_at: AwareDatetime
    itinerary_ref: ShortText
    """The ``itinerary_ref`` of the travel-arranged message actually used."""
    notes: Note | None = None


class ReceptionConfirmed(Message):
    """The receiving NGO has met the person in the country of origin.

    Sent by the receiving NGO to both missions; for the destination mission it
    is the proof that the person arrived and was received.
    """

    KIND: ClassVar[MessageKind] = MessageKind.RECEPTION_CONFIRMED

    received_at: AwareDatetime
    place: ShortText
    received_by: StaffMember
    shelter: ShortText | None = None
    condition_notes: Note | None = None


class ReintegrationUpdate(Message):
    """What reintegration services the person has had, and what comes next.

    Sent periodically by the receiving NGO to the origin mission (and, where
    the consent covers it, the destination mission).
    """

    KIND: ClassVar[MessageKind] = MessageKind.REINTEGRATION_UPDATE

    services_delivered: Annotated[
        tuple[ReintegrationService, ...], Field(max_length=16), Distinct
    ] = ()
    status: ReintegrationStatus
    next_review: date | None = None
    notes: Note | None = None
