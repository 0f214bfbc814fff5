"""Fork reports: a witness tells the auditors of two checkpoints of one log that conflict.

A report is a JSON payload signed by the witness's own Ed25519 signing key,
carried as ``{"type": "trm-fork-report", "report": base64(payload),
"signature": base64(Ed25519(DOMAIN || payload)), "kid": <key id>}``. It is
signed rather than sealed as an envelope: both checkpoint notes are public
(they name no case and no person), so there is nothing to encrypt, and a
detached signature over the exact payload bytes is all an auditor needs to
know which witness says it.

`verify_report` is the auditor's side and trusts nothing in the report: the
signature must verify under the witness's key in the auditor's verified
directory (a participant the directory lists as a witness), both notes under
the routing participant their origin names (`open_log_checkpoint`), and the
notes must conflict. How strongly they do is said by `strength`:

- ``proven``: the notes alone prove the log misbehaved: one size, two roots;
  or a smaller tree signed after a larger one.
- ``attested``: two sizes in order; the witness says the log could not prove
  the larger extends the smaller. The auditor can confirm it by asking the
  log for that consistency proof (`trm audit consistency`).

Verified reports are kept in ``HOME/fork-reports.jsonl`` (one wire report a
line) so they outlive the queue they came from.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pika.exceptions

from broker import _crypto
from broker.directory import Directory
from broker.errors import AuditError, TrmError
from broker.keys import Sender
from services.checkpoint import Checkpoint, named_log, open_log_checkpoint

if TYPE_CHECKING:
    from broker.transport import AmqpSettings

REPORT_TYPE = "trm-fork-report"
DOMAIN = b"trm-fork-report/v1\n"
STORE_FILE = "fork-reports.jsonl"
MAX_REPORT_BYTES = 64 * 1024
_PIKA_ERRORS = (pika.exceptions.AMQPError, OSError)


class ReportRefused(AuditError):
    """A fork report that does not verify; `why` says which check failed."""

    reason = "fork_report_refused"

    def __init__(self, why: str, message: str) -> None:
        super().__init__(f"{why}: {message}")
        self.why = why


@dataclass(frozen=True)
class ForkReport:
    """A verified fork report."""

    witness: str
    origin: str
    kind: str
    detail: str
    detected_at: str
    strength: str
    sizes: tuple[int, int]
    cosigned_note: str
    offered_note: str
    wire: bytes

    def shown(self) -> dict[str, Any]:
        """JSON-ready, without the wire bytes."""
        return {
            "witness": self.witness,
            "origin": self.origin,
            "kind": self.kind,
            "detail": self.detail,
            "detected_at": self.detected_at,
            "strength": self.strength,
            "sizes": list(self.sizes),
            "cosigned_note": self.cosigned_note,
            "offered_note": self.offered_note,
        }


def is_report(body: bytes) -> bool:
    """Whether `body` claims to be a fork report (other messages share the queue)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("type") == REPORT_TYPE


def report_body(
    signer: Sender,
    *,
    origin: str,
    kind: str,
    detail: str,
    detected_at: datetime,
    cosigned_note: str,
    offered_note: str,
) -> bytes:
    """The wire report of one conflict, signed by `signer` (the witness)."""
    payload = json.dumps(
        {
            "version": 1,
            "witness": signer.participant,
            "origin": origin,
            "kind": kind,
            "detail": detail,
            "detected_at": detected_at.isoformat(),
            "signed_at": datetime.now(UTC).isoformat(),
            "cosigned_note": cosigned_note,
            "offered_note": offered_note,
        },
        separators=(",", ":"),
    ).encode()
    signature = _crypto.sign(signer.key, DOMAIN + payload)
    wire = {
        "type": REPORT_TYPE,
        "kid": signer.kid,
        "report": base64.b64encode(payload).decode(),
        "signature": base64.b64encode(signature).decode(),
    }
    return json.dumps(wire, separators=(",", ":")).encode()


def verify_report(body: bytes, directory: Directory, *, sent_by: str | None) -> ForkReport:
    """The verified report in `body`, or ReportRefused saying why.

    `sent_by` is the AMQP user id RabbitMQ validated; it must be the witness.
    """
    kid, payload, signature = _unwrap(body)
    data = _payload(payload)
    witness = data["witness"]
    if witness not in directory.body.witnesses:
        raise ReportRefused("not_a_witness", f"{witness!r} is not a witness in the directory")
    if sent_by != witness:
        raise ReportRefused("wrong_sender", f"sent by {sent_by!r}, signed as {witness!r}")
    try:
        signed_at = datetime.fromisoformat(data["signed_at"])
        key = directory.signing_key(witness, kid, used_at=signed_at)
        _crypto.verify(key, signature, DOMAIN + payload)
    except (TrmError, _crypto.CryptoError, ValueError, TypeError) as e:
        raise ReportRefused(
            "bad_signature", f"not signed by a valid key of witness {witness!r}"
        ) from e
    cosigned = _opened(data["cosigned_note"], directory, data["origin"])
    offered = _opened(data["offered_note"], directory, data["origin"])
    return ForkReport(
        witness=witness,
        origin=data["origin"],
        kind=data["kind"],
        detail=data["detail"],
        detected_at=data["detected_at"],
        strength=conflict_strength(cosigned, offered),
        sizes=(cosigned.size, offered.size),
        cosigned_note=data["cosigned_note"],
        offered_note=data["offered_note"],
        wire=body,
    )


def conflict_strength(a: Checkpoint, b: Checkpoint) -> str:
    """``proven`` or ``attested`` (see the module); ReportRefused if they do not conflict."""
    if a.size == b.size:
        if a.root == b.root:
            raise ReportRefused("no_conflict", f"both notes hold the same tree of size {a.size}")
        return "proven"
    small, large = (a, b) if a.size < b.size else (b, a)
    return "proven" if small.time > large.time else "attested"


def _unwrap(body: bytes) -> tuple[str, bytes, bytes]:
    if len(body) > MAX_REPORT_BYTES:
        raise ReportRefused("malformed", f"larger than {MAX_REPORT_BYTES} bytes")
    try:
        wire = json.loads(body)
        return (
            str(wire["kid"]),
            base64.b64decode(wire["report"], validate=True),
            base64.b64decode(wire["signature"], validate=True),
        )
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, binascii.Error) as e:
        raise ReportRefused("malformed", "not a fork report") from e


def _payload(payload: bytes) -> dict[str, Any]:
    fields = ("witness", "origin", "kind", "detail", "detected_at", "signed_at")
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise ReportRefused("malformed", "the report is not JSON") from e
    notes = ("cosigned_note", "offered_note")
    if not isinstance(data, dict) or not all(isinstance(data.get(f), str) for f in fields + notes):
        raise ReportRefused("malformed", "the report lacks a field")
    return data


def _opened(note: str, directory: Directory, origin: str) -> Checkpoint:
    try:
        raw = note.encode()
        checkpoint = open_log_checkpoint(raw, directory, log_id=named_log(raw, directory))
    except TrmError as e:
        raise ReportRefused("bad_note", f"a note does not verify as the routing log's: {e}") from e
    if checkpoint.origin != origin:
        raise ReportRefused("bad_note", f"a note is of {checkpoint.origin!r}, not {origin!r}")
    return checkpoint


# --- the auditor's store ----------------------------------------------------------------


def store(home: Path, reports: list[ForkReport]) -> None:
    """Append the reports not yet kept to ``HOME/fork-reports.jsonl`` (mode 0600), synced.

    A witness that sends one conflict again (its confirm was lost) signs it
    anew; it is the same conflict, kept once.
    """
    held: set[tuple[str, str, str]] = set()
    for line in stored(home):
        data = json.loads(base64.b64decode(json.loads(line)["report"]))
        held.add((data["witness"], data["cosigned_note"], data["offered_note"]))
    fresh = []
    for report in reports:
        key = (report.witness, report.cosigned_note, report.offered_note)
        if key not in held:
            held.add(key)
            fresh.append(report)
    if not fresh:
        return
    fd = os.open(home / STORE_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"".join(r.wire + b"\n" for r in fresh))
        os.fsync(fd)
    finally:
        os.close(fd)


def stored(home: Path) -> list[bytes]:
    """The wire reports kept in `home`, each verified when it arrived."""
    path = home / STORE_FILE
    return path.read_bytes().splitlines() if path.exists() else []


def sender_of(wire: bytes) -> str | None:
    """The witness a kept report names (it was checked against the sender on arrival)."""
    try:
        witness = json.loads(base64.b64decode(json.loads(wire)["report"]))["witness"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    return witness if isinstance(witness, str) else None


# --- the auditor's queue ----------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one `take` found: the reports verified and those refused, with their reasons."""

    verified: list[ForkReport]
    refused: list[tuple[str | None, str]]
    """(the AMQP user that sent it, why it was refused)."""
    others: int
    """Messages on the queue that are no fork report, left there."""


def take(home: Path, settings: AmqpSettings, participant: str, directory: Directory) -> Outcome:
    """Verify every fork report on ``trm.witness.<participant>``, keep the good ones, ack all.

    Reports are acked only after the verified ones are stored, so a crash
    loses none. Other messages (cosignature requests, if this auditor is a
    witness too) are not acked and go back to the queue when the channel closes.
    """
    from broker.topology import witness_queue
    from broker.transport import open_connection, translate

    verified: list[ForkReport] = []
    refused: list[tuple[str | None, str]] = []
    others = 0
    connection = open_connection(settings)
    try:
        channel = connection.channel()
        tags: list[int] = []
        while True:
            method, properties, body = channel.basic_get(witness_queue(participant))
            if method is None or method.delivery_tag is None:
                break
            if body is None or not is_report(body):
                others += 1
                continue
            tags.append(method.delivery_tag)
            sent_by = None if properties is None else properties.user_id
            try:
                verified.append(verify_report(body, directory, sent_by=sent_by))
            except ReportRefused as e:
                refused.append((sent_by, str(e)))
        store(home, verified)
        for tag in tags:
            channel.basic_ack(tag)
    except _PIKA_ERRORS as e:
        raise translate(e, settings, "taking fork reports") from e
    finally:
        if connection.is_open:
            connection.close()
    return Outcome(verified, refused, others)
