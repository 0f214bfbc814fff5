"""``trm directory``: build, sign, show, verify and install the trust directory.

Every command that changes a directory first verifies the current file with
the authority's own key, then writes the next serial atomically.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ParamSpec, TypeVar

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from broker.directory import (
    CardField,
    Directory,
    DirectoryBody,
    Participant,
    PublicKey,
    add_participant,
    card_changes,
    install_directory,
    load_directory,
    next_body,
    parse_unverified,
    read_directory,
    revoke_key,
    set_witnesses,
    sign_directory,
    write_atomically,
)
from broker.errors import ConfigError, DirectoryError, KeyFileError, TrmError
from broker.keys import load_authority, read_pinned_authority

P = ParamSpec("P")
R = TypeVar("R")

FILE = click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
AUTHORITY_DIR = click.option(
    "--authority",
    "authority_dir",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The authority folder made by `trm init --role authority`.",
)
AUTHORITY_KEY = click.option(
    "--authority-key",
    "authority_key",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The pinned authority.pub to verify with.",
)


def _reasons(command: Callable[P, R]) -> Callable[P, R]:
    """End the command with a one-line reason instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except TrmError as e:
            raise click.ClickException(f"{e.reason}: {e}") from e

    return wrapper


@click.group()
def directory() -> None:
    """Build, sign, show, verify and install the trust directory."""


@directory.command()
@AUTHORITY_DIR
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@_reasons
def new(authority_dir: Path, out: Path) -> None:
    """Start an empty directory, serial 1, signed by the authority."""
    if out.exists():
        raise DirectoryError(f"{out} already exists; refusing to overwrite a directory")
    key = load_authority(authority_dir)
    body = DirectoryBody(serial=1, issued_at=_now(), participants=())
    write_atomically(out, sign_directory(body, key), mode=0o644)
    click.echo(f"{out}: new directory, serial 1")


@directory.command()
@FILE
@click.option(
    "--card",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A participant.json card made by `trm init`.",
)
@click.option(
    "--allow-change",
    "allow_change",
    default="",
    callback=lambda _context, _option, value: _card_fields(value),
    help="Let a replacement card change these, comma-separated: role, parent, country.",
)
@AUTHORITY_DIR
@_reasons
def add(file: Path, card: Path, allow_change: frozenset[CardField], authority_dir: Path) -> None:
    """Add a card, or replace one keeping every key and revocation; bump the serial.

    A replacement that changes role, parent or country is refused unless
    --allow-change names them; every change is printed.
    """
    key, current = _current(file, authority_dir)
    participant = _read_card(card)
    old = next((p for p in current.participants() if p.id == participant.id), None)
    body = add_participant(current.body, participant, now=_now(), allow_change=allow_change)
    _write(file, body, key)
    verb = "updated" if old is not None else "added"
    click.echo(f"{file}: {verb} {participant.id}, serial {body.serial}")
    if old is not None:
        changes = card_changes(old, participant) or ("no change to the card",)
        for line in changes:
            click.echo(f"  {line}")


@directory.command()
@FILE
@click.option("--id", "participant_id", required=True, help="The participant holding the key.")
@click.option("--key", "kid", required=True, help="The key id to revoke.")
@click.option("--at", "at", help="Revocation time, ISO 8601 with a zone (default: now).")
@AUTHORITY_DIR
@_reasons
def revoke(file: Path, participant_id: str, kid: str, at: str | None, authority_dir: Path) -> None:
    """Revoke a key from a time on; bump the serial."""
    key, current = _current(file, authority_dir)
    when = _parse_time(at) if at else _now()
    body = revoke_key(current.body, participant_id, kid, at=when, now=_now())
    _write(file, body, key)
    click.echo(
        f"{file}: revoked {kid} of {participant_id} at {when.isoformat()}, serial {body.serial}"
    )


@directory.command()
@FILE
@click.option(
    "--witness",
    "witnesses",
    multiple=True,
    help="A mission or auditor whose cosignatures count; repeat for each (none: no witnesses).",
)
@click.option(
    "--quorum",
    type=click.IntRange(min=0),
    required=True,
    help="How many witnesses must cosign the newest checkpoint an auditor accepts.",
)
@AUTHORITY_DIR
@_reasons
def witnesses(file: Path, witnesses: tuple[str, ...], quorum: int, authority_dir: Path) -> None:
    """Name the routing log's witnesses and their quorum; bump the serial."""
    key, current = _current(file, authority_dir)
    body = set_witnesses(current.body, witnesses, quorum, now=_now())
    _write(file, body, key)
    named = ", ".join(body.witnesses) or "none"
    click.echo(f"{file}: witnesses {named}, quorum {body.quorum}, serial {body.serial}")


@directory.command()
@FILE
@AUTHORITY_DIR
@_reasons
def sign(file: Path, authority_dir: Path) -> None:
    """Re-sign the directory under the next serial."""
    key, current = _current(file, authority_dir)
    body = next_body(current.body, current.body.participants, now=_now())
    _write(file, body, key)
    click.echo(f"{file}: signed, serial {body.serial}")


@directory.command()
@FILE
@click.option(
    "--authority-key",
    "authority_key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Verify with this authority.pub before showing.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the body as JSON.")
@_reasons
def show(file: Path, authority_key: Path | None, as_json: bool) -> None:
    """List participants, roles, keys, validity windows and revocations."""
    data = _read(file)
    if authority_key is not None:
        body = load_directory(data, authority=read_pinned_authority(authority_key)).body
        checked = "signature valid"
    else:
        body = parse_unverified(data)
        checked = "signature NOT checked (pass --authority-key)"
    if as_json:
        click.echo(body.model_dump_json(indent=2))
        return
    click.echo(f"serial {body.serial}, issued {body.issued_at.isoformat()}, {checked}")
    if body.witnesses or body.quorum:
        click.echo(f"witnesses {', '.join(body.witnesses)}, quorum {body.quorum}")
    for participant in body.participants:
        click.echo(_participant_line(participant))
        for key in participant.keys:
            click.echo(_key_line(key))


@directory.command()
@FILE
@AUTHORITY_KEY
@click.option("--min-serial", type=click.IntRange(min=0), default=0, show_default=True)
@_reasons
def verify(file: Path, authority_key: Path, min_serial: int) -> None:
    """Exit 0 if the directory is signed by the authority and not older than --min-serial."""
    verified = read_directory(
        file, authority=read_pinned_authority(authority_key), min_serial=min_serial
    )
    click.echo(f"valid, serial {verified.serial}")


@directory.command()
@FILE
@AUTHORITY_KEY
@click.option("--days", type=click.IntRange(min=0), default=30, show_default=True)
@_reasons
def check(file: Path, authority_key: Path, days: int) -> None:
    """Warn about keys that expire within --days (or already have); exit 0."""
    verified = read_directory(file, authority=read_pinned_authority(authority_key))
    now = _now()
    horizon = now + timedelta(days=days)
    warnings = 0
    for participant in verified.participants():
        for key in participant.keys:
            if key.revoked_at is not None or key.not_after > horizon:
                continue
            warnings += 1
            if key.not_after <= now:
                click.echo(f"warning: {participant.id} key {key.kid} ({key.use}) has expired")
                continue
            left = math.ceil((key.not_after - now) / timedelta(days=1))
            click.echo(
                f"warning: {participant.id} key {key.kid} ({key.use}) expires in {left} days "
                f"({key.not_after.isoformat()}); rotate it"
            )
    click.echo(f"valid, serial {verified.serial}, {warnings} warning(s)")


@directory.command()
@FILE
@click.option(
    "--home",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The participant's home folder holding authority.pub.",
)
@_reasons
def install(file: Path, home: Path) -> None:
    """Verify with HOME's pinned key and install; a lower serial is refused."""
    installed = install_directory(_read(file), home)
    click.echo(f"installed serial {installed.serial} in {home}")


# --- internals ---------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:
        raise DirectoryError(f"cannot read {file}: {e.strerror}") from e


def _current(file: Path, authority_dir: Path) -> tuple[Ed25519PrivateKey, Directory]:
    """The authority key, and the current file verified with it."""
    key = load_authority(authority_dir)
    return key, load_directory(_read(file), authority=key.public_key())


def _write(file: Path, body: DirectoryBody, key: Ed25519PrivateKey) -> None:
    write_atomically(file, sign_directory(body, key), mode=0o644)


def _read_card(path: Path) -> Participant:
    try:
        return Participant.model_validate_json(path.read_bytes())
    except OSError as e:
        raise KeyFileError(f"cannot read card {path}: {e.strerror}") from e
    except ValidationError as e:
        raise KeyFileError(f"{path} is not a participant card: {e.errors()[0]['msg']}") from e


def _card_fields(text: str) -> frozenset[CardField]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    try:
        return frozenset(CardField(name) for name in names)
    except ValueError as e:
        known = ", ".join(CardField)
        raise click.BadParameter(f"{text!r}: name some of {known}, comma-separated") from e


def _parse_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError as e:
        raise ConfigError(f"--at {text!r} is not an ISO 8601 time") from e
    if when.tzinfo is None:
        raise ConfigError(f"--at {text!r} needs a time zone, e.g. {text}Z")
    return when.astimezone(UTC)


def _participant_line(p: Participant) -> str:
    extra = f" parent={p.parent}" if p.parent else ""
    name = f" {json.dumps(p.name, ensure_ascii=False)}" if p.name else ""
    return f"{p.id:<32} {p.role:<8} {p.country}{extra}{name}"


def _key_line(k: PublicKey) -> str:
    revoked = f"  REVOKED {k.revoked_at.isoformat()}" if k.revoked_at else ""
    window = f"{k.not_before.isoformat()} .. {k.not_after.isoformat()}"
    return f"    {k.use:<7} {k.kid:<40} {k.alg:<36} {window}{revoked}"
