"""Hostile envelopes: mutations of valid ones, forgeries and replays, each with the
reasons a receiver may refuse it with.

`forge` assembles a correctly framed, signed and encrypted envelope from any
header and payload bytes with the raw primitives, the way an attacker holding
some key would, so that checks past the signature (schema, time, sender) can
be reached. `hostile_stream` interleaves hostile envelopes of every family
with valid ones, in an order a single consumer sees them in.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import _crypto
from broker.directory import Directory
from broker.envelope import MAX_ENVELOPE_BYTES, SealedEnvelope, new_envelope_id, seal
from broker.errors import EnvelopeError, TrmError
from broker.keys import ParticipantKeys
from schemas.base import MessageKind
from schemas.examples import example
from schemas.registry import encode_payload

ADMIN = None
"""`publish_as` of an envelope injected by the broker's administrator (no participant)."""

VALID_KINDS = (
    MessageKind.RETURN_REQUEST,
    MessageKind.RETURN_ACCEPTED,
    MessageKind.TRAVEL_ARRANGED,
    MessageKind.REFERRAL_REQUEST,
)


def _subclasses(cls: type[TrmError]) -> list[type[TrmError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _subclasses(sub)
    return found


ENVELOPE_REASONS = frozenset(cls.reason for cls in _subclasses(EnvelopeError))
"""Every reason an envelope can be refused with."""


@dataclass(frozen=True)
class Valid:
    """A valid envelope, published by its sender."""

    envelope_id: str
    body: bytes
    publish_as: str


@dataclass(frozen=True)
class Hostile:
    """A hostile envelope, the family it belongs to and the reasons it may be refused with."""

    family: str
    body: bytes
    expected: frozenset[str]
    publish_as: str | None
    """The participant user publishing it, or None for an injection by the administrator."""


@dataclass(frozen=True)
class Cast:
    """Who takes part: the sender and its keys, the target receiver, a third party's keys."""

    directory: Directory
    sender: ParticipantKeys
    target: str
    third: ParticipantKeys
    now: datetime
    case: str = "KZ-2026-9001"

    @property
    def sender_id(self) -> str:
        """The sender's participant id."""
        return self.sender.card.id

    def signing_key(self, keys: ParticipantKeys) -> tuple[str, Ed25519PrivateKey]:
        """(kid, private key) of `keys`' current signing key."""
        sender = keys.sender(self.now)
        return sender.kid, sender.key


def forge(
    directory: Directory,
    header: dict[str, Any] | bytes,
    payload: bytes,
    *,
    signer: Ed25519PrivateKey,
    now: datetime,
    wrap_for: Sequence[tuple[str, str]] | None = None,
) -> bytes:
    """A correctly framed and signed envelope of any header and payload bytes.

    Each recipient's entry wraps the content key under the directory's current
    encryption key of the participant named second in `wrap_for` (default the
    recipient itself), so a wrong-key envelope can be made too.
    """
    if isinstance(header, bytes):
        header_bytes = header
        parsed = json.loads(header)
    else:
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        parsed = header
    pairs = wrap_for if wrap_for is not None else [(r, r) for r in parsed["recipients"]]
    content_key = _crypto.new_content_key()
    body = b"TRM1" + struct.pack(">I", len(header_bytes)) + header_bytes
    body += struct.pack(">H", len(pairs))
    for rid, key_owner in pairs:
        kid, key = directory.encryption_key(key_owner, now)
        info = b"trm/v1 content-key" + hashlib.sha256(header_bytes).digest() + rid.encode()
        wrapped = _crypto.wrap(key, content_key, info)
        body += bytes([len(rid)]) + rid.encode() + bytes([len(kid)]) + kid.encode()
        body += struct.pack(">H", len(wrapped)) + wrapped
    ciphertext = _crypto.encrypt(content_key, payload, header_bytes)
    body += struct.pack(">I", len(ciphertext)) + ciphertext
    return body + _crypto.sign(signer, b"trm/v1 envelope\x00" + body)


def header_dict(
    *,
    sender: str,
    sender_key: str,
    recipients: Sequence[str],
    case: str,
    sent_at: datetime,
    kind: str = MessageKind.RETURN_REQUEST,
    seq: int = 1,
    envelope_id: str | None = None,
) -> dict[str, Any]:
    """A header as a dict, with the documented fields and a UUIDv7 matching `sent_at`."""
    moment = sent_at.replace(microsecond=sent_at.microsecond // 1000 * 1000)
    return {
        "v": 1,
        "id": envelope_id or str(new_envelope_id(moment)),
        "kind": str(kind),
        "schema_version": 1,
        "case": case,
        "sender": sender,
        "sender_key": sender_key,
        "recipients": list(recipients),
        "sent_at": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
        "seq": seq,
        "reply_to": None,
    }


def seal_valid(
    cast: Cast, seq: int, *, now: datetime | None = None, **extra: Any
) -> SealedEnvelope:
    """A valid envelope from the cast's sender to its target."""
    kind = VALID_KINDS[seq % len(VALID_KINDS)]
    moment = now or cast.now
    return seal(
        example(kind),
        case=cast.case,
        sender=cast.sender.sender(moment),
        recipients=(cast.target,),
        directory=cast.directory,
        seq=seq,
        now=moment,
        **extra,
    )


class _Maker:
    """Makes hostile envelopes of each family from a cast and a seeded random source."""

    def __init__(self, cast: Cast, rng: random.Random) -> None:
        self.cast = cast
        self.rng = rng
        self.seq = 10_000
        self.base = seal_valid(cast, 1).raw

    def _header(self, **changes: Any) -> dict[str, Any]:
        kid, _ = self.cast.signing_key(self.cast.sender)
        self.seq += 1
        fields: dict[str, Any] = {
            "sender": self.cast.sender_id,
            "sender_key": kid,
            "recipients": (self.cast.target,),
            "case": self.cast.case,
            "sent_at": self.cast.now,
            "seq": self.seq,
        }
        fields.update(changes)
        return header_dict(**fields)

    def _signed(self, header: dict[str, Any] | bytes, payload: bytes, **kw: Any) -> bytes:
        _, key = self.cast.signing_key(self.cast.sender)
        signer = kw.pop("signer", key)
        return forge(self.cast.directory, header, payload, signer=signer, now=self.cast.now, **kw)

    def _payload(self) -> bytes:
        return encode_payload(example(MessageKind.RETURN_REQUEST))

    def bitflip(self) -> Hostile:
        data = bytearray(self.base)
        for _ in range(self.rng.randint(1, 3)):
            at = self.rng.randrange(len(data))
            data[at] ^= 1 << self.rng.randrange(8)
        return Hostile("bitflip", bytes(data), ENVELOPE_REASONS, self.cast.sender_id)

    def truncate(self) -> Hostile:
        cut = self.rng.randrange(len(self.base))
        return Hostile("truncated", self.base[:cut], frozenset({"malformed"}), self.cast.sender_id)

    def wrong_signer(self) -> Hostile:
        _, key = self.cast.signing_key(self.cast.third)
        body = self._signed(self._header(), self._payload(), signer=key)
        return Hostile("wrong_signing_key", body, frozenset({"bad_signature"}), self.cast.sender_id)

    def wrong_wrap_key(self) -> Hostile:
        # The entry names the target, but the content key is wrapped to the third party's key.
        third = self.cast.third.card.id
        body = self._signed(self._header(), self._payload(), wrap_for=[(self.cast.target, third)])
        expected = frozenset({"not_addressed_to_me", "decryption_failed"})
        return Hostile("wrong_encryption_key", body, expected, self.cast.sender_id)

    def schema(self) -> Hostile:
        choices = [
            b"{}",
            b'{"unexpected": true}',
            b"[1, 2, 3]",
            b"not json at all",
            encode_payload(example(MessageKind.CASE_CLOSED)),
            b'{"a":' * 200 + b"1" + b"}" * 200,
        ]
        body = self._signed(self._header(), self.rng.choice(choices))
        return Hostile("schema_violation", body, frozenset({"schema_violation"}), ADMIN)

    def oversize(self) -> Hostile:
        body = self.base + bytes(MAX_ENVELOPE_BYTES + 1 - len(self.base))
        return Hostile("oversize", body, frozenset({"too_large"}), self.cast.sender_id)

    def stale_future(self) -> Hostile:
        ahead = self.cast.now + timedelta(minutes=self.rng.randint(6, 600))
        body = self._signed(self._header(sent_at=ahead), self._payload())
        return Hostile("stale_future", body, frozenset({"stale"}), self.cast.sender_id)

    def stale_id(self) -> Hostile:
        off = timedelta(minutes=self.rng.choice([-1, 1]) * self.rng.randint(6, 60))
        envelope_id = str(new_envelope_id(self.cast.now + off))
        body = self._signed(self._header(envelope_id=envelope_id), self._payload())
        return Hostile("stale_id_time", body, frozenset({"stale"}), self.cast.sender_id)

    def stale_past(self) -> Hostile:
        # Older than the 30-day window; if the key is younger, its window refuses it first.
        past = self.cast.now - timedelta(days=self.rng.randint(31, 400))
        body = self._signed(self._header(sent_at=past), self._payload())
        expected = frozenset({"stale", "key_not_yet_valid"})
        return Hostile("stale_past", body, expected, self.cast.sender_id)

    def header_tamper(self) -> Hostile:
        # Change one character of the case reference after signing: same length, same frame.
        data = bytearray(self.base)
        marker = f'"case":"{self.cast.case}"'.encode()
        at = bytes(data).index(marker) + len(marker) - 2
        data[at] = ord("0") + (data[at] - ord("0") + 1) % 10
        return Hostile("header_tampered", bytes(data), frozenset({"bad_signature"}), ADMIN)

    def claimed_sender(self) -> Hostile:
        # The header says the third party sent it; the sender's own key signed it.
        third = self.cast.third.card.id
        kid, _ = self.cast.signing_key(self.cast.third)
        body = self._signed(self._header(sender=third, sender_key=kid), self._payload())
        return Hostile("signed_as_other", body, frozenset({"bad_signature"}), ADMIN)

    def sender_mismatch(self) -> Hostile:
        # A valid envelope of the sender, published by the administrator under its own user id.
        body = seal_valid(self.cast, self._next()).raw
        return Hostile("user_id_mismatch", body, frozenset({"sender_mismatch"}), "admin")

    def unknown_sender(self) -> Hostile:
        body = self._signed(self._header(sender="iom-xx"), self._payload())
        return Hostile("unknown_sender", body, frozenset({"unknown_sender"}), ADMIN)

    def not_addressed(self) -> Hostile:
        header = self._header(recipients=(self.cast.third.card.id,))
        body = self._signed(header, self._payload())
        return Hostile("not_addressed", body, frozenset({"not_addressed_to_me"}), ADMIN)

    def garbage(self) -> Hostile:
        body = self.rng.randbytes(self.rng.randint(0, 2048))
        if self.rng.random() < 0.5:
            body = b"TRM1" + body
        return Hostile("random_bytes", body, frozenset({"malformed"}), self.cast.sender_id)

    def _next(self) -> int:
        self.seq += 1
        return self.seq


FAMILIES = (
    "bitflip",
    "truncate",
    "wrong_signer",
    "wrong_wrap_key",
    "schema",
    "stale_future",
    "stale_id",
    "stale_past",
    "header_tamper",
    "claimed_sender",
    "sender_mismatch",
    "unknown_sender",
    "not_addressed",
    "garbage",
)
OVERSIZE_EVERY = 100
"""One oversize envelope (1 MiB + 1 byte) per this many hostile ones: they are costly to publish."""


def hostile_stream(
    cast: Cast, hostile: int, *, valid_every: int = 4, seed: int = 0
) -> list[Valid | Hostile]:
    """`hostile` hostile envelopes of every family, a valid one after every `valid_every`.

    Every valid envelope is followed, later in the stream, by a replay: its id
    with other bytes (sealed again), which the receiver must refuse as
    ``replayed`` (counted among the hostile ones).
    """
    rng = random.Random(seed)
    maker = _Maker(cast, rng)
    items: list[Valid | Hostile] = []
    replays: list[Hostile] = []
    made = 0
    seq = 1
    while made < hostile:
        if made % valid_every == 0:
            seq += 1
            sealed = seal_valid(cast, seq)
            items.append(Valid(str(sealed.id), sealed.raw, cast.sender_id))
            again = seal_valid(cast, seq, envelope_id=sealed.id, now=sealed.header.sent_at)
            replays.append(
                Hostile("replayed_id", again.raw, frozenset({"replayed"}), cast.sender_id)
            )
        if replays and made % valid_every == valid_every // 2:
            items.append(replays.pop(0))
        elif made % OVERSIZE_EVERY == OVERSIZE_EVERY - 1:
            items.append(maker.oversize())
        else:
            family = FAMILIES[made % len(FAMILIES)]
            items.append(getattr(maker, family)())
        made += 1
    return items
