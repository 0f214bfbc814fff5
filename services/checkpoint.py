"""Signed checkpoints of the audit log, as transparency-log signed notes.

The body follows c2sp.org/tlog-checkpoint; trm puts the checkpoint time in
one extension line, so a body is exactly four lines::

    trm.routing/routing
    1042
    <base64 of the 32-byte RFC 9162 root hash>
    time 2026-03-01T09:30:00Z

The signed note follows c2sp.org/signed-note: the body, a blank line, then
signature lines ``\u2014 <key name> <base64(key id || Ed25519 signature)>``,
where the key id is the first 4 bytes of SHA-256(key name || 0x0A || 0x01 ||
public key) and the signature covers the body bytes exactly (final newline
included). Lines by other keys (cosigners, witnesses) are ignored, as the
spec requires; at least one line by the expected key must be present and
every one of them must verify. The signature is checked over the received
bytes before the body is parsed.

`open_log_checkpoint` is what an auditor calls: it trusts nothing a note or
an export says about whose log it is. The log is that of a routing
participant of the verified directory, named by the auditor or by the
checkpoint's origin, and the signature must be by one of that participant's
keys as the directory lists it at the checkpoint's time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker import _crypto
from broker.directory import Directory, Role
from broker.errors import CheckpointInvalid, TrmError

ORIGIN_PREFIX = "trm.routing/"
"""Origins of trm checkpoints: ``trm.routing/<routing participant id>``."""

_ED25519 = b"\x01"
_KEY_ID_BYTES = 4
_SIG_PREFIX = "\u2014 "
_TIME_PREFIX = "time "
_MAX_NOTE_BYTES = 64 * 1024  # a checkpoint with a few dozen cosignatures fits many times over
_SIZE = re.compile(r"0|[1-9][0-9]{0,19}")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?Z")
_ROOT_BYTES = 32


@dataclass(frozen=True)
class Checkpoint:
    """A commitment to the first `size` entries of a log: their Merkle root at a time."""

    origin: str
    size: int
    root: bytes
    time: datetime


def origin_for(routing_id: str) -> str:
    """The checkpoint origin of the routing service with participant id `routing_id`."""
    return ORIGIN_PREFIX + routing_id


def key_id(key_name: str, key: Ed25519PublicKey) -> bytes:
    """The signed-note key id: SHA-256(key name || 0x0A || 0x01 || public key)[:4]."""
    _check_key_name(key_name)
    material = key_name.encode() + b"\n" + _ED25519 + _crypto.raw_public(key)
    return hashlib.sha256(material).digest()[:_KEY_ID_BYTES]


def checkpoint_body(cp: Checkpoint) -> bytes:
    """The exact note text a checkpoint signature covers."""
    _check_origin(cp.origin)
    if not isinstance(cp.size, int) or isinstance(cp.size, bool) or cp.size < 0:
        raise CheckpointInvalid(f"a checkpoint size must be a non-negative int, not {cp.size!r}")
    if not isinstance(cp.root, bytes) or len(cp.root) != _ROOT_BYTES:
        raise CheckpointInvalid(f"a checkpoint root must be {_ROOT_BYTES} bytes")
    lines = [cp.origin, str(cp.size), base64.b64encode(cp.root).decode(), _format_time(cp.time)]
    return ("\n".join(lines) + "\n").encode()


def sign_checkpoint(cp: Checkpoint, key: Ed25519PrivateKey, key_name: str) -> bytes:
    """The signed note: body, blank line, one signature line by `key` under `key_name`."""
    body = checkpoint_body(cp)
    signature = _crypto.sign(key, body)
    blob = base64.b64encode(key_id(key_name, key.public_key()) + signature).decode()
    return body + f"\n{_SIG_PREFIX}{key_name} {blob}\n".encode()


def open_checkpoint(
    note: bytes, *, key: Ed25519PublicKey, key_name: str, origin: str | None = None
) -> Checkpoint:
    """Verify the note's signature by `key_name`/`key` over the exact body, then parse it.

    `origin`, when given, must equal the checkpoint's origin. Raises
    CheckpointInvalid on any problem.
    """
    body, signatures = _split_note(note)
    _verify_signatures(body, signatures, key, key_name)
    cp = _parse_body(body)
    if origin is not None and cp.origin != origin:
        raise CheckpointInvalid(f"the checkpoint is for log {cp.origin!r}, not {origin!r}")
    return cp


# --- checkpoints of a trm log, against the directory -------------------------------


def routing_participant(directory: Directory, participant_id: str) -> str:
    """`participant_id` if the directory lists it with role routing, else CheckpointInvalid.

    Only a routing participant's key signs an audit log, so a log named
    after any other participant, or after none, is no log an auditor trusts.
    """
    try:
        card = directory.participant(participant_id)
    except TrmError as e:
        raise CheckpointInvalid(
            f"the directory (serial {directory.serial}) has no participant {participant_id!r}, "
            "so no log of that name can be trusted"
        ) from e
    if card.role is not Role.ROUTING:
        raise CheckpointInvalid(
            f"{participant_id!r} is a {card.role} in the directory (serial {directory.serial}), "
            "not a routing participant: only the routing service's key signs the audit log"
        )
    return participant_id


def named_log(note: bytes, directory: Directory) -> str:
    """The routing participant that a note's origin ``trm.routing/<id>`` names.

    Read before the signature is checked, to know whose key must have signed;
    CheckpointInvalid unless the directory lists that participant as routing.
    """
    origin = claimed_origin(note)
    participant_id = origin.removeprefix(ORIGIN_PREFIX)
    if not origin.startswith(ORIGIN_PREFIX) or not participant_id:
        raise CheckpointInvalid(
            f"the checkpoint origin {origin!r} is not {ORIGIN_PREFIX}<routing participant id>"
        )
    return routing_participant(directory, participant_id)


def open_log_checkpoint(
    note: bytes, directory: Directory, *, log_id: str, key_name: str | None = None
) -> Checkpoint:
    """A checkpoint of routing participant `log_id`'s log, its signature checked.

    The key name must be ``<log_id>/<kid>`` (`key_name`, else the first
    signature line of the note under such a name); the key is `kid` of
    `log_id` as the directory lists it at the checkpoint's time, and the
    origin must be ``trm.routing/<log_id>``. `log_id` is trusted as given:
    pass one the auditor named or `named_log` returned.
    """
    name = _log_key_name(note, log_id) if key_name is None else key_name
    prefix = f"{log_id}/"
    if not name.startswith(prefix):
        raise CheckpointInvalid(f"signed under key name {name!r}, not a key of the log {log_id!r}")
    claimed = claimed_time(note)
    key = directory.signing_key(log_id, name.removeprefix(prefix), used_at=claimed)
    checkpoint = open_checkpoint(note, key=key, key_name=name, origin=origin_for(log_id))
    if checkpoint.time != claimed:
        raise CheckpointInvalid("the checkpoint time could not be read consistently")
    return checkpoint


def claimed_origin(note: bytes) -> str:
    """The origin a note states on its first line, read before its signature is checked."""
    if not isinstance(note, bytes):
        raise CheckpointInvalid(f"a signed note must be bytes, not {type(note).__name__}")
    try:
        return note.split(b"\n", 1)[0].decode()
    except UnicodeDecodeError as e:
        raise CheckpointInvalid("the checkpoint origin is not UTF-8") from e


def claimed_time(note: bytes) -> datetime:
    """The time a note states, read before its signature is checked (to pick the key)."""
    lines = note.split(b"\n")
    if len(lines) < 4 or not lines[3].startswith(_TIME_PREFIX.encode()):
        raise CheckpointInvalid("the note's fourth line is not 'time <RFC 3339 UTC>'")
    try:
        stamp = lines[3][len(_TIME_PREFIX) :].decode("ascii")
        moment = datetime.fromisoformat(stamp.removesuffix("Z"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointInvalid("the note's time is not RFC 3339") from e
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _log_key_name(note: bytes, log_id: str) -> str:
    _, signatures = _split_note(note)
    names = [name for name, _ in signatures if name.startswith(f"{log_id}/")]
    if not names:
        raise CheckpointInvalid(f"the note carries no signature by a key of the log {log_id!r}")
    return names[0]


# --- the note framing ------------------------------------------------------------


def note_signatures(note: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The note's body and its (key name, key id || signature) lines, none of them checked."""
    return _split_note(note)


def _split_note(note: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Body bytes and (key name, key id || signature) pairs, per c2sp.org/signed-note."""
    if not isinstance(note, bytes):
        raise CheckpointInvalid(f"a signed note must be bytes, not {type(note).__name__}")
    if len(note) > _MAX_NOTE_BYTES:
        raise CheckpointInvalid(f"the note has {len(note)} bytes; the limit is {_MAX_NOTE_BYTES}")
    split = note.rfind(b"\n\n")
    if split < 0:
        raise CheckpointInvalid("the note has no blank line before signature lines: unsigned")
    body, block = note[: split + 1], note[split + 2 :]
    try:
        text = block.decode()
    except UnicodeDecodeError as e:
        raise CheckpointInvalid("the signature lines are not UTF-8") from e
    if not text.endswith("\n"):
        raise CheckpointInvalid("the note does not end with a signature line and a newline")
    return body, [_parse_signature_line(line) for line in text[:-1].split("\n")]


def _parse_signature_line(line: str) -> tuple[str, bytes]:
    if not line.startswith(_SIG_PREFIX):
        raise CheckpointInvalid("a signature line does not start with an em dash and a space")
    parts = line[len(_SIG_PREFIX) :].split(" ")
    if len(parts) != 2:
        raise CheckpointInvalid("a signature line is not '\u2014 <key name> <base64>'")
    name, blob = parts
    _check_key_name(name)
    raw = _b64decode(blob, "signature")
    if len(raw) <= _KEY_ID_BYTES:
        raise CheckpointInvalid(f"the signature by {name!r} is too short to hold a key id")
    return name, raw


def _verify_signatures(
    body: bytes, signatures: list[tuple[str, bytes]], key: Ed25519PublicKey, key_name: str
) -> None:
    expected = key_id(key_name, key)
    matching = [raw[_KEY_ID_BYTES:] for name, raw in signatures if name == key_name]
    if not matching:
        raise CheckpointInvalid(f"the note carries no signature by key {key_name!r}")
    mine = [
        raw[_KEY_ID_BYTES:]
        for name, raw in signatures
        if name == key_name and raw[:_KEY_ID_BYTES] == expected
    ]
    if not mine:
        raise CheckpointInvalid(
            f"the note's signature by {key_name!r} has key id other than {expected.hex()}: "
            "signed by another key under that name"
        )
    for signature in mine:
        if len(signature) != _crypto.SIGNATURE_BYTES:
            raise CheckpointInvalid(f"the signature by {key_name!r} is not 64 bytes of Ed25519")
        try:
            _crypto.verify(key, signature, body)
        except _crypto.CryptoError as e:
            raise CheckpointInvalid(
                f"the signature by {key_name!r} does not verify over the note body"
            ) from e


# --- the checkpoint body ----------------------------------------------------------


def _parse_body(body: bytes) -> Checkpoint:
    try:
        text = body.decode()
    except UnicodeDecodeError as e:
        raise CheckpointInvalid("the checkpoint body is not UTF-8") from e
    lines = text[:-1].split("\n")
    if len(lines) != 4:
        raise CheckpointInvalid(
            f"the checkpoint body has {len(lines)} lines; trm writes origin, size, root, time"
        )
    origin, size, root, time = lines
    _check_origin(origin)
    if not _SIZE.fullmatch(size):
        raise CheckpointInvalid("the checkpoint size line is not a decimal number")
    raw_root = _b64decode(root, "root hash")
    if len(raw_root) != _ROOT_BYTES:
        raise CheckpointInvalid(f"the checkpoint root has {len(raw_root)} bytes, not 32")
    return Checkpoint(origin=origin, size=int(size), root=raw_root, time=_parse_time(time))


def _format_time(value: datetime) -> str:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise CheckpointInvalid("a checkpoint time must be a timezone-aware datetime")
    utc = value.astimezone(UTC)
    pattern = "%Y-%m-%dT%H:%M:%S.%fZ" if utc.microsecond else "%Y-%m-%dT%H:%M:%SZ"
    return _TIME_PREFIX + utc.strftime(pattern)


def _parse_time(line: str) -> datetime:
    if not line.startswith(_TIME_PREFIX):
        raise CheckpointInvalid("the fourth checkpoint line is not 'time <RFC 3339 UTC>'")
    stamp = line[len(_TIME_PREFIX) :]
    if not _TIME.fullmatch(stamp):
        raise CheckpointInvalid("the checkpoint time is not RFC 3339 UTC ending in Z")
    try:
        return datetime.fromisoformat(stamp[:-1]).replace(tzinfo=UTC)
    except ValueError as e:
        raise CheckpointInvalid(f"the checkpoint time {stamp!r} is not a real date") from e


def _check_origin(origin: object) -> None:
    if not isinstance(origin, str) or not origin:
        raise CheckpointInvalid("a checkpoint origin must be a non-empty string")
    if any(c.isspace() or not c.isprintable() for c in origin):
        raise CheckpointInvalid("a checkpoint origin may not contain spaces or control characters")


def _check_key_name(name: object) -> None:
    # signed-note: non-empty, no Unicode spaces, no '+' (the vkey separator).
    if not isinstance(name, str) or not name:
        raise CheckpointInvalid("a signed-note key name must be a non-empty string")
    if "+" in name or any(c.isspace() or not c.isprintable() for c in name):
        raise CheckpointInvalid(f"the key name {name!r} contains a space, '+' or control character")


def _b64decode(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise CheckpointInvalid(f"the {what} is not valid base64") from e
    # One encoding per value: no alternative paddings or trailing bits.
    if base64.b64encode(raw).decode() != text:
        raise CheckpointInvalid(f"the {what} is not canonical base64")
    return raw
