"""The names on the broker, and provisioning them from the trust directory.

See docs/architecture.md, "Names on the broker". `provision` is idempotent:
the vhost, users and permissions go through the management HTTP API
(PUTs), the exchanges, queues and bindings through AMQP declares as the
administrator; running it twice changes nothing.

Permissions of participant X on the vhost:

- configure ``^$``: nothing. Passive declares, ``basic.qos``,
  ``confirm.select`` and ``basic.consume`` need no configure permission, so
  a participant can check for and consume its queues without being able to
  create, delete or re-bind anything.
- write ``^trm\\.(handoff|quarantine|witness)$``: publish envelopes,
  quarantine records and witness messages. The default exchange
  (``amq.default``) is not writable, so X cannot drop a message straight
  into another participant's queue.
- read ``^trm\\.(inbox|quarantine|witness|proofs)\\.X$`` (the routing
  participant also ``^trm\\.routing$``): consume (and purge) its own queues
  only.

The witness exchange ``trm.witness`` (direct) routes by participant id to
``trm.witness.<id>``: the routing service's cosignature requests to each
witness's queue, the witnesses' answers to the routing participant's own.
Nothing on it is trusted for who sent it: requests carry the routing
service's signed checkpoint, answers the witness's cosignature. On the same
exchange, key ``proofs.<id>`` routes to ``trm.proofs.<id>``: membership
proof requests to the routing participant, its answers to each requester
(`services.membership`).

Dead-lettering from an inbox to the quarantine is done by the broker itself
and needs no user permission.

RabbitMQ users are broker-wide and named by participant id, so one user may
serve several vhosts (networks). Provisioning never changes a user that holds
permissions on another vhost: it leaves one whose password is already the
given one as it is, and refuses (`UserInUse`, naming the vhosts) to set
another password or drop its tags, because that would lock the other
network's participant out. Everything is checked before anything is changed.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from broker.errors import (
    AccessRefused,
    BrokerUnavailable,
    ConfigError,
    KeyFileError,
    ProvisioningError,
    TrmError,
    UserInUse,
)

if TYPE_CHECKING:
    from broker.management import ManagementClient
    from broker.transport import AmqpSettings

EXCHANGE = "trm.handoff"
QUARANTINE_EXCHANGE = "trm.quarantine"
ROUTING_QUEUE = "trm.routing"
WITNESS_EXCHANGE = "trm.witness"
DELIVERY_LIMIT = 200
"""Deliveries of one message before the broker moves it to the quarantine.

The inbox quarantines every bad envelope itself on its first delivery, so
the limit only sets aside a message that kills the consumer's process each
time. A quorum queue counts a delivery for every unacked message in the
prefetch window when a consumer dies, so the limit is in effect the number of
adapter crashes a valid message must survive: at 20, one relay-crash campaign
moved 100 valid receipts to the quarantine while their adapter crash-looped.
"""
ROUTING_ROLE = "routing"
PASSWORD_FILE = "amqp-password"  # noqa: S105 - a file name, not a secret
VHOST_FILE = "amqp-vhost"
"""The vhost a home was provisioned on, so that no command has to repeat it."""

_PARTICIPANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_log = structlog.get_logger(__name__)


def inbox_queue(participant_id: str) -> str:
    """The name of ``participant_id``'s inbox queue."""
    return f"trm.inbox.{participant_id}"


def proofs_queue(participant_id: str) -> str:
    """The queue of ``participant_id``'s membership proof requests (routing) or answers."""
    return f"trm.proofs.{participant_id}"


def proofs_key(participant_id: str) -> str:
    """The key that routes to ``participant_id``'s proofs queue on ``trm.witness``."""
    return f"proofs.{participant_id}"


def witness_queue(participant_id: str) -> str:
    """The queue of ``participant_id``'s witness messages (requests, or answers for routing)."""
    return f"trm.witness.{participant_id}"


def quarantine_queue(participant_id: str) -> str:
    """The name of ``participant_id``'s quarantine queue."""
    return f"trm.quarantine.{participant_id}"


@dataclass(frozen=True)
class Permissions:
    """A RabbitMQ user's configure/write/read regular expressions on one vhost."""

    configure: str
    write: str
    read: str


def permissions_for(participant_id: str, role: str) -> Permissions:
    """What participant ``participant_id`` (with ``role``) may do on the vhost."""
    me = re.escape(participant_id)
    read = rf"^trm\.(inbox|quarantine|witness|proofs)\.{me}$"
    if str(role) == ROUTING_ROLE:
        read += rf"|^{re.escape(ROUTING_QUEUE)}$"
    return Permissions(configure="^$", write=r"^trm\.(handoff|quarantine|witness)$", read=read)


def queue_arguments(dead_letter_key: str, delivery_limit: int) -> dict[str, object]:
    """Arguments of an inbox-like queue: quorum, delivery limit, dead-letter to quarantine."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": QUARANTINE_EXCHANGE,
        "x-dead-letter-routing-key": dead_letter_key,
    }


@dataclass(frozen=True)
class ProvisionResult:
    """What `provision` did: users it created, queues that exist, password files written."""

    users_created: list[str]
    queues: list[str]
    passwords_written: list[Path]


def _check_ids(participants: Sequence[tuple[str, str]]) -> None:
    seen: set[str] = set()
    for participant_id, _role in participants:
        if not _PARTICIPANT_ID.fullmatch(participant_id):
            raise ConfigError(
                f"participant id {participant_id!r} is not a valid id "
                "(lower-case letters, digits and '-', 2 to 63 characters)"
            )
        if participant_id in seen:
            raise ConfigError(f"participant id {participant_id!r} is listed twice")
        seen.add(participant_id)


def declare(
    settings: AmqpSettings,
    participants: Sequence[tuple[str, str]],
    *,
    delivery_limit: int = DELIVERY_LIMIT,
    routing_queue: bool = True,
) -> list[str]:
    """Declare the exchanges, queues and bindings over AMQP; the queue names.

    ``settings`` must carry a user with configure permission on the vhost;
    a participant's own credentials get `AccessRefused`. Without
    ``routing_queue`` there is no ``trm.routing`` here: a country broker
    linked to the one where the routing service runs (`broker.federation`).
    """
    import pika.exceptions

    # Imported here: transport imports this module's names.
    from broker.transport import open_connection, translate

    _check_ids(participants)
    routing_ids = [p for p, role in participants if str(role) == ROUTING_ROLE]
    routing_key = routing_ids[0] if routing_ids else ROUTING_ROLE
    queues: list[str] = []
    connection = open_connection(settings)
    try:
        channel = connection.channel()
        channel.exchange_declare(EXCHANGE, "topic", durable=True)
        channel.exchange_declare(QUARANTINE_EXCHANGE, "direct", durable=True)
        channel.exchange_declare(WITNESS_EXCHANGE, "direct", durable=True)
        for participant_id, _role in participants:
            quarantine = quarantine_queue(participant_id)
            channel.queue_declare(quarantine, durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_bind(quarantine, QUARANTINE_EXCHANGE, routing_key=participant_id)
            inbox = inbox_queue(participant_id)
            channel.queue_declare(
                inbox, durable=True, arguments=queue_arguments(participant_id, delivery_limit)
            )
            channel.queue_bind(inbox, EXCHANGE, routing_key=participant_id)
            witness = witness_queue(participant_id)
            channel.queue_declare(witness, durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_bind(witness, WITNESS_EXCHANGE, routing_key=participant_id)
            proofs = proofs_queue(participant_id)
            channel.queue_declare(proofs, durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_bind(proofs, WITNESS_EXCHANGE, routing_key=proofs_key(participant_id))
            queues += [inbox, quarantine, witness, proofs]
        if routing_queue:
            channel.queue_declare(
                ROUTING_QUEUE, durable=True, arguments=queue_arguments(routing_key, delivery_limit)
            )
            channel.queue_bind(ROUTING_QUEUE, EXCHANGE, routing_key="#")
            queues.append(ROUTING_QUEUE)
    except (pika.exceptions.AMQPError, OSError) as e:
        error = translate(e, settings, "declaring the topology")
        if isinstance(error, AccessRefused | BrokerUnavailable | ProvisioningError):
            raise error from e
        raise ProvisioningError(
            f"{error}; a queue exists with other arguments: delete it (losing its messages) "
            "or provision with the arguments it has"
        ) from e
    finally:
        if connection.is_open:
            connection.close()
    return sorted(queues)


def queue_depths(settings: AmqpSettings, queues: Sequence[str]) -> dict[str, int]:
    """Exact ready-message counts of ``queues`` now, by passive declare over AMQP."""
    return {name: messages for name, (messages, _) in _queue_counts(settings, queues).items()}


def queue_consumers(settings: AmqpSettings, queues: Sequence[str]) -> dict[str, int]:
    """Exact consumer counts of ``queues`` now (the management API's lag by seconds)."""
    return {name: consumers for name, (_, consumers) in _queue_counts(settings, queues).items()}


def _queue_counts(settings: AmqpSettings, queues: Sequence[str]) -> dict[str, tuple[int, int]]:
    import pika.exceptions

    from broker.transport import open_connection, translate

    connection = open_connection(settings)
    try:
        channel = connection.channel()
        counts = {}
        for name in queues:
            method = channel.queue_declare(name, passive=True).method
            counts[name] = (int(method.message_count), int(method.consumer_count))
        return counts
    except (pika.exceptions.AMQPError, OSError) as e:
        raise translate(e, settings, "counting queue messages and consumers") from e
    finally:
        if connection.is_open:
            connection.close()


@dataclass(frozen=True)
class _UserPlan:
    """What provisioning does to one participant's RabbitMQ user."""

    participant_id: str
    role: str
    password: str | None
    """The password to set, or None to leave the user as it is."""
    created: bool
    new_file: Path | None
    """Where a generated password is to be written (mode 0600) before it is set."""


def _known_password(
    participant_id: str, passwords: Mapping[str, str], keys_root: Path | None
) -> str | None:
    """The participant's password given, else read from its file; None when neither."""
    if participant_id in passwords:
        return passwords[participant_id]
    if keys_root is None:
        return None
    path = keys_root / participant_id / PASSWORD_FILE
    try:
        if not path.exists():
            return None
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror}") from e
    if not secret:
        raise KeyFileError(f"{path} is empty: delete it to have a new password made")
    return secret


def write_vhost(home: Path, vhost: str) -> None:
    """Record in `home` the vhost it is provisioned on (replaced atomically)."""
    path = home / VHOST_FILE
    tmp = home / f".{VHOST_FILE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(vhost + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise KeyFileError(f"cannot write {path}: {e.strerror}") from e


def read_vhost(home: Path) -> str | None:
    """The vhost `home` was provisioned on, if recorded."""
    try:
        recorded = (home / VHOST_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KeyFileError(f"cannot read {home / VHOST_FILE}: {e.strerror}") from e
    return recorded or None


def _write_password(path: Path, secret: str) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secret + "\n")
    except OSError as e:
        raise KeyFileError(f"cannot write {path}: {e.strerror}") from e


def _unchanged(user: Mapping[str, object], password: str) -> bool:
    """Whether putting ``password`` and no tags would leave ``user`` exactly as it is."""
    from broker.management import password_matches

    return user.get("tags") in ("", []) and password_matches(dict(user), password)


def _plan_user(
    management: ManagementClient,
    vhost: str,
    participant: tuple[str, str],
    passwords: Mapping[str, str],
    keys_root: Path | None,
) -> _UserPlan:
    participant_id, role = participant
    user = management.get_user(participant_id)
    secret = _known_password(participant_id, passwords, keys_root)
    new_file = None
    if secret is None and keys_root is not None:
        secret = secrets.token_urlsafe(32)
        new_file = keys_root / participant_id / PASSWORD_FILE
    if user is None:
        if secret is None:
            raise ConfigError(
                f"no password for new RabbitMQ user {participant_id!r}: give --keys-root "
                f"or --password {participant_id}=SECRET"
            )
        return _UserPlan(participant_id, role, secret, True, new_file)
    if secret is None or _unchanged(user, secret):
        return _UserPlan(participant_id, role, None, False, None)
    _refuse_if_shared(management, vhost, participant_id)
    return _UserPlan(participant_id, role, secret, False, new_file)


def _refuse_if_shared(management: ManagementClient, vhost: str, participant_id: str) -> None:
    others = tuple(v for v in management.user_vhosts(participant_id) if v != vhost)
    if not others:
        return
    names = ", ".join(repr(v) for v in others)
    raise UserInUse(
        f"RabbitMQ user {participant_id!r} also holds permissions on vhost {names}: "
        f"provisioning vhost {vhost!r} would change its password (or tags) and lock that "
        f"network's {participant_id!r} out. Nothing was changed. Give the password that "
        f"user has (--password {participant_id}=SECRET or "
        f"KEYS_ROOT/{participant_id}/{PASSWORD_FILE}), or give this network other "
        "participant ids; RabbitMQ users are broker-wide",
        participant_id,
        others,
    )


def provision(
    management: ManagementClient,
    amqp_url: str,
    vhost: str,
    participants: Sequence[tuple[str, str]],
    *,
    keys_root: Path | None = None,
    passwords: Mapping[str, str] | None = None,
    delivery_limit: int = DELIVERY_LIMIT,
    routing_queue: bool = True,
) -> ProvisionResult:
    """Create the vhost, users, permissions, exchanges, queues and bindings.

    ``routing_queue`` False leaves out ``trm.routing`` (see `declare`).

    ``participants`` are (id, role) pairs. A password comes from
    ``passwords``, else ``keys_root/<id>/amqp-password``, else is generated
    and written there (mode 0600). An existing user whose password is known
    from neither, or already is the one known, is left as it is. A user that
    would change while it holds permissions on another vhost is refused with
    `UserInUse` before anything is created. Idempotent.
    """
    from broker.transport import AmqpSettings

    _check_ids(participants)
    admin = AmqpSettings.from_url(amqp_url, vhost=vhost)
    with management.users_held():  # no removal of a shared user between plan and grant
        plans = [
            _plan_user(management, vhost, participant, passwords or {}, keys_root)
            for participant in participants
        ]
        management.create_vhost(vhost)
        management.set_permissions(vhost, admin.username, configure=".*", write=".*", read=".*")
        for plan in plans:
            _apply(management, vhost, plan)
    created = [plan.participant_id for plan in plans if plan.created]
    written = [plan.new_file for plan in plans if plan.new_file is not None]
    if keys_root is not None:
        for participant_id, _role in participants:
            if (keys_root / participant_id).is_dir():
                write_vhost(keys_root / participant_id, vhost)
    try:
        queues = declare(
            admin, participants, delivery_limit=delivery_limit, routing_queue=routing_queue
        )
    except TrmError:
        _log.error("provisioning failed", vhost=vhost)
        raise
    _log.info("provisioned", vhost=vhost, users_created=created, queues=len(queues))
    return ProvisionResult(users_created=created, queues=queues, passwords_written=written)


def _apply(management: ManagementClient, vhost: str, plan: _UserPlan) -> None:
    """Write the plan's new password file, put the user if it changes, set its permissions."""
    if plan.password is not None:
        if plan.new_file is not None:
            _write_password(plan.new_file, plan.password)
        management.put_user(plan.participant_id, plan.password)
    allowed = permissions_for(plan.participant_id, plan.role)
    management.set_permissions(
        vhost,
        plan.participant_id,
        configure=allowed.configure,
        write=allowed.write,
        read=allowed.read,
    )
