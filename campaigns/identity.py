"""The identity and authorisation matrix: every participant tries to act as every other.

For every ordered pair (a, b) of participants, a tries to read b's queue and
to publish as b (RabbitMQ must refuse both), to sign as b (the receiver must
refuse the signature), to send after its own key's revocation (refused as
revoked) and to hand b a directory with a lower serial (refused as a
rollback). Every attempt must be refused with its own reason.

Participant ids carry a per-run suffix (``iom-kz-1a2b3c``) because RabbitMQ
users are global to the broker: two runs, or a run beside the test suite,
must not reset each other's passwords.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.directory import (
    DirectoryBody,
    Role,
    install_directory,
    load_directory,
    revoke_key,
    sign_directory,
)
from broker.envelope import Recipient, open_envelope, seal, verify_envelope
from broker.errors import TrmError
from broker.keys import (
    ParticipantKeys,
    init_authority,
    init_participant,
    load_authority,
    load_keys,
    pin_authority,
    read_pinned_authority,
)
from broker.management import ManagementClient
from broker.topology import inbox_queue, provision
from broker.transport import AmqpSettings, Consumer, Outgoing, Publisher
from campaigns.hostile import forge, header_dict
from campaigns.report import Row
from schemas.base import MessageKind
from schemas.examples import example
from schemas.registry import encode_payload

PARTICIPANTS: tuple[tuple[str, Role, str, str | None], ...] = (
    ("iom-kz", Role.MISSION, "KZ", None),
    ("iom-uz", Role.MISSION, "UZ", None),
    ("ngo-uz-istiqbolli-avlod", Role.NGO, "UZ", "iom-uz"),
    ("routing", Role.ROUTING, "AT", None),
)
EXPECTED = {
    "read_other_queue": "access_refused",
    "publish_as_other": "access_refused",
    "sign_as_other": "bad_signature",
    "send_after_revocation": "revoked_key",
    "install_lower_serial": "directory_rollback",
}
"""Each attempt and the reason it must be refused with."""
ACCEPTED = "ACCEPTED"
_READ_GIVE_UP = 5.0


@dataclass(frozen=True)
class World:
    """Participants with key folders and homes, the directory at serial 1 and serial 2."""

    ids: dict[str, str]
    """Base name (``iom-kz``) to this run's participant id."""
    keys: dict[str, ParticipantKeys]
    homes: dict[str, Path]
    serial1: bytes
    serial2: bytes
    """Serial 2 revokes every participant's signing key one minute before `now`."""
    now: datetime


def build_world(root: Path, now: datetime | None = None) -> World:
    """Key folders, an authority, and directories at serial 1 and 2 (installed in every home)."""
    moment = now or datetime.now(UTC)
    suffix = secrets.token_hex(3)
    ids = {base: f"{base}-{suffix}" for base, *_ in PARTICIPANTS}
    init_authority(root / "authority")
    authority = load_authority(root / "authority")
    cards = []
    for base, role, country, parent in PARTICIPANTS:
        cards.append(
            init_participant(
                root / ids[base],
                participant_id=ids[base],
                role=role,
                country=country,
                parent=ids[parent] if parent else None,
                now=moment - timedelta(days=1),
            )
        )
    body = DirectoryBody(serial=1, issued_at=moment, participants=tuple(cards))
    revoked = body
    for card in cards:
        kid = next(k.kid for k in card.keys if k.use == "sign")
        revoked = revoke_key(revoked, card.id, kid, at=moment - timedelta(minutes=1), now=moment)
    revoked = revoked.model_copy(update={"serial": 2})
    serial1, serial2 = sign_directory(body, authority), sign_directory(revoked, authority)
    homes = {}
    for base in ids:
        home = root / ids[base]
        pin_authority(home, root / "authority" / "authority.pub")
        install_directory(serial2, home)
        homes[base] = home
    keys = {base: load_keys(root / ids[base]) for base in ids}
    return World(ids, keys, homes, serial1, serial2, moment)


def _attempt(action: Callable[..., object], *args: Any) -> str:
    """The reason `action(*args)` was refused with, or ACCEPTED."""
    try:
        action(*args)
    except TrmError as e:
        return e.reason
    return ACCEPTED


class _Broker:
    """The run's vhost with every participant provisioned as a RabbitMQ user."""

    def __init__(self, world: World, amqp_url: str, management_url: str) -> None:
        self.management = ManagementClient(management_url)
        self.amqp_url = amqp_url
        self.vhost = f"trm-identity-{secrets.token_hex(4)}"
        self.passwords = {pid: secrets.token_urlsafe(16) for pid in world.ids.values()}
        roles = {world.ids[base]: str(role) for base, role, *_ in PARTICIPANTS}
        provision(
            self.management,
            amqp_url,
            self.vhost,
            list(roles.items()),
            passwords=self.passwords,
        )

    def settings(self, participant: str) -> AmqpSettings:
        return AmqpSettings.from_url(
            self.amqp_url,
            vhost=self.vhost,
            username=participant,
            password=self.passwords[participant],
        )

    def read(self, reader: str, owner: str) -> None:
        stop = threading.Event()
        timer = threading.Timer(_READ_GIVE_UP, stop.set)
        timer.start()
        consumer = Consumer(self.settings(reader), inbox_queue(owner))
        try:
            consumer.run(lambda _delivery: None, stop)
        finally:
            timer.cancel()
            consumer.close()

    def publish_as(self, publisher: str, claimed: str, body: bytes) -> None:
        connection = Publisher(self.settings(publisher), claimed)
        try:
            connection.publish([Outgoing("identity-probe", (publisher,), body)], timeout=10)
        finally:
            connection.close()

    def close(self) -> None:
        self.management.delete_vhost(self.vhost)
        for user in self.passwords:
            self.management.delete_user(user)


def _sign_as(world: World, a: str, b: str) -> None:
    """a makes an envelope claiming to come from b, signed with a's own key, for a third."""
    third = next(base for base in world.ids if base not in (a, b))
    directory = load_directory(world.serial1, authority=_authority(world))
    header = header_dict(
        sender=world.ids[b],
        sender_key=world.keys[b].sender(world.now).kid,
        recipients=(world.ids[third],),
        case="iom-kz.KZ-2026-7001",
        sent_at=world.now,
    )
    body = forge(
        directory,
        header,
        encode_payload(example(MessageKind.RETURN_REQUEST)),
        signer=world.keys[a].sender(world.now).key,
        now=world.now,
    )
    recipient = Recipient(world.ids[third], world.keys[third].decryption)
    open_envelope(body, recipient=recipient, directory=directory, now=world.now)


def _after_revocation(world: World, a: str, b: str) -> None:
    """a seals with the directory it still holds; b opens with the one revoking a's key."""
    old = load_directory(world.serial1, authority=_authority(world))
    sealed = seal(
        example(MessageKind.RETURN_REQUEST),
        case="iom-kz.KZ-2026-7002",
        sender=world.keys[a].sender(world.now),
        recipients=(world.ids[b],),
        directory=old,
        seq=1,
        now=world.now,
    )
    current = load_directory(world.serial2, authority=_authority(world))
    recipient = Recipient(world.ids[b], world.keys[b].decryption)
    open_envelope(sealed.raw, recipient=recipient, directory=current, now=world.now)


def _authority(world: World) -> Ed25519PublicKey:
    return read_pinned_authority(next(iter(world.homes.values())) / "authority.pub")


def run_identity(root: Path, amqp_url: str, management_url: str) -> Row:
    """Run every attempt for every ordered pair; the row holds the matrix counts."""
    world = build_world(root)
    broker = _Broker(world, amqp_url, management_url)
    outcomes: dict[str, Counter[str]] = {attempt: Counter() for attempt in EXPECTED}
    try:
        for a, b in itertools.permutations(world.ids, 2):
            pa, pb = world.ids[a], world.ids[b]
            tally = outcomes.__getitem__
            tally("read_other_queue")[_attempt(broker.read, pa, pb)] += 1
            tally("publish_as_other")[_attempt(broker.publish_as, pa, pb, b"probe")] += 1
            tally("sign_as_other")[_attempt(_sign_as, world, a, b)] += 1
            # The routing service (no decryption) checks the forged origin too.
            tally("sign_as_other")[_attempt(_verify_forged, world, a, b)] += 1
            tally("send_after_revocation")[_attempt(_after_revocation, world, a, b)] += 1
            tally("install_lower_serial")[
                _attempt(install_directory, world.serial1, world.homes[b])
            ] += 1
    finally:
        broker.close()
    return _row(outcomes, len(world.ids))


def _verify_forged(world: World, a: str, b: str) -> None:
    directory = load_directory(world.serial1, authority=_authority(world))
    header = header_dict(
        sender=world.ids[b],
        sender_key=world.keys[b].sender(world.now).kid,
        recipients=(world.ids[a],),
        case="iom-kz.KZ-2026-7003",
        sent_at=world.now,
    )
    body = forge(
        directory, header, b"{}", signer=world.keys[a].sender(world.now).key, now=world.now
    )
    verify_envelope(body, directory, at=world.now)


def _row(outcomes: dict[str, Counter[str]], participants: int) -> Row:
    row = Row("identity")
    row.messages = sum(sum(c.values()) for c in outcomes.values())
    row.faults = row.messages
    for attempt, counts in outcomes.items():
        expected = EXPECTED[attempt]
        row.add_reasons(counts)
        row.figures[attempt] = f"{counts[expected]}/{sum(counts.values())} refused"
        row.must(
            f"every {attempt} attempt is refused as {expected}",
            set(counts) == {expected},
        )
    row.ok = sum(counts[EXPECTED[a]] for a, counts in outcomes.items())
    row.figures["participants"] = participants
    row.figures["ordered_pairs"] = participants * (participants - 1)
    return row
