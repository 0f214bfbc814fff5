"""The pydantic models of every message kind and of the envelope header."""

from schemas.base import Message, MessageKind
from schemas.control import (
    CaseClosed,
    ConsentWithdrawn,
    DeliveryReceipt,
    Reminder,
    RequestWithdrawn,
)
from schemas.header import EnvelopeHeader
from schemas.referrals import ReferralAccepted, ReferralDeclined, ReferralRequest
from schemas.registry import (
    MAX_JSON_DEPTH,
    MAX_PAYLOAD_BYTES,
    MESSAGE_TYPES,
    decode_payload,
    encode_payload,
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

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_PAYLOAD_BYTES",
    "MESSAGE_TYPES",
    "CaseClosed",
    "ConsentWithdrawn",
    "DeliveryReceipt",
    "Departed",
    "EnvelopeHeader",
    "Message",
    "MessageKind",
    "ReceptionConfirmed",
    "ReferralAccepted",
    "ReferralDeclined",
    "ReferralRequest",
    "ReintegrationUpdate",
    "Reminder",
    "RequestWithdrawn",
    "ReturnAccepted",
    "ReturnDeclined",
    "ReturnRequest",
    "TravelArranged",
    "decode_payload",
    "encode_payload",
]
