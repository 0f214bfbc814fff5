"""The auditor's offline tools: verify and replay an audit log export.

`verify_export` checks everything an export claims, with nothing but the
export, the trust directory and (optionally) a checkpoint the auditor kept
from earlier, and names the first bad entry. Whose log it is comes from the
verified directory, never from the export's own header: the routing
participant the auditor names, else the one the first checkpoint's origin
names; the header's fields are claims checked against it. `replay_export` rebuilds every
case's handoff history from the log alone. The checks, their order and what
they cannot detect are specified in ``docs/audit.md``.

Envelope signatures dominate the cost. The main process only cuts the export
into byte ranges at line ends; worker processes each read their own ranges,
check every line, hash the entries and verify their envelopes, and send back
the leaf hashes, `prev` links, receive times and checkpoint lines, from which
the main process checks the chain and the Merkle tree. So verification is
linear in the size of the export and uses every core. Whatever the
scheduling, the error reported is the one with the lowest entry index (ties
broken by the order of the checks), and a range whose lines are not all in
order is read again knowing where it starts, so the result is that of one
sequential read.
"""

from __future__ import annotations

import binascii
import hashlib
import itertools
import json
import os
import re
import struct
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import pybase64
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.directory import Directory, load_directory
from broker.envelope import EnvelopeVerifier, read_header
from broker.errors import AuditError, LogTampered, ProofInvalid, TrmError
from services.auditlog import (
    ENTRY_CONTEXT,
    EXPORT_TYPE,
    EXPORT_VERSION,
    HASH_BYTES,
    REJECTED,
    TIME,
    VERIFICATION,
    VERIFIED,
    ZERO_HASH,
    LogEntry,
    check_verification,
    parse_time,
)
from services.cases import CaseState, Event, replay
from services.checkpoint import (
    Checkpoint,
    named_log,
    open_log_checkpoint,
    origin_for,
    routing_participant,
)
from services.cosignature import CosignatureInvalid, check_cosignatures, require_quorum
from services.merkle import EMPTY_ROOT, MerkleTree, verify_consistency

CHUNK_BYTES = 1 << 20
"""Bytes of the export per unit of work (cut at the next line end): about 700 entries."""

SIGNATURE_REASONS = frozenset({"bad_signature", "malformed", "too_large"})
"""Rejections that depend on the bytes alone: an entry recorded with one of
these reasons that verifies offline was wrongly rejected."""

# Ranks break ties between problems found at the same entry: the order of the checks.
_STRUCTURE, _CHAIN, _ENVELOPE, _CHECKPOINT, _COVERAGE = range(5)
_ENTRY_KEYS = frozenset({"type", "index", "received_at", "verification", "prev", "envelope"})
_CHECKPOINT_KEYS = frozenset({"type", "key_name", "note"})
_HEADER_KEYS = frozenset({"type", "version", "origin", "log_key", "key_name", "directory"})

_TIME_BYTES = len("2026-03-01T08:00:02.000123Z")
"""Every receive time that passes `parse_time` has this many ASCII characters."""

# The leaf hash of docs/audit.md, SHA-256(0x00 || leaf input), with the fixed
# prefix hashed once.
_LEAF_HEAD = hashlib.sha256(b"\x00" + ENTRY_CONTEXT)
_U16, _U32, _U64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")

# An entry line exactly as `AuditLog.export` writes it, up to the envelope's text.
_EXPORTED_ENTRY = re.compile(
    rb'\{"type":"entry","index":(0|[1-9][0-9]{0,17}),"received_at":"('
    + TIME.pattern.encode()
    + rb')","verification":"('
    + VERIFICATION.pattern.encode()
    + rb')","prev":"([0-9a-f]{64})","envelope":"'
)

_Fields = tuple[int, bytes, datetime, bytes, bytes, bytes]
"""An entry line's index, received_at, its time, verification, prev and envelope bytes."""

_OnEntry = Callable[[int, datetime, bytes, bytes], None]
"""Called with each entry's index, receive time, verification and envelope, in order."""

Progress = Callable[[int, int], None]
"""Called as an export is verified: bytes of its entries read so far, and in all."""


@dataclass(frozen=True)
class VerifyReport:
    """What an intact export holds."""

    entries: int
    checkpoints: int
    envelopes_ok: int
    """Entries recorded ``ok`` whose envelope verifies offline."""
    rejected_recorded: int
    """Entries the routing service recorded as rejected."""
    rejected_confirmed: int
    """Rejected entries that fail verification offline too."""
    root: str
    """Hex Merkle root of every entry, as signed by the last checkpoint."""
    origin: str
    log_id: str
    """The routing participant whose keys the checkpoints were checked against."""
    directory_serial: int
    """The serial of the directory that lists `log_id` as routing and its keys."""
    quorum: int = 0
    """How many witnesses had to cosign the newest checkpoint."""
    directory_quorum: int = 0
    """The quorum the directory sets; `quorum` is lower when the auditor lowered it."""
    witnesses: tuple[str, ...] = ()
    """The witnesses whose cosignatures of the newest checkpoint verified."""

    def summary(self) -> str:
        """One line for a terminal."""
        return (
            f"intact: {self.entries} entries, {self.checkpoints} checkpoints, "
            f"{self.envelopes_ok} envelopes verified, {self.rejected_recorded} recorded as "
            f"rejected ({self.rejected_confirmed} confirmed offline); root {self.root}; "
            f"log of routing participant {self.log_id!r} ({self.origin}) "
            f"in directory serial {self.directory_serial}; {self.witnessed()}"
        )

    def witnessed(self) -> str:
        """What the witnesses' cosignatures showed, in words."""
        named = ", ".join(self.witnesses) or "none"
        lowered = (
            f", LOWERED from the directory's {self.directory_quorum} by the auditor"
            if self.quorum < self.directory_quorum
            else ""
        )
        if self.quorum == 0 and self.directory_quorum == 0:
            return f"no witness quorum set by the directory (cosigned by: {named})"
        return (
            f"quorum met: {len(self.witnesses)} witnesses cosigned the newest checkpoint "
            f"({named}), {self.quorum} required{lowered}"
        )


@dataclass(frozen=True)
class _Header:
    origin: str
    log_key: str
    key_name: str
    directory: bytes | None


@dataclass(frozen=True)
class _Mark:
    """A checkpoint line as found in the export."""

    key_name: str
    note: bytes
    after: int
    """The number of entries read before this line (in its part, while in a `_Part`)."""


@dataclass
class _Findings:
    """The problems found so far; the one with the lowest (index, rank) is reported."""

    best: tuple[int, int, str] | None = None

    def add(self, index: int, rank: int, problem: str) -> None:
        if self.best is None or (index, rank) < self.best[:2]:
            self.best = (index, rank, problem)

    def raise_first(self) -> None:
        if self.best is not None:
            raise LogTampered(self.best[0], self.best[2])


@dataclass
class _Part:
    """What one byte range of the export holds, read line by line in order.

    Worker processes return these, so they hold bytes rather than objects:
    32 bytes of leaf hash and of `prev` and `_TIME_BYTES` of receive time an
    entry, and the checkpoint lines with `after` counted from the range start.
    """

    first_index: int | None
    """The index the first entry has or must have; None: taken from the first entry read."""
    entries: int = 0
    leaves: bytearray = field(default_factory=bytearray)
    prevs: bytearray = field(default_factory=bytearray)
    times: bytearray = field(default_factory=bytearray)
    marks: list[_Mark] = field(default_factory=list)
    problem: tuple[int, str] | None = None
    """The line problem that ended the read, at the entry index expected there."""
    error: str | None = None
    """Why the range could not be read."""

    def read(self, line: bytes, on_entry: _OnEntry) -> None:
        """Check one line (LogTampered if bad) and add what it holds."""
        first = self.first_index
        expected = None if first is None else first + self.entries
        fields = _exported_entry(line)
        if fields is None or (expected is not None and fields[0] != expected):
            found = _any_line(line, expected, self.entries)
            if isinstance(found, _Mark):
                self.marks.append(found)
                return
            fields = found
        index, when, at, verification, prev, raw = fields
        if first is None:
            if not 0 <= index < 1 << 63:
                # No entry has that index: the range is read again knowing which it must be.
                raise LogTampered(None, f"the first entry read holds index {index}")
            self.first_index = index
        self.leaves += _leaf_hash(index, when, verification, prev, raw)
        self.prevs += prev
        self.times += when
        self.entries += 1
        on_entry(index, at, verification, raw)


@dataclass
class _Scan:
    """What the reading of the export yields, gathered part by part."""

    header: _Header
    tree: MerkleTree | None = None
    """When given, the Merkle tree of the leaves, extended as parts are taken."""
    leaf_bytes: bytearray = field(default_factory=bytearray)
    prev_bytes: bytearray = field(default_factory=bytearray)
    time_bytes: bytearray = field(default_factory=bytearray)
    marks: list[_Mark] = field(default_factory=list)
    count: int = 0

    def take(self, part: _Part, findings: _Findings) -> bool:
        """Add a part read from entry `count` on; False once a line problem ends the read."""
        if part.error is not None:
            raise AuditError(part.error)
        self.marks += [replace(m, after=self.count + m.after) for m in part.marks]
        self.leaf_bytes += part.leaves
        self.prev_bytes += part.prevs
        self.time_bytes += part.times
        self.count += part.entries
        if self.tree is not None:
            for leaf in _split_hashes(part.leaves):
                self.tree.append(leaf)
        if part.problem is not None:
            findings.add(part.problem[0], _STRUCTURE, part.problem[1])
            return False
        return True

    @cached_property
    def leaves(self) -> list[bytes]:
        """The leaf hashes, read to the end."""
        return _split_hashes(self.leaf_bytes)

    def merkle_tree(self) -> MerkleTree:
        """The Merkle tree of every leaf read (once reading is done)."""
        if self.tree is None:
            self.tree = MerkleTree.from_leaves(self.leaves)
        return self.tree

    def time(self, index: int) -> datetime:
        """The receive time of entry `index`."""
        at = index * _TIME_BYTES
        return parse_time(self.time_bytes[at : at + _TIME_BYTES].decode("ascii"))


def _split_hashes(blob: bytes | bytearray) -> list[bytes]:
    data = bytes(blob)
    return [data[i : i + HASH_BYTES] for i in range(0, len(data), HASH_BYTES)]


# --- reading an export -------------------------------------------------------------------


def _unreadable(path: Path, e: OSError) -> str:
    return f"cannot read the export {path}: {e.strerror}"


def _layout(path: Path) -> tuple[_Header, int, int]:
    """The header, and the byte offsets where the lines after it begin and the file ends."""
    try:
        with path.open("rb") as f:
            first = f.readline()
            start = f.tell()
            size = f.seek(0, os.SEEK_END)
    except OSError as e:
        raise AuditError(_unreadable(path, e)) from e
    return _header(first or None), start, size


def _ranges(path: Path, start: int, size: int) -> Iterator[tuple[int, int]]:
    """Byte ranges of about `CHUNK_BYTES` from `start` to `size`, each ending at a line end."""
    step = max(CHUNK_BYTES, 1)
    try:
        with path.open("rb") as f:
            while start < size:
                f.seek(start + step - 1)
                f.readline()
                end = min(f.tell(), size)
                yield start, end
                start = end
    except OSError as e:
        raise AuditError(_unreadable(path, e)) from e


def _read_part(path: Path, start: int, end: int, first: int | None, on_entry: _OnEntry) -> _Part:
    """The lines in bytes `start` to `end`, up to the first bad one; `first` as in `_Part`."""
    part = _Part(first)
    try:
        with path.open("rb") as f:
            f.seek(start)
            data = f.read(end - start)
    except OSError as e:
        part.error = _unreadable(path, e)
        return part
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the newline ending the last line
        lines.pop()
    try:
        for line in lines:
            part.read(line, on_entry)
    except LogTampered as e:
        part.problem = (e.index or 0, e.problem)
    return part


def _leaf_hash(index: int, when: bytes, verification: bytes, prev: bytes, raw: bytes) -> bytes:
    """`LogEntry.leaf_hash` from the entry's fields as bytes, without copying the envelope."""
    h = _LEAF_HEAD.copy()
    h.update(
        b"".join(
            (
                _U64.pack(index),
                _U16.pack(len(when)),
                when,
                _U16.pack(len(verification)),
                verification,
                prev,
                _U32.pack(len(raw)),
            )
        )
    )
    h.update(raw)
    return h.digest()


def _exported_entry(line: bytes) -> _Fields | None:
    """The fields of an entry line written exactly as `AuditLog.export` writes it, else None.

    The fields' characters need no JSON escapes, so a line matched here holds
    what `json.loads` would read, and every check of `_entry` but the index
    sequence is made here as there. Any other line, good or bad, goes through
    `_any_line`, which also names what is wrong.
    """
    m = _EXPORTED_ENTRY.match(line)
    if m is None or m.end() > len(line) - 2 or not line.endswith(b'"}'):
        return None
    text = line[m.end() : -2]
    try:
        # pybase64 (SIMD) rather than binascii: base64 was a tenth of the
        # Python work per entry. validate=True refuses what strict binascii does.
        raw = pybase64.b64decode(text, validate=True)
        # As `parse_time`, whose pattern the expression holds: the "Z" reads as UTC.
        at = datetime.fromisoformat(m[2].decode("ascii"))
    except (binascii.Error, ValueError):
        return None
    # Canonical base64 only, so also nothing but base64 between the quotes.
    if pybase64.b64encode(raw) != text:
        return None
    return int(m[1]), m[2], at, m[3], binascii.a2b_hex(m[4]), raw


def _any_line(line: bytes, expected: int | None, read: int) -> _Fields | _Mark:
    """Any line after the header: an entry's fields, or a checkpoint read after `read` entries.

    LogTampered naming entry `expected` if the line is bad; with `expected`
    None, any index is taken for the first entry of a range.
    """
    data = _json(line, expected)
    kind = data.get("type")
    if kind == "checkpoint":
        return _mark(data, expected, read)
    if kind != "entry":
        raise LogTampered(expected, f"a line of unknown type {kind!r}")
    return _entry(data, expected)


def _json(line: bytes, where: int | None) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise LogTampered(where, "the line is not JSON") from e
    if not isinstance(data, dict):
        raise LogTampered(where, "the line is not a JSON object")
    return data


def _header(line: bytes | None) -> _Header:
    if line is None:
        raise LogTampered(None, "the file is empty: not an audit log export")
    data = _json(line, None)
    if data.get("type") != EXPORT_TYPE or data.get("version") != EXPORT_VERSION:
        raise LogTampered(None, f"the first line is not a {EXPORT_TYPE} version 1 header")
    if set(data) != _HEADER_KEYS:
        raise LogTampered(None, f"the header has fields {sorted(data)}, not {sorted(_HEADER_KEYS)}")
    origin, log_key, key_name = data["origin"], data["log_key"], data["key_name"]
    if not all(isinstance(v, str) and v for v in (origin, log_key)) or not isinstance(
        key_name, str
    ):
        raise LogTampered(None, "the header's origin, log_key or key_name is not a string")
    raw_directory = data["directory"]
    directory = None
    if raw_directory is not None:
        if not isinstance(raw_directory, str):
            raise LogTampered(None, "the header's directory is not base64 text")
        directory = _b64(raw_directory, None, "the header's directory")
    return _Header(origin, log_key, key_name, directory)


def _b64(text: str, where: int | None, what: str) -> bytes:
    try:
        # Lenient decoding skips stray characters, but the comparison below
        # refuses any text that is not exactly the encoding of its bytes.
        raw = binascii.a2b_base64(text)
    except (binascii.Error, ValueError) as e:
        raise LogTampered(where, f"{what} is not base64") from e
    # One encoding per value: a flipped padding bit must not go unnoticed.
    if binascii.b2a_base64(raw, newline=False) != text.encode("ascii", "replace"):
        raise LogTampered(where, f"{what} is not canonical base64")
    return raw


def _sequence_problem(index: int, expected: int) -> str:
    if index > expected:
        return (
            f"missing: the line after entry {expected - 1} holds entry {index} "
            "(entries deleted or reordered)"
        )
    return (
        f"missing: the line after entry {expected - 1} holds entry {index} again "
        "(an entry duplicated, reordered or inserted)"
    )


def _entry(data: dict[str, Any], expected: int | None) -> _Fields:
    """The fields of a line that should hold entry `expected`; LogTampered naming it if not."""
    if set(data) != _ENTRY_KEYS:
        raise LogTampered(expected, f"the entry line has fields {sorted(data)}")
    index = data["index"]
    if not isinstance(index, int) or isinstance(index, bool):
        raise LogTampered(expected, "the entry's index is not an integer")
    if expected is not None and index != expected:
        raise LogTampered(expected, _sequence_problem(index, expected))
    received_at, verification, prev, envelope = (
        data["received_at"],
        data["verification"],
        data["prev"],
        data["envelope"],
    )
    if not all(isinstance(v, str) for v in (received_at, verification, prev, envelope)):
        raise LogTampered(expected, "a field of the entry is not a string")
    try:
        at = parse_time(received_at)
        check_verification(verification)
    except AuditError as e:
        raise LogTampered(expected, str(e)) from e
    if len(prev) != 2 * len(ZERO_HASH) or prev != prev.lower():
        raise LogTampered(expected, "prev is not 64 lowercase hex digits")
    try:
        prev_bytes = bytes.fromhex(prev)
    except ValueError as e:
        raise LogTampered(expected, "prev is not 64 lowercase hex digits") from e
    raw = _b64(envelope, expected, "the envelope")
    return index, received_at.encode("ascii"), at, verification.encode("ascii"), prev_bytes, raw


def read_entry(data: object) -> LogEntry:
    """An entry line's object, as an export holds it, as a `LogEntry`; LogTampered if it is not."""
    if not isinstance(data, dict) or data.get("type") != "entry":
        raise LogTampered(None, "not an entry line of an export")
    index, when, _, verification, prev, raw = _entry(data, None)
    if not 0 <= index < 1 << 63:
        raise LogTampered(None, f"no entry has index {index}")
    return LogEntry(index, when.decode("ascii"), verification.decode("ascii"), prev, raw)


def _mark(data: dict[str, Any], where: int | None, after: int) -> _Mark:
    if set(data) != _CHECKPOINT_KEYS:
        raise LogTampered(where, f"the checkpoint line has fields {sorted(data)}")
    key_name, note = data["key_name"], data["note"]
    if not isinstance(key_name, str) or not isinstance(note, str):
        raise LogTampered(where, "the checkpoint's key_name or note is not a string")
    return _Mark(key_name, note.encode(), after)


# --- the chain --------------------------------------------------------------------------


def _check_chain(scan: _Scan, proven: int, findings: _Findings) -> None:
    """Find the first broken `prev` link and name the entry that explains it.

    A changed entry j changes its leaf hash, which breaks the link of entry
    j+1; if its own `prev` was changed, the link of j breaks too. Entries
    below `proven` are covered by a checkpoint whose root matched.
    """
    if scan.prev_bytes == ZERO_HASH + scan.leaf_bytes[: len(scan.leaf_bytes) - HASH_BYTES]:
        return  # every link holds: compared at once, not entry by entry
    leaves, prevs = scan.leaves, _split_hashes(scan.prev_bytes)
    for j, prev in enumerate(prevs):
        expected = leaves[j - 1] if j else ZERO_HASH
        if prev == expected:
            continue
        if j >= 2 and prev == leaves[j - 2]:
            findings.add(
                j - 1, _CHAIN, f"inserted: entry {j} links to entry {j - 2}, not to this one"
            )
        elif j == 0 or proven >= j or (j + 1 < len(prevs) and prevs[j + 1] != leaves[j]):
            what = "32 zero bytes" if j == 0 else f"the hash of entry {j - 1}"
            findings.add(
                j,
                _CHAIN,
                f"altered: its prev is not {what} (this entry was changed or "
                "entries before it removed)",
            )
        else:
            findings.add(
                j - 1, _CHAIN, f"altered: entry {j} records a different hash for this entry"
            )
        return


# --- envelope signatures -----------------------------------------------------------------

_WORKER_VERIFIER: EnvelopeVerifier | None = None


def _init_worker(directory: Directory) -> None:
    global _WORKER_VERIFIER  # one verifier (and key cache) per worker process, set once
    _WORKER_VERIFIER = EnvelopeVerifier(directory)


@dataclass
class _Tally:
    """The envelope outcomes of a part: the first that contradicts its record, and counts."""

    first: tuple[int, str] | None = None
    ok: int = 0
    rejected: int = 0
    confirmed: int = 0

    def add(self, other: _Tally, findings: _Findings) -> None:
        if other.first is not None:
            findings.add(other.first[0], _ENVELOPE, other.first[1])
        self.ok += other.ok
        self.rejected += other.rejected
        self.confirmed += other.confirmed


class _Envelopes:
    """The envelopes of a part, each verified at its receive time once the part is read.

    The checks are `verify_envelope(raw, directory, at=at, max_age=None)`'s;
    the tally stops at the first outcome that contradicts its entry's record.
    """

    def __init__(self, verifier: EnvelopeVerifier) -> None:
        self.verifier = verifier
        self.read: list[tuple[int, bytes, bytes, datetime]] = []

    def __call__(self, index: int, at: datetime, verification: bytes, raw: bytes) -> None:
        self.read.append((index, verification, raw, at))

    def tally(self) -> _Tally:
        """Verify every envelope read; the first contradiction and the counts."""
        tally = _Tally()
        outcomes = self.verifier.check_all([(raw, at) for _, _, raw, at in self.read], max_age=None)
        for (index, verification, _, _), error in zip(self.read, outcomes, strict=True):
            _record(tally, index, verification, error)
            if tally.first is not None:
                break  # only the first problem of a part can be the first of the export
        return tally


def _record(tally: _Tally, index: int, verification: bytes, error: TrmError | None) -> None:
    """Count one envelope's outcome against what its entry records."""
    if error is None:
        outcome, detail = VERIFIED, ""
    else:
        outcome, detail = f"{REJECTED}{error.reason}", str(error)
    if verification == b"ok":
        if outcome != VERIFIED:
            tally.first = (
                index,
                f"recorded ok but the envelope does not verify at its receive time "
                f"({outcome}): {detail}",
            )
        else:
            tally.ok += 1
        return
    tally.rejected += 1
    recorded = verification.decode("ascii")
    if outcome != VERIFIED:
        tally.confirmed += 1
    elif recorded.removeprefix(REJECTED) in SIGNATURE_REASONS:
        tally.first = (
            index,
            f"recorded {recorded} but the envelope verifies: it was wrongly rejected",
        )


def _verify_part(
    path: Path, start: int, end: int, first: int | None, verifier: EnvelopeVerifier | None = None
) -> tuple[_Part, _Tally]:
    """Read, check and hash the lines of a byte range and verify their envelopes."""
    envelopes = _Envelopes(verifier or _verifier())
    part = _read_part(path, start, end, first, envelopes)
    return part, envelopes.tally()


def _verifier() -> EnvelopeVerifier:
    assert _WORKER_VERIFIER is not None, "set by _init_worker"
    return _WORKER_VERIFIER


class _Workers:
    """Byte ranges verified in worker processes, or inline for one worker; results in order."""

    def __init__(self, directory: Directory, workers: int) -> None:
        self.verifier = EnvelopeVerifier(directory)
        self.pool = (
            ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(directory,))
            if workers > 1
            else None
        )
        self.window = 4 * workers

    def parts(
        self, path: Path, start: int, size: int, scan: _Scan
    ) -> Iterator[tuple[_Part, _Tally, int]]:
        """Each range's part, tally and end, read from entry `scan.count` on as `scan` takes them.

        Workers read a range not knowing its first entry's index; a range
        whose first index is not the one expected, or that holds a bad line,
        is read again here knowing it, so that the problem is named exactly
        as a sequential read names it.
        """
        ranges = _ranges(path, start, size)
        if self.pool is None:
            for begin, end in ranges:
                yield (*_verify_part(path, begin, end, scan.count, self.verifier), end)
            return
        for begin, end, future in self._submitted(path, ranges):
            part, tally = future.result()
            if part.problem or part.error or part.first_index not in (None, scan.count):
                part, tally = _verify_part(path, begin, end, scan.count, self.verifier)
            yield part, tally, end

    def _submitted(
        self, path: Path, ranges: Iterator[tuple[int, int]]
    ) -> Iterator[tuple[int, int, Future[tuple[_Part, _Tally]]]]:
        assert self.pool is not None
        pending: deque[tuple[int, int, Future[tuple[_Part, _Tally]]]] = deque()
        for begin, end in ranges:
            pending.append((begin, end, self.pool.submit(_verify_part, path, begin, end, None)))
            # Bounded memory: at most `window` ranges in flight.
            if len(pending) > self.window:
                yield pending.popleft()
        yield from pending

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _read_and_verify(
    path: Path,
    directory: Directory,
    workers: int,
    findings: _Findings,
    progress: Progress | None = None,
) -> tuple[_Scan, _Tally]:
    """Read the export once, verifying every envelope; a line problem ends the read."""
    header, start, size = _layout(path)
    scan, total = _Scan(header, MerkleTree()), _Tally()
    pool = _Workers(directory, workers)
    try:
        for part, tally, end in pool.parts(path, start, size, scan):
            total.add(tally, findings)
            if not scan.take(part, findings):
                break
            if progress is not None:
                progress(end - start, size - start)
    finally:
        pool.close()
    return scan, total


# --- checkpoints -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Verified:
    checkpoint: Checkpoint
    mark: _Mark


def _log_id(
    scan: _Scan, directory: Directory, named: str | None, trusted: bytes | None
) -> str | None:
    """The routing participant whose log this is: named by the auditor, else by a checkpoint.

    Without a name, the first checkpoint of the export names it by its
    origin (else the trusted checkpoint does); every checkpoint is then
    checked against that participant's keys. None when nothing names it.
    """
    if named is not None:
        try:
            return routing_participant(directory, named)
        except TrmError as e:
            raise AuditError(f"the log id given: {e}") from e
    if scan.marks:
        try:
            return named_log(scan.marks[0].note, directory)
        except TrmError as e:
            raise LogTampered(None, f"the first checkpoint names no log to trust: {e}") from e
    if trusted is not None:
        try:
            return named_log(trusted, directory)
        except TrmError as e:
            raise AuditError(f"the trusted checkpoint names no log to trust: {e}") from e
    return None


def _check_header(header: _Header, log_id: str) -> None:
    """The header's claims about the log, each against the log's identity."""
    claims = (
        ("origin", header.origin, header.origin == origin_for(log_id)),
        ("log_key", header.log_key, header.log_key == log_id),
        # Empty when the log had no checkpoint to name a key by.
        ("key_name", header.key_name, not header.key_name or _keyed(header.key_name, log_id)),
    )
    for name, value, holds in claims:
        if not holds:
            raise LogTampered(
                None,
                f"the header claims {name} {value!r}, but the log is that of routing "
                f"participant {log_id!r} ({origin_for(log_id)})",
            )


def _keyed(key_name: str, log_id: str) -> bool:
    return key_name.startswith(f"{log_id}/") and len(key_name) > len(log_id) + 1


def _check_checkpoints(
    scan: _Scan, directory: Directory, log_id: str, findings: _Findings
) -> tuple[list[_Verified], int, str | None]:
    """Signatures, placement, roots, forks and consistency.

    Returns the checkpoints verified, the proven size (that of the largest
    checkpoint whose root matched the entries, every entry below it being
    committed to by a signature) and why the first refused one was refused.
    """
    count = scan.count
    verified: list[_Verified] = []
    refused: str | None = None
    for mark in scan.marks:
        try:
            cp = open_log_checkpoint(mark.note, directory, log_id=log_id, key_name=mark.key_name)
        except TrmError as e:
            findings.add(max(mark.after - 1, 0), _CHECKPOINT, f"checkpoint: {e}")
            refused = refused or f"after entry {mark.after - 1}: {e}"
            continue
        if cp.size > count:
            findings.add(
                count,
                _CHECKPOINT,
                f"missing: a checkpoint signs {cp.size} entries but the export ends before "
                f"entry {count} (entries {count}..{cp.size - 1} removed)",
            )
            continue
        if cp.size != mark.after:
            findings.add(
                max(min(cp.size, mark.after) - 1, 0),
                _CHECKPOINT,
                f"a checkpoint of size {cp.size} is placed after entry {mark.after - 1}",
            )
        verified.append(_Verified(cp, mark))
    proven = _check_roots(scan, verified, findings)
    _check_consistency(scan, verified, findings)
    return verified, proven, refused


def _check_roots(scan: _Scan, verified: list[_Verified], findings: _Findings) -> int:
    proven = 0
    seen: dict[int, bytes] = {}
    for item in sorted(verified, key=lambda v: v.checkpoint.size):
        cp = item.checkpoint
        last = cp.size - 1
        if cp.size in seen and seen[cp.size] != cp.root:
            findings.add(
                last,
                _CHECKPOINT,
                f"fork: two signed checkpoints of size {cp.size} have different roots",
            )
            continue
        seen[cp.size] = cp.root
        if cp.size and cp.time < scan.time(last):
            findings.add(
                last,
                _CHECKPOINT,
                f"the checkpoint of size {cp.size} is dated before this entry was received",
            )
        if scan.merkle_tree().root(cp.size) != cp.root:
            findings.add(
                max(last, 0),
                _CHECKPOINT,
                f"the entries up to this one do not hash to the root signed for size {cp.size} "
                f"(this entry, or entries from {proven} on, were altered)",
            )
            continue
        proven = cp.size
    return proven


def _check_consistency(scan: _Scan, verified: list[_Verified], findings: _Findings) -> None:
    """Each checkpoint extends the one before, by a consistency proof computed from the leaves."""
    if len(verified) < 2 or findings.best is not None:
        return
    tree = scan.merkle_tree()
    ordered = sorted(verified, key=lambda v: v.checkpoint.size)
    for old, new in itertools.pairwise(ordered):
        a, b = old.checkpoint, new.checkpoint
        try:
            verify_consistency(
                a.size, b.size, a.root, b.root, tree.consistency_proof(a.size, b.size)
            )
        except ProofInvalid as e:
            findings.add(
                max(b.size - 1, 0),
                _CHECKPOINT,
                f"checkpoint of size {b.size} does not extend that of size {a.size}: {e}",
            )
            return


def _check_coverage(
    scan: _Scan,
    verified: list[_Verified],
    directory: Directory,
    trusted: tuple[str, bytes] | None,
    findings: _Findings,
    refused: str | None = None,
) -> None:
    """Every entry covered by a checkpoint; `trusted` is (log id, the auditor's kept note).

    `refused` says why a checkpoint of the export was refused, since the
    entries it would have covered are then reported here, at a lower index.
    """
    count = scan.count
    covered = max((v.checkpoint.size for v in verified), default=0)
    if covered < count:
        why = "" if refused is None else f" (a checkpoint was refused, {refused})"
        findings.add(
            covered,
            _COVERAGE,
            f"entries after the last checkpoint are not covered: entries {covered}..{count - 1} "
            f"carry no signature{why}",
        )
    if trusted is None:
        return
    log_id, note = trusted
    try:
        cp = open_log_checkpoint(note, directory, log_id=log_id)
    except TrmError as e:
        raise AuditError(f"the trusted checkpoint does not verify: {e}") from e
    if cp.size > count:
        findings.add(
            count,
            _COVERAGE,
            f"missing: the trusted checkpoint signs {cp.size} entries, the export has {count}",
        )
    elif scan.merkle_tree().root(cp.size) != cp.root:
        findings.add(
            max(cp.size - 1, 0),
            _COVERAGE,
            f"the export is not consistent with the trusted checkpoint of size {cp.size}: "
            "entries up to this one differ from what it signed",
        )


# --- the public functions ----------------------------------------------------------------


def verify_export(
    path: Path,
    directory: Directory,
    *,
    workers: int | None = None,
    trusted_checkpoint: bytes | None = None,
    log_id: str | None = None,
    quorum: int | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check an export offline; LogTampered naming the first bad entry, else a report.

    Every witness cosignature on a checkpoint must verify, and the newest
    checkpoint must carry those of `quorum` distinct witnesses of the
    directory (default: the directory's quorum), else LogTampered for the
    export, naming that checkpoint.

    `directory` must list every key that signed (use the newest directory:
    it also carries revocations); `trusted_checkpoint` is a signed note the
    auditor kept from an earlier export, which this one must extend.
    `log_id` is the routing participant whose log the auditor expects;
    without it, the one the first checkpoint's origin names, which the
    directory must list with role routing. The export's header is never
    trusted: it must agree with that identity (LogTampered for the export).
    `progress`, if given, is called after each range of entries is verified.
    """
    findings = _Findings()
    cores = workers or os.cpu_count() or 1
    scan, tally = _read_and_verify(path, directory, cores, findings, progress)
    broken = findings.best is not None and findings.best[1] == _STRUCTURE
    log = _log_id(scan, directory, log_id, trusted_checkpoint)
    verified: list[_Verified] = []
    proven, refused = 0, None
    if log is not None:  # else the export holds no checkpoint to check
        _check_header(scan.header, log)
        verified, proven, refused = _check_checkpoints(scan, directory, log, findings)
    _check_chain(scan, proven, findings)
    if not broken:
        # Coverage is judged only on a whole export: a scan cut short by a
        # structural problem would make later checkpoints look absent.
        kept = None if log is None or trusted_checkpoint is None else (log, trusted_checkpoint)
        _check_coverage(scan, verified, directory, kept, findings, refused)
    findings.raise_first()
    if log is None:
        raise AuditError(
            "the export holds no entry and no checkpoint, so nothing names its log: "
            "pass the routing participant id (--log-id)"
        )
    required = directory.body.quorum if quorum is None else quorum
    witnesses = _check_witnessed(verified, directory, required)
    return VerifyReport(
        entries=scan.count,
        checkpoints=len(verified),
        envelopes_ok=tally.ok,
        rejected_recorded=tally.rejected,
        rejected_confirmed=tally.confirmed,
        root=max(verified, key=lambda v: v.checkpoint.size).checkpoint.root.hex()
        if verified
        else EMPTY_ROOT.hex(),
        origin=origin_for(log),
        log_id=log,
        directory_serial=directory.serial,
        quorum=required,
        directory_quorum=directory.body.quorum,
        witnesses=tuple(witnesses),
    )


def _check_witnessed(verified: list[_Verified], directory: Directory, quorum: int) -> list[str]:
    """Every cosignature verified; the witnesses of the newest checkpoint, at least `quorum`."""
    if quorum < 0:
        raise AuditError(f"a quorum cannot be negative, got {quorum}")
    for item in verified:
        try:
            check_cosignatures(item.mark.note, directory)
        except CosignatureInvalid as e:
            raise LogTampered(
                max(item.checkpoint.size - 1, 0), f"checkpoint of size {item.checkpoint.size}: {e}"
            ) from e
    if not verified:
        if quorum:
            raise LogTampered(None, f"no checkpoint, so none cosigned by {quorum} witnesses")
        return []
    newest = max(verified, key=lambda v: v.checkpoint.size)
    try:
        return require_quorum(newest.mark.note, directory, quorum)
    except CosignatureInvalid as e:
        cp = newest.checkpoint
        raise LogTampered(
            None,
            f"the newest checkpoint (size {cp.size}, root {cp.root.hex()}, "
            f"{cp.time.isoformat()}) lacks the witness quorum: {e}",
        ) from e


def replay_export(
    path: Path,
    roles_from: Directory | None = None,
    case: str | None = None,
    *,
    authority: Ed25519PublicKey | None = None,
    progress: Progress | None = None,
) -> dict[str, CaseState]:
    """Every case's state rebuilt from the export's ``ok`` entries, in log order.

    Roles come from `roles_from` (a directory the auditor verified), else
    from the directory embedded in the export's header, which must verify
    with `authority`, the directory authority's key: the header is not
    covered by any checkpoint, so its directory is trusted for nothing
    until then. AuditError if neither is given or the embedded one does not
    verify. The export's structure and hash chain are checked on the way
    (LogTampered); signatures are `verify_export`'s job. `progress`, if
    given, is called after each range of entries is read, as by `verify_export`.
    """
    events: list[Event] = []

    def collect(index: int, at: datetime, verification: bytes, raw: bytes) -> None:
        if verification != b"ok":
            return
        try:
            header = read_header(raw)
        except TrmError as e:
            raise LogTampered(index, f"recorded ok but the envelope does not parse: {e}") from e
        if case is None or header.case == case:
            events.append(Event.from_header(header, at))

    findings = _Findings()
    header, start, size = _layout(path)
    roles = _roles(roles_from or _embedded_directory(header, authority))
    scan = _Scan(header)
    for begin, end in _ranges(path, start, size):
        if not scan.take(_read_part(path, begin, end, scan.count, collect), findings):
            break
        if progress is not None:
            progress(end - start, size - start)
    _check_chain(scan, 0, findings)
    findings.raise_first()
    return replay(events, roles)


def _embedded_directory(header: _Header, authority: Ed25519PublicKey | None) -> Directory:
    """The header's directory, verified with the authority's key; AuditError if it cannot be."""
    if authority is None:
        raise AuditError(
            "replay takes participants' roles from a verified directory: pass the directory "
            "(--directory) or the authority key (--authority-key) to check the embedded one"
        )
    if header.directory is None:
        raise AuditError("the export embeds no directory: pass the directory (--directory)")
    try:
        return load_directory(header.directory, authority=authority)
    except TrmError as e:
        raise AuditError(
            f"the directory embedded in the export does not verify with the authority key ({e}): "
            "its roles cannot be trusted; pass the directory (--directory)"
        ) from e


def _roles(directory: Directory) -> Mapping[str, str]:
    return {p.id: str(p.role) for p in directory.participants()}


def diff_states(a: Mapping[str, CaseState], b: Mapping[str, CaseState]) -> list[str]:
    """Human-readable differences between two sets of case states (empty when equal).

    `a` is typically the replayed log, `b` the routing service's database.
    """
    differences: list[str] = []
    for ref in sorted(set(a) | set(b)):
        if ref not in b:
            differences.append(f"case {ref}: only in the first (log)")
            continue
        if ref not in a:
            differences.append(f"case {ref}: only in the second (database)")
            continue
        left, right = a[ref].to_dict(), b[ref].to_dict()
        for key in sorted(set(left) | set(right)):
            if left.get(key) != right.get(key):
                first, second = _short(left.get(key)), _short(right.get(key))
                differences.append(f"case {ref}: {key} differs: {first} != {second}")
    return differences


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
