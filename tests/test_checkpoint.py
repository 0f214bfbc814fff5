"""Signed checkpoints in the c2sp.org signed-note form."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import _crypto
from broker.errors import CheckpointInvalid
from services.checkpoint import (
    Checkpoint,
    checkpoint_body,
    key_id,
    open_checkpoint,
    origin_for,
    sign_checkpoint,
)
from services.merkle import MerkleTree, leaf_hash

SEED = bytes(range(32))
KEY = _crypto.signing_key_from_raw(SEED)
PUB = KEY.public_key()
NAME = origin_for("routing")
ROOT = MerkleTree.from_leaves(leaf_hash(bytes([i])) for i in range(5)).root()
CP = Checkpoint(origin=NAME, size=5, root=ROOT, time=datetime(2026, 3, 1, 9, 30, tzinfo=UTC))


def test_body_layout() -> None:
    """The body is origin, decimal size, base64 root and a time extension line, newline-ended."""
    expected = (
        f"trm.routing/routing\n5\n{base64.b64encode(ROOT).decode()}\ntime 2026-03-01T09:30:00Z\n"
    )
    assert checkpoint_body(CP) == expected.encode()


def test_key_id_follows_signed_note() -> None:
    """The key id is SHA-256(name || 0x0A || 0x01 || public key), first four bytes."""
    raw = _crypto.raw_public(PUB)
    assert key_id(NAME, PUB) == hashlib.sha256(NAME.encode() + b"\n\x01" + raw).digest()[:4]


def test_signed_note_layout() -> None:
    """The note is body, blank line, one em-dash line holding key id and a 64-byte signature."""
    note = sign_checkpoint(CP, KEY, NAME)
    body = checkpoint_body(CP)
    assert note.startswith(body + b"\n\xe2\x80\x94 " + NAME.encode() + b" ")
    assert note.endswith(b"\n")
    blob = base64.b64decode(note[len(body) + 1 :].decode().split(" ")[2])
    assert blob[:4] == key_id(NAME, PUB)
    _crypto.verify(PUB, blob[4:], body)


def test_round_trip() -> None:
    """A signed checkpoint opens to the same checkpoint, microseconds and other offsets too."""
    assert open_checkpoint(sign_checkpoint(CP, KEY, NAME), key=PUB, key_name=NAME) == CP
    plus5 = timezone(timedelta(hours=5))
    fine = Checkpoint(NAME, 0, ROOT, datetime(2026, 3, 1, 14, 30, 0, 123456, tzinfo=plus5))
    opened = open_checkpoint(sign_checkpoint(fine, KEY, NAME), key=PUB, key_name=NAME)
    assert opened.time == fine.time
    assert opened.time.tzinfo == UTC


def test_origin_checked_when_given() -> None:
    """open_checkpoint refuses a checkpoint of another log when the origin is named."""
    note = sign_checkpoint(CP, KEY, NAME)
    assert open_checkpoint(note, key=PUB, key_name=NAME, origin=NAME) == CP
    with pytest.raises(CheckpointInvalid, match=r"not 'trm\.routing/other'"):
        open_checkpoint(note, key=PUB, key_name=NAME, origin="trm.routing/other")


def test_every_flipped_byte_rejected() -> None:
    """Flipping any single byte of the note, body or signature line, makes it not open."""
    note = sign_checkpoint(CP, KEY, NAME)
    for i in range(len(note)):
        bad = bytearray(note)
        bad[i] ^= 0x01
        with pytest.raises(CheckpointInvalid):
            open_checkpoint(bytes(bad), key=PUB, key_name=NAME)


def test_flipped_signature_says_so() -> None:
    """A damaged signature is reported as a signature that does not verify."""
    note = sign_checkpoint(CP, KEY, NAME)
    body_len = len(checkpoint_body(CP)) + 1
    name, blob = note[body_len:].decode().split(" ")[1:]
    raw = bytearray(base64.b64decode(blob))
    raw[10] ^= 0x80
    bad = note[:body_len] + f"\u2014 {name} {base64.b64encode(raw).decode()}\n".encode()
    with pytest.raises(CheckpointInvalid, match="does not verify over the note body"):
        open_checkpoint(bad, key=PUB, key_name=NAME)


def test_changed_body_says_signature_fails() -> None:
    """A body altered after signing fails on the signature, before it is parsed."""
    note = sign_checkpoint(CP, KEY, NAME)
    with pytest.raises(CheckpointInvalid, match="does not verify"):
        open_checkpoint(note.replace(b"\n5\n", b"\n6\n", 1), key=PUB, key_name=NAME)


def test_another_key_rejected() -> None:
    """A note signed by another key under the same name is refused by its key id."""
    other = _crypto.new_signing_key()
    note = sign_checkpoint(CP, other, NAME)
    with pytest.raises(CheckpointInvalid, match="signed by another key"):
        open_checkpoint(note, key=PUB, key_name=NAME)


def test_another_key_with_forged_key_id_rejected() -> None:
    """Another key's signature carrying our key id still fails verification."""
    other = _crypto.new_signing_key()
    body = checkpoint_body(CP)
    blob = base64.b64encode(key_id(NAME, PUB) + _crypto.sign(other, body)).decode()
    note = body + f"\n\u2014 {NAME} {blob}\n".encode()
    with pytest.raises(CheckpointInvalid, match="does not verify"):
        open_checkpoint(note, key=PUB, key_name=NAME)


def test_wrong_key_name_rejected() -> None:
    """A note signed under another key name carries no signature the opener accepts."""
    note = sign_checkpoint(CP, KEY, "trm.routing/other")
    with pytest.raises(CheckpointInvalid, match=r"no signature by key 'trm\.routing/routing'"):
        open_checkpoint(note, key=PUB, key_name=NAME)


def test_missing_signature_line_rejected() -> None:
    """A body alone, or a body and blank line with nothing after, is refused as unsigned."""
    body = checkpoint_body(CP)
    with pytest.raises(CheckpointInvalid, match="unsigned"):
        open_checkpoint(body, key=PUB, key_name=NAME)
    with pytest.raises(CheckpointInvalid):
        open_checkpoint(body + b"\n", key=PUB, key_name=NAME)


def test_cosignatures_ignored_and_kept_verifying() -> None:
    """Signature lines by other keys (witnesses) are ignored; ours must still verify."""
    witness = _crypto.new_signing_key()
    note = sign_checkpoint(CP, KEY, NAME)
    body = checkpoint_body(CP)
    blob = base64.b64encode(key_id("witness", witness.public_key()) + _crypto.sign(witness, body))
    cosigned = note + b"\xe2\x80\x94 witness " + blob + b"\n"
    assert open_checkpoint(cosigned, key=PUB, key_name=NAME) == CP
    opened = open_checkpoint(cosigned, key=witness.public_key(), key_name="witness")
    assert opened == CP


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"trm.routing/routing\n5\nROOT\ntime 2026-03-01T09:30:00Z\ngarbage\n", "has 5 lines"),
        (b"trm.routing/routing\n5\nROOT\n", "has 3 lines"),
        (b"trm.routing/routing\n05\nROOT\ntime 2026-03-01T09:30:00Z\n", "size line"),
        (b"trm.routing/routing\n+5\nROOT\ntime 2026-03-01T09:30:00Z\n", "size line"),
        (b"trm.routing/routing\n5\nAAAA\ntime 2026-03-01T09:30:00Z\n", "has 3 bytes"),
        (b"trm.routing/routing\n5\nROOT\nwhen 2026-03-01T09:30:00Z\n", "fourth checkpoint line"),
        (b"trm.routing/routing\n5\nROOT\ntime 2026-03-01T09:30:00+01:00\n", "ending in Z"),
        (b"trm.routing/routing\n5\nROOT\ntime 2026-02-30T09:30:00Z\n", "not a real date"),
        (b"trm routing\n5\nROOT\ntime 2026-03-01T09:30:00Z\n", "origin"),
        (b"trm.routing/routing\n5\nROOT\xff\ntime 2026-03-01T09:30:00Z\n", "not UTF-8"),
    ],
)
def test_malformed_body_signed_by_the_right_key_rejected(body: bytes, message: str) -> None:
    """A properly signed body that is not a trm checkpoint is refused, saying what is wrong."""
    body = body.replace(b"ROOT", base64.b64encode(ROOT))
    blob = base64.b64encode(key_id(NAME, PUB) + _crypto.sign(KEY, body)).decode()
    note = body + f"\n\u2014 {NAME} {blob}\n".encode()
    with pytest.raises(CheckpointInvalid, match=message):
        open_checkpoint(note, key=PUB, key_name=NAME)


def test_non_canonical_base64_root_rejected() -> None:
    """A root in base64 with stray trailing bits is refused: one encoding per root."""
    encoded = base64.b64encode(ROOT).decode()
    skewed = encoded[:-2] + chr(ord(encoded[-2]) + 1) + "="
    body = f"{NAME}\n5\n{skewed}\ntime 2026-03-01T09:30:00Z\n".encode()
    blob = base64.b64encode(key_id(NAME, PUB) + _crypto.sign(KEY, body)).decode()
    note = body + f"\n\u2014 {NAME} {blob}\n".encode()
    with pytest.raises(CheckpointInvalid, match="not canonical base64"):
        open_checkpoint(note, key=PUB, key_name=NAME)


@pytest.mark.parametrize(
    ("note", "message"),
    [
        (b"x\n\n- trm.routing/routing AAAA\n", "em dash"),
        (b"x\n\n\xe2\x80\x94 trm.routing/routing AAAA", "end with a signature line"),
        (b"x\n\n\xe2\x80\x94 trm.routing/routing\n", "is not"),
        (b"x\n\n\xe2\x80\x94 trm.routing/routing !!!!\n", "not valid base64"),
        (b"x\n\n\xe2\x80\x94 trm.routing/routing AAAA\n", "too short"),
        (b"x\n\n\xe2\x80\x94 a+b AAAAAAAA\n", "contains a space"),
        (b"x\n\n\xff\n", "not UTF-8"),
        (b"x" * 70_000 + b"\n\n", "the limit is"),
    ],
)
def test_malformed_signature_lines_rejected(note: bytes, message: str) -> None:
    """Broken signature framing is refused with a message naming the problem."""
    with pytest.raises(CheckpointInvalid, match=message):
        open_checkpoint(note, key=PUB, key_name=NAME)


@pytest.mark.parametrize(
    ("cp", "message"),
    [
        (Checkpoint(NAME, -1, ROOT, CP.time), "non-negative"),
        (Checkpoint(NAME, 5, ROOT[:31], CP.time), "32 bytes"),
        (Checkpoint(NAME, 5, ROOT, datetime(2026, 3, 1)), "timezone-aware"),
        (Checkpoint("", 5, ROOT, CP.time), "non-empty"),
        (Checkpoint("a\nb", 5, ROOT, CP.time), "control characters"),
    ],
)
def test_bad_checkpoint_refused_when_signing(cp: Checkpoint, message: str) -> None:
    """sign_checkpoint refuses a checkpoint it could not write as a valid body."""
    with pytest.raises(CheckpointInvalid, match=message):
        sign_checkpoint(cp, KEY, NAME)


def test_bad_key_name_refused_when_signing() -> None:
    """A key name with a space or '+' cannot sign, per the signed-note rules."""
    for name in ("", "a b", "a+b"):
        with pytest.raises(CheckpointInvalid):
            sign_checkpoint(CP, KEY, name)


@settings(max_examples=300, deadline=None)
@given(note=st.binary(max_size=300), tail=st.binary(max_size=80))
def test_fuzz_only_checkpoint_invalid(note: bytes, tail: bytes) -> None:
    """Random notes, and a real note with random bytes appended, raise only CheckpointInvalid."""
    for candidate in (note, sign_checkpoint(CP, KEY, NAME) + tail):
        try:
            opened = open_checkpoint(candidate, key=PUB, key_name=NAME)
        except CheckpointInvalid as e:
            assert str(e)
        else:
            assert opened == CP
