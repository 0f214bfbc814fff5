"""A participant's key folder: generate, write (mode 0600), load, rotate.

Layout of a key folder (a participant's home)::

    participant.json     the public card, given to the directory authority
    keys/<kid>.key       one private key per file, JSON, mode 0600
    authority.pub        the directory authority's pinned public key

An authority folder holds ``keys/authority.key`` and ``authority.pub``.
Private key files are created with mode 0600 in the ``open`` call itself, so
they are never readable by others, not even for an instant.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from broker import _crypto
from broker._crypto import DecryptionKey
from broker.directory import (
    AUTHORITY_PUB_FILE,
    SIGN_ALG,
    Directory,
    KeyUse,
    Participant,
    PublicKey,
    Role,
    authority_key_id,
    write_atomically,
)
from broker.errors import ConfigError, KeyFileError, KeyNotValid, TrmError, UnknownParticipant

CARD_FILE = "participant.json"
KEYS_DIR = "keys"
AUTHORITY_KEY_FILE = "authority.key"
_KID_PREFIX_MAX = 53  # id prefix + "-s-" + 8 hex stays within KeyId's 64 characters


@dataclass(frozen=True)
class Sender:
    """What sealing an envelope needs: who signs, with which key id and key."""

    participant: str
    kid: str
    key: Ed25519PrivateKey


@dataclass(frozen=True)
class ParticipantKeys:
    """A participant's card and the private keys its folder holds."""

    card: Participant
    signing: Mapping[str, Ed25519PrivateKey]
    decryption: Mapping[str, DecryptionKey]

    def sender(self, at: datetime | None = None, published: Directory | None = None) -> Sender:
        """The newest signing key valid at `at` (default now) per the card's windows.

        With `published`, only keys that directory lists as valid count: after
        a rotation the new key is used once peers can verify it, not before.
        """
        when = at or datetime.now(UTC)
        listed = _listed_signing_keys(published, self.card.id, when)
        usable = [
            k
            for k in self.card.keys
            if k.use is KeyUse.SIGN
            and k.kid in self.signing
            and k.valid_at(when)
            and (listed is None or k.kid in listed)
        ]
        if not usable:
            raise KeyNotValid(
                f"{self.card.id!r} has no signing key valid at {when.isoformat()}; "
                "rotate its keys and have the authority publish the new card"
            )
        newest = max(usable, key=lambda k: k.not_before)
        return Sender(self.card.id, newest.kid, self.signing[newest.kid])


# --- participants ------------------------------------------------------------------


def _listed_signing_keys(
    published: Directory | None, participant_id: str, at: datetime
) -> set[str] | None:
    """Key ids of the participant's signing keys that `published` lists as valid at `at`."""
    if published is None:
        return None
    try:
        card = published.participant(participant_id)
    except UnknownParticipant as e:
        raise UnknownParticipant(
            f"{participant_id!r} is not in the installed directory (serial {published.serial}): "
            "send HOME/participant.json to the directory authority and install the directory "
            "it signs with `trm directory install`"
        ) from e
    return {k.kid for k in card.keys if k.use is KeyUse.SIGN and k.valid_at(at)}


def init_participant(
    out: Path,
    *,
    participant_id: str,
    role: Role,
    country: str,
    parent: str | None = None,
    name: str | None = None,
    suite: _crypto.Suite = _crypto.Suite.MLKEM768_X25519,
    valid_days: int = 365,
    now: datetime | None = None,
) -> Participant:
    """Create a participant's key folder at `out` and return its public card.

    Refuses to touch a folder that already holds a card or keys.
    """
    if valid_days < 1:
        raise ConfigError("--valid-days must be at least 1")
    if role is Role.NGO and parent is None:
        raise ConfigError("an NGO needs --parent, the id of the mission it works with")
    if role is not Role.NGO and parent is not None:
        raise ConfigError("only an NGO names a --parent mission")
    start = _start(now)
    end = start + timedelta(days=valid_days)
    card = _card(
        participant_id=participant_id, role=role, country=country, parent=parent, name=name
    )
    _refuse_existing(out)
    signing, decryption = _new_keys(card.id, suite, start, end, taken=set())
    keys_dir = _make_folders(out)
    for key_public, private in (signing, decryption):
        _write_private(keys_dir, key_public, private)
    card = card.model_copy(update={"keys": (signing[0], decryption[0])})
    _write_card(out, card)
    return card


def load_keys(home: Path) -> ParticipantKeys:
    """The card and private keys of the folder `home`.

    KeyFileError if the card or a key is missing or unreadable, if a key file
    is readable by others, or if a key does not match the card.
    """
    card = _read_card(home)
    signing: dict[str, Ed25519PrivateKey] = {}
    decryption: dict[str, DecryptionKey] = {}
    keys_dir = home / KEYS_DIR
    try:
        files = sorted(keys_dir.glob("*.key"))
    except OSError as e:
        raise KeyFileError(f"cannot list {keys_dir}: {e.strerror}") from e
    for path in files:
        kid, private = _read_private(path)
        public = card.key(kid)
        if public is None:
            raise KeyFileError(f"{path} holds key {kid!r}, which {home / CARD_FILE} does not list")
        _match(path, public, private)
        if isinstance(private, Ed25519PrivateKey):
            signing[kid] = private
        else:
            decryption[kid] = private
    if not signing or not decryption:
        raise KeyFileError(
            f"{keys_dir} needs at least one signing and one decryption key; "
            "create the folder with trm init"
        )
    return ParticipantKeys(card=card, signing=signing, decryption=decryption)


def rotate_keys(
    home: Path, *, valid_days: int = 365, overlap_days: int = 30, now: datetime | None = None
) -> Participant:
    """Add a new signing and encryption key; the current ones end after the overlap.

    Between now and now + `overlap_days` both old and new keys are valid, so
    peers holding the previous directory keep working while the authority
    publishes the new card. Returns the updated card.
    """
    if valid_days < 1 or overlap_days < 0 or overlap_days >= valid_days:
        raise ConfigError("rotation needs valid_days >= 1 and 0 <= overlap_days < valid_days")
    held = load_keys(home)
    start = _start(now)
    retire = start + timedelta(days=overlap_days)
    suite = _newest_suite(held.card, start)
    signing, decryption = _new_keys(
        held.card.id,
        suite,
        start,
        start + timedelta(days=valid_days),
        taken={k.kid for k in held.card.keys},
    )
    for key_public, private in (signing, decryption):
        _write_private(home / KEYS_DIR, key_public, private)
    old = tuple(
        k.model_copy(update={"not_after": max(min(k.not_after, retire), k.not_before + _TICK)})
        if k.valid_at(start)
        else k
        for k in held.card.keys
    )
    card = held.card.model_copy(update={"keys": (*old, signing[0], decryption[0])})
    _write_card(home, card)
    return card


_TICK = timedelta(seconds=1)


# --- the directory authority -----------------------------------------------------------


def init_authority(out: Path) -> Ed25519PublicKey:
    """Create an authority folder: keys/authority.key (0600) and authority.pub."""
    key_file = out / KEYS_DIR / AUTHORITY_KEY_FILE
    if key_file.exists() or (out / AUTHORITY_PUB_FILE).exists():
        raise KeyFileError(f"{out} already holds an authority key; refusing to overwrite it")
    key = _crypto.new_signing_key()
    public = key.public_key()
    kid = authority_key_id(public)
    keys_dir = _make_folders(out)
    _write_exclusive(
        keys_dir / AUTHORITY_KEY_FILE,
        _key_json(kid, KeyUse.SIGN, SIGN_ALG, _crypto.raw_private(key)),
    )
    _write_exclusive(out / AUTHORITY_PUB_FILE, _authority_pub_json(public), mode=0o644)
    return public


def load_authority(folder: Path) -> Ed25519PrivateKey:
    """The authority's private key from an authority folder."""
    path = folder / KEYS_DIR / AUTHORITY_KEY_FILE
    _, private = _read_private(path)
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 signing key")
    return private


def read_pinned_authority(path: Path) -> Ed25519PublicKey:
    """The authority public key in an ``authority.pub`` file."""
    data = _read_json(path)
    if data.get("use") != KeyUse.SIGN or data.get("alg") != SIGN_ALG:
        raise KeyFileError(f"{path} is not an Ed25519 authority key")
    try:
        return _crypto.verify_key_from_raw(_b64(data.get("public"), path))
    except _crypto.CryptoError as e:
        raise KeyFileError(f"{path} does not hold a valid Ed25519 public key") from e


def pin_authority(home: Path, pub_file: Path) -> None:
    """Copy the authority public key `pub_file` into HOME as authority.pub."""
    public = read_pinned_authority(pub_file)
    target = home / AUTHORITY_PUB_FILE
    if target.exists():
        pinned = read_pinned_authority(target)
        if _crypto.raw_public(pinned) == _crypto.raw_public(public):
            return
        raise KeyFileError(
            f"{target} pins another authority key; remove it first if the authority changed"
        )
    try:
        write_atomically(target, _authority_pub_json(public), mode=0o644)
    except TrmError as e:
        raise KeyFileError(str(e)) from e


# --- internals ---------------------------------------------------------------------


def _start(now: datetime | None) -> datetime:
    start = now or datetime.now(UTC)
    if start.tzinfo is None:
        raise TypeError("now must be timezone-aware (UTC)")
    return start.astimezone(UTC).replace(microsecond=0)


def _card(
    *, participant_id: str, role: Role, country: str, parent: str | None, name: str | None
) -> Participant:
    try:
        return Participant(
            id=participant_id, role=role, country=country, parent=parent, name=name, keys=()
        )
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{where}: {first['msg']}") from e


def _new_kid(participant_id: str, use: KeyUse, taken: set[str]) -> str:
    letter = "s" if use is KeyUse.SIGN else "e"
    while True:
        kid = f"{participant_id[:_KID_PREFIX_MAX]}-{letter}-{secrets.token_hex(4)}"
        if kid not in taken:
            taken.add(kid)
            return kid


_NewKey = tuple[PublicKey, Ed25519PrivateKey | DecryptionKey]


def _new_keys(
    participant_id: str, suite: _crypto.Suite, start: datetime, end: datetime, taken: set[str]
) -> tuple[_NewKey, _NewKey]:
    sign_key = _crypto.new_signing_key()
    sign_public = PublicKey(
        kid=_new_kid(participant_id, KeyUse.SIGN, taken),
        use=KeyUse.SIGN,
        alg=SIGN_ALG,
        public=base64.b64encode(_crypto.raw_public(sign_key.public_key())).decode(),
        not_before=start,
        not_after=end,
    )
    decrypt_key = _crypto.new_decryption_key(suite)
    encrypt_public = PublicKey(
        kid=_new_kid(participant_id, KeyUse.ENCRYPT, taken),
        use=KeyUse.ENCRYPT,
        alg=str(suite),
        public=base64.b64encode(decrypt_key.public().raw).decode(),
        not_before=start,
        not_after=end,
    )
    return (sign_public, sign_key), (encrypt_public, decrypt_key)


def _newest_suite(card: Participant, at: datetime) -> _crypto.Suite:
    encrypt = [k for k in card.keys if k.use is KeyUse.ENCRYPT]
    valid = [k for k in encrypt if k.valid_at(at)] or encrypt
    newest = max(valid, key=lambda k: k.not_before)
    return _crypto.Suite(newest.alg)


def _refuse_existing(out: Path) -> None:
    keys_dir = out / KEYS_DIR
    if (out / CARD_FILE).exists() or (keys_dir.is_dir() and any(keys_dir.glob("*.key"))):
        raise KeyFileError(f"{out} already holds participant keys; refusing to overwrite them")


def _make_folders(out: Path) -> Path:
    keys_dir = out / KEYS_DIR
    try:
        out.mkdir(parents=True, exist_ok=True)
        keys_dir.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise KeyFileError(f"cannot create {keys_dir}: {e.strerror}") from e
    return keys_dir


def _key_json(kid: str, use: KeyUse, alg: str, private: bytes) -> bytes:
    data = {"kid": kid, "use": str(use), "alg": alg, "private": base64.b64encode(private).decode()}
    return (json.dumps(data, indent=2) + "\n").encode()


def _authority_pub_json(public: Ed25519PublicKey) -> bytes:
    data = {
        "kid": authority_key_id(public),
        "use": str(KeyUse.SIGN),
        "alg": SIGN_ALG,
        "public": base64.b64encode(_crypto.raw_public(public)).decode(),
    }
    return (json.dumps(data, indent=2) + "\n").encode()


def _write_private(
    keys_dir: Path, public: PublicKey, private: Ed25519PrivateKey | DecryptionKey
) -> None:
    raw = private.raw if isinstance(private, DecryptionKey) else _crypto.raw_private(private)
    _write_exclusive(
        keys_dir / f"{public.kid}.key", _key_json(public.kid, public.use, public.alg, raw)
    )


def _write_exclusive(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Create `path` with `mode` from the start; never overwrite an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as e:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from e
    except OSError as e:
        raise KeyFileError(f"cannot create {path}: {e.strerror}") from e
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; make it exact
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise KeyFileError(f"cannot write {path}: {e.strerror}") from e


def _write_card(out: Path, card: Participant) -> None:
    data = (card.model_dump_json(indent=2, exclude_none=True) + "\n").encode()
    try:
        write_atomically(out / CARD_FILE, data, mode=0o644)
    except TrmError as e:
        raise KeyFileError(str(e)) from e


def _read_card(home: Path) -> Participant:
    path = home / CARD_FILE
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(
            f"cannot read {path}: {e.strerror}; is {home} a key folder made by trm init?"
        ) from e
    try:
        return Participant.model_validate_json(data)
    except ValidationError as e:
        raise KeyFileError(f"{path} is not a participant card: {e.errors()[0]['msg']}") from e


def _read_private(path: Path) -> tuple[str, Ed25519PrivateKey | DecryptionKey]:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror}") from e
    if mode & 0o077:
        raise KeyFileError(
            f"{path} is readable by others (mode {mode:04o}); run `chmod 600 {path}`"
        )
    data = _read_json(path)
    kid, use, alg = data.get("kid"), data.get("use"), data.get("alg")
    if not isinstance(kid, str) or (path.stem != kid and path.name != AUTHORITY_KEY_FILE):
        raise KeyFileError(f"{path} names key {kid!r}, not the one its file name says")
    raw = _b64(data.get("private"), path)
    try:
        if use == KeyUse.SIGN and alg == SIGN_ALG:
            return kid, _crypto.signing_key_from_raw(raw)
        if use == KeyUse.ENCRYPT and alg in set(_crypto.Suite):
            key = DecryptionKey(_crypto.Suite(alg), raw)
            key.public()  # proves the raw bytes are a key of this suite
            return kid, key
    except (ValueError, _crypto.CryptoError) as e:
        raise KeyFileError(f"{path} does not hold a valid {alg} private key") from e
    raise KeyFileError(f"{path} has unknown use/alg {use!r}/{alg!r}")


def _match(path: Path, public: PublicKey, private: Ed25519PrivateKey | DecryptionKey) -> None:
    if isinstance(private, DecryptionKey):
        actual = private.public().raw
        ok = public.use is KeyUse.ENCRYPT and public.alg == private.suite
    else:
        actual = _crypto.raw_public(private.public_key())
        ok = public.use is KeyUse.SIGN
    if not ok or base64.b64encode(actual).decode() != public.public:
        raise KeyFileError(f"{path} does not match key {public.kid!r} on the card")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror}") from e
    except ValueError as e:
        raise KeyFileError(f"{path} is not JSON") from e
    if not isinstance(data, dict):
        raise KeyFileError(f"{path} is not a JSON object")
    return data


def _b64(value: object, path: Path) -> bytes:
    if not isinstance(value, str):
        raise KeyFileError(f"{path} lacks its base64 key bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise KeyFileError(f"{path} holds invalid base64") from e
