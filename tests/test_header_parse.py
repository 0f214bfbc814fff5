"""The header read once agrees with the header read strictly, on every input."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import envelope
from broker.errors import MalformedEnvelope
from schemas.base import MessageKind
from schemas.header import EnvelopeHeader

HEADER = EnvelopeHeader(
    id=UUID("019b8cbd-b05e-7921-b980-0b7b76adc78d"),
    kind=MessageKind.RETURN_REQUEST,
    schema_version=1,
    case="iom-kz.KZ-B-0000001",
    sender="iom-kz",
    sender_key="iom-kz-s-2ea3c270",
    recipients=("iom-uz", "ngo-uz-a"),
    sent_at=datetime(2026, 1, 5, 6, 0, 0, 350000, tzinfo=UTC),
    seq=1,
)
GOOD = HEADER.model_dump_json().encode()
# The bytes that change how JSON reads: quotes, escapes, structure, whitespace
# JSON allows and whitespace it does not, a control character, a BOM.
TRICKY = [
    b'"', b"\\", b"{", b"}", b"[", b"]", b":", b",", b" ", b"\t", b"\n", b"\r",
    b"\x0c", b"\x0b", b"\x00", b"\xef\xbb\xbf", b"NaN", b"Infinity", b"\\u0069d", b"1e3",
]  # fmt: skip


def _outcome(parse: object, raw: bytes) -> tuple[str, object]:
    try:
        return "ok", parse(raw)  # type: ignore[operator]
    except MalformedEnvelope as e:
        return "refused", str(e)


def _agree(raw: bytes) -> None:
    assert _outcome(envelope._parse_header, raw) == _outcome(envelope._parse_header_strictly, raw)


def _with(**changes: object) -> bytes:
    data = json.loads(GOOD)
    data.update(changes)
    return json.dumps(data, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "raw",
    [
        GOOD,
        GOOD.replace(b'{"v":1,', b'{"v":1,"seq":7,'),  # a duplicate key
        GOOD.replace(b'{"v":1,', b'{"v":1,"s\\u0065q":7,'),  # a duplicate key, escaped
        GOOD.replace(b'"seq":1', b'"seq":1,"seq":1'),  # a duplicate key, same value
        b"\xef\xbb\xbf" + GOOD,  # a byte order mark
        GOOD.replace(b'"iom-kz"', b'"iom-\tkz"', 1),  # a raw control character in a string
        GOOD.replace(b'"seq":1', b'"seq":NaN'),
        GOOD.replace(b'"seq":1', b'"seq":Infinity'),
        GOOD.replace(b'"seq":1', b'"seq":1.0'),
        GOOD.replace(b'"seq":1', b'"seq":1e0'),
        GOOD + b" ",
        GOOD + b"\x0c",
        GOOD[:-1] + b",}",  # a trailing comma
        GOOD.replace(b'"v":1', b'"v" : 1'),
        GOOD.replace(b"iom-uz", b"iom-kz"),  # two equal strings that are not keys
        _with(recipients=["iom-uz", "iom-uz"]),
        _with(reply_to={"id": "x"}),
        _with(id="019b8cbd-b05e-4921-b980-0b7b76adc78d"),  # a UUIDv4
        GOOD.replace(b"iom-kz.KZ", b"iom-kz.\xff\xfe"),  # not UTF-8
        b"",
        b"[]",
        b'"{}"',
    ],
)
def test_the_two_reads_agree_on_hand_picked_headers(raw: bytes) -> None:
    _agree(raw)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, len(GOOD)), st.integers(0, 3), st.sampled_from(TRICKY)),
        min_size=1,
        max_size=3,
    )
)
def test_the_two_reads_agree_on_mutated_headers(edits: list[tuple[int, int, bytes]]) -> None:
    raw = GOOD
    for at, cut, insert in edits:
        at = min(at, len(raw))
        raw = raw[:at] + insert + raw[at + cut :]
    _agree(raw)


def test_a_plain_header_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def strictly(raw: bytes) -> EnvelopeHeader:
        raise AssertionError("read strictly")

    monkeypatch.setattr(envelope, "_parse_header_strictly", strictly)
    assert envelope._parse_header(GOOD) == HEADER
