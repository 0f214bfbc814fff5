"""``trm init``: create a participant's key folder, or the directory authority's."""

from __future__ import annotations

from pathlib import Path

import click

from broker._crypto import Suite
from broker.directory import Role
from broker.errors import TrmError
from broker.keys import CARD_FILE, init_authority, init_participant, pin_authority, rotate_keys

AUTHORITY = "authority"
SUITES = {"mlkem768x25519": Suite.MLKEM768_X25519, "x25519": Suite.X25519}


@click.command()
@click.option(
    "--id", "participant_id", help="Participant id, e.g. iom-kz (required but for 'authority')."
)
@click.option(
    "--role",
    required=True,
    type=click.Choice([*(str(r) for r in Role), AUTHORITY]),
    help="The participant's role; 'authority' makes a directory authority folder.",
)
@click.option(
    "--country",
    help="ISO 3166-1 alpha-2 country code, e.g. KZ; required for every participant, "
    "routing and auditor included (where it runs).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to create the keys in.",
)
@click.option("--parent", help="For an NGO: the id of the mission it works with.")
@click.option("--name", help="The organisation's name, shown in the directory.")
@click.option(
    "--suite",
    type=click.Choice(sorted(SUITES)),
    default="mlkem768x25519",
    show_default=True,
    help="HPKE suite of the encryption key.",
)
@click.option("--valid-days", type=click.IntRange(min=1), default=365, show_default=True)
@click.option(
    "--authority-key",
    "authority_key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The directory authority's authority.pub, received out of band: pinned in the new "
    "home, which then trusts only directories it signed.",
)
def init(
    participant_id: str | None,
    role: str,
    country: str | None,
    out: Path,
    parent: str | None,
    name: str | None,
    suite: str,
    valid_days: int,
    authority_key: Path | None,
) -> None:
    """Create a key folder: private keys (mode 0600) and the public card."""
    try:
        if role == AUTHORITY:
            init_authority(out)
            click.echo(f"authority key created in {out}; give {out / 'authority.pub'} to everyone")
            return
        if participant_id is None or country is None:
            missing = [f for f, v in (("--id", participant_id), ("--country", country)) if not v]
            raise click.UsageError(
                f"{' and '.join(missing)} required for a {role} (every role but 'authority'): "
                "e.g. --id routing --country AT for a routing service run from Austria"
            )
        card = init_participant(
            out,
            participant_id=participant_id,
            role=Role(role),
            country=country,
            parent=parent,
            name=name,
            suite=SUITES[suite],
            valid_days=valid_days,
        )
        if authority_key is not None:
            pin_authority(out, authority_key)
    except TrmError as e:
        raise click.ClickException(f"{e.reason}: {e}") from e
    click.echo(f"keys for {card.id} created in {out}")
    if authority_key is not None:
        click.echo(f"authority key pinned in {out / 'authority.pub'}")
    for key in card.keys:
        click.echo(f"  {key.use:<7} {key.kid}  {key.alg}  until {key.not_after.isoformat()}")
    click.echo(f"give {out / CARD_FILE} to the directory authority")


@click.command()
@click.option(
    "--home",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The participant's key folder.",
)
@click.option("--valid-days", type=click.IntRange(min=1), default=365, show_default=True)
@click.option(
    "--overlap-days",
    type=click.IntRange(min=0),
    default=30,
    show_default=True,
    help="How long the current keys stay valid beside the new ones.",
)
def rotate(home: Path, valid_days: int, overlap_days: int) -> None:
    """Add new signing and encryption keys; the current ones end after the overlap.

    The new signing key is used once an installed directory lists it: send
    the updated card to the authority (`trm directory add`), then install the
    directory it signs (`trm directory install`) on every home.
    """
    try:
        card = rotate_keys(home, valid_days=valid_days, overlap_days=overlap_days)
    except TrmError as e:
        raise click.ClickException(f"{e.reason}: {e}") from e
    newest = sorted(card.keys, key=lambda k: k.not_before)[-2:]
    click.echo(f"new keys {', '.join(k.kid for k in newest)} in {home}")
    click.echo(f"send {home / CARD_FILE} to the directory authority")
