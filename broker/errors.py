"""The one exception tree of trm.

Every failure a caller can meet is a `TrmError` subclass with a stable
machine-readable `reason` (used in quarantine headers, audit results and
campaign tallies) and a message that says what was wrong and, for operators,
what to do next. Driver errors (pika, SQLAlchemy, pydantic) are translated at
the boundary with ``raise ... from e``.
"""

from __future__ import annotations


class TrmError(Exception):
    """Base of every error trm raises on purpose."""

    reason = "error"


# --- envelopes -------------------------------------------------------------


class EnvelopeError(TrmError):
    """An envelope could not be accepted."""

    reason = "envelope"


class MalformedEnvelope(EnvelopeError):
    """The bytes are not a well-formed envelope (framing, header JSON, sizes)."""

    reason = "malformed"


class NotSealed(MalformedEnvelope):
    """A kind that must be sealed arrived signed only, its payload in the clear."""

    reason = "not_sealed"


class EnvelopeTooLarge(MalformedEnvelope):
    """The envelope exceeds the documented size limit."""

    reason = "too_large"


class UnknownSender(EnvelopeError):
    """The header names a sender the directory does not list."""

    reason = "unknown_sender"


class KeyNotValid(EnvelopeError):
    """A key exists but may not be used now."""

    reason = "key_not_valid"


class UnknownKey(KeyNotValid):
    """The key id is not among the participant's keys."""

    reason = "unknown_key"


class RevokedKey(KeyNotValid):
    """The key was revoked before it was used."""

    reason = "revoked_key"


class ExpiredKey(KeyNotValid):
    """The key's validity window ended before it was used."""

    reason = "expired_key"


class KeyNotYetValid(KeyNotValid):
    """The key's validity window starts after it was used."""

    reason = "key_not_yet_valid"


class BadSignature(EnvelopeError):
    """The signature does not verify over the received bytes."""

    reason = "bad_signature"


class NotAddressedToMe(EnvelopeError):
    """No wrapped key in the envelope is for this participant."""

    reason = "not_addressed_to_me"


class ReplayedEnvelope(EnvelopeError):
    """An envelope id already seen arrives with different bytes."""

    reason = "replayed"


class StaleEnvelope(EnvelopeError):
    """The envelope's time lies outside the accepted window."""

    reason = "stale"


class DecryptionFailed(EnvelopeError):
    """The content key or the payload could not be decrypted."""

    reason = "decryption_failed"


class SchemaViolation(EnvelopeError):
    """The decrypted payload does not match its kind's schema."""

    reason = "schema_violation"


class ProtocolViolation(EnvelopeError):
    """A sound envelope that the case protocol forbids; `reason` names the rule broken.

    Raised by `trm send` before anything is queued and recorded by the inbox
    as the reason an envelope was quarantined.
    """

    reason = "protocol"

    def __init__(self, reason: str, detail: str) -> None:
        """A violation with the protocol's reason code (`broker.casepolicy.Reason`)."""
        super().__init__(detail)
        self.reason = reason


class SenderMismatch(EnvelopeError):
    """The signed sender differs from the authenticated AMQP user id."""

    reason = "sender_mismatch"


class MissingUserId(EnvelopeError):
    """A broker delivery carries no AMQP user id, so nobody RabbitMQ authenticated sent it.

    Every participant publishes with its user id, which RabbitMQ checks against
    the login; only a broker administrator (or an impersonator) can publish
    without one.
    """

    reason = "no_user_id"


class ClassicalDowngrade(EnvelopeError):
    """Sealing would wrap one content key for hybrid and classical-only recipients alike."""

    reason = "classical_downgrade"


# --- the trust directory ---------------------------------------------------


class DirectoryError(TrmError):
    """The trust directory could not be built or accepted."""

    reason = "directory"


class DirectoryUnsigned(DirectoryError):
    """The directory carries no signature."""

    reason = "directory_unsigned"


class DirectorySignatureInvalid(DirectoryError):
    """The directory is signed by another key, or the signature is wrong."""

    reason = "directory_signature_invalid"


class DirectoryRollback(DirectoryError):
    """The directory's serial is lower than the one already held."""

    reason = "directory_rollback"


class CardChangeRefused(DirectoryError):
    """A replacement card changes a participant's role, parent or country unasked."""

    reason = "card_change_refused"


class DuplicateParticipant(DirectoryError):
    """Two entries share a participant id or a key id."""

    reason = "duplicate_participant"


class UnknownParticipant(DirectoryError):
    """A participant id is not in the directory."""

    reason = "unknown_participant"


class MalformedDirectory(DirectoryError):
    """The directory file is not valid JSON, base64 or directory schema."""

    reason = "directory_malformed"


# --- keys and key folders --------------------------------------------------


class KeyFileError(TrmError):
    """A key folder or key file is missing, unreadable or too open."""

    reason = "key_file"


# --- transport ---------------------------------------------------------------


class TransportError(TrmError):
    """Talking to RabbitMQ failed."""

    reason = "transport"


class BrokerUnavailable(TransportError):
    """RabbitMQ cannot be reached or closed the connection."""

    reason = "broker_unavailable"


class AccessRefused(TransportError):
    """RabbitMQ refused a login, a read or a publish."""

    reason = "access_refused"


class LoginRefused(AccessRefused):
    """RabbitMQ refused the user name and password: a wrong password or no such user."""

    reason = "login_refused"


class VhostRefused(AccessRefused):
    """The login was right but the vhost does not exist or grants the user nothing."""

    reason = "vhost_refused"


class PublishFailed(TransportError):
    """RabbitMQ returned (unroutable) or nacked a publish."""

    reason = "publish_failed"

    def __init__(self, message: str, envelope_ids: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.envelope_ids = envelope_ids
        """The envelope ids RabbitMQ returned or nacked (empty when not known)."""


class ProvisioningError(TransportError):
    """Declaring users, permissions, exchanges or queues failed."""

    reason = "provisioning"


class UserInUse(ProvisioningError):
    """Provisioning would change a RabbitMQ user that another vhost relies on."""

    reason = "user_in_use"

    def __init__(self, message: str, user: str, vhosts: tuple[str, ...]) -> None:
        super().__init__(message)
        self.user = user
        self.vhosts = vhosts
        """The other vhosts on which the user holds permissions."""


# --- storage -----------------------------------------------------------------


class StorageError(TrmError):
    """The local database failed."""

    reason = "storage"


class CaseSystemError(TrmError):
    """The local case system could not take a delivered message; it will be retried."""

    reason = "case_system"


class LocalUnavailable(TrmError):
    """The local side (database, case system, own keys) cannot apply deliveries now.

    Raised by a consumer's handler: the consumer stops taking deliveries,
    holds the batch in hand unacknowledged and tries it again with backoff.
    """

    reason = "local_unavailable"


# --- the audit log -----------------------------------------------------------


class AuditError(TrmError):
    """The audit log or a proof did not verify."""

    reason = "audit"


class ProofInvalid(AuditError):
    """An inclusion or consistency proof does not verify."""

    reason = "proof_invalid"


class TreeRequestInvalid(AuditError):
    """A Merkle tree was given a malformed hash, or asked for a size or leaf it lacks."""

    reason = "tree_request_invalid"


class LogTampered(AuditError):
    """An export differs from what the log's signatures commit to."""

    reason = "log_tampered"

    def __init__(self, index: int | None, problem: str) -> None:
        where = "the export" if index is None else f"entry {index}"
        super().__init__(f"{where}: {problem}")
        self.index = index
        self.problem = problem


class CheckpointInvalid(AuditError):
    """A checkpoint's signature or root does not verify."""

    reason = "checkpoint_invalid"


# --- cases -------------------------------------------------------------------


class CaseError(TrmError):
    """A case event or case state cannot be used as given."""

    reason = "case"


class CaseStateInvalid(CaseError):
    """A serialised case state does not have the documented shape."""

    reason = "case_state_invalid"


# --- configuration -----------------------------------------------------------


class ConfigError(TrmError):
    """A setting is missing or wrong; the message names the setting."""

    reason = "config"
