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
- write ``^trm\\.(handoff|quarantine)$``: publish envelopes and quarantine
  records. The default exchange (``amq.default``) is not writable, so X
  cannot drop a message straight into another participant's queue.
- read ``^trm\\.(inbox|quarantine)\\.X$`` (the routing participant also
  ``^trm\\.routing$``): consume (and purge) its own queues only.

Dead-lettering from an inbox to the quarantine is done by the broker itself
and needs no user permission.
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
)

if TYPE_CHECKING:
    from broker.management import ManagementClient
    from broker.transport import AmqpSettings

EXCHANGE = "trm.handoff"
QUARANTINE_EXCHANGE = "trm.quarantine"
ROUTING_QUEUE = "trm.routing"
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

_PARTICIPANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_log = structlog.get_logger(__name__)


def inbox_queue(participant_id: str) -> str:
    """The name of ``participant_id``'s inbox queue."""
    return f"trm.inbox.{participant_id}"


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
    read = rf"^trm\.(inbox|quarantine)\.{me}$"
    if str(role) == ROUTING_ROLE:
        read += rf"|^{re.escape(ROUTING_QUEUE)}$"
    return Permissions(configure="^$", write=r"^trm\.(handoff|quarantine)$", read=read)


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
) -> list[str]:
    """Declare the exchanges, queues and bindings over AMQP; the queue names.

    ``settings`` must carry a user with configure permission on the vhost;
    a participant's own credentials get `AccessRefused`.
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
        for participant_id, _role in participants:
            quarantine = quarantine_queue(participant_id)
            channel.queue_declare(quarantine, durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_bind(quarantine, QUARANTINE_EXCHANGE, routing_key=participant_id)
            inbox = inbox_queue(participant_id)
            channel.queue_declare(
                inbox, durable=True, arguments=queue_arguments(participant_id, delivery_limit)
            )
            channel.queue_bind(inbox, EXCHANGE, routing_key=participant_id)
            queues += [inbox, quarantine]
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


def _password(
    participant_id: str,
    passwords: Mapping[str, str],
    keys_root: Path | None,
    written: list[Path],
) -> str | None:
    """The participant's password: given, else from its file, else new and written."""
    if participant_id in passwords:
        return passwords[participant_id]
    if keys_root is None:
        return None
    path = keys_root / participant_id / PASSWORD_FILE
    try:
        if path.exists():
            secret = path.read_text(encoding="utf-8").strip()
            if not secret:
                raise KeyFileError(f"{path} is empty: delete it to have a new password made")
            return secret
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secret + "\n")
    except OSError as e:
        raise KeyFileError(f"cannot read or write {path}: {e.strerror}") from e
    written.append(path)
    return secret


def provision(
    management: ManagementClient,
    amqp_url: str,
    vhost: str,
    participants: Sequence[tuple[str, str]],
    *,
    keys_root: Path | None = None,
    passwords: Mapping[str, str] | None = None,
    delivery_limit: int = DELIVERY_LIMIT,
) -> ProvisionResult:
    """Create the vhost, users, permissions, exchanges, queues and bindings.

    ``participants`` are (id, role) pairs. A password comes from
    ``passwords``, else ``keys_root/<id>/amqp-password``, else is generated
    and written there (mode 0600). An existing user whose password is known
    from neither is left as it is. Idempotent.
    """
    from broker.transport import AmqpSettings

    _check_ids(participants)
    admin = AmqpSettings.from_url(amqp_url, vhost=vhost)
    management.create_vhost(vhost)
    management.set_permissions(vhost, admin.username, configure=".*", write=".*", read=".*")
    created: list[str] = []
    written: list[Path] = []
    for participant_id, role in participants:
        existed = management.get_user(participant_id) is not None
        secret = _password(participant_id, passwords or {}, keys_root, written)
        if secret is None and not existed:
            raise ConfigError(
                f"no password for new RabbitMQ user {participant_id!r}: give --keys-root "
                f"or --password {participant_id}=SECRET"
            )
        if secret is not None:
            management.put_user(participant_id, secret)
        if not existed:
            created.append(participant_id)
        allowed = permissions_for(participant_id, role)
        management.set_permissions(
            vhost,
            participant_id,
            configure=allowed.configure,
            write=allowed.write,
            read=allowed.read,
        )
    try:
        queues = declare(admin, participants, delivery_limit=delivery_limit)
    except TrmError:
        _log.error("provisioning failed", vhost=vhost)
        raise
    _log.info("provisioned", vhost=vhost, users_created=created, queues=len(queues))
    return ProvisionResult(users_created=created, queues=queues, passwords_written=written)
