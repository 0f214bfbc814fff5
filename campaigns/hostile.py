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
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import _crypto
from broker.directory import Directory
from broker.envelope import (
    MAX_ENVELOPE_BYTES,
    SIGNED_CONTEXT,
    SealedEnvelope,
    new_envelope_id,
    seal,
)
from broker.errors import EnvelopeError, TrmError
from broker.keys import ParticipantKeys, load_keys
from broker.topology import inbox_queue
from broker.transport import AmqpSettings, Outgoing, Publisher
from campaigns.checker import RECEIPT_KIND, inbox_ids, outbox_count, quarantine_rows
from campaigns.network import KZ, NGO, UZ, Services, scratch_network
from campaigns.report import Row
from schemas.base import MessageKind
from schemas.examples import example
from schemas.registry import encode_payload
from trm.localnet import LocalNetwork

ADMIN = None
"""`publish_as` of an envelope injected by the broker's administrator (no participant)."""

OPENING_SEQ = 1
"""The number of the stream's first valid envelope: the return request that opens the case."""
VALID_KINDS = (MessageKind.TRAVEL_ARRANGED, MessageKind.REINTEGRATION_UPDATE)
"""The kinds of the valid envelopes after the opening: kinds the case's owner may send again."""


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
    case: str = "iom-kz.KZ-2026-9001"

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
    """A valid envelope from the cast's sender to its target, the case's opening if `seq` is 1."""
    kind = MessageKind.RETURN_REQUEST if seq == OPENING_SEQ else VALID_KINDS[seq % len(VALID_KINDS)]
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
        return Hostile(
            "schema_violation", body, frozenset({"schema_violation"}), self.cast.sender_id
        )

    def oversize(self) -> Hostile:
        body = self.base + self.rng.randbytes(MAX_ENVELOPE_BYTES + 1 - len(self.base))
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
        data = bytearray(seal_valid(self.cast, self._next()).raw)
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

    def no_user_id(self) -> Hostile:
        # A valid envelope of the sender, injected by the administrator without a user id.
        body = seal_valid(self.cast, self._next()).raw
        return Hostile("no_user_id", body, frozenset({"no_user_id"}), ADMIN)

    def unknown_sender(self) -> Hostile:
        body = self._signed(self._header(sender="iom-xx"), self._payload())
        return Hostile("unknown_sender", body, frozenset({"unknown_sender"}), ADMIN)

    def not_addressed(self) -> Hostile:
        header = self._header(recipients=(self.cast.third.card.id,))
        body = self._signed(header, self._payload())
        expected = frozenset({"not_addressed_to_me"})
        return Hostile("not_addressed", body, expected, self.cast.sender_id)

    def unsealed(self) -> Hostile:
        # The sender's own key signs a return request in the signed form, payload in the clear.
        header_bytes = json.dumps(self._header(), separators=(",", ":")).encode()
        payload = self._payload()
        body = b"TRS1" + struct.pack(">I", len(header_bytes)) + header_bytes
        body += struct.pack(">I", len(payload)) + payload
        _, key = self.cast.signing_key(self.cast.sender)
        body += _crypto.sign(key, SIGNED_CONTEXT + body)
        return Hostile("not_sealed", body, frozenset({"not_sealed"}), self.cast.sender_id)

    def garbage(self) -> Hostile:
        body = self.rng.randbytes(self.rng.randint(0, 2048))
        if self.rng.random() < 0.5:
            body = self.rng.choice([b"TRM1", b"TRS1"]) + body
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
    "no_user_id",
    "unknown_sender",
    "not_addressed",
    "unsealed",
    "garbage",
)
OVERSIZE_EVERY = 100
"""One oversize envelope (1 MiB + 1 byte) per this many hostile ones: they are costly to publish."""


def hostile_stream(
    cast: Cast, hostile: int, *, valid_every: int = 4, seed: int = 0
) -> list[Valid | Hostile]:
    """`hostile` hostile envelopes of every family, a valid one after every `valid_every`.

    The first valid envelope opens the cast's case, the later ones go on it.

    Every valid envelope is followed, later in the stream, by a replay: its id
    with other bytes (sealed again), which the receiver must refuse as
    ``replayed`` (counted among the hostile ones).
    """
    rng = random.Random(seed)
    maker = _Maker(cast, rng)
    items: list[Valid | Hostile] = []
    replays: list[Hostile] = []
    made = picked = 0
    seq = OPENING_SEQ - 1
    seen: set[bytes] = set()
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
            # A count of its own: taken from `made`, the slots the replays fill would
            # skip the same families every time whenever their number is even.
            family = FAMILIES[picked % len(FAMILIES)]
            picked += 1
            item: Hostile = getattr(maker, family)()
            # Identical bytes would count as a redelivery of one quarantined envelope.
            for _ in range(100):
                if hashlib.sha256(item.body).digest() not in seen:
                    break
                item = getattr(maker, family)()
            else:
                raise ValueError(f"the {family} family keeps making the same bytes")
            items.append(item)
        made += 1
        last = items[-1]
        if isinstance(last, Hostile):
            seen.add(hashlib.sha256(last.body).digest())
    return items


# --- the campaign ------------------------------------------------------------------------


def run_hostile(root: Path, services: Services, *, hostile: int, seed: int = 5) -> Row:
    """Campaign 5: `hostile` hostile envelopes interleaved with valid ones on iom-uz's queue."""
    with scratch_network(root, "sqlite", [KZ, UZ, NGO], services) as net:
        uz = net.settings(UZ)
        cast = Cast(
            directory=uz.directory(),
            sender=load_keys(net.home(KZ)),
            target=UZ,
            third=load_keys(net.home(NGO)),
            now=datetime.now(UTC),
        )
        items = hostile_stream(cast, hostile, seed=seed)
        receiver = net.start_adapter(UZ)
        started = time.monotonic()
        with _Injector(net, services) as injector:
            for i, item in enumerate(items):
                injector.publish(i, item)
        valid = [item for item in items if isinstance(item, Valid)]
        bad = [item for item in items if isinstance(item, Hostile)]
        url = net.database_url(UZ)

        def settled() -> bool:
            return len(quarantine_rows(url)) >= len(bad) and len(inbox_ids(url)) >= len(valid)

        try:
            net.wait_for(settled, 120 + 0.2 * len(items), "every envelope handled")
            finished = True
        except TimeoutError:
            finished = False
        seconds = time.monotonic() - started
        alive = receiver.poll() is None
        net.stop(receiver)
        return _hostile_row(net, valid, bad, finished, alive, seconds, hostile)


def _hostile_row(
    net: LocalNetwork,
    valid: list[Valid],
    bad: list[Hostile],
    finished: bool,
    alive: bool,
    seconds: float,
    requested: int,
) -> Row:
    url = net.database_url(UZ)
    rows = quarantine_rows(url)
    by_digest = {row.digest: row for row in rows}
    row = Row("hostile_input", "sqlite", messages=len(valid) + len(bad), faults=len(bad))
    wrong: Counter[str] = Counter()
    families: Counter[str] = Counter()
    for item in bad:
        found = by_digest.get(hashlib.sha256(item.body).hexdigest())
        families[item.family] += 1
        if found is None or found.reason not in item.expected:
            wrong[f"{item.family}:{found.reason if found else 'not quarantined'}"] += 1
    applied = inbox_ids(url)
    files = {p.stem for p in net.delivered_files(UZ)}
    valid_ids = {item.envelope_id for item in valid}
    row.quarantined = len(rows)
    row.ok = len(applied & valid_ids)
    row.lost = len(valid_ids - applied)
    row.add_reasons(r.reason for r in rows)
    row.figures.update(
        valid=len(valid),
        hostile=len(bad),
        families=len(families),
        misclassified=dict(wrong) or 0,
        seconds=round(seconds, 1),
    )
    row.must("every envelope was handled in time", finished)
    row.must(f"at least {requested} hostile envelopes", len(bad) >= requested)
    row.must("every hostile envelope quarantined with an expected reason", not wrong)
    row.must("one quarantine row per hostile envelope", len(rows) == len(bad))
    row.must("every one quarantined on first delivery", all(r.redeliveries == 0 for r in rows))
    row.must("the consumer never crashed", alive)
    row.must("inbox rows only for valid envelopes", applied == valid_ids)
    row.must("delivered files only for valid envelopes", files == valid_ids)
    row.must(
        "receipts only for valid envelopes",
        outbox_count(url, RECEIPT_KIND) == outbox_count(url) == len(valid_ids),
    )
    return row


class _Injector:
    """Publishes onto iom-uz's queue: as iom-kz through the exchange, or as the administrator."""

    def __init__(self, net: LocalNetwork, services: Services) -> None:
        self.net = net
        self.admin_settings = AmqpSettings.from_url(services.amqp_url, vhost=net.vhost)

    def __enter__(self) -> _Injector:
        self.kz = Publisher(self.net.settings(KZ).amqp_settings(), KZ)
        self.admin = pika.BlockingConnection(self.admin_settings.parameters())
        self.channel = self.admin.channel()
        self.channel.confirm_delivery()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kz.close()
        if self.admin.is_open:
            self.admin.close()

    def publish(self, index: int, item: Valid | Hostile) -> None:
        """Publish `item` as its `publish_as` says and wait for the broker's confirm."""
        if isinstance(item, Valid) or item.publish_as == KZ:
            label = item.envelope_id if isinstance(item, Valid) else f"hostile-{index}"
            self.kz.publish([Outgoing(label, (UZ,), item.body)])
            return
        user_id = self.admin_settings.username if item.publish_as == "admin" else None
        self.channel.basic_publish(
            "",
            inbox_queue(UZ),
            item.body,
            pika.BasicProperties(delivery_mode=2, user_id=user_id, message_id=f"hostile-{index}"),
            mandatory=True,
        )
