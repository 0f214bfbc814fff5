"""Linking two country brokers: RabbitMQ federation of the handoff exchange.

Each country runs its own broker; a mission connects only to its own. The
downstream broker's federation plugin consumes, from a queue it declares on
the upstream broker, every envelope published there whose routing key one of
its own bindings of ``trm.handoff`` matches (a recipient whose inbox is
local, or ``#`` where the routing service's queue is), and publishes it again
into its own ``trm.handoff``. A link each way joins two sites.

What the link is set to, and why:

- ``trust-user-id: true``: the ``user_id`` RabbitMQ validated on the upstream
  broker is kept when the envelope is published again downstream, where no
  user of that name logged in. Without it the field would be cleared and
  every inbox would quarantine the envelope (its signed sender would no
  longer match). The downstream broker thereby takes the upstream broker's
  word for who published: docs/deployment.md says what that means between
  the two operators.
- ``max-hops: 1``: an envelope crosses one link at most, so with links both
  ways it never comes back to where it was published, and an inbox or the
  routing queue never gets it a second time through the other site.
- ``ack-mode: on-confirm``: the upstream queue lets go of an envelope only
  once the downstream broker confirmed it; a link cut midway loses nothing,
  and what it delivers twice the inboxes absorb (exactly-once by envelope id).
- no ``expires`` nor ``message-ttl``: while the downstream broker is away the
  upstream queue keeps everything for it, however long.

The link's user on the upstream broker (`grant_link_user`) may only do what
federation does there: declare its exchange and queue (named
``federation: trm.handoff -> ...``), bind the queue to that exchange and that
exchange to ``trm.handoff`` (write on its own names, read on
``trm.handoff``), and consume its queue. It may publish nothing anywhere,
and read no participant's queue.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from broker.errors import ConfigError, ProvisioningError
from broker.management import ManagementClient
from broker.topology import EXCHANGE, Permissions

MAX_HOPS = 1
POLICY_PRIORITY = 10
_LINK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_FEDERATION_PREFIX = f"federation: {EXCHANGE} -> "


def link_permissions() -> Permissions:
    """What the link's user may do on the upstream vhost: federation's own names, no more."""
    own = "^" + re.escape(_FEDERATION_PREFIX) + ".*"
    return Permissions(configure=own, write=own, read=f"^{re.escape(EXCHANGE)}$|{own}")


def grant_link_user(management: ManagementClient, vhost: str, user: str, password: str) -> None:
    """On the upstream broker: the link's user with `link_permissions` on `vhost` (idempotent).

    The user holds no tags: it cannot log in to the management API.
    """
    _check_name(user, "link user")
    if not management.vhost_exists(vhost):
        raise ConfigError(
            f"the upstream broker has no vhost {vhost!r}: provision it first (trm broker provision)"
        )
    management.put_user(user, password)
    allowed = link_permissions()
    management.set_permissions(
        vhost, user, configure=allowed.configure, write=allowed.write, read=allowed.read
    )


@dataclass(frozen=True)
class LinkStatus:
    """One federation link as the downstream broker reports it."""

    upstream: str
    status: str
    node: str
    error: str


def link(
    management: ManagementClient,
    vhost: str,
    name: str,
    upstream_uri: str,
    *,
    max_hops: int = MAX_HOPS,
) -> None:
    """On the downstream broker: federate ``trm.handoff`` of `vhost` from `upstream_uri`.

    `name` names the upstream (the other site). `upstream_uri` is
    ``amqp://LINK-USER:PASSWORD@host:port/VHOST`` (several, comma-separated,
    for the nodes of an upstream cluster). Idempotent; the exchange must be
    provisioned.
    """
    _check_name(name, "upstream name")
    uris = [part.strip() for part in upstream_uri.split(",") if part.strip()]
    if not uris:
        raise ConfigError("--upstream-uri is empty: give amqp://LINK-USER:PASSWORD@host:5672/VHOST")
    for uri in uris:
        parts = urlsplit(uri)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname or not parts.username:
            raise ConfigError(
                "--upstream-uri must look like amqp://LINK-USER:PASSWORD@host:5672/VHOST, "
                f"got scheme {parts.scheme!r}"
            )
    if (
        management.request("GET", f"/exchanges/{quote(vhost, safe='')}/{EXCHANGE}", missing_ok=True)
        is None
    ):
        raise ConfigError(
            f"the downstream broker has no exchange {EXCHANGE} on vhost {vhost!r}: "
            "provision it first (trm broker provision)"
        )
    value: dict[str, Any] = {
        "uri": uris if len(uris) > 1 else uris[0],
        "exchange": EXCHANGE,
        "trust-user-id": True,
        "max-hops": max_hops,
        "ack-mode": "on-confirm",
    }
    vhost_part = quote(vhost, safe="")
    management.request(
        "PUT",
        f"/parameters/federation-upstream/{vhost_part}/{quote(name, safe='')}",
        {"value": value},
    )
    management.request(
        "PUT",
        f"/policies/{vhost_part}/{quote(policy_name(name), safe='')}",
        {
            "pattern": f"^{re.escape(EXCHANGE)}$",
            "definition": {"federation-upstream": name},
            "apply-to": "exchanges",
            "priority": POLICY_PRIORITY,
        },
    )


def policy_name(upstream: str) -> str:
    """The name of the policy that federates the handoff exchange from `upstream`."""
    return f"trm-federation-{upstream}"


def unlink(management: ManagementClient, vhost: str, name: str) -> None:
    """Remove the upstream `name` and its policy (the upstream's queue stays there)."""
    vhost_part = quote(vhost, safe="")
    management.request(
        "DELETE", f"/policies/{vhost_part}/{quote(policy_name(name), safe='')}", missing_ok=True
    )
    management.request(
        "DELETE",
        f"/parameters/federation-upstream/{vhost_part}/{quote(name, safe='')}",
        missing_ok=True,
    )


def link_status(management: ManagementClient, vhost: str) -> list[LinkStatus]:
    """The federation links of `vhost` on this (downstream) broker, e.g. ``running``."""
    try:
        found = management.request(
            "GET", f"/federation-links/{quote(vhost, safe='')}", missing_ok=True
        )
    except ProvisioningError as e:
        raise ConfigError(
            f"{e}; is the rabbitmq_federation_management plugin enabled on this broker?"
        ) from e
    if found is None:
        raise ConfigError(
            "the management API has no federation links page: enable the "
            "rabbitmq_federation and rabbitmq_federation_management plugins"
        )
    return [
        LinkStatus(
            upstream=str(item.get("upstream", "")),
            status=str(item.get("status", "")),
            node=str(item.get("node", "")),
            error=str(item.get("error", "")),
        )
        for item in found
        if item.get("exchange") == EXCHANGE
    ]


def _check_name(name: str, what: str) -> None:
    if not _LINK_NAME.fullmatch(name):
        raise ConfigError(
            f"{what} {name!r} is not valid (lower-case letters, digits and '-', 2 to 63 characters)"
        )
