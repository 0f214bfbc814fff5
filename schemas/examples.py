"""Fictional but realistic payloads for every message kind.

One return from Kazakhstan to Uzbekistan: the Kazakhstan mission (``iom-kz``)
asks the Uzbekistan mission (``iom-uz``) to receive a young woman whose
passport was taken by her employer in Almaty; the NGO "Istiqbolli Avlod"
(``ngo-uz-istiqbolli-avlod``) receives her in Tashkent. The person is
invented; tests use `EXAMPLE_PERSON_NAME` to prove that a name from a payload
never reaches headers, logs, the broker or any database.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from typing import TypeVar
from uuid import UUID

from schemas.base import Message, MessageKind
from schemas.control import (
    CaseClosed,
    ConsentWithdrawn,
    DeliveryReceipt,
    ErasureConfirmed,
    Reminder,
    RequestWithdrawn,
)
from schemas.person import ConsentAttestation, ConsentScope, Person, StaffMember
from schemas.referrals import (
    ReferralAccepted,
    ReferralDeclined,
    ReferralRequest,
    ServiceCompleted,
    ServiceStarted,
)
from schemas.registry import encode_payload
from schemas.returns import (
    Departed,
    EscortArrangement,
    EscortNeed,
    IssuedDocument,
    Leg,
    ReceptionConfirmed,
    ReintegrationUpdate,
    ReturnAccepted,
    ReturnDeclined,
    ReturnRequest,
    TravelArranged,
    TravelWindow,
)
from schemas.vocabulary import (
    ClosureReason,
    ConsentPurpose,
    DataCategory,
    DeclineReason,
    DocumentStatus,
    JourneyStage,
    PreDepartureAssistance,
    ReceptionAssistance,
    ReferralService,
    ReferrerType,
    ReintegrationService,
    ReintegrationStatus,
    RequestWithdrawalReason,
    Sex,
    TransportAssistance,
    TransportMode,
    TravelDocumentType,
)

M = TypeVar("M", bound=Message)

EXAMPLE_PERSON_NAME = "Dilnoza Yusupova"
"""A fictional name, present in every example that carries a person."""

EXAMPLE_CASE = "iom-kz.KZ-2026-0417"
"""The pseudonymous case reference the examples belong to, owned by ``iom-kz``."""

EXAMPLE_SENDER = "iom-kz"
EXAMPLE_ORIGIN_MISSION = "iom-uz"
EXAMPLE_NGO = "ngo-uz-istiqbolli-avlod"

_ALMATY = timezone(timedelta(hours=5))
_TASHKENT = timezone(timedelta(hours=5))


def _consent() -> ConsentAttestation:
    return ConsentAttestation(
        informed_and_voluntary=True,
        given_at=datetime(2026, 3, 2, 11, 30, tzinfo=_ALMATY),
        recorded_by=StaffMember(role="case manager", staff_id="KZ-CM-07"),
        language="uz",
        scope=ConsentScope(
            data=(
                DataCategory.IDENTITY,
                DataCategory.HEALTH,
                DataCategory.TRAVEL_DOCUMENTS,
                DataCategory.FAMILY,
            ),
            share_with=(EXAMPLE_SENDER, EXAMPLE_ORIGIN_MISSION, EXAMPLE_NGO),
            purposes=(
                ConsentPurpose.RETURN_ASSISTANCE,
                ConsentPurpose.RECEPTION,
                ConsentPurpose.REINTEGRATION,
                ConsentPurpose.REFERRAL,
            ),
        ),
    )


def _person() -> Person:
    return Person(
        full_name=EXAMPLE_PERSON_NAME,
        date_of_birth=date(2001, 7, 14),
        sex=Sex.FEMALE,
        nationality="UZ",
        identity_document=DocumentStatus.HELD_BY_EXPLOITER,
        languages=("uz", "ru"),
    )


def _return_request() -> ReturnRequest:
    return ReturnRequest(
        consent=_consent(),
        person=_person(),
        destination_country="KZ",
        origin_country="UZ",
        assistance_before_departure=(
            PreDepartureAssistance.RELEASE_FROM_EXPLOITATION,
            PreDepartureAssistance.TEMPORARY_SHELTER,
            PreDepartureAssistance.MEDICAL,
            PreDepartureAssistance.PSYCHOLOGICAL,
            PreDepartureAssistance.CLOTHES_AND_FOOD,
        ),
        transport_needs=(
            TransportAssistance.TRAVEL_COSTS,
            TransportAssistance.TRAVEL_ARRANGEMENT,
            TransportAssistance.TEMPORARY_TRAVEL_DOCUMENTS,
            TransportAssistance.ESCORT,
        ),
        reception_needs=(
            ReceptionAssistance.AIRPORT_RECEPTION,
            ReceptionAssistance.TRANSPORT_TO_SHELTER,
            ReceptionAssistance.MEDICAL_SCREENING,
        ),
        travel_documents=DocumentStatus.HELD_BY_EXPLOITER,
        escort=EscortNeed(
            stages=(JourneyStage.DEPARTURE,),
            note="Escort from the Almaty shelter to the departure gate.",
        ),
        travel_window=TravelWindow(earliest=date(2026, 3, 16), latest=date(2026, 3, 31)),
        receiving_ngo=EXAMPLE_NGO,
        notes=(
            "Worked eight months in a garment workshop in Almaty without pay; "
            "released with the help of the police on 24 February. "
            "Wishes to return to her mother in Samarkand region."
        ),
    )


def _return_accepted() -> ReturnAccepted:
    return ReturnAccepted(
        receiving_ngo=EXAMPLE_NGO,
        conditions=("Certificate of return to be issued by the Embassy of Uzbekistan in Astana",),
    )


def _return_declined() -> ReturnDeclined:
    return ReturnDeclined(
        reason=DeclineReason.INSUFFICIENT_INFORMATION,
        note="Please confirm the place of permanent registration.",
    )


def _travel_arranged() -> TravelArranged:
    return TravelArranged(
        itinerary_ref="KZ-2026-0417-T1",
        legs=(
            Leg(
                mode=TransportMode.AIR,
                depart_from="ALA Almaty",
                arrive_at="TAS Tashkent",
                carrier="Uzbekistan Airways",
                service_number="HY 766",
                departs_at=datetime(2026, 3, 20, 14, 35, tzinfo=_ALMATY),
                arrives_at=datetime(2026, 3, 20, 16, 0, tzinfo=_TASHKENT),
            ),
        ),
        documents_issued=(
            IssuedDocument(
                type=TravelDocumentType.CERTIFICATE_OF_RETURN,
                issuing_authority="Embassy of the Republic of Uzbekistan in Astana",
                valid_until=date(2026, 4, 15),
            ),
        ),
        escorts=(
            EscortArrangement(
                stage=JourneyStage.DEPARTURE,
                escort_role="shelter social worker",
                organisation="Rodnik",
                handover_place="Almaty airport, departure gate",
            ),
        ),
        planned_arrival=datetime(2026, 3, 20, 16, 0, tzinfo=_TASHKENT),
    )


def _departed() -> Departed:
    return Departed(
        departed_at=datetime(2026, 3, 20, 14, 41, tzinfo=_ALMATY),
        itinerary_ref="KZ-2026-0417-T1",
    )


def _reception_confirmed() -> ReceptionConfirmed:
    return ReceptionConfirmed(
        received_at=datetime(2026, 3, 20, 16, 25, tzinfo=_TASHKENT),
        place="Tashkent International Airport, arrivals hall",
        received_by=StaffMember(role="reception officer", staff_id="IA-RO-3"),
        shelter="Istiqbolli Avlod shelter, Tashkent",
        condition_notes="Tired but well; asked to call her mother this evening.",
    )


def _reintegration_update() -> ReintegrationUpdate:
    return ReintegrationUpdate(
        services_delivered=(
            ReintegrationService.ACCOMMODATION,
            ReintegrationService.MEDICAL_SCREENING,
            ReintegrationService.PSYCHOLOGICAL,
            ReintegrationService.ID_DOCUMENT_RECOVERY,
            ReintegrationService.FAMILY_CONTACT,
        ),
        status=ReintegrationStatus.IN_PROGRESS,
        next_review=date(2026, 5, 20),
        notes="New passport applied for; enrolled in a sewing course from May.",
    )


def _case_closed() -> CaseClosed:
    return CaseClosed(
        reason=ClosureReason.REINTEGRATED,
        closed_at=datetime(2026, 11, 20, 10, 0, tzinfo=_TASHKENT),
        note="Employed since September; monitoring completed.",
    )


def _referral_request() -> ReferralRequest:
    return ReferralRequest(
        consent=_consent(),
        person=_person(),
        referrer_type=ReferrerType.LAW_ENFORCEMENT,
        services_needed=(
            ReferralService.TEMPORARY_SHELTER,
            ReferralService.MEDICAL,
            ReferralService.RETURN_ASSISTANCE,
        ),
        service_country="KZ",
        urgent=True,
        notes="Referred by the Almaty city police after a workplace inspection.",
    )


def _referral_accepted() -> ReferralAccepted:
    return ReferralAccepted(
        services_offered=(ReferralService.TEMPORARY_SHELTER, ReferralService.MEDICAL),
        conditions=("Shelter place available from 25 February",),
    )


def _referral_declined() -> ReferralDeclined:
    return ReferralDeclined(reason=DeclineReason.NO_CAPACITY, note="Shelter full until April.")


def _service_started() -> ServiceStarted:
    return ServiceStarted(
        started_at=datetime(2026, 2, 25, 10, 0, tzinfo=_ALMATY),
        services=(ReferralService.TEMPORARY_SHELTER, ReferralService.MEDICAL),
    )


def _service_completed() -> ServiceCompleted:
    return ServiceCompleted(
        completed_at=datetime(2026, 4, 1, 16, 0, tzinfo=_ALMATY),
        done=True,
        notes="Shelter stay and medical check-up completed.",
    )


def _erasure_confirmed() -> ErasureConfirmed:
    return ErasureConfirmed(
        withdrawal=UUID("0195a3c2-7d10-7c4e-9b2a-5f0e8d1c2b3b"),
        erased_payloads=4,
        erased_at=datetime(2026, 3, 10, 9, 20, tzinfo=UTC),
    )


def _consent_withdrawn() -> ConsentWithdrawn:
    return ConsentWithdrawn(
        withdrawn_at=datetime(2026, 3, 10, 9, 15, tzinfo=_ALMATY),
        recorded_by=StaffMember(role="case manager", staff_id="KZ-CM-07"),
        purposes=(ConsentPurpose.REINTEGRATION,),
        delete_data=False,
        notes="Agrees to the return but not to reintegration follow-up.",
    )


def _request_withdrawn() -> RequestWithdrawn:
    return RequestWithdrawn(
        reason=RequestWithdrawalReason.PERSON_CHANGED_PLANS,
        note="Decided to stay with relatives in Shymkent.",
    )


def _delivery_receipt() -> DeliveryReceipt:
    return DeliveryReceipt(
        envelope_id=UUID("0195a3c2-7d10-7c4e-9b2a-5f0e8d1c2b3a"),
        digest="9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c0b2d4f6e8a1c3e5b7d9f0a2c4e6b8d0f",
        received_at=datetime(2026, 3, 2, 7, 0, 12, tzinfo=UTC),
        applied_at=datetime(2026, 3, 2, 7, 0, 12, 250000, tzinfo=UTC),
    )


def _reminder() -> Reminder:
    return Reminder(
        stage="requested",
        owed_by=EXAMPLE_ORIGIN_MISSION,
        deadline=datetime(2026, 3, 5, 7, 0, tzinfo=UTC),
        overdue=True,
        about_envelope=UUID("0195a3c2-7d10-7c4e-9b2a-5f0e8d1c2b3a"),
    )


_EXAMPLES: dict[MessageKind, Callable[[], Message]] = {
    MessageKind.RETURN_REQUEST: _return_request,
    MessageKind.RETURN_ACCEPTED: _return_accepted,
    MessageKind.RETURN_DECLINED: _return_declined,
    MessageKind.TRAVEL_ARRANGED: _travel_arranged,
    MessageKind.DEPARTED: _departed,
    MessageKind.RECEPTION_CONFIRMED: _reception_confirmed,
    MessageKind.REINTEGRATION_UPDATE: _reintegration_update,
    MessageKind.CASE_CLOSED: _case_closed,
    MessageKind.REFERRAL_REQUEST: _referral_request,
    MessageKind.REFERRAL_ACCEPTED: _referral_accepted,
    MessageKind.REFERRAL_DECLINED: _referral_declined,
    MessageKind.SERVICE_STARTED: _service_started,
    MessageKind.SERVICE_COMPLETED: _service_completed,
    MessageKind.CONSENT_WITHDRAWN: _consent_withdrawn,
    MessageKind.REQUEST_WITHDRAWN: _request_withdrawn,
    MessageKind.DELIVERY_RECEIPT: _delivery_receipt,
    MessageKind.REMINDER: _reminder,
    MessageKind.ERASURE_CONFIRMED: _erasure_confirmed,
}


def example(kind: MessageKind) -> Message:
    """A fictional, valid message of the given kind from the KZ -> UZ example return."""
    return _EXAMPLES[MessageKind(kind)]()


def sharing_with(message: M, share_with: Sequence[str]) -> M:
    """`message` (an opening request) with its consent shared with `share_with` instead."""
    consent = getattr(message, "consent", None)
    if not isinstance(consent, ConsentAttestation):
        raise TypeError(f"a {message.KIND} carries no consent")
    scope = consent.scope.model_copy(update={"share_with": tuple(share_with)})
    return message.model_copy(update={"consent": consent.model_copy(update={"scope": scope})})


def example_payload_bytes(kind: MessageKind) -> bytes:
    """The encoded payload of `example(kind)`."""
    return encode_payload(example(kind))
