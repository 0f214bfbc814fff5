"""Witness cosignatures of checkpoints, in the c2sp.org/tlog-cosignature Ed25519 form.

A cosignature is one more signature line on a checkpoint note::

    \u2014 trm.witness/<participant id>/<key id> base64(key id || u64 timestamp || signature)

The 4-byte key id is SHA-256(key name || 0x0A || 0x04 || public key)[:4]; the
signature is Ed25519 over ``cosignature/v1\\n``, ``time <timestamp>\\n`` and
the checkpoint body (the note without its signature lines), the timestamp
being POSIX seconds. A witness signs with its participant signing key; the
key id in the name says which of its keys, so a rotated witness key still
verifies what it signed before. Readers that know nothing of witnesses
ignore the line, as c2sp.org/signed-note requires, and the note stays valid.

`check_cosignatures` is the auditor's side: every line under a witness name
must verify with that witness's key in the verified directory, valid at the
cosignature's time; `require_quorum` then counts the distinct witnesses.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker import _crypto
from broker.directory import Directory
from broker.errors import AuditError, TrmError
from services.checkpoint import note_signatures

NAME_PREFIX = "trm.witness/"
"""Witness key names: ``trm.witness/<participant id>/<key id>``."""
HEADER = b"cosignature/v1\n"

_ED25519_COSIGNATURE = b"\x04"
_KEY_ID_BYTES = 4
_TIMESTAMP = struct.Struct(">Q")
_MAX_TIMESTAMP = 2**63 - 1


class CosignatureInvalid(AuditError):
    """A witness cosignature does not verify, or a checkpoint lacks the quorum."""

    reason = "cosignature_invalid"


@dataclass(frozen=True)
class Cosignature:
    """One verified witness cosignature."""

    witness: str
    kid: str
    time: datetime


def witness_key_name(participant_id: str, kid: str) -> str:
    """The key name a witness cosigns under."""
    return f"{NAME_PREFIX}{participant_id}/{kid}"


def cosignature_key_id(key_name: str, key: Ed25519PublicKey) -> bytes:
    """SHA-256(key name || 0x0A || 0x04 || public key)[:4], as tlog-cosignature defines."""
    material = key_name.encode() + b"\n" + _ED25519_COSIGNATURE + _crypto.raw_public(key)
    return hashlib.sha256(material).digest()[:_KEY_ID_BYTES]


def signed_message(body: bytes, timestamp: int) -> bytes:
    """What a cosignature covers: header, time line, then the checkpoint body."""
    return HEADER + f"time {timestamp}\n".encode() + body


def cosign(note: bytes, key: Ed25519PrivateKey, key_name: str, *, at: datetime) -> bytes:
    """The cosignature line (ending in a newline) of `note` by `key` under `key_name` at `at`."""
    body, _ = note_signatures(note)
    timestamp = int(at.timestamp())
    if not 0 < timestamp <= _MAX_TIMESTAMP:
        raise CosignatureInvalid(f"a cosignature time must be after 1970, not {at.isoformat()}")
    signature = _crypto.sign(key, signed_message(body, timestamp))
    blob = cosignature_key_id(key_name, key.public_key()) + _TIMESTAMP.pack(timestamp) + signature
    return f"\u2014 {key_name} {base64.b64encode(blob).decode()}\n".encode()


def with_cosignature(note: bytes, line: bytes) -> bytes:
    """`note` with the signature line `line` added, unless it carries that line already."""
    if line in note.split(b"\n\n")[-1].splitlines(keepends=True):
        return note
    return note + line


def check_cosignatures(note: bytes, directory: Directory) -> list[Cosignature]:
    """Every cosignature on `note` by a witness the directory lists, each verified.

    Lines under names of no listed witness are not counted (and not trusted);
    a line under a witness's name that does not verify with that witness's key,
    valid at the cosignature's time, raises CosignatureInvalid.
    """
    body, signatures = note_signatures(note)
    found = []
    for name, raw in signatures:
        if not name.startswith(NAME_PREFIX):
            continue
        witness, _, kid = name.removeprefix(NAME_PREFIX).partition("/")
        if witness not in directory.body.witnesses:
            continue
        found.append(_verified(body, name, witness, kid, raw, directory))
    return found


def require_quorum(note: bytes, directory: Directory, quorum: int) -> list[str]:
    """The distinct witnesses whose cosignatures on `note` verify; too few: CosignatureInvalid."""
    witnesses = sorted({c.witness for c in check_cosignatures(note, directory)})
    if len(witnesses) < quorum:
        named = ", ".join(witnesses) or "none"
        raise CosignatureInvalid(
            f"cosigned by {len(witnesses)} of the {quorum} witnesses required ({named})"
        )
    return witnesses


def _verified(
    body: bytes, name: str, witness: str, kid: str, raw: bytes, directory: Directory
) -> Cosignature:
    expected_bytes = _KEY_ID_BYTES + _TIMESTAMP.size + _crypto.SIGNATURE_BYTES
    if len(raw) != expected_bytes:
        raise CosignatureInvalid(f"the cosignature by {name!r} is not an Ed25519 cosignature")
    (timestamp,) = _TIMESTAMP.unpack_from(raw, _KEY_ID_BYTES)
    if not 0 < timestamp <= _MAX_TIMESTAMP:
        raise CosignatureInvalid(f"the cosignature by {name!r} has timestamp {timestamp}")
    moment = datetime.fromtimestamp(timestamp, UTC)
    try:
        key = directory.signing_key(witness, kid, used_at=moment)
    except TrmError as e:
        raise CosignatureInvalid(f"the cosignature by {name!r}: {e}") from e
    if raw[:_KEY_ID_BYTES] != cosignature_key_id(name, key):
        raise CosignatureInvalid(f"the cosignature by {name!r} has another key's id")
    try:
        _crypto.verify(key, raw[_KEY_ID_BYTES + _TIMESTAMP.size :], signed_message(body, timestamp))
    except _crypto.CryptoError as e:
        raise CosignatureInvalid(
            f"the cosignature by {name!r} does not verify over the checkpoint"
        ) from e
    return Cosignature(witness=witness, kid=kid, time=moment)
