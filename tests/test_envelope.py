"""Sealing, verifying and opening envelopes with real keys and a real signed directory."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import _crypto, envelope
from broker.directory import (
    Directory,
    DirectoryBody,
    Participant,
    Role,
    load_directory,
    sign_directory,
)
from broker.envelope import (
    MAX_AGE,
    MAX_CLOCK_SKEW,
    MAX_ENVELOPE_BYTES,
    SIGNED_CONTEXT,
    SIGNED_MAGIC,
    EnvelopeVerifier,
    Recipient,
    SealedEnvelope,
    classical_recipients,
    new_envelope_id,
    open_envelope,
    read_header,
    seal,
    sign,
    verify_envelope,
)
from broker.errors import (
    BadSignature,
    ClassicalDowngrade,
    DecryptionFailed,
    EnvelopeTooLarge,
    ExpiredKey,
    KeyNotValid,
    KeyNotYetValid,
    MalformedEnvelope,
    NotAddressedToMe,
    NotSealed,
    RevokedKey,
    SchemaViolation,
    SenderMismatch,
    StaleEnvelope,
    TrmError,
    UnknownKey,
    UnknownParticipant,
    UnknownSender,
)
from broker.keys import ParticipantKeys, Sender, init_participant, load_keys
from schemas.base import MessageKind
from schemas.examples import example
from schemas.header import MAX_RECIPIENTS
from schemas.registry import encode_payload

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
KEYS_FROM = NOW - timedelta(days=10)
KZ, UZ, NGO, KG = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod", "iom-kg"
CASE = "iom-kz.KZ-2026-0042"


@dataclass(frozen=True)
class World:
    """Four participants with real keys, the authority, and the signed directory."""

    keys: dict[str, ParticipantKeys]
    authority: Ed25519PrivateKey
    body: DirectoryBody
    directory: Directory

    def sender(self, pid: str) -> Sender:
        return self.keys[pid].sender(NOW)

    def recipient(self, pid: str) -> Recipient:
        return Recipient(pid, self.keys[pid].decryption)

    def with_cards(self, *cards: Participant) -> Directory:
        """A directory where `cards` replace the participants with the same ids."""
        by_id = {c.id: c for c in cards}
        participants = tuple(by_id.get(p.id, p) for p in self.body.participants)
        body = self.body.model_copy(update={"participants": participants})
        return load_directory(
            sign_directory(body, self.authority), authority=self.authority.public_key()
        )


def make_world(root: Path) -> World:
    """Missions KZ, UZ, KG (hybrid keys) and an Uzbek NGO with classical X25519 keys."""
    specs: list[tuple[str, Role, str, str | None, _crypto.Suite]] = [
        (KZ, Role.MISSION, "KZ", None, _crypto.Suite.MLKEM768_X25519),
        (UZ, Role.MISSION, "UZ", None, _crypto.Suite.MLKEM768_X25519),
        (NGO, Role.NGO, "UZ", UZ, _crypto.Suite.X25519),
        (KG, Role.MISSION, "KG", None, _crypto.Suite.MLKEM768_X25519),
    ]
    cards = []
    for pid, role, country, parent, suite in specs:
        cards.append(
            init_participant(
                root / pid,
                participant_id=pid,
                role=role,
                country=country,
                parent=parent,
                suite=suite,
                now=KEYS_FROM,
            )
        )
    authority = Ed25519PrivateKey.generate()
    body = DirectoryBody(serial=1, issued_at=KEYS_FROM, participants=tuple(cards))
    directory = load_directory(sign_directory(body, authority), authority=authority.public_key())
    keys = {pid: load_keys(root / pid) for pid, *_ in specs}
    return World(keys, authority, body, directory)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """One world per module, so ML-KEM keys are generated once."""
    return make_world(tmp_path_factory.mktemp("world"))


def _seal(
    world: World, kind: MessageKind = MessageKind.RETURN_REQUEST, **kw: Any
) -> SealedEnvelope:
    args: dict[str, Any] = {
        "case": CASE,
        "sender": world.sender(KZ),
        "recipients": [UZ, NGO],
        "directory": world.directory,
        "seq": 1,
        "now": NOW,
        # The default envelope mixes suites on purpose, to prove what opening does
        # with it; test_seal_refuses_hybrid_and_classical_together proves the default.
        "allow_classical": True,
    }
    args.update(kw)
    return seal(example(kind), **args)


@pytest.fixture(scope="module")
def sealed(world: World) -> SealedEnvelope:
    """A return request from KZ to UZ (hybrid) and the NGO (X25519)."""
    return _seal(world)


# --- an independent reading and writing of the wire format, for tampering --------------


@dataclass(frozen=True)
class Regions:
    """Byte ranges of an envelope's parts, read straight from docs/envelope.md."""

    header: range
    wrapped: list[range]
    ciphertext: range
    signature: range


def regions(raw: bytes) -> Regions:
    (hlen,) = struct.unpack_from(">I", raw, 4)
    pos = 8 + hlen
    header = range(8, pos)
    (n,) = struct.unpack_from(">H", raw, pos)
    pos += 2
    wrapped = []
    for _ in range(n):
        pos += 1 + raw[pos]
        pos += 1 + raw[pos]
        (wlen,) = struct.unpack_from(">H", raw, pos)
        wrapped.append(range(pos + 2, pos + 2 + wlen))
        pos += 2 + wlen
    (clen,) = struct.unpack_from(">I", raw, pos)
    ciphertext = range(pos + 4, pos + 4 + clen)
    return Regions(header, wrapped, ciphertext, range(len(raw) - 64, len(raw)))


def _forge(
    world: World,
    header: dict[str, Any] | bytes,
    payload: bytes,
    *,
    signer: Ed25519PrivateKey | None = None,
    entry_ids: list[str] | None = None,
    corrupt_wrap: bool = False,
    corrupt_ciphertext: bool = False,
) -> bytes:
    """A correctly signed envelope assembled by hand from arbitrary header and payload bytes."""
    header_bytes = (
        header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    )
    ids = entry_ids if entry_ids is not None else list(_as_dict(header).get("recipients", [UZ]))
    content_key = _crypto.new_content_key()
    body = b"TRM1" + struct.pack(">I", len(header_bytes)) + header_bytes
    body += struct.pack(">H", len(ids))
    for rid in ids:
        kid, key = world.directory.encryption_key(rid, NOW)
        info = b"trm/v1 content-key" + hashlib.sha256(header_bytes).digest() + rid.encode()
        wrapped = _crypto.wrap(key, content_key, info)
        if corrupt_wrap:
            wrapped = _flip(wrapped, len(wrapped) - 1)
        body += bytes([len(rid)]) + rid.encode() + bytes([len(kid)]) + kid.encode()
        body += struct.pack(">H", len(wrapped)) + wrapped
    ciphertext = _crypto.encrypt(content_key, payload, header_bytes)
    if corrupt_ciphertext:
        ciphertext = _flip(ciphertext, len(ciphertext) - 1)
    body += struct.pack(">I", len(ciphertext)) + ciphertext
    key = signer or world.keys[KZ].signing[world.sender(KZ).kid]
    return body + key.sign(b"trm/v1 envelope\x00" + body)


def _as_dict(header: dict[str, Any] | bytes) -> dict[str, Any]:
    if isinstance(header, dict):
        return header
    try:
        parsed = json.loads(header)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _header(world: World, **changes: Any) -> dict[str, Any]:
    base = {
        "v": 1,
        "id": str(new_envelope_id(NOW)),
        "kind": "return_request",
        "schema_version": 1,
        "case": CASE,
        "sender": KZ,
        "sender_key": world.sender(KZ).kid,
        "recipients": [UZ],
        "sent_at": NOW.isoformat().replace("+00:00", "Z"),
        "seq": 1,
        "reply_to": None,
    }
    base.update(changes)
    return base


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def _open(world: World, raw: bytes, pid: str = UZ, **kw: Any) -> Any:
    args: dict[str, Any] = {"recipient": world.recipient(pid), "directory": world.directory}
    args["now"] = NOW
    args.update(kw)
    return open_envelope(raw, **args)


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MessageKind))
def test_round_trip_every_kind(world: World, kind: MessageKind) -> None:
    """Every message kind sealed to one recipient opens to an equal message with the same header."""
    sealed = _seal(world, kind, recipients=[UZ])
    opened = _open(world, sealed.raw)
    assert opened.message == example(kind)
    assert opened.header == sealed.header
    assert opened.header.kind is kind
    assert opened.digest == sealed.digest == hashlib.sha256(sealed.raw).hexdigest()


@pytest.mark.parametrize("kind", list(MessageKind))
def test_every_recipient_of_several_opens_every_kind(world: World, kind: MessageKind) -> None:
    """Sealed to three recipients, each of them opens the same message and an outsider cannot."""
    sealed = _seal(world, kind, recipients=[UZ, NGO, KZ])
    for pid in (UZ, NGO, KZ):
        assert _open(world, sealed.raw, pid).message == example(kind)
    with pytest.raises(NotAddressedToMe):
        _open(world, sealed.raw, KG)


def test_mixed_suites_wrap_per_recipient_key(world: World, sealed: SealedEnvelope) -> None:
    """The hybrid recipient gets an ML-KEM+X25519 wrap, the NGO an X25519 one, and both open."""
    wrapped = regions(sealed.raw).wrapped
    assert [len(r) for r in wrapped] == [1088 + 32 + 48, 32 + 48]
    assert _open(world, sealed.raw, UZ).message == _open(world, sealed.raw, NGO).message


def test_header_fields_from_seal(world: World, sealed: SealedEnvelope) -> None:
    """Seal fills the header from the message, the sender and the arguments, with a UUIDv7 id."""
    h = sealed.header
    assert (h.kind, h.schema_version, h.case, h.sender) == ("return_request", 1, CASE, KZ)
    assert h.recipients == (UZ, NGO) and h.seq == 1 and h.reply_to is None
    assert h.sent_at == NOW and sealed.id == h.id and h.id.version == 7
    assert sealed.raw[:4] == b"TRM1"


def test_verify_needs_only_the_directory(world: World, sealed: SealedEnvelope) -> None:
    """Anyone with the directory verifies origin and integrity without a decryption key."""
    verified = verify_envelope(sealed.raw, world.directory, at=NOW, amqp_user_id=KZ)
    assert verified.header == sealed.header
    assert verified.raw == sealed.raw and verified.digest == sealed.digest


def test_read_header_does_not_verify(world: World, sealed: SealedEnvelope) -> None:
    """read_header returns the header of a well-framed envelope even with a broken signature."""
    broken = _flip(sealed.raw, len(sealed.raw) - 1)
    assert read_header(broken) == sealed.header
    with pytest.raises(BadSignature):
        verify_envelope(broken, world.directory, at=NOW)


def test_envelope_ids_are_time_ordered() -> None:
    """UUIDv7 ids carry their millisecond time, so later ids sort after earlier ones."""
    first = new_envelope_id(NOW)
    later = new_envelope_id(NOW + timedelta(milliseconds=1))
    assert first.version == 7 and later.version == 7
    assert first < later
    assert first.int >> 80 == int(NOW.timestamp() * 1000)
    assert new_envelope_id(NOW) != first


def test_reply_to_and_explicit_id_are_carried(world: World) -> None:
    """reply_to and a caller-chosen envelope id appear unchanged in the opened header."""
    answered, own = new_envelope_id(NOW), new_envelope_id(NOW)
    sealed = _seal(world, MessageKind.RETURN_ACCEPTED, reply_to=answered, envelope_id=own)
    opened = _open(world, sealed.raw)
    assert opened.header.reply_to == answered and opened.header.id == own


def test_payload_is_not_in_the_clear(world: World) -> None:
    """No payload text appears in the envelope bytes; the header holds only metadata."""
    message = example(MessageKind.RETURN_REQUEST)
    sealed = _seal(world)
    header_text = sealed.header.model_dump_json()
    secrets = [v for v in _strings(json.loads(encode_payload(message))) if v not in header_text]
    assert len(secrets) > 3
    for value in secrets:
        if len(value) >= 4:
            assert value.encode() not in sealed.raw


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


# --- tampering --------------------------------------------------------------------------


def _positions(r: range) -> list[int]:
    return [r.start, r.start + len(r) // 2, r.stop - 1]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("region", ["wrapped-0", "wrapped-1", "ciphertext", "signature"])
def test_flipped_byte_fails_the_signature(
    world: World, sealed: SealedEnvelope, region: str, where: str
) -> None:
    """One flipped bit in a wrapped key, the ciphertext or the signature is a BadSignature."""
    parts = regions(sealed.raw)
    chosen = {
        "wrapped-0": parts.wrapped[0],
        "wrapped-1": parts.wrapped[1],
        "ciphertext": parts.ciphertext,
        "signature": parts.signature,
    }[region]
    index = _positions(chosen)[["first", "middle", "last"].index(where)]
    tampered = _flip(sealed.raw, index)
    with pytest.raises(BadSignature):
        _open(world, tampered)
    with pytest.raises(BadSignature):
        verify_envelope(tampered, world.directory, at=NOW)


@pytest.mark.parametrize(
    ("where", "error"),
    [("first", MalformedEnvelope), ("case", BadSignature), ("last", MalformedEnvelope)],
)
def test_flipped_header_byte(
    world: World, sealed: SealedEnvelope, where: str, error: type[TrmError]
) -> None:
    """A flip breaking the header JSON is malformed; one keeping it valid breaks the signature."""
    header = regions(sealed.raw).header
    offsets = {
        "first": header.start,
        "case": sealed.raw.index(CASE.encode()) + len(CASE) - 1,
        "last": header.stop - 1,
    }
    tampered = _flip(sealed.raw, offsets[where])
    with pytest.raises(error):
        _open(world, tampered)


def test_every_header_byte_flip_is_refused(world: World, sealed: SealedEnvelope) -> None:
    """Whatever header byte is flipped, the envelope is refused with an envelope error."""
    for index in regions(sealed.raw).header:
        with pytest.raises((MalformedEnvelope, BadSignature, UnknownSender, KeyNotValid)):
            verify_envelope(_flip(sealed.raw, index), world.directory, at=NOW)


def test_flipped_length_field_is_malformed(world: World, sealed: SealedEnvelope) -> None:
    """A changed header or ciphertext length no longer frames the envelope."""
    for index in (4, 7, regions(sealed.raw).ciphertext.start - 1):
        with pytest.raises(MalformedEnvelope):
            _open(world, _flip(sealed.raw, index))


def test_truncation_is_malformed(world: World, sealed: SealedEnvelope) -> None:
    """An envelope cut short at any offset is malformed, never read past its end."""
    for cut in [*range(0, len(sealed.raw), 13), len(sealed.raw) - 1]:
        with pytest.raises(MalformedEnvelope) as info:
            _open(world, sealed.raw[:cut])
        assert type(info.value) is MalformedEnvelope


def test_truncation_names_the_field_cut(world: World, sealed: SealedEnvelope) -> None:
    """The error names the field that runs past the end, down to the key entry."""
    wrapped = regions(sealed.raw).wrapped[0]
    header_end = regions(sealed.raw).header.stop
    cuts = {
        6: "header length",
        header_end + 1: "key entry count",
        header_end + 2: "key entry 0 recipient length",
        header_end + 4: "key entry 0 recipient id",
        wrapped.start - 1: "key entry 0 wrapped key length",
        wrapped.start + 5: "key entry 0 wrapped key",
        regions(sealed.raw).signature.start + 1: "signature",
    }
    for cut, field in cuts.items():
        with pytest.raises(MalformedEnvelope, match=f"^envelope truncated: {field} runs past"):
            _open(world, sealed.raw[:cut])


@pytest.mark.parametrize("extra", [b"\x00", b"garbage", bytes(64)])
def test_trailing_bytes_are_malformed(world: World, sealed: SealedEnvelope, extra: bytes) -> None:
    """Bytes appended after the signature make the envelope malformed."""
    with pytest.raises(MalformedEnvelope, match="trailing"):
        _open(world, sealed.raw + extra)


def test_wrong_magic_is_malformed(world: World, sealed: SealedEnvelope) -> None:
    """Bytes that do not start with TRM1 are not an envelope."""
    with pytest.raises(MalformedEnvelope, match="magic"):
        _open(world, b"TRM2" + sealed.raw[4:])


def test_oversized_is_refused_first(world: World) -> None:
    """An envelope over the 1 MiB limit is refused before any parsing."""
    with pytest.raises(EnvelopeTooLarge):
        _open(world, b"TRM1" + bytes(MAX_ENVELOPE_BYTES))
    with pytest.raises(EnvelopeTooLarge):
        read_header(bytes(MAX_ENVELOPE_BYTES + 1))


@pytest.mark.parametrize("count", [0, MAX_RECIPIENTS + 1, 0xFFFF])
def test_key_entry_count_outside_the_recipient_cap_is_refused_before_any_entry(
    world: World, sealed: SealedEnvelope, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    """A count of key entries over 32 (or none) is malformed before a single entry is read."""
    r = regions(sealed.raw)
    # The smallest key entries there are (empty ids, empty key): 4 bytes each.
    entries = struct.pack(">H", count) + bytes(4 * count)
    raw = sealed.raw[: r.header.stop] + entries + sealed.raw[r.ciphertext.start - 4 :]
    read: list[int] = []
    read_entry = envelope._read_entry

    def counting(raw: bytes, pos: int, index: int) -> tuple[Any, int]:
        read.append(index)
        return read_entry(raw, pos, index)

    monkeypatch.setattr(envelope, "_read_entry", counting)
    with pytest.raises(MalformedEnvelope, match=f"{count} key entries"):
        read_header(raw)
    assert read == []


def test_check_reports_what_verify_raises_from_one_parse(
    world: World, sealed: SealedEnvelope
) -> None:
    """`EnvelopeVerifier.check` gives the header and error `verify` would, and the digest."""
    verifier = EnvelopeVerifier(world.directory)
    good = verifier.check(sealed.raw, at=NOW)
    assert (good.header, good.error) == (sealed.header, None)
    assert good.sha256.hex() == sealed.digest
    forged = verifier.check(_flip(sealed.raw, len(sealed.raw) - 1), at=NOW)
    assert forged.header == sealed.header and isinstance(forged.error, BadSignature)
    junk = verifier.check(b"TRM2")
    assert junk.header is None and isinstance(junk.error, MalformedEnvelope)


# --- who signed -------------------------------------------------------------------------


def test_unknown_sender(world: World) -> None:
    """A header naming a participant the directory does not list is UnknownSender."""
    raw = _forge(world, _header(world, sender="iom-xx"), b"{}")
    with pytest.raises(UnknownSender):
        _open(world, raw)


def test_unknown_key(world: World) -> None:
    """A header naming a key id the sender does not have is UnknownKey."""
    raw = _forge(world, _header(world, sender_key="no-such-key"), b"{}")
    with pytest.raises(UnknownKey):
        _open(world, raw)


def test_encryption_key_id_as_signing_key_is_unknown(world: World) -> None:
    """Naming the sender's encryption key as the signing key is UnknownKey."""
    raw = _forge(world, _header(world, sender_key=next(iter(world.keys[KZ].decryption))), b"{}")
    with pytest.raises(UnknownKey):
        _open(world, raw)


def _sender_card(world: World, **changes: Any) -> Participant:
    card = world.directory.participant(KZ)
    kid = world.sender(KZ).kid
    keys = tuple(k.model_copy(update=changes) if k.kid == kid else k for k in card.keys)
    return card.model_copy(update={"keys": keys})


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"revoked_at": NOW - timedelta(seconds=1)}, RevokedKey),
        ({"revoked_at": NOW + timedelta(minutes=1)}, RevokedKey),
        ({"not_after": NOW}, ExpiredKey),
        ({"not_before": NOW + timedelta(seconds=1)}, KeyNotYetValid),
    ],
)
def test_sender_key_not_valid(
    world: World, sealed: SealedEnvelope, changes: dict[str, Any], error: type[TrmError]
) -> None:
    """A key revoked (before sending or before checking), expired or not yet valid is refused."""
    directory = world.with_cards(_sender_card(world, **changes))
    at = NOW + timedelta(minutes=2)
    with pytest.raises(error):
        open_envelope(sealed.raw, recipient=world.recipient(UZ), directory=directory, now=at)
    with pytest.raises(error):
        verify_envelope(sealed.raw, directory, at=at)


def test_auditor_accepts_envelope_received_before_revocation(
    world: World, sealed: SealedEnvelope
) -> None:
    """Checked at its receive time, an envelope stays valid after its key is later revoked."""
    directory = world.with_cards(_sender_card(world, revoked_at=NOW + timedelta(days=60)))
    verified = verify_envelope(sealed.raw, directory, at=NOW, max_age=None)
    assert verified.header == sealed.header


def test_signed_by_another_participant(world: World) -> None:
    """A header naming KZ and KZ's key but signed with UZ's key is a BadSignature."""
    other = world.keys[UZ].signing[world.sender(UZ).kid]
    payload = encode_payload(example(MessageKind.RETURN_REQUEST))
    raw = _forge(world, _header(world), payload, signer=other)
    with pytest.raises(BadSignature):
        _open(world, raw)
    with pytest.raises(BadSignature):
        verify_envelope(raw, world.directory, at=NOW)


def test_header_claiming_another_sender_than_the_signer(world: World) -> None:
    """A header naming UZ and UZ's key but signed by KZ is a BadSignature, and seal refuses it."""
    header = _header(world, sender=UZ, sender_key=world.sender(UZ).kid, recipients=[NGO])
    raw = _forge(world, header, encode_payload(example(MessageKind.RETURN_REQUEST)))
    with pytest.raises(BadSignature):
        _open(world, raw, NGO)
    mine = world.sender(KZ)
    impostor = Sender(UZ, world.sender(UZ).kid, mine.key)
    with pytest.raises(KeyNotValid, match="does not match"):
        _seal(world, sender=impostor)


def test_amqp_user_id_must_match_sender(world: World, sealed: SealedEnvelope) -> None:
    """An envelope published by another AMQP user than its signed sender is refused."""
    assert _open(world, sealed.raw, amqp_user_id=KZ).header.sender == KZ
    with pytest.raises(SenderMismatch):
        _open(world, sealed.raw, amqp_user_id=UZ)
    with pytest.raises(SenderMismatch):
        verify_envelope(sealed.raw, world.directory, at=NOW, amqp_user_id=KG)


# --- whom it is for ----------------------------------------------------------------------


def test_non_recipient_is_not_addressed(world: World, sealed: SealedEnvelope) -> None:
    """A participant not among the recipients gets NotAddressedToMe."""
    with pytest.raises(NotAddressedToMe, match="not among"):
        _open(world, sealed.raw, KG)


def test_recipient_without_the_named_key(world: World, sealed: SealedEnvelope) -> None:
    """A recipient that no longer holds the key its entry names gets NotAddressedToMe."""
    stranger = Recipient(UZ, world.keys[KG].decryption)
    with pytest.raises(NotAddressedToMe, match="does not hold"):
        open_envelope(sealed.raw, recipient=stranger, directory=world.directory, now=NOW)


def test_wrong_private_key_under_the_right_kid_fails_decryption(
    world: World, sealed: SealedEnvelope
) -> None:
    """A key id mapped to another private key cannot unwrap the content key."""
    kid = next(iter(world.keys[UZ].decryption))
    impostor = Recipient(UZ, {kid: next(iter(world.keys[KG].decryption.values()))})
    with pytest.raises(DecryptionFailed):
        open_envelope(sealed.raw, recipient=impostor, directory=world.directory, now=NOW)


def test_key_entries_must_match_header_recipients(world: World) -> None:
    """Key entries for other recipients, or in another order, than the header's are malformed."""
    payload = encode_payload(example(MessageKind.RETURN_REQUEST))
    for ids in ([NGO], [NGO, UZ], [UZ, NGO, KG], []):
        raw = _forge(world, _header(world, recipients=[UZ, NGO]), payload, entry_ids=ids)
        with pytest.raises(MalformedEnvelope, match="recipients"):
            _open(world, raw)


def test_key_wrapped_for_another_header_fails(world: World) -> None:
    """A wrapped key from a correctly signed envelope that does not unwrap is DecryptionFailed."""
    payload = encode_payload(example(MessageKind.RETURN_REQUEST))
    raw = _forge(world, _header(world), payload, corrupt_wrap=True)
    with pytest.raises(DecryptionFailed, match="content key"):
        _open(world, raw)
    verify_envelope(raw, world.directory, at=NOW)


def test_ciphertext_altered_before_signing_fails_decryption(world: World) -> None:
    """A correctly signed envelope whose ciphertext does not authenticate is DecryptionFailed."""
    payload = encode_payload(example(MessageKind.RETURN_REQUEST))
    raw = _forge(world, _header(world), payload, corrupt_ciphertext=True)
    with pytest.raises(DecryptionFailed, match="payload"):
        _open(world, raw)


def test_hand_forged_envelope_opens(world: World) -> None:
    """The test's own writer of the documented format produces envelopes seal's reader accepts."""
    payload = encode_payload(example(MessageKind.RETURN_REQUEST))
    opened = _open(world, _forge(world, _header(world), payload))
    assert opened.message == example(MessageKind.RETURN_REQUEST)


# --- what it says --------------------------------------------------------------------------


def test_payload_not_matching_schema(world: World) -> None:
    """A signed payload breaking its kind's schema is a SchemaViolation that quotes no value."""
    raw = _forge(world, _header(world), b'{"given_name":"Gulnara","nonsense":true}')
    with pytest.raises(SchemaViolation) as info:
        _open(world, raw)
    assert "Gulnara" not in str(info.value)


def test_payload_of_another_kind(world: World) -> None:
    """A valid return_request payload under a header saying case_closed is a SchemaViolation."""
    payload = encode_payload(example(MessageKind.RETURN_REQUEST))
    raw = _forge(world, _header(world, kind="case_closed"), payload)
    with pytest.raises(SchemaViolation):
        _open(world, raw)


def test_unsupported_schema_version(world: World) -> None:
    """A header naming a schema version this build does not read is a SchemaViolation."""
    payload = encode_payload(example(MessageKind.RETURN_REQUEST))
    raw = _forge(world, _header(world, schema_version=2), payload)
    with pytest.raises(SchemaViolation):
        _open(world, raw)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b"[" * 5000 + b"]" * 5000, id="deeply-nested"),
        pytest.param(b'{"a":' * 3000 + b"1" + b"}" * 3000, id="deeply-nested-object"),
        pytest.param(b"null", id="not-an-object"),
        pytest.param(b"\xef\xbb\xbf{}", id="bom"),
    ],
)
def test_header_bytes_not_a_header(world: World, header: bytes) -> None:
    """Header bytes that are not UTF-8 JSON of a header object are malformed."""
    with pytest.raises(MalformedEnvelope, match="header"):
        _open(world, _forge(world, header, b"{}", entry_ids=[UZ]))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"seq": "1"}, "seq"),
        ({"extra": 1}, "extra"),
        ({"recipients": [UZ, UZ]}, "recipients"),
        ({"sent_at": "2026-03-01T12:00:00+01:00"}, "sent_at: timezone_offset"),
        ({"sent_at": "2026-03-01T12:00:00"}, "sent_at: timezone_aware"),
        ({"case": "Gulnara Karimova"}, "case"),
        ({"v": 2}, "v"),
        ({"id": "6f1c64b2-35b3-4c5c-9d7a-8d3f1b0a0c11"}, "UUIDv7"),
    ],
)
def test_header_schema_violations_are_malformed(
    world: World, changes: dict[str, Any], field: str
) -> None:
    """A header breaking the strict schema is malformed, naming the field but not the value."""
    raw = _forge(world, _header(world, **changes), b"{}", entry_ids=[UZ])
    with pytest.raises(MalformedEnvelope, match=field) as info:
        _open(world, raw)
    assert "Gulnara" not in str(info.value)


def test_duplicate_header_keys_are_malformed(world: World) -> None:
    """A header with a key twice is malformed, whichever value a parser would pick."""
    text = json.dumps(_header(world), separators=(",", ":"))
    doubled = text[:-1] + f',"sender":"{UZ}"}}'
    with pytest.raises(MalformedEnvelope, match="JSON"):
        _open(world, _forge(world, doubled.encode(), b"{}", entry_ids=[UZ]))


# --- when ----------------------------------------------------------------------------------


def test_stale_and_future_envelopes(world: World, sealed: SealedEnvelope) -> None:
    """sent_at older than MAX_AGE or later than MAX_CLOCK_SKEW from now is StaleEnvelope."""
    second = timedelta(seconds=1)
    _open(world, sealed.raw, now=NOW + MAX_AGE)
    _open(world, sealed.raw, now=NOW - MAX_CLOCK_SKEW)
    with pytest.raises(StaleEnvelope, match="before"):
        _open(world, sealed.raw, now=NOW + MAX_AGE + second)
    with pytest.raises(StaleEnvelope, match="after"):
        _open(world, sealed.raw, now=NOW - MAX_CLOCK_SKEW - second)
    with pytest.raises(StaleEnvelope):
        verify_envelope(sealed.raw, world.directory, at=NOW + MAX_AGE + second)


def test_auditor_without_age_limit(world: World, sealed: SealedEnvelope) -> None:
    """With max_age=None an old envelope verifies, but a future one still does not."""
    later = NOW + timedelta(days=300)
    assert verify_envelope(sealed.raw, world.directory, at=later, max_age=None).header.seq == 1
    with pytest.raises(StaleEnvelope):
        verify_envelope(sealed.raw, world.directory, at=NOW - timedelta(hours=1), max_age=None)


def test_id_time_must_agree_with_sent_at(world: World) -> None:
    """An id whose UUIDv7 time is far from sent_at is a StaleEnvelope."""
    payload = encode_payload(example(MessageKind.RETURN_REQUEST))
    for shift in (timedelta(minutes=6), -timedelta(days=2)):
        header = _header(world, id=str(new_envelope_id(NOW + shift)))
        with pytest.raises(StaleEnvelope, match="id"):
            _open(world, _forge(world, header, payload))


def test_id_time_may_differ_from_sent_at_by_the_skew_and_no_more(world: World) -> None:
    """Five minutes between the id's time and sent_at pass; one millisecond more does not."""
    payload = encode_payload(example(MessageKind.RETURN_REQUEST))
    for direction in (1, -1):
        header = _header(world, id=str(new_envelope_id(NOW + direction * MAX_CLOCK_SKEW)))
        assert _open(world, _forge(world, header, payload)).header.id == UUID(header["id"])
        late = MAX_CLOCK_SKEW + timedelta(milliseconds=1)
        header = _header(world, id=str(new_envelope_id(NOW + direction * late)))
        with pytest.raises(StaleEnvelope, match="id"):
            _open(world, _forge(world, header, payload))


# --- sealing -------------------------------------------------------------------------------


def test_seal_refuses_bad_header_values(world: World) -> None:
    """Seal refuses an invalid case reference, duplicate recipients or a zero seq."""
    for kw in ({"case": "x"}, {"recipients": [UZ, UZ]}, {"seq": 0}, {"recipients": []}):
        with pytest.raises(MalformedEnvelope, match="cannot seal"):
            _seal(world, **kw)


def test_seal_refuses_hybrid_and_classical_together(world: World) -> None:
    """Sealing for a hybrid and an X25519-only recipient is refused, naming the classical one."""
    request = example(MessageKind.RETURN_REQUEST)
    args: dict[str, Any] = {
        "case": CASE,
        "sender": world.sender(KZ),
        "directory": world.directory,
        "seq": 1,
        "now": NOW,
    }
    with pytest.raises(ClassicalDowngrade, match=f"recipient '{NGO}' holds only a classical"):
        seal(request, recipients=[UZ, NGO], **args)
    with pytest.raises(ClassicalDowngrade, match="only as strong as X25519"):
        seal(request, recipients=[NGO, KG, UZ], **args)
    assert seal(request, recipients=[UZ, KG], **args).header.recipients == (UZ, KG)
    assert seal(request, recipients=[NGO], **args).header.recipients == (NGO,)


def test_seal_allows_classical_when_asked_and_both_open(world: World) -> None:
    """With allow_classical a mixed envelope seals, and the hybrid and classical one open it."""
    sealed = seal(
        example(MessageKind.RETURN_REQUEST),
        case=CASE,
        sender=world.sender(KZ),
        recipients=[UZ, NGO],
        directory=world.directory,
        seq=1,
        now=NOW,
        allow_classical=True,
    )
    for pid in (UZ, NGO):
        assert _open(world, sealed.raw, pid).message == example(MessageKind.RETURN_REQUEST)
    assert classical_recipients(world.directory, [UZ, NGO], NOW) == (NGO,)
    assert classical_recipients(world.directory, [UZ, KG], NOW) == ()
    assert classical_recipients(world.directory, [NGO], NOW) == ()


def test_seal_refuses_unknown_recipient(world: World) -> None:
    """Seal refuses a recipient the directory does not list."""
    with pytest.raises(TrmError):
        _seal(world, recipients=[UZ, "iom-xx"])


def test_seal_refuses_expired_sender_key(world: World) -> None:
    """Seal refuses to sign with a key the directory says has expired."""
    with pytest.raises(ExpiredKey):
        _seal(world, now=NOW + timedelta(days=400))


def test_sealed_envelope_id_matches_header(sealed: SealedEnvelope) -> None:
    """SealedEnvelope.id is the header's UUID."""
    assert isinstance(sealed.id, UUID) and sealed.id == sealed.header.id


# --- the signed form ---------------------------------------------------------------------


def _sign(world: World, **kw: Any) -> SealedEnvelope:
    args: dict[str, Any] = {
        "case": CASE,
        "sender": world.sender(UZ),
        "recipients": [KZ],
        "directory": world.directory,
        "seq": 1,
        "now": NOW,
    }
    args.update(kw)
    return sign(example(MessageKind.DELIVERY_RECEIPT), **args)


def _forge_signed(
    world: World, header: dict[str, Any], payload: bytes, context: bytes = SIGNED_CONTEXT
) -> bytes:
    """A signed envelope assembled by hand, signed by KZ's real key under `context`."""
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    body = b"TRS1" + struct.pack(">I", len(header_bytes)) + header_bytes
    body += struct.pack(">I", len(payload)) + payload
    return body + world.keys[KZ].signing[world.sender(KZ).kid].sign(context + body)


def _signed_receipt_header(world: World) -> dict[str, Any]:
    return _header(world, kind="delivery_receipt")


def test_a_signed_receipt_opens_verifies_and_reads_without_any_decryption_key(
    world: World,
) -> None:
    """A receipt signed, not sealed, opens for its recipient holding no decryption key at
    all, verifies for anyone with the directory, and is smaller than the sealed one."""
    signed = _sign(world)
    assert signed.raw[:4] == SIGNED_MAGIC
    keyless = Recipient(KZ, {})
    opened = open_envelope(signed.raw, recipient=keyless, directory=world.directory, now=NOW)
    assert opened.message == example(MessageKind.DELIVERY_RECEIPT)
    assert opened.header == signed.header == read_header(signed.raw)
    verified = verify_envelope(signed.raw, world.directory, at=NOW)
    assert verified.digest == signed.digest
    assert EnvelopeVerifier(world.directory).check(signed.raw, at=NOW).error is None
    sealed = _seal(world, MessageKind.DELIVERY_RECEIPT, sender=world.sender(UZ), recipients=[KZ])
    assert len(signed.raw) < len(sealed.raw) - 1000


def test_a_signed_receipt_carries_its_payload_in_the_clear(world: World) -> None:
    """What a signed envelope shows anyone is the payload's exact JSON (no personal data)."""
    signed = _sign(world)
    assert encode_payload(example(MessageKind.DELIVERY_RECEIPT)) in signed.raw


@pytest.mark.parametrize("kind", [k for k in MessageKind if k is not MessageKind.DELIVERY_RECEIPT])
def test_sign_refuses_every_kind_that_must_be_sealed(world: World, kind: MessageKind) -> None:
    with pytest.raises(NotSealed, match="must be sealed"):
        sign(
            example(kind),
            case=CASE,
            sender=world.sender(KZ),
            recipients=[UZ],
            directory=world.directory,
            seq=1,
            now=NOW,
        )


def test_a_payload_of_personal_data_signed_in_the_clear_is_refused_before_its_signature(
    world: World,
) -> None:
    """The attack: a legitimate sender signs a return request with its real key but leaves
    it unencrypted. Every reader refuses it by its kind (`not_sealed`), before any key is
    looked up, so a correct signature buys it nothing; a forged signature changes nothing."""
    forged = _forge_signed(
        world, _header(world), encode_payload(example(MessageKind.RETURN_REQUEST))
    )
    for attempt in (forged, forged[:-64] + bytes(64)):
        with pytest.raises(NotSealed) as raised:
            _open(world, attempt, UZ)
        assert raised.value.reason == "not_sealed"
        with pytest.raises(NotSealed):
            verify_envelope(attempt, world.directory, at=NOW)
        with pytest.raises(NotSealed):
            read_header(attempt)
        assert isinstance(EnvelopeVerifier(world.directory).check(attempt, at=NOW).error, NotSealed)


def test_a_signed_envelope_under_the_sealed_context_fails_its_signature(world: World) -> None:
    """The signature names the form: bytes signed as a sealed envelope never pass as signed."""
    payload = encode_payload(example(MessageKind.DELIVERY_RECEIPT))
    header = _signed_receipt_header(world)
    assert (
        _open(world, _forge_signed(world, header, payload), UZ).message.KIND == "delivery_receipt"
    )
    wrong = _forge_signed(world, header, payload, context=b"trm/v1 envelope\x00")
    with pytest.raises(BadSignature):
        _open(world, wrong, UZ)


def test_every_byte_of_a_signed_envelope_is_covered(world: World) -> None:
    """Flipping any byte of the header, the payload or the signature is refused."""
    raw = _sign(world).raw
    for index in range(8, len(raw)):
        with pytest.raises(TrmError):
            verify_envelope(_flip(raw, index), world.directory, at=NOW)


def test_a_signed_envelope_is_opened_only_by_its_recipients(world: World) -> None:
    with pytest.raises(NotAddressedToMe):
        _open(world, _sign(world).raw, KG)


@pytest.mark.parametrize("cut", [5, 9, 20, -65, -1])
def test_a_truncated_signed_envelope_is_malformed(world: World, cut: int) -> None:
    raw = _sign(world).raw
    with pytest.raises(MalformedEnvelope, match="truncated"):
        read_header(raw[:cut])


def test_trailing_bytes_after_a_signed_envelope_are_malformed(world: World) -> None:
    with pytest.raises(MalformedEnvelope, match="trailing"):
        read_header(_sign(world).raw + b"\x00")


def test_sign_refuses_an_unlisted_recipient_and_a_foreign_key(world: World) -> None:
    with pytest.raises(UnknownParticipant):
        _sign(world, recipients=["iom-xx"])
    with pytest.raises(KeyNotValid):
        _sign(world, sender=Sender(UZ, world.sender(UZ).kid, world.keys[KZ].sender(NOW).key))
