"""The words payloads are made of: enumerations and bounded free text.

The enumerations follow the stages of a return and the services named in the
programme's final report (see DOMAIN.md); a value is never renamed, only
added, so that old messages keep their meaning.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler, StringConstraints
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

# No control characters in one-line text: they have no place in a name or a
# place and could forge lines in whatever a case system prints them into.
ShortText = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$"),
]
"""One line of text: a name, a place, a role, a carrier."""

Note = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=4000, pattern=r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]+$"
    ),
]
"""Free text of a few paragraphs; tabs and line breaks allowed."""

MAX_ITEMS = 32
"""The most entries any list in a payload may hold (enumerations are smaller)."""


class _Distinct:
    """Refuses a list naming the same entry twice; says ``uniqueItems`` in the JSON Schema.

    Put it after the ``Field`` that bounds the list: pydantic applies a
    length bound written after a validator as a generic check, which it
    exports as ``minLength``/``maxLength`` (string keywords that JSON Schema
    ignores on arrays) instead of ``minItems``/``maxItems``.
    """

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_after_validator_function(_distinct, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**handler(schema), "uniqueItems": True}


def _distinct(values: tuple[Any, ...]) -> tuple[Any, ...]:
    if len(set(values)) != len(values):
        raise ValueError("entries must be distinct")
    return values


Distinct = _Distinct()
"""Refuses a list naming the same entry twice (after its ``Field``, see `_Distinct`)."""


class PreDepartureAssistance(StrEnum):
    """Assistance given in the destination country before the person leaves."""

    TEMPORARY_SHELTER = "temporary_shelter"
    LEGAL_CONSULTATION = "legal_consultation"
    MEDICAL = "medical"
    PSYCHOLOGICAL = "psychological"
    CASH_INSTALLMENTS = "cash_installments"
    RELEASE_FROM_EXPLOITATION = "release_from_exploitation"
    CLOTHES_AND_FOOD = "clothes_and_food"


class TransportAssistance(StrEnum):
    """What the journey home needs."""

    TRAVEL_COSTS = "travel_costs"
    TRAVEL_ARRANGEMENT = "travel_arrangement"
    TEMPORARY_TRAVEL_DOCUMENTS = "temporary_travel_documents"
    VISA_OR_REGISTRATION = "visa_or_registration"
    ESCORT = "escort"


class ReceptionAssistance(StrEnum):
    """What the receiving side must have ready when the person lands."""

    AIRPORT_RECEPTION = "airport_reception"
    TRANSPORT_TO_SHELTER = "transport_to_shelter"
    ACCOMMODATION = "accommodation"
    MEDICAL_SCREENING = "medical_screening"
    PSYCHOLOGICAL_FIRST_AID = "psychological_first_aid"
    INTERPRETATION = "interpretation"


class ReintegrationService(StrEnum):
    """Rehabilitation and reintegration services in the origin country."""

    ACCOMMODATION = "accommodation"
    MEDICAL_SCREENING = "medical_screening"
    PSYCHOLOGICAL = "psychological"
    LEGAL = "legal"
    SOCIAL = "social"
    ID_DOCUMENT_RECOVERY = "id_document_recovery"
    JOB_COUNSELLING = "job_counselling"
    VOCATIONAL_TRAINING = "vocational_training"
    REINTEGRATION_GRANT = "reintegration_grant"
    EQUIPMENT = "equipment"
    FAMILY_CONTACT = "family_contact"
    MONITORING = "monitoring"


class ReferralService(StrEnum):
    """A service one organisation asks another to provide."""

    TEMPORARY_SHELTER = "temporary_shelter"
    RETURN_ASSISTANCE = "return_assistance"
    LEGAL = "legal"
    MEDICAL = "medical"
    PSYCHOLOGICAL = "psychological"
    SOCIAL = "social"
    CASH_ASSISTANCE = "cash_assistance"
    RELEASE_FROM_EXPLOITATION = "release_from_exploitation"
    CLOTHES_AND_FOOD = "clothes_and_food"
    ID_DOCUMENT_RECOVERY = "id_document_recovery"
    JOB_COUNSELLING = "job_counselling"
    VOCATIONAL_TRAINING = "vocational_training"
    REINTEGRATION_GRANT = "reintegration_grant"
    FAMILY_CONTACT = "family_contact"
    MONITORING = "monitoring"
    LAW_ENFORCEMENT_COOPERATION = "law_enforcement_cooperation"


class ReferrerType(StrEnum):
    """Who first referred the person."""

    LAW_ENFORCEMENT = "law_enforcement"
    EMBASSY_OR_CONSULATE = "embassy_or_consulate"
    RED_CROSS = "red_cross"
    MINISTRY = "ministry"
    NGO = "ngo"
    CENTRE_FOR_MIGRANTS_ABROAD = "centre_for_migrants_abroad"
    HOTLINE = "hotline"
    SELF = "self"


class Sex(StrEnum):
    """Sex as recorded by the referring organisation."""

    FEMALE = "female"
    MALE = "male"
    OTHER = "other"
    NOT_RECORDED = "not_recorded"


class DocumentStatus(StrEnum):
    """Where the person's identity or travel document stands."""

    VALID = "valid"
    EXPIRED = "expired"
    HELD_BY_EXPLOITER = "held_by_exploiter"
    LOST = "lost"
    DESTROYED = "destroyed"
    NEVER_HAD = "never_had"
    TEMPORARY_DOCUMENT_ISSUED = "temporary_document_issued"
    REPLACEMENT_REQUESTED = "replacement_requested"
    UNKNOWN = "unknown"


class TravelDocumentType(StrEnum):
    """A document issued so the person can travel or enter."""

    PASSPORT = "passport"
    CERTIFICATE_OF_RETURN = "certificate_of_return"
    TEMPORARY_TRAVEL_DOCUMENT = "temporary_travel_document"
    EXIT_PERMIT = "exit_permit"
    TRANSIT_VISA = "transit_visa"
    ENTRY_VISA = "entry_visa"
    REGISTRATION = "registration"


class JourneyStage(StrEnum):
    """A part of the journey, e.g. where an escort is needed."""

    DEPARTURE = "departure"
    TRANSIT = "transit"
    ARRIVAL = "arrival"
    WHOLE_JOURNEY = "whole_journey"


class TransportMode(StrEnum):
    """How one leg of a journey travels."""

    AIR = "air"
    RAIL = "rail"
    ROAD = "road"
    SEA = "sea"


class DataCategory(StrEnum):
    """A category of the person's data that consent may cover."""

    IDENTITY = "identity"
    CONTACT = "contact"
    HEALTH = "health"
    EXPLOITATION_HISTORY = "exploitation_history"
    TRAVEL_DOCUMENTS = "travel_documents"
    FAMILY = "family"


class ConsentPurpose(StrEnum):
    """What the person agreed their data may be used for."""

    RETURN_ASSISTANCE = "return_assistance"
    RECEPTION = "reception"
    REINTEGRATION = "reintegration"
    REFERRAL = "referral"
    CASE_MONITORING = "case_monitoring"
    LAW_ENFORCEMENT_COOPERATION = "law_enforcement_cooperation"


class DeclineReason(StrEnum):
    """Why a return or referral request was declined."""

    OUTSIDE_MANDATE = "outside_mandate"
    INSUFFICIENT_INFORMATION = "insufficient_information"
    NO_CAPACITY = "no_capacity"
    CONSENT_NOT_VERIFIABLE = "consent_not_verifiable"
    IDENTITY_NOT_CONFIRMED = "identity_not_confirmed"
    NOT_COUNTRY_OF_ORIGIN = "not_country_of_origin"
    SAFETY_RISK_ON_RETURN = "safety_risk_on_return"
    DUPLICATE = "duplicate"
    OTHER = "other"


class ReintegrationStatus(StrEnum):
    """How a person's reintegration plan stands."""

    PLANNED = "planned"
    IN_PROGRESS = "in_progress"
    SUSPENDED = "suspended"
    COMPLETED = "completed"


class ClosureReason(StrEnum):
    """Why a case was closed."""

    REINTEGRATED = "reintegrated"
    CONSENT_WITHDRAWN = "consent_withdrawn"
    LOST_CONTACT = "lost_contact"
    TRANSFERRED = "transferred"
    OTHER = "other"


class ServiceNotDoneReason(StrEnum):
    """Why a referred service was not provided (Primero's ``done`` is false)."""

    PERSON_DECLINED = "person_declined"
    PERSON_UNREACHABLE = "person_unreachable"
    SERVICE_UNAVAILABLE = "service_unavailable"
    NOT_ELIGIBLE = "not_eligible"
    REFERRED_ELSEWHERE = "referred_elsewhere"
    OTHER = "other"


class RequestWithdrawalReason(StrEnum):
    """Why the sender withdrew a request it had made."""

    CONSENT_WITHDRAWN = "consent_withdrawn"
    PERSON_CHANGED_PLANS = "person_changed_plans"
    PERSON_UNREACHABLE = "person_unreachable"
    RESOLVED_LOCALLY = "resolved_locally"
    SENT_IN_ERROR = "sent_in_error"
    DUPLICATE = "duplicate"
    OTHER = "other"
