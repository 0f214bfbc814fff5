"""``trm broker``: provision RabbitMQ from the trust directory, show queue depths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from broker.management import DEFAULT_MANAGEMENT_URL, ManagementClient
from broker.topology import DELIVERY_LIMIT, ROUTING_ROLE, provision
from broker.transport import DEFAULT_AMQP_URL, AmqpSettings

_EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _pairs(pairs: tuple[str, ...], hint: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for pair in pairs:
        participant_id, sep, value = pair.partition("=")
        if not sep or not participant_id or not value:
            raise click.BadParameter(f"give {hint}", param_hint=hint.split()[0])
        found[participant_id] = value
    return found


def _read_secret(path: Path, what: str) -> str:
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror}", param_hint=what) from e
    if not secret:
        raise click.BadParameter(f"{path} is empty", param_hint=what)
    return secret


def _passwords(inline: tuple[str, ...], files: tuple[str, ...]) -> dict[str, str]:
    """Passwords given as ID=SECRET, and as ID=FILE (Docker secrets), the files read."""
    found = _pairs(inline, "--password ID=SECRET")
    for participant_id, path in _pairs(files, "--password-file ID=FILE").items():
        found[participant_id] = _read_secret(Path(path), "--password-file")
    return found


def _url(given: str, env_file: str) -> str:
    """`given`, unless the environment names a file holding the URL (credentials in it)."""
    path = os.environ.get(env_file)
    return _read_secret(Path(path), env_file) if path else given


@click.group()
def broker() -> None:
    """RabbitMQ: provision users, permissions and queues; show queue depths."""


@broker.command("provision")
@click.option(
    "--directory",
    "directory_file",
    type=_EXISTING_FILE,
    required=True,
    help="The signed trust directory (directory.json).",
)
@click.option(
    "--authority-key",
    type=_EXISTING_FILE,
    required=True,
    help="The directory authority's public key (authority.pub).",
)
@click.option(
    "--vhost",
    envvar="TRM_AMQP_VHOST",
    default=None,
    help="RabbitMQ vhost [TRM_AMQP_VHOST; default: from the AMQP URL, else /].",
)
@click.option(
    "--amqp-url",
    envvar="TRM_AMQP_URL",
    default=DEFAULT_AMQP_URL,
    show_default=True,
    help="AMQP URL of an administrator [TRM_AMQP_URL, or a file named by TRM_AMQP_URL_FILE].",
)
@click.option(
    "--management-url",
    envvar="TRM_AMQP_MANAGEMENT_URL",
    default=DEFAULT_MANAGEMENT_URL,
    show_default=True,
    help="Management API URL of an administrator [TRM_AMQP_MANAGEMENT_URL, or a file named "
    "by TRM_AMQP_MANAGEMENT_URL_FILE].",
)
@click.option(
    "--keys-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of participant homes; passwords are read from or written to "
    "KEYS_ROOT/<id>/amqp-password (mode 0600).",
)
@click.option(
    "--password",
    "passwords",
    multiple=True,
    metavar="ID=SECRET",
    help="A participant's RabbitMQ password (repeatable).",
)
@click.option(
    "--password-file",
    "password_files",
    multiple=True,
    metavar="ID=FILE",
    help="A file holding a participant's RabbitMQ password, e.g. a Docker secret (repeatable).",
)
@click.option(
    "--delivery-limit",
    type=click.IntRange(1),
    default=DELIVERY_LIMIT,
    show_default=True,
    help="Deliveries before a message goes to the quarantine.",
)
@click.option(
    "--participant",
    "only",
    multiple=True,
    metavar="ID",
    help="Provision only this participant on this broker (repeatable): a country broker "
    "linked to others with trm broker link. trm.routing goes only where the routing "
    "participant is. Default: every participant in the directory.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def provision_command(
    directory_file: Path,
    authority_key: Path,
    vhost: str | None,
    amqp_url: str,
    management_url: str,
    keys_root: Path | None,
    passwords: tuple[str, ...],
    password_files: tuple[str, ...],
    delivery_limit: int,
    only: tuple[str, ...],
    as_json: bool,
) -> None:
    """Create the vhost, a user per participant, permissions, exchanges and queues.

    Idempotent: running it again changes nothing. On a cluster every queue is
    a quorum queue with a replica on each node (up to RabbitMQ's default
    initial group size of 3, the nodes running when it is declared).
    """
    from broker.directory import read_directory
    from broker.keys import read_pinned_authority

    directory = read_directory(directory_file, authority=read_pinned_authority(authority_key))
    participants = [(p.id, str(p.role)) for p in directory.participants()]
    if only:
        unknown = sorted(set(only) - {p for p, _ in participants})
        if unknown:
            raise click.BadParameter(
                f"{', '.join(unknown)} not in the directory", param_hint="--participant"
            )
        participants = [(p, role) for p, role in participants if p in only]
    amqp_url = _url(amqp_url, "TRM_AMQP_URL_FILE")
    chosen_vhost = vhost or AmqpSettings.from_url(amqp_url).vhost
    result = provision(
        ManagementClient(_url(management_url, "TRM_AMQP_MANAGEMENT_URL_FILE")),
        amqp_url,
        chosen_vhost,
        participants,
        keys_root=keys_root,
        passwords=_passwords(passwords, password_files),
        delivery_limit=delivery_limit,
        routing_queue=not only or any(role == ROUTING_ROLE for _p, role in participants),
    )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "vhost": chosen_vhost,
                    "participants": [p for p, _ in participants],
                    "users_created": result.users_created,
                    "queues": result.queues,
                    "passwords_written": [str(p) for p in result.passwords_written],
                },
                indent=2,
            )
        )
        return
    click.echo(f"vhost {chosen_vhost}: {len(participants)} participants provisioned")
    created = ", ".join(result.users_created) or "none"
    click.echo(f"  users created: {created}")
    click.echo(f"  queues: {len(result.queues)} ({', '.join(result.queues)})")
    for path in result.passwords_written:
        click.echo(f"  password written: {path}")


@broker.command("status")
@click.option(
    "--vhost",
    envvar="TRM_AMQP_VHOST",
    default="/",
    show_default=True,
    help="RabbitMQ vhost [TRM_AMQP_VHOST].",
)
@click.option(
    "--management-url",
    envvar="TRM_AMQP_MANAGEMENT_URL",
    default=DEFAULT_MANAGEMENT_URL,
    show_default=True,
    help="Management API URL [TRM_AMQP_MANAGEMENT_URL].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the queues as JSON.")
def status(vhost: str, management_url: str, as_json: bool) -> None:
    """Queue depths on the vhost (as the broker last sampled them, a few seconds old)."""
    queues = ManagementClient(management_url).list_queues(vhost)
    rows = [
        {
            "queue": q.name,
            "type": q.type,
            "messages": q.messages,
            "ready": q.messages_ready,
            "unacked": q.messages_unacknowledged,
            "consumers": q.consumers,
        }
        for q in queues
    ]
    if as_json:
        click.echo(json.dumps({"vhost": vhost, "queues": rows}, indent=2))
        return
    click.echo(
        f"{'queue':40} {'type':8} {'messages':>9} {'ready':>9} {'unacked':>8} {'consumers':>9}"
    )
    for row in rows:
        click.echo(
            f"{row['queue']:40} {row['type']:8} {row['messages']:>9} {row['ready']:>9} "
            f"{row['unacked']:>8} {row['consumers']:>9}"
        )


_VHOST = click.option(
    "--vhost",
    envvar="TRM_AMQP_VHOST",
    required=True,
    help="The network's vhost, the same on both brokers [TRM_AMQP_VHOST].",
)
_MANAGEMENT = click.option(
    "--management-url",
    envvar="TRM_AMQP_MANAGEMENT_URL",
    default=DEFAULT_MANAGEMENT_URL,
    show_default=True,
    help="Management API URL of this broker's administrator [TRM_AMQP_MANAGEMENT_URL, or a "
    "file named by TRM_AMQP_MANAGEMENT_URL_FILE].",
)


@broker.command("link-user")
@_VHOST
@_MANAGEMENT
@click.option("--user", required=True, help="The link's user on this broker, e.g. trm-link-uz.")
@click.option(
    "--password-file",
    type=_EXISTING_FILE,
    required=True,
    help="A file holding the link user's password (give it to the other site's operator).",
)
def link_user(vhost: str, management_url: str, user: str, password_file: Path) -> None:
    """On the upstream broker: a user the other site's federation link logs in as.

    It may declare, bind and consume only federation's own queue of
    trm.handoff: no publishing, no participant's queue. Idempotent.
    """
    from broker.federation import grant_link_user, link_permissions

    client = ManagementClient(_url(management_url, "TRM_AMQP_MANAGEMENT_URL_FILE"))
    grant_link_user(client, vhost, user, _read_secret(password_file, "--password-file"))
    allowed = link_permissions()
    click.echo(f"link user {user} on vhost {vhost}")
    click.echo(f"  configure {allowed.configure}")
    click.echo(f"  write     {allowed.write}")
    click.echo(f"  read      {allowed.read}")


@broker.command("link")
@_VHOST
@_MANAGEMENT
@click.option("--name", required=True, help="The upstream's name: the other site, e.g. site-kz.")
@click.option(
    "--upstream-url-file",
    type=_EXISTING_FILE,
    required=True,
    help="A file holding amqp://LINK-USER:PASSWORD@host:5672/VHOST of the other broker "
    "(its nodes comma-separated for a cluster); the password stays out of the command line.",
)
@click.option(
    "--max-hops",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Links an envelope may cross; 1 keeps two sites linked both ways free of loops.",
)
def link_command(
    vhost: str, management_url: str, name: str, upstream_url_file: Path, max_hops: int
) -> None:
    """On the downstream broker: federate trm.handoff from the other site's broker.

    Envelopes published there for participants whose inboxes are here (or for
    trm.routing, if the routing service runs here) cross the link with their
    validated user_id kept (trust-user-id). Run it on each side for a link both
    ways. Idempotent. docs/deployment.md says what each operator then trusts.
    """
    from broker.federation import link

    client = ManagementClient(_url(management_url, "TRM_AMQP_MANAGEMENT_URL_FILE"))
    link(
        client,
        vhost,
        name,
        _read_secret(upstream_url_file, "--upstream-url-file"),
        max_hops=max_hops,
    )
    click.echo(f"trm.handoff on vhost {vhost} federated from upstream {name}")


@broker.command("links")
@_VHOST
@_MANAGEMENT
@click.option("--json", "as_json", is_flag=True, help="Print the links as JSON.")
def links(vhost: str, management_url: str, as_json: bool) -> None:
    """The federation links of trm.handoff on this broker; exit 1 unless all are running."""
    from broker.federation import link_status

    found = link_status(
        ManagementClient(_url(management_url, "TRM_AMQP_MANAGEMENT_URL_FILE")), vhost
    )
    if as_json:
        click.echo(json.dumps([vars(item) for item in found], indent=2))
    else:
        for item in found:
            detail = f" ({item.error})" if item.error else ""
            click.echo(f"{item.upstream:24} {item.status:10} {item.node}{detail}")
        if not found:
            click.echo(f"no federation link of trm.handoff on vhost {vhost}")
    if not found or any(item.status != "running" for item in found):
        raise SystemExit(1)
