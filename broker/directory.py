"""The signed trust directory: who takes part, with which keys, valid when.

The directory is one JSON body (serial, issue time, participants and their
public keys) carried in a DSSE envelope (in-toto's Dead Simple Signing
Envelope) signed by the directory authority. Loading verifies the signature
over the exact payload bytes before anything is parsed, refuses a serial lower
than the one already held, and checks the body's consistency; lookups then
answer "which key may this participant use at this time".
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AwareDatetime, Field, ValidationError

from broker import _crypto
from broker.errors import (
    CardChangeRefused,
    DirectoryError,
    DirectoryRollback,
    DirectorySignatureInvalid,
    DirectoryUnsigned,
    DuplicateParticipant,
    ExpiredKey,
    KeyNotValid,
    KeyNotYetValid,
    MalformedDirectory,
    RevokedKey,
    UnknownKey,
    UnknownParticipant,
    UnknownSender,
)
from schemas.base import CountryCode, KeyId, ParticipantId, Strict

PAYLOAD_TYPE = "application/vnd.trm.directory+json"
SIGN_ALG = "ed25519"
DIRECTORY_FILE = "directory.json"
SERIAL_FLOOR_FILE = "directory.serial"
"""Beside the directory: the highest serial the home has verified, only ever raised."""
AUTHORITY_PUB_FILE = "authority.pub"

log = structlog.get_logger(__name__)


class Role(StrEnum):
    """What a participant is in the handoff network."""

    MISSION = "mission"
    NGO = "ngo"
    STATE_SERVICE = "state_service"
    """A police unit, ministry or state-run shelter: a case party with no parent mission."""
    ROUTING = "routing"
    AUDITOR = "auditor"


class KeyUse(StrEnum):
    """What a public key is for."""

    SIGN = "sign"
    ENCRYPT = "encrypt"


class PublicKey(Strict):
    """One public key of a participant, with its validity window."""

    kid: KeyId
    use: KeyUse
    alg: str
    """``ed25519`` for a signing key; a `broker._crypto.Suite` value for an encryption key."""
    public: str
    """Standard base64 of the raw public key."""
    not_before: AwareDatetime
    not_after: AwareDatetime
    revoked_at: AwareDatetime | None = None

    def raw(self) -> bytes:
        """The raw public key bytes; MalformedDirectory if `public` is not base64."""
        return _b64decode(self.public, f"public key {self.kid}")

    def valid_at(self, at: datetime) -> bool:
        """True if the window contains `at` and the key was not revoked by then."""
        if self.revoked_at is not None and self.revoked_at <= at:
            return False
        return self.not_before <= at < self.not_after


class Participant(Strict):
    """A participant's public card: identity, role, country and public keys."""

    id: ParticipantId
    role: Role
    country: CountryCode
    parent: ParticipantId | None = None
    """The mission an NGO works with; None for every other role."""
    name: str | None = Field(default=None, max_length=200)
    """The organisation's name, e.g. "Istiqbolli Avlod"."""
    keys: tuple[PublicKey, ...]

    def key(self, kid: str) -> PublicKey | None:
        """The key with id `kid`, if the card holds one."""
        return next((k for k in self.keys if k.kid == kid), None)


class DirectoryBody(Strict):
    """The signed content of the directory."""

    serial: int = Field(ge=1, le=2**53)
    issued_at: AwareDatetime
    participants: tuple[Participant, ...]
    witnesses: tuple[ParticipantId, ...] = ()
    """Missions and auditors whose cosignatures of the routing log's checkpoints count."""
    quorum: int = Field(default=0, ge=0)
    """How many witnesses must have cosigned the newest checkpoint an auditor accepts."""


@dataclass(frozen=True)
class Directory:
    """A verified directory: the body and the exact signed file bytes."""

    body: DirectoryBody
    raw: bytes
    _index: Mapping[str, Participant] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {p.id: p for p in self.body.participants}
        object.__setattr__(self, "_index", index)

    @property
    def serial(self) -> int:
        """The directory's serial number."""
        return self.body.serial

    def participant(self, participant_id: str) -> Participant:
        """The participant with this id; UnknownParticipant if there is none."""
        found = self._index.get(participant_id)
        if found is None:
            raise UnknownParticipant(
                f"participant {participant_id!r} is not in directory serial {self.serial}"
            )
        return found

    def participants(self) -> tuple[Participant, ...]:
        """Every participant, in directory order."""
        return self.body.participants

    def signing_key(
        self,
        participant_id: str,
        kid: str,
        *,
        used_at: datetime,
        checked_at: datetime | None = None,
    ) -> Ed25519PublicKey:
        """The Ed25519 key `kid` of `participant_id`, if it may have signed at `used_at`.

        A revoked key is refused from its revocation time on, judged at the
        later of `used_at` and `checked_at`: once revoked, nothing it signed
        is accepted any more.
        """
        _require_aware(used_at)
        if checked_at is not None:
            _require_aware(checked_at)
        found = self._index.get(participant_id)
        if found is None:
            raise UnknownSender(f"sender {participant_id!r} is not in directory {self.serial}")
        key = found.key(kid)
        if key is None or key.use is not KeyUse.SIGN:
            raise UnknownKey(f"{participant_id!r} has no signing key {kid!r}")
        if used_at < key.not_before:
            raise KeyNotYetValid(
                f"key {kid!r} of {participant_id!r} is valid from {key.not_before.isoformat()}"
            )
        if used_at >= key.not_after:
            raise ExpiredKey(
                f"key {kid!r} of {participant_id!r} expired at {key.not_after.isoformat()}"
            )
        judged = max(used_at, checked_at or used_at)
        if key.revoked_at is not None and key.revoked_at <= judged:
            raise RevokedKey(
                f"key {kid!r} of {participant_id!r} was revoked at {key.revoked_at.isoformat()}"
            )
        try:
            return _crypto.verify_key_from_raw(key.raw())
        except _crypto.CryptoError as e:  # pragma: no cover - checked at load
            raise MalformedDirectory(f"key {kid!r} is not an Ed25519 key") from e

    def encryption_key(
        self, participant_id: str, at: datetime
    ) -> tuple[str, _crypto.EncryptionKey]:
        """(kid, key) of the newest encryption key of `participant_id` valid at `at`."""
        _require_aware(at)
        participant = self.participant(participant_id)
        valid = [k for k in participant.keys if k.use is KeyUse.ENCRYPT and k.valid_at(at)]
        if not valid:
            raise KeyNotValid(
                f"{participant_id!r} has no encryption key valid at {at.isoformat()}; "
                "it must rotate its keys and the authority publish a new directory"
            )
        newest = max(valid, key=lambda k: k.not_before)
        return newest.kid, _crypto.EncryptionKey(_crypto.Suite(newest.alg), newest.raw())


# --- the DSSE envelope ----------------------------------------------------------


def authority_key_id(authority: Ed25519PublicKey) -> str:
    """A short stable id of the authority's key, named in the DSSE signature."""
    digest = hashlib.sha256(_crypto.raw_public(authority)).hexdigest()
    return f"authority-{digest[:16]}"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what the signature covers."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def canonical_body(body: DirectoryBody) -> bytes:
    """The body's signed encoding: sorted keys, no spaces, UTF-8."""
    data = body.model_dump(mode="json")
    # Absent when unset, so that directories signed before witnesses existed keep their bytes.
    for name in ("witnesses", "quorum"):
        if not data[name]:
            del data[name]
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_payload(payload: bytes, authority: Ed25519PrivateKey) -> bytes:
    """The DSSE file bytes for `payload` signed by `authority`, unchecked.

    `sign_directory` is what callers use; this is the envelope alone.
    """
    signature = _crypto.sign(authority, pae(PAYLOAD_TYPE, payload))
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {
                "keyid": authority_key_id(authority.public_key()),
                "sig": base64.b64encode(signature).decode(),
            }
        ],
    }
    return (json.dumps(envelope, indent=2) + "\n").encode()


def sign_directory(body: DirectoryBody, authority: Ed25519PrivateKey) -> bytes:
    """The signed directory file bytes; refuses a body `load_directory` would refuse."""
    check_body(body)
    return sign_payload(canonical_body(body), authority)


def load_directory(data: bytes, *, authority: Ed25519PublicKey, min_serial: int = 0) -> Directory:
    """Verify and parse a directory file signed by `authority`.

    The signature is checked over the exact payload bytes before the body is
    parsed. Raises DirectoryUnsigned, DirectorySignatureInvalid,
    MalformedDirectory, DuplicateParticipant or DirectoryRollback.
    """
    payload, signatures = _open_envelope(data)
    _verify_signatures(payload, signatures, authority)
    body = _parse_body(payload)
    check_body(body)
    if body.serial < min_serial:
        raise DirectoryRollback(
            f"directory serial {body.serial} is older than serial {min_serial} already held; "
            "ask the authority for the current directory"
        )
    return Directory(body=body, raw=bytes(data))


def parse_unverified(data: bytes) -> DirectoryBody:
    """The body of a directory file WITHOUT checking its signature, for display only."""
    payload, _ = _open_envelope(data, require_signature=False)
    return _parse_body(payload)


def read_directory(path: Path, *, authority: Ed25519PublicKey, min_serial: int = 0) -> Directory:
    """`load_directory` on the bytes of the file at `path`."""
    return load_directory(_read(path), authority=authority, min_serial=min_serial)


def install_directory(data: bytes, home: Path) -> Directory:
    """Verify `data` with HOME's pinned authority key and make it HOME's directory.

    Refuses a serial lower than the installed one or than HOME's serial floor,
    and a different directory under the same serial; the file is replaced
    atomically, then the floor raised to the new serial.
    """
    from broker.keys import read_pinned_authority  # keys builds on this module

    authority = read_pinned_authority(home / AUTHORITY_PUB_FILE)
    target = home / DIRECTORY_FILE
    with _locked(home):
        floor = read_serial_floor(home)
        held = read_directory(target, authority=authority) if target.exists() else None
        held_serial = held.serial if held is not None else 0
        new = load_directory(data, authority=authority, min_serial=max(floor, held_serial))
        if held is not None and new.serial == held.serial and new.body != held.body:
            raise DirectoryRollback(
                f"a different directory with the same serial {new.serial} is installed; "
                "the authority must bump the serial"
            )
        write_atomically(target, new.raw, mode=0o644)
        # After the file: a crash in between leaves a floor readers can still raise.
        if new.serial > floor:
            _write_floor(home, new.serial)
    return new


def load_home_directory(home: Path, *, held: int = 0) -> Directory:
    """HOME's installed directory, verified with HOME's pinned authority key.

    Refuses a serial lower than HOME's serial floor (the highest this home has
    verified) or than `held`, the serial the caller already holds, and raises
    the floor when the directory is newer, unless the home is read-only.
    """
    from broker.keys import read_pinned_authority  # keys builds on this module

    authority = read_pinned_authority(home / AUTHORITY_PUB_FILE)
    target = home / DIRECTORY_FILE
    recorded = read_serial_floor(home)
    floor = max(recorded, held)
    directory = read_directory(target, authority=authority)
    if directory.serial < floor:
        raise DirectoryRollback(
            f"{target} is serial {directory.serial}, older than serial {floor} this home "
            "has already verified: an older directory was put in its place; install the "
            f"current one with `trm directory install FILE --home {home}`"
        )
    if directory.serial > recorded and os.access(home, os.W_OK):
        _raise_floor(home, directory.serial)
    return directory


def reload_home_directory(home: Path, held: Directory | None) -> Directory:
    """HOME's directory again after its file changed, or `held` if the file is older.

    For a running process: a directory with a lower serial than the one it
    holds is refused and logged, and the process keeps what it holds.
    """
    try:
        return load_home_directory(home, held=held.serial if held is not None else 0)
    except DirectoryRollback as e:
        if held is None:
            raise
        log.error("directory.rollback_refused", reason=e.reason, detail=str(e), serial=held.serial)
        return held


def read_serial_floor(home: Path) -> int:
    """The highest directory serial HOME has verified (``HOME/directory.serial``), else 0."""
    path = home / SERIAL_FLOOR_FILE
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as e:
        raise DirectoryError(f"cannot read {path}: {e}; check the home folder") from e
    if not text.strip().isdigit():
        raise MalformedDirectory(
            f"{path} does not hold a directory serial; restore it, or remove it to trust "
            "the installed directory's serial again"
        )
    return int(text)


def _raise_floor(home: Path, serial: int) -> None:
    with _locked(home):
        if serial > read_serial_floor(home):
            _write_floor(home, serial)


def _write_floor(home: Path, serial: int) -> None:
    write_atomically(home / SERIAL_FLOOR_FILE, f"{serial}\n".encode(), mode=0o600)


def write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    """Write `data` to `path` so readers see the old file or the new, never half."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            Path(tmp).replace(path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise DirectoryError(f"cannot write {path}: {e.strerror}; check the folder") from e


# --- editing (the authority's side) ---------------------------------------------------


class CardField(StrEnum):
    """A field of a card that a replacement changes only when asked to."""

    ROLE = "role"
    PARENT = "parent"
    COUNTRY = "country"


def add_participant(
    body: DirectoryBody,
    card: Participant,
    *,
    now: datetime,
    allow_change: Collection[CardField] = (),
) -> DirectoryBody:
    """The next body with `card` added, or replacing the card with the same id.

    A replacement keeps every key the old card listed, with its revocation;
    it may add keys and change windows, but not an existing key's public
    value, and changes role, parent or country only if `allow_change` names
    them (CardChangeRefused otherwise).
    """
    old = next((p for p in body.participants if p.id == card.id), None)
    if old is None:
        return next_body(body, (*body.participants, card), now=now)
    merged = _merge_card(old, card, allow_change)
    participants = tuple(merged if p.id == card.id else p for p in body.participants)
    return next_body(body, participants, now=now)


def card_changes(old: Participant, new: Participant) -> tuple[str, ...]:
    """What replacing card `old` by `new` changes, one line each, for the operator."""
    lines = [
        f"{name}: {_shown(getattr(old, name))} -> {_shown(getattr(new, name))}"
        for name in (*CardField, "name")
        if getattr(old, name) != getattr(new, name)
    ]
    for key in new.keys:
        lines += _key_changes(old.key(key.kid), key)
    for key in old.keys:
        if new.key(key.kid) is None:
            revoked = f", revoked {key.revoked_at.isoformat()}" if key.revoked_at else ""
            lines.append(f"key {key.kid} kept ({key.use}{revoked}): not on the new card")
    return tuple(lines)


def _key_changes(before: PublicKey | None, key: PublicKey) -> list[str]:
    if before is None:
        return [f"key {key.kid} added ({key.use}, {key.alg})"]
    lines = []
    if (before.not_before, before.not_after) != (key.not_before, key.not_after):
        lines.append(f"key {key.kid} valid {_window(before)} -> {_window(key)}")
    held, offered = before.revoked_at, key.revoked_at
    if offered is not None and (held is None or offered < held):
        lines.append(f"key {key.kid} revoked from {offered.isoformat()}")
    elif held is not None and offered != held:
        lines.append(f"key {key.kid} stays revoked from {held.isoformat()}")
    return lines


def revoke_key(
    body: DirectoryBody, participant_id: str, kid: str, *, at: datetime, now: datetime
) -> DirectoryBody:
    """The next body with key `kid` of `participant_id` revoked from `at`."""
    _require_aware(at)
    found = next((p for p in body.participants if p.id == participant_id), None)
    if found is None:
        raise UnknownParticipant(f"participant {participant_id!r} is not in the directory")
    key = found.key(kid)
    if key is None:
        raise UnknownKey(f"{participant_id!r} has no key {kid!r}")
    revoked_at = at if key.revoked_at is None else min(at, key.revoked_at)
    keys = tuple(
        k.model_copy(update={"revoked_at": revoked_at}) if k.kid == kid else k for k in found.keys
    )
    updated = found.model_copy(update={"keys": keys})
    participants = tuple(updated if p.id == participant_id else p for p in body.participants)
    return next_body(body, participants, now=now)


def next_body(
    body: DirectoryBody, participants: tuple[Participant, ...], *, now: datetime
) -> DirectoryBody:
    """A body with the next serial, issued `now`, listing `participants`."""
    _require_aware(now)
    return DirectoryBody(
        serial=body.serial + 1,
        issued_at=now,
        participants=participants,
        witnesses=body.witnesses,
        quorum=body.quorum,
    )


def set_witnesses(
    body: DirectoryBody, witnesses: tuple[str, ...], quorum: int, *, now: datetime
) -> DirectoryBody:
    """The next body naming `witnesses` (missions or auditors) and the `quorum` they form."""
    changed = next_body(body, body.participants, now=now)
    updated = changed.model_copy(update={"witnesses": tuple(witnesses), "quorum": quorum})
    check_body(updated)
    return updated


def _merge_card(
    old: Participant, new: Participant, allow_change: Collection[CardField]
) -> Participant:
    _check_identity(old, new, allow_change)
    keys = [_merge_key(new.id, old.key(key.kid), key) for key in new.keys]
    # A key the new card leaves out stays, revocation and all: an auditor still
    # needs it for what it signed, and a later card listing it again must find
    # it revoked rather than new.
    keys += [key for key in old.keys if new.key(key.kid) is None]
    return new.model_copy(update={"keys": tuple(keys)})


def _check_identity(
    old: Participant, new: Participant, allow_change: Collection[CardField]
) -> None:
    refused = [
        name
        for name in CardField
        if getattr(old, name) != getattr(new, name) and name not in allow_change
    ]
    if refused:
        changes = ", ".join(
            f"{name} {_shown(getattr(old, name))} -> {_shown(getattr(new, name))}"
            for name in refused
        )
        raise CardChangeRefused(
            f"the card for {new.id!r} changes {changes}; if that is intended, allow it "
            f"explicitly (`trm directory add --allow-change {','.join(refused)}`)"
        )


def _merge_key(participant_id: str, before: PublicKey | None, key: PublicKey) -> PublicKey:
    if before is None:
        return key
    if (before.use, before.alg, before.public) != (key.use, key.alg, key.public):
        raise DirectoryError(
            f"card for {participant_id!r} changes key {key.kid!r}; a new key needs a new key id"
        )
    revocations = [t for t in (before.revoked_at, key.revoked_at) if t is not None]
    return key.model_copy(update={"revoked_at": min(revocations, default=None)})


def _shown(value: object) -> str:
    return "none" if value is None else str(value)


def _window(key: PublicKey) -> str:
    return f"{key.not_before.isoformat()} .. {key.not_after.isoformat()}"


# --- checks ------------------------------------------------------------------------


def check_body(body: DirectoryBody) -> None:
    """Raise unless the body is consistent: unique ids, parents, keys that decode."""
    roles: dict[str, Role] = {}
    for participant in body.participants:
        if participant.id in roles:
            raise DuplicateParticipant(f"participant {participant.id!r} is listed twice")
        roles[participant.id] = participant.role
    for participant in body.participants:
        _check_parent(participant, roles)
        _check_keys(participant)
    _check_witnesses(body, roles)


def _check_witnesses(body: DirectoryBody, roles: Mapping[str, Role]) -> None:
    if len(set(body.witnesses)) != len(body.witnesses):
        raise MalformedDirectory("a witness is listed twice")
    for witness in body.witnesses:
        if roles.get(witness) not in (Role.MISSION, Role.AUDITOR):
            raise MalformedDirectory(
                f"witness {witness!r} is not a mission or an auditor in this directory"
            )
    if body.quorum > len(body.witnesses):
        raise MalformedDirectory(
            f"the quorum is {body.quorum} but only {len(body.witnesses)} witnesses are listed"
        )


def _check_parent(participant: Participant, roles: Mapping[str, Role]) -> None:
    if participant.role is not Role.NGO:
        if participant.parent is not None:
            raise MalformedDirectory(f"{participant.id!r} is not an NGO but names a parent")
        return
    if participant.parent is None:
        raise MalformedDirectory(f"NGO {participant.id!r} names no parent mission")
    if roles.get(participant.parent) is not Role.MISSION:
        raise MalformedDirectory(
            f"NGO {participant.id!r} names parent {participant.parent!r}, "
            "which is not a mission in this directory"
        )


def _check_keys(participant: Participant) -> None:
    seen: set[str] = set()
    for key in participant.keys:
        if key.kid in seen:
            raise DuplicateParticipant(f"{participant.id!r} lists key id {key.kid!r} twice")
        seen.add(key.kid)
        if key.not_before >= key.not_after:
            raise MalformedDirectory(f"key {key.kid!r} of {participant.id!r} has an empty window")
        _check_public(participant.id, key)
    uses = {key.use for key in participant.keys}
    if uses != {KeyUse.SIGN, KeyUse.ENCRYPT}:
        raise MalformedDirectory(
            f"{participant.id!r} needs at least one signing and one encryption key"
        )


def _check_public(participant_id: str, key: PublicKey) -> None:
    raw = key.raw()
    try:
        if key.use is KeyUse.SIGN:
            if key.alg != SIGN_ALG:
                raise MalformedDirectory(f"signing key {key.kid!r} must be {SIGN_ALG}")
            _crypto.verify_key_from_raw(raw)
            return
        try:
            suite = _crypto.Suite(key.alg)
        except ValueError as e:
            raise MalformedDirectory(f"key {key.kid!r} names unknown suite {key.alg!r}") from e
        _crypto.check_encryption_key(_crypto.EncryptionKey(suite, raw))
    except _crypto.CryptoError as e:
        raise MalformedDirectory(
            f"key {key.kid!r} of {participant_id!r} is not a valid {key.alg} public key"
        ) from e


# --- parsing -----------------------------------------------------------------------


def _open_envelope(
    data: bytes, *, require_signature: bool = True
) -> tuple[bytes, list[Mapping[str, Any]]]:
    try:
        envelope = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise MalformedDirectory("the directory file is not JSON") from e
    if not isinstance(envelope, dict):
        raise MalformedDirectory("the directory file is not a DSSE envelope")
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise MalformedDirectory(f"the directory's payloadType is not {PAYLOAD_TYPE}")
    payload = envelope.get("payload")
    if not isinstance(payload, str):
        raise MalformedDirectory("the directory envelope has no payload")
    signatures = envelope.get("signatures", [])
    if not isinstance(signatures, list) or not all(isinstance(s, dict) for s in signatures):
        raise MalformedDirectory("the directory's signatures are not a list of objects")
    if require_signature and not signatures:
        raise DirectoryUnsigned("the directory carries no signature; refusing it")
    return _b64decode(payload, "the directory payload"), signatures


def _verify_signatures(
    payload: bytes, signatures: list[Mapping[str, Any]], authority: Ed25519PublicKey
) -> None:
    signed = pae(PAYLOAD_TYPE, payload)
    for entry in signatures:
        sig = entry.get("sig")
        if not isinstance(sig, str):
            continue
        try:
            _crypto.verify(authority, _b64decode(sig, "a signature"), signed)
        except (_crypto.CryptoError, MalformedDirectory):
            continue
        return
    raise DirectorySignatureInvalid(
        f"no signature on the directory verifies with the pinned authority key "
        f"{authority_key_id(authority)}; it is altered or signed by another key"
    )


def _parse_body(payload: bytes) -> DirectoryBody:
    try:
        return DirectoryBody.model_validate_json(payload)
    except ValidationError as e:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": str(e)}
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise MalformedDirectory(f"directory body: {where}: {first['msg']}") from e


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MalformedDirectory(f"{what} is not valid base64") from e


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DirectoryError(f"cannot read directory {path}: {e.strerror}") from e


def _require_aware(at: datetime) -> None:
    if at.tzinfo is None or at.utcoffset() is None:
        raise TypeError("times must be timezone-aware (UTC)")


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Serialise installs into one home so a lower serial never wins a race."""
    try:
        handle = (home / ".directory.lock").open("a")
    except OSError as e:
        raise DirectoryError(f"cannot lock {home}: {e.strerror}; check the home folder") from e
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
