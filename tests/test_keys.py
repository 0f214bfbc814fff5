"""Key folders: creation with mode 0600, loading and its refusals, rotation, the authority."""

from __future__ import annotations

import base64
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker import _crypto
from broker.directory import (
    Directory,
    DirectoryBody,
    KeyUse,
    Participant,
    Role,
    add_participant,
    load_directory,
    sign_directory,
)
from broker.errors import ConfigError, KeyFileError, KeyNotValid
from broker.keys import (
    init_authority,
    init_participant,
    load_authority,
    load_keys,
    pin_authority,
    read_pinned_authority,
    rotate_keys,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def _mission(tmp_path: Path, **extra: object) -> Path:
    home = tmp_path / "iom-kz"
    init_participant(
        home,
        participant_id="iom-kz",
        role=Role.MISSION,
        country="KZ",
        suite=_crypto.Suite.X25519,
        now=T0,
        **extra,  # type: ignore[arg-type]
    )
    return home


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_card_and_private_keys_0600(tmp_path: Path) -> None:
    """init_participant writes a card with one sign and one encrypt key, private files 0600."""
    home = _mission(tmp_path, valid_days=30)
    card = json.loads((home / "participant.json").read_text())
    assert card["id"] == "iom-kz"
    assert [k["use"] for k in card["keys"]] == ["sign", "encrypt"]
    files = sorted((home / "keys").glob("*.key"))
    assert len(files) == 2
    assert all(_mode(f) == 0o600 for f in files)
    assert _mode(home / "keys") == 0o700
    sign_kid = card["keys"][0]["kid"]
    assert sign_kid.startswith("iom-kz-s-") and len(sign_kid) == len("iom-kz-s-") + 8
    assert card["keys"][0]["not_after"] == "2026-03-31T12:00:00Z"
    assert set(json.loads(files[0].read_text())) == {"kid", "use", "alg", "private"}


def test_init_files_0600_under_permissive_umask(tmp_path: Path) -> None:
    """Private key files are 0600 even when the umask would allow more."""
    old = os.umask(0)
    try:
        home = _mission(tmp_path)
    finally:
        os.umask(old)
    assert all(_mode(f) == 0o600 for f in (home / "keys").glob("*.key"))


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    """A second init into the same folder is refused and the keys stay as they were."""
    home = _mission(tmp_path)
    before = {f.name: f.read_bytes() for f in (home / "keys").iterdir()}
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        _mission(tmp_path)
    assert {f.name: f.read_bytes() for f in (home / "keys").iterdir()} == before


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"participant_id": "Bad Id", "role": Role.MISSION, "country": "KZ"}, "id"),
        ({"participant_id": "iom-kz", "role": Role.MISSION, "country": "kz"}, "country"),
        ({"participant_id": "ngo-kz", "role": Role.NGO, "country": "KZ"}, "--parent"),
        (
            {"participant_id": "iom-kz", "role": Role.MISSION, "country": "KZ", "parent": "x"},
            "only an NGO",
        ),
    ],
)
def test_init_bad_input(tmp_path: Path, fields: dict[str, object], match: str) -> None:
    """Bad ids, countries or parents are refused before any file is written."""
    with pytest.raises(ConfigError, match=match):
        init_participant(tmp_path / "x", **fields)  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()


def test_load_keys_round_trip(tmp_path: Path) -> None:
    """load_keys returns the card and private keys that match its public keys."""
    home = _mission(tmp_path)
    held = load_keys(home)
    sender = held.sender(T0 + DAY)
    assert sender.participant == "iom-kz"
    public = held.card.key(sender.kid)
    assert public is not None
    assert public.use is KeyUse.SIGN
    (kid,) = held.decryption
    card_key = held.card.key(kid)
    assert card_key is not None
    assert base64.b64decode(card_key.public) == held.decryption[kid].public().raw


def test_load_refuses_0644_key(tmp_path: Path) -> None:
    """A private key file readable by others is refused with the chmod fix in the message."""
    home = _mission(tmp_path)
    victim = next((home / "keys").glob("*.key"))
    victim.chmod(0o644)
    with pytest.raises(KeyFileError, match=f"chmod 600 {victim}"):
        load_keys(home)


@pytest.mark.parametrize("damage", ["missing-card", "bad-json", "wrong-key", "foreign-key"])
def test_load_refuses_damaged_folder(tmp_path: Path, damage: str) -> None:
    """A missing card, unreadable key, key not matching the card or unlisted key is refused."""
    home = _mission(tmp_path)
    sign_file = next(f for f in (home / "keys").glob("*.key") if "-s-" in f.name)
    if damage == "missing-card":
        (home / "participant.json").unlink()
    elif damage == "bad-json":
        sign_file.write_text("{")
    elif damage == "wrong-key":
        data = json.loads(sign_file.read_text())
        other = _mission(tmp_path / "other")
        other_file = next(f for f in (other / "keys").glob("*.key") if "-s-" in f.name)
        data["private"] = json.loads(other_file.read_text())["private"]
        sign_file.write_text(json.dumps(data))
    else:
        extra = home / "keys" / "stray.key"
        extra.write_text(json.dumps({"kid": "stray", "use": "sign", "alg": "ed25519"}))
        extra.chmod(0o600)
    with pytest.raises(KeyFileError):
        load_keys(home)


def test_rotation_overlap(tmp_path: Path) -> None:
    """After rotation old and new keys are both valid inside the overlap; sender() picks new."""
    home = _mission(tmp_path)
    old = load_keys(home).sender(T0)
    rotated_at = T0 + 300 * DAY
    card = rotate_keys(home, valid_days=365, overlap_days=30, now=rotated_at)
    held = load_keys(home)
    assert len(held.signing) == 2 and len(held.decryption) == 2
    new = held.sender(rotated_at + DAY)
    assert new.kid != old.kid
    authority = _crypto.new_signing_key()
    body = add_participant(DirectoryBody(serial=1, issued_at=T0, participants=()), card, now=T0)
    directory = load_directory(sign_directory(body, authority), authority=authority.public_key())
    inside = rotated_at + 15 * DAY
    directory.signing_key("iom-kz", old.kid, used_at=inside)
    directory.signing_key("iom-kz", new.kid, used_at=inside)
    assert (
        directory.encryption_key("iom-kz", inside)[0]
        != directory.encryption_key("iom-kz", rotated_at - DAY)[0]
    )
    old_key = card.key(old.kid)
    assert old_key is not None
    assert old_key.not_after == rotated_at + 30 * DAY
    assert held.sender(rotated_at + 31 * DAY).kid == new.kid
    assert all(_mode(f) == 0o600 for f in (home / "keys").glob("*.key"))


def test_rotated_key_signs_only_once_published(tmp_path: Path) -> None:
    """With a directory given, sender() keeps the old key until a directory lists the new one."""
    home = _mission(tmp_path)
    before = load_keys(home)
    authority = _crypto.new_signing_key()

    def published(card: Participant, serial: int) -> Directory:
        body = DirectoryBody(serial=serial, issued_at=T0, participants=())
        signed = sign_directory(add_participant(body, card, now=T0), authority)
        return load_directory(signed, authority=authority.public_key())

    old_directory = published(before.card, 1)
    rotated_at = T0 + 300 * DAY
    card = rotate_keys(home, valid_days=365, overlap_days=30, now=rotated_at)
    held = load_keys(home)
    inside = rotated_at + DAY
    assert held.sender(inside, old_directory).kid == before.sender(T0).kid
    assert held.sender(inside, published(card, 2)).kid != before.sender(T0).kid
    with pytest.raises(KeyNotValid):
        held.sender(rotated_at + 31 * DAY, old_directory)  # the old key ended, the new is unknown


def test_sender_without_valid_key(tmp_path: Path) -> None:
    """sender() outside every window raises KeyNotValid."""
    home = _mission(tmp_path, valid_days=10)
    with pytest.raises(KeyNotValid):
        load_keys(home).sender(T0 + 11 * DAY)


def test_authority_folder(tmp_path: Path) -> None:
    """init_authority writes a 0600 private key and a public file that pins the same key."""
    public = init_authority(tmp_path / "auth")
    assert _mode(tmp_path / "auth" / "keys" / "authority.key") == 0o600
    key = load_authority(tmp_path / "auth")
    assert _crypto.raw_public(key.public_key()) == _crypto.raw_public(public)
    pinned = read_pinned_authority(tmp_path / "auth" / "authority.pub")
    assert _crypto.raw_public(pinned) == _crypto.raw_public(public)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        init_authority(tmp_path / "auth")


def test_pin_authority(tmp_path: Path) -> None:
    """pin_authority copies authority.pub into a home and refuses to replace another pin."""
    init_authority(tmp_path / "a")
    init_authority(tmp_path / "b")
    home = tmp_path / "home"
    home.mkdir()
    pin_authority(home, tmp_path / "a" / "authority.pub")
    pin_authority(home, tmp_path / "a" / "authority.pub")
    with pytest.raises(KeyFileError, match="another authority"):
        pin_authority(home, tmp_path / "b" / "authority.pub")
    pinned = read_pinned_authority(home / "authority.pub")
    expected = read_pinned_authority(tmp_path / "a" / "authority.pub")
    assert _crypto.raw_public(pinned) == _crypto.raw_public(expected)


def test_authority_key_too_open(tmp_path: Path) -> None:
    """An authority key readable by others is refused."""
    init_authority(tmp_path / "auth")
    (tmp_path / "auth" / "keys" / "authority.key").chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_authority(tmp_path / "auth")


def test_longest_participant_id_gives_valid_key_ids(tmp_path: Path) -> None:
    """A 63-character participant id still yields key ids the directory accepts."""
    pid = "ngo-" + "a" * 59
    card = init_participant(
        tmp_path / "long", participant_id=pid, role=Role.AUDITOR, country="AT", now=T0
    )
    assert all(len(k.kid) <= 64 for k in card.keys)
    authority = _crypto.new_signing_key()
    body = add_participant(DirectoryBody(serial=1, issued_at=T0, participants=()), card, now=T0)
    loaded = load_directory(sign_directory(body, authority), authority=authority.public_key())
    assert loaded.participant(pid).keys == card.keys


def test_rotate_command(tmp_path: Path) -> None:
    """`trm rotate` adds a signing and an encryption key (0600) and says where the card is."""
    from click.testing import CliRunner

    from trm.cli import cli

    home = _mission(tmp_path)
    result = CliRunner().invoke(cli, ["rotate", "--home", str(home), "--overlap-days", "7"])
    assert result.exit_code == 0, result.output
    assert "participant.json" in result.output
    keys = sorted((home / "keys").glob("*.key"))
    assert len(keys) == 4
    assert all(_mode(f) == 0o600 for f in keys)
    refused = CliRunner().invoke(cli, ["rotate", "--home", str(home), "--overlap-days", "400"])
    assert refused.exit_code != 0
    assert "overlap" in refused.output


def test_init_of_a_routing_service_without_country_names_the_missing_flag(tmp_path: Path) -> None:
    """`--help` marks --country as needed by routing and auditors too; leaving it out says so."""
    from click.testing import CliRunner

    from trm.cli import cli

    runner = CliRunner()
    shown = " ".join(runner.invoke(cli, ["init", "--help"]).output.split())
    assert "required for every participant, routing and auditor included" in shown
    result = runner.invoke(
        cli, ["init", "--id", "routing", "--role", "routing", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "--country required for a routing" in result.output
    assert not (tmp_path / "r").exists()


def test_init_pins_the_authority_key_given(tmp_path: Path) -> None:
    """`trm init --authority-key` pins authority.pub in the new home, the same bytes' key."""
    from click.testing import CliRunner

    from broker.keys import read_pinned_authority
    from trm.cli import cli

    runner = CliRunner()
    made = runner.invoke(cli, ["init", "--role", "authority", "--out", str(tmp_path / "auth")])
    assert made.exit_code == 0, made.output
    pub = tmp_path / "auth" / "authority.pub"
    home = tmp_path / "kz"
    args = ["init", "--id", "iom-kz", "--role", "mission", "--country", "KZ", "--out", str(home)]
    result = runner.invoke(cli, [*args, "--authority-key", str(pub)])
    assert result.exit_code == 0, result.output
    assert "authority key pinned" in result.output
    assert read_pinned_authority(home / "authority.pub") == read_pinned_authority(pub)


def test_a_sender_missing_from_the_directory_is_told_so(tmp_path: Path) -> None:
    """A home whose participant the installed directory does not list is told exactly that
    (not that its keys are invalid), with the step that fixes it."""
    from broker.errors import UnknownParticipant

    home = _mission(tmp_path)
    authority = _crypto.new_signing_key()
    empty = DirectoryBody(serial=3, issued_at=T0, participants=())
    directory = load_directory(sign_directory(empty, authority), authority=authority.public_key())
    with pytest.raises(UnknownParticipant, match=r"not in the installed directory \(serial 3\)"):
        load_keys(home).sender(T0 + DAY, published=directory)
