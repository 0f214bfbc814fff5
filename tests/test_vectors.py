"""Replay the committed envelope test vectors in tests/vectors/ at their fixed time."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from broker import _crypto, errors
from broker.directory import Directory, load_directory
from broker.envelope import Recipient, open_envelope, read_header, verify_envelope
from broker.errors import TrmError
from schemas.registry import encode_payload

VECTORS = Path(__file__).parent / "vectors"
VALID = sorted(VECTORS.glob("valid-*.json"))
INVALID = sorted(VECTORS.glob("invalid-*.json"))


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    """Every private and public key the vectors use."""
    return _load(VECTORS / "keys.json")


@pytest.fixture(scope="module")
def directory(keys: dict[str, Any]) -> Directory:
    """The committed directory, verified against the committed authority key."""
    authority = _crypto.verify_key_from_raw(bytes.fromhex(keys["authority"]["public"]))
    return load_directory((VECTORS / "directory.json").read_bytes(), authority=authority)


def _recipient(keys: dict[str, Any], pid: str) -> Recipient:
    entries = keys["participants"][pid]["encryption"]
    return Recipient(
        pid,
        {
            kid: _crypto.DecryptionKey(_crypto.Suite(e["suite"]), bytes.fromhex(e["private"]))
            for kid, e in entries.items()
        },
    )


def _now(vector: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(vector["now"])


def test_there_are_enough_vectors() -> None:
    """The folder holds valid vectors and at least twelve invalid ones."""
    assert len(VALID) >= 3
    assert len(INVALID) >= 12


def test_keys_match_the_directory(keys: dict[str, Any], directory: Directory) -> None:
    """Every public key in keys.json is the one the directory lists and derives from its private."""
    for pid, entry in keys["participants"].items():
        card = directory.participant(pid)
        for kid, key in entry["signing"].items():
            private = _crypto.signing_key_from_raw(bytes.fromhex(key["private"]))
            assert _crypto.raw_public(private.public_key()).hex() == key["public"]
            listed = card.key(kid)
            assert listed is not None and listed.raw().hex() == key["public"]
        for kid, key in entry["encryption"].items():
            private_key = _crypto.DecryptionKey(
                _crypto.Suite(key["suite"]), bytes.fromhex(key["private"])
            )
            assert private_key.public().raw.hex() == key["public"]
            listed = card.key(kid)
            assert listed is not None and listed.raw().hex() == key["public"]


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_vector_opens(path: Path, keys: dict[str, Any], directory: Directory) -> None:
    """Each recipient named by a valid vector opens it to the stored header and payload."""
    vector = _load(path)
    raw = bytes.fromhex(vector["envelope"])
    header_bytes = vector["header"].encode()
    assert raw[8 : 8 + len(header_bytes)] == header_bytes
    expected_header = json.loads(header_bytes)
    assert read_header(raw).model_dump(mode="json") == expected_header
    verified = verify_envelope(raw, directory, at=_now(vector))
    assert verified.digest == vector["sha256"]
    for pid in vector["recipients"]:
        opened = open_envelope(
            raw, recipient=_recipient(keys, pid), directory=directory, now=_now(vector)
        )
        assert opened.header.model_dump(mode="json") == expected_header
        assert json.loads(encode_payload(opened.message)) == vector["payload"]


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_vector_is_refused(path: Path, keys: dict[str, Any], directory: Directory) -> None:
    """Each invalid vector raises exactly the error class and reason it names."""
    vector = _load(path)
    error = getattr(errors, vector["error"])
    assert issubclass(error, TrmError)
    with pytest.raises(TrmError) as info:
        open_envelope(
            bytes.fromhex(vector["envelope"]),
            recipient=_recipient(keys, vector["recipient"]),
            directory=directory,
            now=_now(vector),
            amqp_user_id=vector["amqp_user_id"],
        )
    assert type(info.value) is error
    assert info.value.reason == vector["reason"]
