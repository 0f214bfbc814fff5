"""The signed trust directory: signing, every refusal on load, key lookups by time."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.home import Home
from broker import _crypto
from broker.directory import (
    SERIAL_FLOOR_FILE,
    CardField,
    Directory,
    DirectoryBody,
    KeyUse,
    Participant,
    PublicKey,
    Role,
    add_participant,
    canonical_body,
    card_changes,
    install_directory,
    load_directory,
    load_home_directory,
    read_serial_floor,
    revoke_key,
    sign_directory,
    sign_payload,
)
from broker.errors import (
    CardChangeRefused,
    DirectoryRollback,
    DirectorySignatureInvalid,
    DirectoryUnsigned,
    DuplicateParticipant,
    ExpiredKey,
    KeyNotValid,
    KeyNotYetValid,
    MalformedDirectory,
    RevokedKey,
    TrmError,
    UnknownKey,
    UnknownParticipant,
    UnknownSender,
)
from broker.keys import init_authority, load_authority, pin_authority
from broker.testing import capture_logs

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
AUTHORITY = _crypto.new_signing_key()
OTHER = _crypto.new_signing_key()


def _sign_key(kid: str, start: datetime = T0, days: int = 365, **extra: object) -> PublicKey:
    public = _crypto.raw_public(_crypto.new_signing_key().public_key())
    return PublicKey(
        kid=kid,
        use=KeyUse.SIGN,
        alg="ed25519",
        public=base64.b64encode(public).decode(),
        not_before=start,
        not_after=start + days * DAY,
        **extra,  # type: ignore[arg-type]
    )


def _encrypt_key(kid: str, start: datetime = T0, days: int = 365, **extra: object) -> PublicKey:
    suite = _crypto.Suite.X25519
    public = _crypto.new_decryption_key(suite).public().raw
    return PublicKey(
        kid=kid,
        use=KeyUse.ENCRYPT,
        alg=str(suite),
        public=base64.b64encode(public).decode(),
        not_before=start,
        not_after=start + days * DAY,
        **extra,  # type: ignore[arg-type]
    )


def _participant(pid: str, role: Role = Role.MISSION, **extra: object) -> Participant:
    fields: dict[str, object] = {
        "id": pid,
        "role": role,
        "country": "UZ",
        "keys": (_sign_key(f"{pid}-s-1"), _encrypt_key(f"{pid}-e-1")),
    }
    fields.update(extra)
    return Participant(**fields)  # type: ignore[arg-type]


def _body(*participants: Participant, serial: int = 1) -> DirectoryBody:
    return DirectoryBody(serial=serial, issued_at=T0, participants=participants)


def _standard(serial: int = 1) -> DirectoryBody:
    return _body(
        _participant("iom-kz"),
        _participant("iom-uz"),
        _participant("ngo-uz-istiqbolli-avlod", Role.NGO, parent="iom-uz", name="Istiqbolli Avlod"),
        serial=serial,
    )


def _signed_raw(body: DirectoryBody) -> bytes:
    """Sign a body bypassing sign_directory's checks, as a hostile authority could."""
    return sign_payload(canonical_body(body), AUTHORITY)


def _envelope(data: bytes) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(data)
    return loaded


# --- signing and loading --------------------------------------------------------------


def test_round_trip_keeps_exact_bytes() -> None:
    """A signed directory loads back with the same body and the exact file bytes."""
    body = _standard(serial=7)
    raw = sign_directory(body, AUTHORITY)
    loaded = load_directory(raw, authority=AUTHORITY.public_key())
    assert loaded.body == body
    assert loaded.raw == raw
    assert loaded.serial == 7
    assert [p.id for p in loaded.participants()] == ["iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod"]
    assert loaded.participant("iom-uz").role is Role.MISSION


def test_file_is_dsse() -> None:
    """The file is a DSSE envelope whose payload is the canonical body JSON."""
    body = _standard()
    envelope = _envelope(sign_directory(body, AUTHORITY))
    assert envelope["payloadType"] == "application/vnd.trm.directory+json"
    assert base64.b64decode(str(envelope["payload"])) == canonical_body(body)
    signatures = envelope["signatures"]
    assert isinstance(signatures, list)
    assert signatures[0]["keyid"].startswith("authority-")


def test_unsigned_refused() -> None:
    """A directory without signatures is refused as unsigned."""
    envelope = _envelope(sign_directory(_standard(), AUTHORITY))
    envelope["signatures"] = []
    with pytest.raises(DirectoryUnsigned):
        load_directory(json.dumps(envelope).encode(), authority=AUTHORITY.public_key())


def test_wrong_signer_refused() -> None:
    """A directory signed by another key is refused."""
    raw = sign_directory(_standard(), OTHER)
    with pytest.raises(DirectorySignatureInvalid):
        load_directory(raw, authority=AUTHORITY.public_key())


def test_flipped_payload_byte_refused() -> None:
    """Changing one byte of the signed payload breaks the signature."""
    envelope = _envelope(sign_directory(_standard(), AUTHORITY))
    payload = bytearray(base64.b64decode(str(envelope["payload"])))
    payload[len(payload) // 2] ^= 0x01
    envelope["payload"] = base64.b64encode(bytes(payload)).decode()
    with pytest.raises(DirectorySignatureInvalid):
        load_directory(json.dumps(envelope).encode(), authority=AUTHORITY.public_key())


def test_flipped_signature_byte_refused() -> None:
    """Changing one byte of the signature is refused."""
    envelope = _envelope(sign_directory(_standard(), AUTHORITY))
    signatures = envelope["signatures"]
    assert isinstance(signatures, list)
    sig = bytearray(base64.b64decode(signatures[0]["sig"]))
    sig[0] ^= 0x80
    signatures[0]["sig"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(DirectorySignatureInvalid):
        load_directory(json.dumps(envelope).encode(), authority=AUTHORITY.public_key())


def test_rollback_refused() -> None:
    """A serial lower than the one already held is refused; the same serial is accepted."""
    raw = sign_directory(_standard(serial=4), AUTHORITY)
    with pytest.raises(DirectoryRollback):
        load_directory(raw, authority=AUTHORITY.public_key(), min_serial=5)
    assert load_directory(raw, authority=AUTHORITY.public_key(), min_serial=4).serial == 4


def test_signature_checked_before_parsing() -> None:
    """A payload that is not a body but carries a wrong signature fails on the signature."""
    raw = sign_payload(b"not json at all", OTHER)
    with pytest.raises(DirectorySignatureInvalid):
        load_directory(raw, authority=AUTHORITY.public_key())
    with pytest.raises(MalformedDirectory):
        load_directory(sign_payload(b"not json", AUTHORITY), authority=AUTHORITY.public_key())


def test_duplicate_participant_refused() -> None:
    """Two entries with the same participant id are refused, signed or not."""
    body = _body(_participant("iom-kz"), _participant("iom-kz"))
    with pytest.raises(DuplicateParticipant):
        load_directory(_signed_raw(body), authority=AUTHORITY.public_key())
    with pytest.raises(DuplicateParticipant):
        sign_directory(body, AUTHORITY)


def test_duplicate_key_id_refused() -> None:
    """A participant listing the same key id twice is refused."""
    keys = (_sign_key("k-1"), _encrypt_key("k-1"))
    body = _body(_participant("iom-kz", keys=keys))
    with pytest.raises(DuplicateParticipant):
        load_directory(_signed_raw(body), authority=AUTHORITY.public_key())


@pytest.mark.parametrize(
    "ngo",
    [
        _participant("ngo-uz-rodnik", Role.NGO),
        _participant("ngo-uz-rodnik", Role.NGO, parent="iom-tj"),
        _participant("ngo-uz-rodnik", Role.NGO, parent="auditor-vienna"),
    ],
    ids=["no-parent", "unknown-parent", "parent-not-a-mission"],
)
def test_ngo_needs_mission_parent(ngo: Participant) -> None:
    """An NGO must name a mission that is in the same directory."""
    body = _body(_participant("iom-uz"), _participant("auditor-vienna", Role.AUDITOR), ngo)
    with pytest.raises(MalformedDirectory, match="parent"):
        load_directory(_signed_raw(body), authority=AUTHORITY.public_key())


def test_mission_with_parent_refused() -> None:
    """Only NGOs name a parent."""
    body = _body(_participant("iom-uz"), _participant("iom-kz", parent="iom-uz"))
    with pytest.raises(MalformedDirectory, match="parent"):
        load_directory(_signed_raw(body), authority=AUTHORITY.public_key())


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ((_sign_key("s"),), "one signing and one encryption"),
        ((_encrypt_key("e"),), "one signing and one encryption"),
        ((_sign_key("s", days=0), _encrypt_key("e")), "empty window"),
        (
            (_sign_key("s").model_copy(update={"public": "AAAA"}), _encrypt_key("e")),
            "not a valid",
        ),
        (
            (_sign_key("s"), _encrypt_key("e").model_copy(update={"public": "AAAA"})),
            "not a valid",
        ),
        ((_sign_key("s"), _encrypt_key("e").model_copy(update={"alg": "rsa"})), "unknown suite"),
        ((_sign_key("s").model_copy(update={"alg": "rsa"}), _encrypt_key("e")), "ed25519"),
        ((_sign_key("s").model_copy(update={"public": "!!"}), _encrypt_key("e")), "base64"),
    ],
    ids=[
        "no-encrypt",
        "no-sign",
        "empty-window",
        "bad-ed25519",
        "bad-x25519",
        "bad-suite",
        "bad-sign-alg",
        "bad-base64",
    ],
)
def test_bad_keys_refused(keys: tuple[PublicKey, ...], match: str) -> None:
    """Keys that are missing, have an empty window or do not decode make the directory malformed."""
    body = _body(_participant("iom-kz", keys=keys))
    with pytest.raises(MalformedDirectory, match=match):
        load_directory(_signed_raw(body), authority=AUTHORITY.public_key())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"payloadType": "text/plain", "payload": "", "signatures": []}',
        b'{"payloadType": "application/vnd.trm.directory+json", "signatures": []}',
        b'{"payloadType": "application/vnd.trm.directory+json", "payload": "@@", '
        b'"signatures": [{"sig": "AA=="}]}',
        b'{"payloadType": "application/vnd.trm.directory+json", "payload": "", "signatures": "x"}',
        b"[" * 100_000,
    ],
)
def test_garbage_is_malformed(data: bytes) -> None:
    """Bytes that are not a DSSE directory envelope are refused as malformed."""
    with pytest.raises(MalformedDirectory):
        load_directory(data, authority=AUTHORITY.public_key())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_random_bytes_raise_only_trm_errors(data: bytes) -> None:
    """Any random bytes either load or raise a TrmError, nothing else."""
    with pytest.raises(TrmError):
        load_directory(data, authority=AUTHORITY.public_key())


_VALID_BODY = _standard()
_VALID = sign_directory(_VALID_BODY, AUTHORITY)
_VALID_PAYLOAD = canonical_body(_VALID_BODY)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_files_raise_only_trm_errors(data: st.DataObject) -> None:
    """A valid file with bytes changed, cut or inserted loads unchanged or raises a TrmError."""
    raw = bytearray(_VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            raw[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del raw[at : at + data.draw(st.integers(1, 50))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=20))
    try:
        loaded = load_directory(bytes(raw), authority=AUTHORITY.public_key())
    except TrmError:
        return
    assert canonical_body(loaded.body) == _VALID_PAYLOAD


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_signed_payloads_raise_only_trm_errors(data: st.DataObject) -> None:
    """A correctly signed but mutated body loads or raises a TrmError, nothing else."""
    payload = bytearray(_VALID_PAYLOAD)
    at = data.draw(st.integers(0, len(payload) - 1))
    payload[at : at + data.draw(st.integers(0, 8))] = data.draw(st.binary(max_size=8))
    try:
        load_directory(sign_payload(bytes(payload), AUTHORITY), authority=AUTHORITY.public_key())
    except TrmError:
        return


# --- key lookups -------------------------------------------------------------------


def _lookup_directory() -> Directory:
    keys = (
        _sign_key("kz-s-old", start=T0, days=100),
        _sign_key("kz-s-rev", start=T0, days=100, revoked_at=T0 + 50 * DAY),
        _encrypt_key("kz-e-old", start=T0, days=100),
        _encrypt_key("kz-e-new", start=T0 + 80 * DAY, days=100),
        _encrypt_key("kz-e-rev", start=T0 + 90 * DAY, days=100, revoked_at=T0 + 95 * DAY),
    )
    body = _body(_participant("iom-kz", keys=keys))
    return load_directory(sign_directory(body, AUTHORITY), authority=AUTHORITY.public_key())


def test_signing_key_inside_window() -> None:
    """A signing key used inside its window is returned as an Ed25519 public key."""
    key = _lookup_directory().signing_key("iom-kz", "kz-s-old", used_at=T0 + DAY)
    assert len(_crypto.raw_public(key)) == 32


def test_signing_key_refusals() -> None:
    """Each wrong use of a signing key raises its own error."""
    d = _lookup_directory()
    with pytest.raises(UnknownSender):
        d.signing_key("iom-xx", "kz-s-old", used_at=T0)
    with pytest.raises(UnknownKey):
        d.signing_key("iom-kz", "nope", used_at=T0)
    with pytest.raises(UnknownKey):
        d.signing_key("iom-kz", "kz-e-old", used_at=T0)
    with pytest.raises(KeyNotYetValid):
        d.signing_key("iom-kz", "kz-s-old", used_at=T0 - timedelta(seconds=1))
    with pytest.raises(ExpiredKey):
        d.signing_key("iom-kz", "kz-s-old", used_at=T0 + 100 * DAY)
    with pytest.raises(RevokedKey):
        d.signing_key("iom-kz", "kz-s-rev", used_at=T0 + 50 * DAY)


def test_revocation_judged_at_check_time() -> None:
    """A signature made before the revocation is refused when checked after it."""
    d = _lookup_directory()
    d.signing_key("iom-kz", "kz-s-rev", used_at=T0 + DAY, checked_at=T0 + 2 * DAY)
    with pytest.raises(RevokedKey):
        d.signing_key("iom-kz", "kz-s-rev", used_at=T0 + DAY, checked_at=T0 + 60 * DAY)


def test_encryption_key_picks_newest_valid() -> None:
    """The newest encryption key valid and unrevoked at the time is chosen."""
    d = _lookup_directory()
    assert d.encryption_key("iom-kz", T0 + DAY)[0] == "kz-e-old"
    kid, key = d.encryption_key("iom-kz", T0 + 85 * DAY)
    assert kid == "kz-e-new"
    assert key.suite is _crypto.Suite.X25519
    assert d.encryption_key("iom-kz", T0 + 92 * DAY)[0] == "kz-e-rev"
    assert d.encryption_key("iom-kz", T0 + 96 * DAY)[0] == "kz-e-new"


def test_encryption_key_refusals() -> None:
    """No valid encryption key, or no such participant, is an error."""
    d = _lookup_directory()
    with pytest.raises(KeyNotValid):
        d.encryption_key("iom-kz", T0 - DAY)
    with pytest.raises(KeyNotValid):
        d.encryption_key("iom-kz", T0 + 400 * DAY)
    with pytest.raises(UnknownParticipant):
        d.encryption_key("iom-xx", T0)
    with pytest.raises(UnknownParticipant):
        d.participant("iom-xx")


# --- editing -------------------------------------------------------------------------


def test_add_replaces_card_but_keeps_revocation() -> None:
    """Re-adding a card bumps the serial and never undoes a revocation."""
    card = _participant("iom-kz")
    body = add_participant(_body(), card, now=T0)
    kid = card.keys[0].kid
    body = revoke_key(body, "iom-kz", kid, at=T0 + DAY, now=T0)
    body = add_participant(body, card, now=T0)
    assert body.serial == 4
    assert len(body.participants) == 1
    assert body.participants[0].keys[0].revoked_at == T0 + DAY


def test_replacement_keeps_every_key_it_leaves_out_with_its_revocation() -> None:
    """A card without an old (revoked) key keeps that key; listing it again does not unrevoke it."""
    card = _participant("iom-kz")
    body = add_participant(_body(), card, now=T0)
    body = revoke_key(body, "iom-kz", "iom-kz-s-1", at=T0 + DAY, now=T0)
    rotated = card.model_copy(
        update={"keys": (_sign_key("iom-kz-s-2"), _encrypt_key("iom-kz-e-2"))}
    )
    body = add_participant(body, rotated, now=T0)
    kept = body.participants[0]
    assert [k.kid for k in kept.keys] == ["iom-kz-s-2", "iom-kz-e-2", "iom-kz-s-1", "iom-kz-e-1"]
    assert kept.key("iom-kz-s-1").revoked_at == T0 + DAY  # type: ignore[union-attr]
    body = add_participant(body, card, now=T0)
    assert body.participants[0].key("iom-kz-s-1").revoked_at == T0 + DAY  # type: ignore[union-attr]
    with pytest.raises(RevokedKey):
        Directory(body, b"").signing_key("iom-kz", "iom-kz-s-1", used_at=T0 + 2 * DAY)


@pytest.mark.parametrize(
    ("update", "named"),
    [
        ({"role": Role.NGO, "parent": "iom-kz"}, "role mission -> ngo, parent none -> iom-kz"),
        ({"country": "KZ"}, "country UZ -> KZ"),
    ],
)
def test_replacement_refuses_a_change_of_role_parent_or_country(
    update: dict[str, object], named: str
) -> None:
    """Changing role, parent or country is refused, naming each change, unless allowed."""
    body = add_participant(_body(), _participant("iom-kz"), now=T0)
    body = add_participant(body, _participant("iom-uz"), now=T0)
    changed = body.participants[1].model_copy(update=update)
    with pytest.raises(CardChangeRefused, match=named):
        add_participant(body, changed, now=T0)
    allowed = [CardField(name) for name in update]
    after = add_participant(body, changed, now=T0, allow_change=allowed)
    assert after.participants[1] == changed


def test_allowing_one_change_does_not_allow_another() -> None:
    """--allow-change role does not let the same card change the country too."""
    body = add_participant(_body(), _participant("iom-uz"), now=T0)
    changed = body.participants[0].model_copy(update={"role": Role.AUDITOR, "country": "KZ"})
    with pytest.raises(
        CardChangeRefused, match=r"changes country UZ -> KZ; .*--allow-change country`"
    ):
        add_participant(body, changed, now=T0, allow_change=[CardField.ROLE])


def test_card_changes_name_each_difference() -> None:
    """card_changes lists fields changed, keys added, windows moved and keys left out."""
    old = _participant("ngo-uz-a", Role.NGO, parent="iom-uz", name="A")
    old = old.model_copy(
        update={"keys": (old.keys[0].model_copy(update={"revoked_at": T0}), old.keys[1])}
    )
    shorter = old.keys[1].model_copy(update={"not_after": T0 + 30 * DAY})
    new = old.model_copy(
        update={"parent": "iom-kz", "name": "B", "keys": (shorter, _sign_key("ngo-uz-a-s-2"))}
    )
    assert card_changes(old, new) == (
        "parent: iom-uz -> iom-kz",
        "name: A -> B",
        "key ngo-uz-a-e-1 valid 2026-01-01T00:00:00+00:00 .. 2027-01-01T00:00:00+00:00 -> "
        "2026-01-01T00:00:00+00:00 .. 2026-01-31T00:00:00+00:00",
        "key ngo-uz-a-s-2 added (sign, ed25519)",
        "key ngo-uz-a-s-1 kept (sign, revoked 2026-01-01T00:00:00+00:00): not on the new card",
    )
    assert card_changes(old, old) == ()


def test_add_refuses_changed_public_key() -> None:
    """A card that reuses a key id with another public key is refused."""
    card = _participant("iom-kz")
    body = add_participant(_body(), card, now=T0)
    changed = card.model_copy(update={"keys": (_sign_key(card.keys[0].kid), card.keys[1])})
    with pytest.raises(TrmError, match="new key id"):
        add_participant(body, changed, now=T0)


# --- installing into a home --------------------------------------------------------------


def _home(tmp_path: Path) -> tuple[Path, Path]:
    authority = tmp_path / "authority"
    init_authority(authority)
    home = tmp_path / "home"
    home.mkdir()
    pin_authority(home, authority / "authority.pub")
    return authority, home


def test_install_and_load_home(tmp_path: Path) -> None:
    """An installed directory is what load_home_directory returns."""
    authority, home = _home(tmp_path)
    key = load_authority(authority)
    raw = sign_directory(_standard(serial=3), key)
    assert install_directory(raw, home).serial == 3
    assert (home / "directory.json").read_bytes() == raw
    assert load_home_directory(home).serial == 3


def test_install_refuses_rollback_and_keeps_newer(tmp_path: Path) -> None:
    """Installing a lower serial fails and the newer file stays in place."""
    authority, home = _home(tmp_path)
    key = load_authority(authority)
    newer = sign_directory(_standard(serial=5), key)
    install_directory(newer, home)
    with pytest.raises(DirectoryRollback):
        install_directory(sign_directory(_standard(serial=4), key), home)
    with pytest.raises(DirectoryRollback, match="same serial"):
        install_directory(sign_directory(_standard(serial=5), key), home)
    assert (home / "directory.json").read_bytes() == newer
    install_directory(newer, home)


def test_install_refuses_other_authority(tmp_path: Path) -> None:
    """A directory signed by a key other than the pinned one is not installed."""
    _, home = _home(tmp_path)
    with pytest.raises(DirectorySignatureInvalid):
        install_directory(sign_directory(_standard(), OTHER), home)
    assert not (home / "directory.json").exists()


# --- the serial floor: an older directory copied over the installed one ------------------


def _revoking_pair(authority: Path) -> tuple[bytes, bytes]:
    """Serial 1, and serial 2 that revokes iom-kz's signing key from T0 on."""
    key = load_authority(authority)
    first = _standard(serial=1)
    second = revoke_key(first, "iom-kz", "iom-kz-s-1", at=T0, now=T0)
    return sign_directory(first, key), sign_directory(second, key)


def _copy_over(home: Path, data: bytes) -> None:
    """Put `data` in place of HOME/directory.json as `cp` then `mv` would (a new inode)."""
    copied = home / "copied.json"
    copied.write_bytes(data)
    copied.replace(home / "directory.json")


def test_install_writes_the_serial_floor(tmp_path: Path) -> None:
    """Installing records the serial in HOME/directory.serial, mode 0600, only ever upward."""
    authority, home = _home(tmp_path)
    first, second = _revoking_pair(authority)
    install_directory(first, home)
    install_directory(second, home)
    floor = home / SERIAL_FLOOR_FILE
    assert floor.read_text() == "2\n"
    assert floor.stat().st_mode & 0o777 == 0o600
    assert read_serial_floor(home) == 2


def test_home_refuses_an_older_directory_copied_over(tmp_path: Path) -> None:
    """A lower serial copied over directory.json is refused, naming both serials."""
    authority, home = _home(tmp_path)
    first, second = _revoking_pair(authority)
    install_directory(first, home)
    install_directory(second, home)
    _copy_over(home, first)
    with pytest.raises(DirectoryRollback, match=r"serial 1, older than serial 2"):
        load_home_directory(home)
    assert read_serial_floor(home) == 2


def test_install_refuses_a_serial_below_the_floor(tmp_path: Path) -> None:
    """Once serial 2 was verified, installing serial 1 fails even if directory.json holds 1."""
    authority, home = _home(tmp_path)
    first, second = _revoking_pair(authority)
    install_directory(first, home)
    install_directory(second, home)
    _copy_over(home, first)
    with pytest.raises(DirectoryRollback, match=r"serial 1 is older than serial 2"):
        install_directory(first, home)
    assert install_directory(second, home).serial == 2
    assert load_home_directory(home).serial == 2


def test_reading_a_newer_directory_raises_the_floor(tmp_path: Path) -> None:
    """A directory put in place by hand at a higher serial raises the floor when first read."""
    authority, home = _home(tmp_path)
    first, second = _revoking_pair(authority)
    install_directory(first, home)
    _copy_over(home, second)
    assert load_home_directory(home).serial == 2
    assert read_serial_floor(home) == 2
    _copy_over(home, first)
    with pytest.raises(DirectoryRollback):
        load_home_directory(home)


def test_a_mangled_floor_is_refused(tmp_path: Path) -> None:
    """A serial floor file that holds no number is an error naming the file, not floor 0."""
    authority, home = _home(tmp_path)
    install_directory(_revoking_pair(authority)[1], home)
    (home / SERIAL_FLOOR_FILE).write_text("two\n")
    with pytest.raises(MalformedDirectory, match=SERIAL_FLOOR_FILE):
        load_home_directory(home)


def test_running_home_keeps_its_directory_and_the_revocation(tmp_path: Path) -> None:
    """A running home refuses an older directory copied over, logs why, keeps serial 2."""
    authority, home = _home(tmp_path)
    first, second = _revoking_pair(authority)
    install_directory(first, home)
    install_directory(second, home)
    running = Home.resolve(home, environ={})
    assert running.directory().serial == 2
    _copy_over(home, first)
    with capture_logs() as logs:
        held = running.directory()
    assert held.serial == 2
    with pytest.raises(RevokedKey):
        held.signing_key("iom-kz", "iom-kz-s-1", used_at=T0 + DAY)
    refusals = [e for e in logs if e["event"] == "directory.rollback_refused"]
    assert len(refusals) == 1
    assert "serial 1, older than serial 2" in refusals[0]["detail"]
    with pytest.raises(DirectoryRollback):
        Home.resolve(home, environ={}).directory()
    key = load_authority(authority)
    install_directory(sign_directory(_standard(serial=3), key), home)
    assert running.directory().serial == 3
