"""Hostile bytes: nothing but TrmError subclasses escape verify_envelope and open_envelope."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import _crypto, envelope
from broker.directory import Directory, DirectoryBody, Role, load_directory, sign_directory
from broker.envelope import (
    SIGNED_CONTEXT,
    Recipient,
    open_envelope,
    read_header,
    seal,
    sign,
    verify_envelope,
)
from broker.errors import TrmError
from broker.keys import init_participant, load_keys
from schemas.base import MessageKind
from schemas.examples import example

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FUZZ = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Target:
    """A valid envelope and what is needed to check and open it."""

    raw: bytes
    directory: Directory
    recipient: Recipient
    signer: Ed25519PrivateKey
    signed: bytes
    """A delivery receipt in the signed form, from the same sender to the same recipient."""


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Target:
    """A return request from a mission to a hybrid-key mission and an X25519-key NGO."""
    root: Path = tmp_path_factory.mktemp("fuzz")
    start = NOW - timedelta(days=1)
    cards = [
        init_participant(root / "kz", participant_id="iom-kz", role=Role.MISSION, country="KZ",
                         now=start),
        init_participant(root / "uz", participant_id="iom-uz", role=Role.MISSION, country="UZ",
                         now=start),
        init_participant(root / "ngo", participant_id="ngo-uz-a", role=Role.NGO, country="UZ",
                         parent="iom-uz", suite=_crypto.Suite.X25519, now=start),
    ]  # fmt: skip
    authority = Ed25519PrivateKey.generate()
    body = DirectoryBody(serial=1, issued_at=start, participants=tuple(cards))
    directory = load_directory(sign_directory(body, authority), authority=authority.public_key())
    sealed = seal(
        example(MessageKind.RETURN_REQUEST),
        case="iom-kz.KZ-2026-0042",
        sender=load_keys(root / "kz").sender(NOW),
        recipients=["iom-uz", "ngo-uz-a"],
        directory=directory,
        seq=1,
        now=NOW,
        allow_classical=True,  # both suites' key entries are what the fuzzer mutates
    )
    receipt = sign(
        example(MessageKind.DELIVERY_RECEIPT),
        case="iom-kz.KZ-2026-0042",
        sender=load_keys(root / "kz").sender(NOW),
        recipients=["iom-uz"],
        directory=directory,
        seq=2,
        now=NOW,
    )
    recipient = Recipient("iom-uz", load_keys(root / "uz").decryption)
    signer = load_keys(root / "kz").sender(NOW).key
    return Target(sealed.raw, directory, recipient, signer, receipt.raw)


def _check(target: Target, data: bytes) -> None:
    """Feed `data` to every entry point; only TrmError may come out."""
    for attempt in (
        lambda: read_header(data),
        lambda: verify_envelope(data, target.directory, at=NOW),
        lambda: verify_envelope(data, target.directory, at=NOW, max_age=None),
        lambda: open_envelope(
            data, recipient=target.recipient, directory=target.directory, now=NOW
        ),
    ):
        try:
            attempt()
        except TrmError:
            continue
        except Exception as e:
            pytest.fail(f"{type(e).__name__} escaped instead of a TrmError: {e}")


@st.composite
def mutations(draw: st.DrawFn, raw: bytes) -> bytes:
    """A valid envelope with bit flips, a truncation, an insertion or a splice."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "truncate", "insert", "splice", "set-length"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if how == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "truncate":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif how == "splice":
            end = draw(st.integers(at, len(data)))
            src = draw(st.integers(0, len(raw) - 1))
            data[at:end] = raw[src : src + draw(st.integers(0, 64))]
        else:
            data[at : at + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(data)


@FUZZ
@given(data=st.data())
def test_mutated_envelopes_raise_only_trm_errors(target: Target, data: st.DataObject) -> None:
    """Bit flips, truncations, insertions and splices of a valid envelope raise only TrmError."""
    mutated = data.draw(mutations(target.raw))
    _check(target, mutated)


@FUZZ
@given(data=st.data())
def test_mutated_then_resigned_envelopes_raise_only_trm_errors(
    target: Target, data: st.DataObject
) -> None:
    """Mutations re-signed by the real sender reach the later checks and raise only TrmError."""
    body = data.draw(mutations(target.raw[:-64]))
    _check(target, body + target.signer.sign(b"trm/v1 envelope\x00" + body))


@FUZZ
@given(data=st.data())
def test_mutated_signed_envelopes_raise_only_trm_errors(
    target: Target, data: st.DataObject
) -> None:
    """The same mutations of a signed receipt, as they are and re-signed by the real sender
    under the signed form's context, raise only TrmError."""
    mutated = data.draw(mutations(target.signed))
    _check(target, mutated)
    body = data.draw(mutations(target.signed[:-64]))
    _check(target, body + target.signer.sign(SIGNED_CONTEXT + body))


@FUZZ
@given(noise=st.binary(max_size=4096))
def test_random_bytes_raise_only_trm_errors(target: Target, noise: bytes) -> None:
    """Arbitrary bytes, with or without either form's magic, raise only TrmError."""
    _check(target, noise)
    _check(target, b"TRM1" + noise)
    _check(target, b"TRS1" + noise)


@FUZZ
@given(header=st.binary(max_size=512), tail=st.binary(max_size=256))
def test_random_header_in_valid_framing_raises_only_trm_errors(
    target: Target, header: bytes, tail: bytes
) -> None:
    """Any header bytes in otherwise correct framing raise only TrmError."""
    framed = b"TRM1" + len(header).to_bytes(4, "big") + header + b"\x00\x00"
    framed += len(tail).to_bytes(4, "big") + tail + bytes(64)
    _check(target, framed)


def test_unmutated_envelope_opens(target: Target) -> None:
    """The fuzzing target itself is a valid envelope, so mutations start from accepted bytes."""
    opened = open_envelope(
        target.raw, recipient=target.recipient, directory=target.directory, now=NOW
    )
    assert opened.message == example(MessageKind.RETURN_REQUEST)


def _framed(parse: Callable[[bytes], object], data: bytes) -> tuple[str, object]:
    try:
        return "parsed", parse(data)
    except TrmError as e:
        return type(e).__name__, str(e)


def _agree(data: bytes) -> None:
    fast = _framed(envelope._parse, data)
    assert fast == _framed(lambda d: envelope._parse_by_field(d, len(d)), data)


@FUZZ
@given(data=st.data())
def test_one_pass_framing_agrees_with_field_by_field(target: Target, data: st.DataObject) -> None:
    """Whatever a mutation breaks, both framings accept it or both name the same problem."""
    _agree(target.raw)
    _agree(data.draw(mutations(target.raw)))
    _agree(data.draw(mutations(target.signed)))


def test_one_pass_framing_refuses_an_oversized_header_as_field_by_field(target: Target) -> None:
    """A header padded past the limit is refused by name, though its framing is consistent."""
    header_len = int.from_bytes(target.raw[4:8], "big")
    header = target.raw[8 : 8 + header_len]
    padded = header + b" " * (envelope.MAX_HEADER_BYTES + 1 - len(header))
    raw = b"TRM1" + len(padded).to_bytes(4, "big") + padded + target.raw[8 + header_len :]
    assert _framed(envelope._parse, raw) == (
        "MalformedEnvelope",
        f"header longer than {envelope.MAX_HEADER_BYTES} bytes",
    )
    _agree(raw)
