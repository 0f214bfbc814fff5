"""Write the envelope test vectors in this folder.

Run from the repository root: ``.venv/bin/python tests/vectors/generate.py``.

Keys are derived from fixed labels and every time is fixed, so ``keys.json``
and ``directory.json`` come out the same on every run. Envelopes do not: HPKE
and the AES-GCM nonce are randomised, so each ``valid-*.json`` stores the
bytes produced together with the header and payload they must open to, and
each ``invalid-*.json`` the bytes and the error they must raise. Valid
envelopes are made by `broker.envelope.seal`; invalid ones are assembled here
from the primitives, byte by byte as ``docs/envelope.md`` specifies, so the
file doubles as a second writer of the format.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import _crypto
from broker.directory import (
    DirectoryBody,
    KeyUse,
    Participant,
    PublicKey,
    Role,
    load_directory,
    sign_directory,
)
from broker.envelope import Recipient, SealedEnvelope, open_envelope, seal, sign
from broker.errors import TrmError
from broker.keys import Sender
from schemas.base import MessageKind
from schemas.examples import example
from schemas.registry import encode_payload

HERE = Path(__file__).parent
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
"""The `now` every vector is replayed at."""
SENT_AT = NOW - timedelta(minutes=1)
YEAR_START, YEAR_END = datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
KZ, UZ, NGO, KG = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod", "iom-kg"
CASE = "KZ-2026-0042"
Suite = _crypto.Suite


def _seed(label: str, size: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"trm/v1 test vector {label} {counter}".encode()).digest()
        counter += 1
    return out[:size]


def _signing(label: str) -> Ed25519PrivateKey:
    return _crypto.signing_key_from_raw(_seed(label, 32))


def _decryption(label: str, suite: Suite) -> _crypto.DecryptionKey:
    return _crypto.DecryptionKey(suite, _seed(label, 32 if suite is Suite.X25519 else 96))


# (participant, kid) -> (key, not_before, not_after, revoked_at)
SIGNING: dict[tuple[str, str], tuple[Ed25519PrivateKey, datetime, datetime, datetime | None]] = {
    (KZ, "iom-kz-s-1"): (_signing("kz-s-1"), YEAR_START, YEAR_END, None),
    (KZ, "iom-kz-s-revoked"): (
        _signing("kz-s-revoked"),
        YEAR_START,
        YEAR_END,
        datetime(2026, 2, 1, tzinfo=UTC),
    ),
    (KZ, "iom-kz-s-expired"): (
        _signing("kz-s-expired"),
        datetime(2025, 1, 1, tzinfo=UTC),
        YEAR_START,
        None,
    ),
    (KZ, "iom-kz-s-future"): (
        _signing("kz-s-future"),
        YEAR_END,
        datetime(2028, 1, 1, tzinfo=UTC),
        None,
    ),
    (UZ, "iom-uz-s-1"): (_signing("uz-s-1"), YEAR_START, YEAR_END, None),
    (NGO, "ngo-uz-ia-s-1"): (_signing("ngo-s-1"), YEAR_START, YEAR_END, None),
    (KG, "iom-kg-s-1"): (_signing("kg-s-1"), YEAR_START, YEAR_END, None),
}
DECRYPTION: dict[tuple[str, str], _crypto.DecryptionKey] = {
    (KZ, "iom-kz-e-1"): _decryption("kz-e-1", Suite.MLKEM768_X25519),
    (UZ, "iom-uz-e-1"): _decryption("uz-e-1", Suite.MLKEM768_X25519),
    (NGO, "ngo-uz-ia-e-1"): _decryption("ngo-e-1", Suite.X25519),
    (KG, "iom-kg-e-1"): _decryption("kg-e-1", Suite.MLKEM768_X25519),
}
AUTHORITY = _signing("authority")
ROLES = {KZ: (Role.MISSION, "KZ", None), UZ: (Role.MISSION, "UZ", None), NGO: (Role.NGO, "UZ", UZ)}
ROLES[KG] = (Role.MISSION, "KG", None)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def directory_body() -> DirectoryBody:
    """Four participants, the KZ mission with valid, revoked, expired and future keys."""
    cards = []
    for pid, (role, country, parent) in ROLES.items():
        keys = [
            PublicKey(
                kid=kid,
                use=KeyUse.SIGN,
                alg="ed25519",
                public=_b64(_crypto.raw_public(key.public_key())),
                not_before=start,
                not_after=end,
                revoked_at=revoked,
            )
            for (owner, kid), (key, start, end, revoked) in SIGNING.items()
            if owner == pid
        ]
        keys += [
            PublicKey(
                kid=kid,
                use=KeyUse.ENCRYPT,
                alg=key.suite.value,
                public=_b64(key.public().raw),
                not_before=YEAR_START,
                not_after=YEAR_END,
            )
            for (owner, kid), key in DECRYPTION.items()
            if owner == pid
        ]
        cards.append(
            Participant(id=pid, role=role, country=country, parent=parent, keys=tuple(keys))
        )
    return DirectoryBody(serial=1, issued_at=YEAR_START, participants=tuple(cards))


def keys_document() -> dict[str, Any]:
    """Every private and public key of the vectors, hex encoded."""
    participants: dict[str, Any] = {pid: {"signing": {}, "encryption": {}} for pid in ROLES}
    for (pid, kid), (key, *_) in SIGNING.items():
        participants[pid]["signing"][kid] = {
            "private": _crypto.raw_private(key).hex(),
            "public": _crypto.raw_public(key.public_key()).hex(),
        }
    for (pid, kid), dkey in DECRYPTION.items():
        participants[pid]["encryption"][kid] = {
            "suite": dkey.suite.value,
            "private": dkey.raw.hex(),
            "public": dkey.public().raw.hex(),
        }
    return {
        "authority": {
            "private": _crypto.raw_private(AUTHORITY).hex(),
            "public": _crypto.raw_public(AUTHORITY.public_key()).hex(),
        },
        "participants": participants,
    }


# --- a second writer of the wire format -------------------------------------------------


def envelope_id(at: datetime, tail: int = 0x1234) -> UUID:
    """A fixed UUIDv7 for millisecond time `at`."""
    millis = int(at.timestamp() * 1000)
    return UUID(int=(millis << 80) | (0x7 << 76) | (0b10 << 62) | tail)


def header(**changes: Any) -> dict[str, Any]:
    """A valid header from KZ to UZ, with `changes` applied."""
    base: dict[str, Any] = {
        "v": 1,
        "id": str(envelope_id(SENT_AT)),
        "kind": "return_request",
        "schema_version": 1,
        "case": CASE,
        "sender": KZ,
        "sender_key": "iom-kz-s-1",
        "recipients": [UZ],
        "sent_at": SENT_AT.isoformat().replace("+00:00", "Z"),
        "seq": 1,
        "reply_to": None,
    }
    base.update(changes)
    return base


def forge(
    head: dict[str, Any] | bytes,
    payload: bytes,
    *,
    signer: Ed25519PrivateKey | None = None,
    entry_ids: list[str] | None = None,
    tamper_wrap: bool = False,
    tamper_ciphertext: bool = False,
) -> bytes:
    """A signed envelope built from the primitives, exactly as docs/envelope.md lays it out."""
    header_bytes = (
        head if isinstance(head, bytes) else json.dumps(head, separators=(",", ":")).encode()
    )
    ids = entry_ids if entry_ids is not None else list(head["recipients"])  # type: ignore[index]
    content_key = _crypto.new_content_key()
    body = (
        b"TRM1" + struct.pack(">I", len(header_bytes)) + header_bytes + struct.pack(">H", len(ids))
    )
    for rid in ids:
        kid, dkey = next((k, v) for (p, k), v in DECRYPTION.items() if p == rid)
        info = b"trm/v1 content-key" + hashlib.sha256(header_bytes).digest() + rid.encode()
        wrapped = _crypto.wrap(dkey.public(), content_key, info)
        if tamper_wrap:
            wrapped = flip(wrapped, len(wrapped) // 2)
        body += bytes([len(rid)]) + rid.encode() + bytes([len(kid)]) + kid.encode()
        body += struct.pack(">H", len(wrapped)) + wrapped
    ciphertext = _crypto.encrypt(content_key, payload, header_bytes)
    if tamper_ciphertext:
        ciphertext = flip(ciphertext, len(ciphertext) - 1)
    body += struct.pack(">I", len(ciphertext)) + ciphertext
    key = signer or SIGNING[(KZ, "iom-kz-s-1")][0]
    return body + _crypto.sign(key, b"trm/v1 envelope\x00" + body)


def forge_signed(
    head: dict[str, Any],
    payload: bytes,
    *,
    context: bytes = b"trm/v1 signed envelope\x00",
) -> bytes:
    """A signed (not sealed) envelope built from the primitives, as docs/envelope.md lays it out.

    `context` is the signature's domain separation string, the sealed form's to forge one
    signed under the wrong form.
    """
    header_bytes = json.dumps(head, separators=(",", ":")).encode()
    body = b"TRS1" + struct.pack(">I", len(header_bytes)) + header_bytes
    body += struct.pack(">I", len(payload)) + payload
    return body + _crypto.sign(SIGNING[(KZ, "iom-kz-s-1")][0], context + body)


def with_entry_count(raw: bytes, count: int) -> bytes:
    """`raw` with its key entries cut and the count in their place saying `count`."""
    (header_len,) = struct.unpack_from(">I", raw, 4)
    start = 8 + header_len
    pos = start + 2
    for _ in range(struct.unpack_from(">H", raw, start)[0]):
        pos += raw[pos] + 1
        pos += raw[pos] + 1
        pos += 2 + struct.unpack_from(">H", raw, pos)[0]
    return raw[:start] + struct.pack(">H", count) + raw[pos:]


def flip(data: bytes, index: int) -> bytes:
    """`data` with the lowest bit of byte `index` inverted."""
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


# --- the vectors ------------------------------------------------------------------------


def sealed(
    kind: MessageKind,
    sender: str,
    recipients: list[str],
    *,
    seq: int = 1,
    allow_classical: bool = False,
) -> bytes:
    """An envelope made by `seal` at SENT_AT with the sender's first signing key.

    `allow_classical` is `seal`'s, for the vector that mixes suites on purpose.
    """
    return _made(seal, kind, sender, recipients, seq, allow_classical=allow_classical)


def signed(kind: MessageKind, sender: str, recipients: list[str], *, seq: int = 1) -> bytes:
    """An envelope made by `sign` at SENT_AT with the sender's first signing key."""
    return _made(sign, kind, sender, recipients, seq)


def _made(
    make: Callable[..., SealedEnvelope],
    kind: MessageKind,
    sender: str,
    recipients: list[str],
    seq: int,
    **extra: Any,
) -> bytes:
    directory = load_directory(directory_json(), authority=AUTHORITY.public_key())
    kid = next(k for (p, k) in SIGNING if p == sender)
    return make(
        example(kind),
        case=CASE,
        sender=Sender(sender, kid, SIGNING[(sender, kid)][0]),
        recipients=recipients,
        directory=directory,
        seq=seq,
        now=SENT_AT,
        envelope_id=envelope_id(SENT_AT, seq),
        **extra,
    ).raw


def directory_json() -> bytes:
    """The signed directory file."""
    return sign_directory(directory_body(), AUTHORITY)


VALID: dict[str, tuple[str, Callable[[], bytes], list[str]]] = {
    "return-request-hybrid": (
        "KZ mission to UZ mission, ML-KEM-768+X25519",
        lambda: sealed(MessageKind.RETURN_REQUEST, KZ, [UZ]),
        [UZ],
    ),
    "return-request-mixed-suites": (
        "KZ mission to UZ mission (hybrid) and the NGO (X25519), one ciphertext",
        lambda: sealed(MessageKind.RETURN_REQUEST, KZ, [UZ, NGO], seq=2, allow_classical=True),
        [UZ, NGO],
    ),
    "reception-confirmed-from-ngo": (
        "the NGO to both missions",
        lambda: sealed(MessageKind.RECEPTION_CONFIRMED, NGO, [KZ, UZ]),
        [KZ, UZ],
    ),
    "delivery-receipt-x25519": (
        "UZ mission to the NGO only, classical X25519",
        lambda: sealed(MessageKind.DELIVERY_RECEIPT, UZ, [NGO]),
        [NGO],
    ),
    "delivery-receipt-signed": (
        "UZ mission to the KZ mission, signed and not sealed: the payload in the clear",
        lambda: signed(MessageKind.DELIVERY_RECEIPT, UZ, [KZ]),
        [KZ],
    ),
}

PAYLOAD = encode_payload(example(MessageKind.RETURN_REQUEST))
_BASE = forge(header(), PAYLOAD)
_SIG = len(_BASE) - 64
_RECEIPT = encode_payload(example(MessageKind.DELIVERY_RECEIPT))
_SIGNED_RECEIPT = header(kind="delivery_receipt", recipients=[UZ])

# name -> (description, bytes, opener, amqp_user_id, error class name)
INVALID: dict[str, tuple[str, Callable[[], bytes], str, str | None, str]] = {
    "signed-return-request": (
        "a return request signed by its sender but not sealed: only receipts may be",
        lambda: forge_signed(header(), PAYLOAD),
        UZ,
        None,
        "NotSealed",
    ),
    "signed-payload-flipped": (
        "a signed receipt with one bit of its clear payload flipped",
        lambda: flip(forge_signed(_SIGNED_RECEIPT, _RECEIPT), -70),
        UZ,
        None,
        "BadSignature",
    ),
    "signed-under-sealed-context": (
        "a signed receipt whose signature uses the sealed form's context string",
        lambda: forge_signed(_SIGNED_RECEIPT, _RECEIPT, context=b"trm/v1 envelope\x00"),
        UZ,
        None,
        "BadSignature",
    ),
    "bad-magic": ("magic is TRM2", lambda: b"TRM2" + _BASE[4:], UZ, None, "MalformedEnvelope"),
    "truncated-signature": (
        "last byte of the signature missing",
        lambda: _BASE[:-1],
        UZ,
        None,
        "MalformedEnvelope",
    ),
    "header-length-past-end": (
        "header length larger than the envelope",
        lambda: _BASE[:4] + struct.pack(">I", len(_BASE)) + _BASE[8:],
        UZ,
        None,
        "MalformedEnvelope",
    ),
    "trailing-bytes": (
        "one zero byte after the signature",
        lambda: _BASE + b"\x00",
        UZ,
        None,
        "MalformedEnvelope",
    ),
    "key-entry-count-huge": (
        "a key entry count of 65535, over the 32-recipient cap, where the entries were",
        lambda: with_entry_count(_BASE, 0xFFFF),
        UZ,
        None,
        "MalformedEnvelope",
    ),
    "header-not-utf8": (
        "header bytes are not UTF-8",
        lambda: forge(b'{"v":1,"case":"\xff"}', PAYLOAD, entry_ids=[UZ]),
        UZ,
        None,
        "MalformedEnvelope",
    ),
    "header-duplicate-key": (
        "the header names its sender twice",
        lambda: forge(
            json.dumps(header(), separators=(",", ":")).encode()[:-1] + b',"sender":"iom-uz"}',
            PAYLOAD,
            entry_ids=[UZ],
        ),
        UZ,
        None,
        "MalformedEnvelope",
    ),
    "header-unknown-field": (
        "the header carries a field the schema does not have",
        lambda: forge(header(note="x"), PAYLOAD),
        UZ,
        None,
        "MalformedEnvelope",
    ),
    "entries-differ-from-recipients": (
        "key entries for UZ and NGO, header names UZ only",
        lambda: forge(header(), PAYLOAD, entry_ids=[UZ, NGO]),
        UZ,
        None,
        "MalformedEnvelope",
    ),
    "unknown-sender": (
        "sender not in the directory",
        lambda: forge(header(sender="iom-xx"), PAYLOAD),
        UZ,
        None,
        "UnknownSender",
    ),
    "unknown-key": (
        "sender has no such key id",
        lambda: forge(header(sender_key="iom-kz-s-9"), PAYLOAD),
        UZ,
        None,
        "UnknownKey",
    ),
    "revoked-key": (
        "signed with a key revoked before sent_at",
        lambda: forge(
            header(sender_key="iom-kz-s-revoked"),
            PAYLOAD,
            signer=SIGNING[(KZ, "iom-kz-s-revoked")][0],
        ),
        UZ,
        None,
        "RevokedKey",
    ),
    "expired-key": (
        "signed with a key whose window ended before sent_at",
        lambda: forge(
            header(sender_key="iom-kz-s-expired"),
            PAYLOAD,
            signer=SIGNING[(KZ, "iom-kz-s-expired")][0],
        ),
        UZ,
        None,
        "ExpiredKey",
    ),
    "key-not-yet-valid": (
        "signed with a key whose window starts after sent_at",
        lambda: forge(
            header(sender_key="iom-kz-s-future"),
            PAYLOAD,
            signer=SIGNING[(KZ, "iom-kz-s-future")][0],
        ),
        UZ,
        None,
        "KeyNotYetValid",
    ),
    "signature-flipped": (
        "one bit of the signature flipped",
        lambda: flip(_BASE, _SIG + 10),
        UZ,
        None,
        "BadSignature",
    ),
    "ciphertext-flipped": (
        "one bit of the ciphertext flipped after signing",
        lambda: flip(_BASE, _SIG - 1),
        UZ,
        None,
        "BadSignature",
    ),
    "signed-by-another-participant": (
        "header names KZ's key, signed with UZ's key",
        lambda: forge(header(), PAYLOAD, signer=SIGNING[(UZ, "iom-uz-s-1")][0]),
        UZ,
        None,
        "BadSignature",
    ),
    "amqp-user-mismatch": (
        "published by AMQP user iom-kg",
        lambda: _BASE,
        UZ,
        KG,
        "SenderMismatch",
    ),
    "stale": (
        "sent_at 45 days before now",
        lambda: forge(
            header(
                id=str(envelope_id(NOW - timedelta(days=45))),
                sent_at=(NOW - timedelta(days=45)).isoformat().replace("+00:00", "Z"),
            ),
            PAYLOAD,
        ),
        UZ,
        None,
        "StaleEnvelope",
    ),
    "future": (
        "sent_at one hour after now",
        lambda: forge(
            header(
                id=str(envelope_id(NOW + timedelta(hours=1))),
                sent_at=(NOW + timedelta(hours=1)).isoformat().replace("+00:00", "Z"),
            ),
            PAYLOAD,
        ),
        UZ,
        None,
        "StaleEnvelope",
    ),
    "id-time-mismatch": (
        "the id's UUIDv7 time is a day before sent_at",
        lambda: forge(header(id=str(envelope_id(SENT_AT - timedelta(days=1)))), PAYLOAD),
        UZ,
        None,
        "StaleEnvelope",
    ),
    "not-addressed": ("opened by KG, a non-recipient", lambda: _BASE, KG, None, "NotAddressedToMe"),
    "wrapped-key-corrupt": (
        "the wrapped key was altered before signing",
        lambda: forge(header(), PAYLOAD, tamper_wrap=True),
        UZ,
        None,
        "DecryptionFailed",
    ),
    "ciphertext-corrupt": (
        "the ciphertext was altered before signing",
        lambda: forge(header(), PAYLOAD, tamper_ciphertext=True),
        UZ,
        None,
        "DecryptionFailed",
    ),
    "payload-schema-violation": (
        "the payload is JSON that is no return_request",
        lambda: forge(header(), b'{"nonsense":true}'),
        UZ,
        None,
        "SchemaViolation",
    ),
    "payload-kind-mismatch": (
        "a valid return_request payload under a case_closed header",
        lambda: forge(header(kind="case_closed"), PAYLOAD),
        UZ,
        None,
        "SchemaViolation",
    ),
}


def _recipient(pid: str) -> Recipient:
    return Recipient(pid, {k: v for (p, k), v in DECRYPTION.items() if p == pid})


def _write(name: str, document: dict[str, Any]) -> None:
    (HERE / name).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def main(only: set[str] | None = None) -> None:
    """Write keys.json, directory.json and every vector (or those named), checking each.

    Naming vectors (``generate.py key-entry-count-huge``) writes only those,
    so that adding one leaves the committed bytes of the others as they are.
    """
    _write("keys.json", keys_document())
    (HERE / "directory.json").write_bytes(directory_json())
    directory = load_directory(directory_json(), authority=AUTHORITY.public_key())
    for name, (description, make, openers) in VALID.items():
        if only is not None and name not in only:
            continue
        raw = make()
        opened = [
            open_envelope(raw, recipient=_recipient(p), directory=directory, now=NOW)
            for p in openers
        ]
        header_len = struct.unpack(">I", raw[4:8])[0]
        _write(
            f"valid-{name}.json",
            {
                "description": description,
                "now": NOW.isoformat().replace("+00:00", "Z"),
                "envelope": raw.hex(),
                "recipients": openers,
                "header": raw[8 : 8 + header_len].decode(),
                "payload": json.loads(encode_payload(opened[0].message)),
                "sha256": hashlib.sha256(raw).hexdigest(),
            },
        )
    for name, (description, make, opener, amqp_user_id, error) in INVALID.items():
        if only is not None and name not in only:
            continue
        raw = make()
        try:
            open_envelope(
                raw,
                recipient=_recipient(opener),
                directory=directory,
                now=NOW,
                amqp_user_id=amqp_user_id,
            )
        except TrmError as e:
            if type(e).__name__ != error:
                raise SystemExit(f"{name}: expected {error}, got {type(e).__name__}: {e}") from e
            reason = e.reason
        else:
            raise SystemExit(f"{name}: opened, expected {error}")
        _write(
            f"invalid-{name}.json",
            {
                "description": description,
                "now": NOW.isoformat().replace("+00:00", "Z"),
                "envelope": raw.hex(),
                "recipient": opener,
                "amqp_user_id": amqp_user_id,
                "error": error,
                "reason": reason,
            },
        )


if __name__ == "__main__":
    main(set(sys.argv[1:]) or None)
