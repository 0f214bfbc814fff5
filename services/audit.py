"""The auditor's offline tools: verify and replay an audit log export.

`verify_export` checks everything an export claims, with nothing but the
export, the trust directory and (optionally) a checkpoint the auditor kept
from earlier, and names the first bad entry. `replay_export` rebuilds every
case's handoff history from the log alone. The checks, their order and what
they cannot detect are specified in ``docs/audit.md``.

Envelope signatures dominate the cost; they are checked in worker processes
over fixed chunks of entries while the main process reads the file, hashes
the entries and checks the chain, so verification is linear in the size of
the export and uses every core. Whatever the scheduling, the error reported
is the one with the lowest entry index (ties broken by the order of the
checks), so the result is deterministic.
"""

from __future__ import annotations

import binascii
import itertools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.directory import Directory, parse_unverified
from broker.envelope import EnvelopeVerifier, read_header
from broker.errors import AuditError, CheckpointInvalid, LogTampered, ProofInvalid, TrmError
from services.auditlog import (
    EXPORT_TYPE,
    EXPORT_VERSION,
    REJECTED,
    VERIFIED,
    ZERO_HASH,
    LogEntry,
    check_verification,
    parse_time,
)
from services.cases import CaseState, Event, replay
from services.checkpoint import Checkpoint, open_checkpoint
from services.merkle import EMPTY_ROOT, MerkleTree, node_hash, verify_consistency

CHUNK = 1000
"""Entries per unit of work handed to a signature-checking process."""

SIGNATURE_REASONS = frozenset({"bad_signature", "malformed", "too_large"})
"""Rejections that depend on the bytes alone: an entry recorded with one of
these reasons that verifies offline was wrongly rejected."""

# Ranks break ties between problems found at the same entry: the order of the checks.
_STRUCTURE, _CHAIN, _ENVELOPE, _CHECKPOINT, _COVERAGE = range(5)
_ENTRY_KEYS = frozenset({"type", "index", "received_at", "verification", "prev", "envelope"})
_CHECKPOINT_KEYS = frozenset({"type", "key_name", "note"})
_HEADER_KEYS = frozenset({"type", "version", "origin", "log_key", "key_name", "directory"})


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
    log_key: str

    def summary(self) -> str:
        """One line for a terminal."""
        return (
            f"intact: {self.entries} entries, {self.checkpoints} checkpoints, "
            f"{self.envelopes_ok} envelopes verified, {self.rejected_recorded} recorded as "
            f"rejected ({self.rejected_confirmed} confirmed offline); root {self.root}"
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
    """The number of entries read before this line."""


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
class _Scan:
    """What one pass over the export yields."""

    header: _Header
    leaves: list[bytes] = field(default_factory=list)
    prevs: list[bytes] = field(default_factory=list)
    times: list[datetime] = field(default_factory=list)
    marks: list[_Mark] = field(default_factory=list)


# --- reading an export -------------------------------------------------------------------


def _lines(path: Path) -> Iterator[bytes]:
    try:
        with path.open("rb") as f:
            yield from f
    except OSError as e:
        raise AuditError(f"cannot read the export {path}: {e.strerror}") from e


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


def _entry(data: dict[str, Any], expected: int) -> tuple[LogEntry, datetime]:
    """The entry on a line that should hold entry `expected`; LogTampered naming it if not."""
    if set(data) != _ENTRY_KEYS:
        raise LogTampered(expected, f"the entry line has fields {sorted(data)}")
    index = data["index"]
    if not isinstance(index, int) or isinstance(index, bool):
        raise LogTampered(expected, "the entry's index is not an integer")
    if index != expected:
        if index > expected:
            problem = (
                f"missing: the line after entry {expected - 1} holds entry {index} "
                "(entries deleted or reordered)"
            )
        else:
            problem = (
                f"missing: the line after entry {expected - 1} holds entry {index} again "
                "(an entry duplicated, reordered or inserted)"
            )
        raise LogTampered(expected, problem)
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
    return LogEntry(index, received_at, verification, prev_bytes, raw), at


def _mark(data: dict[str, Any], after: int) -> _Mark:
    if set(data) != _CHECKPOINT_KEYS:
        raise LogTampered(after, f"the checkpoint line has fields {sorted(data)}")
    key_name, note = data["key_name"], data["note"]
    if not isinstance(key_name, str) or not isinstance(note, str):
        raise LogTampered(after, "the checkpoint's key_name or note is not a string")
    return _Mark(key_name, note.encode(), after)


def _scan(path: Path, on_entry: Callable[[LogEntry, datetime], None], findings: _Findings) -> _Scan:
    """Read the export once: structure, sequence and leaf hashes; each entry to `on_entry`.

    A structural problem ends the scan and is added to `findings`; what was
    read before it is returned.
    """
    lines = _lines(path)
    scan = _Scan(_header(next(lines, None)))
    try:
        for line in lines:
            expected = len(scan.leaves)
            data = _json(line, expected)
            kind = data.get("type")
            if kind == "checkpoint":
                scan.marks.append(_mark(data, expected))
                continue
            if kind != "entry":
                raise LogTampered(expected, f"a line of unknown type {kind!r}")
            entry, at = _entry(data, expected)
            scan.leaves.append(entry.leaf_hash())
            scan.prevs.append(entry.prev)
            scan.times.append(at)
            on_entry(entry, at)
    except LogTampered as e:
        findings.add(e.index or 0, _STRUCTURE, e.problem)
    return scan


# --- the chain --------------------------------------------------------------------------


def _check_chain(scan: _Scan, proven: int, findings: _Findings) -> None:
    """Find the first broken `prev` link and name the entry that explains it.

    A changed entry j changes its leaf hash, which breaks the link of entry
    j+1; if its own `prev` was changed, the link of j breaks too. Entries
    below `proven` are covered by a checkpoint whose root matched.
    """
    leaves, prevs = scan.leaves, scan.prevs
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


@dataclass(frozen=True)
class _ChunkResult:
    first: tuple[int, str] | None
    ok: int
    rejected: int
    confirmed: int


_Item = tuple[int, datetime, str, bytes]


def _check_chunk(items: list[_Item], verifier: EnvelopeVerifier | None = None) -> _ChunkResult:
    """Verify each envelope at its receive time; the first outcome that contradicts the record.

    The checks are `verify_envelope(raw, directory, at=at, max_age=None)`'s.
    """
    verifier = verifier or _WORKER_VERIFIER
    assert verifier is not None  # set by _init_worker
    ok = rejected = confirmed = 0
    for index, at, recorded, raw in items:
        try:
            verifier.check(raw, at=at, max_age=None)
            outcome, detail = VERIFIED, ""
        except TrmError as e:
            outcome, detail = f"{REJECTED}{e.reason}", str(e)
        if recorded == VERIFIED:
            if outcome != VERIFIED:
                problem = (
                    f"recorded ok but the envelope does not verify at its receive time "
                    f"({outcome}): {detail}"
                )
                return _ChunkResult((index, problem), ok, rejected, confirmed)
            ok += 1
            continue
        rejected += 1
        if outcome != VERIFIED:
            confirmed += 1
        elif recorded.removeprefix(REJECTED) in SIGNATURE_REASONS:
            problem = f"recorded {recorded} but the envelope verifies: it was wrongly rejected"
            return _ChunkResult((index, problem), ok, rejected, confirmed)
    return _ChunkResult(None, ok, rejected, confirmed)


class _Signatures:
    """Envelope checks in chunks: in worker processes, or inline for one worker."""

    def __init__(self, directory: Directory, workers: int) -> None:
        self.verifier = EnvelopeVerifier(directory)
        self.pool = (
            ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(directory,))
            if workers > 1
            else None
        )
        self.window = 4 * workers
        self.chunk: list[_Item] = []
        self.pending: list[Future[_ChunkResult]] = []
        self.results: list[_ChunkResult] = []

    def add(self, entry: LogEntry, at: datetime) -> None:
        self.chunk.append((entry.index, at, entry.verification, entry.envelope))
        if len(self.chunk) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        chunk, self.chunk = self.chunk, []
        if not chunk:
            return
        if self.pool is None:
            self.results.append(_check_chunk(chunk, self.verifier))
            return
        self.pending.append(self.pool.submit(_check_chunk, chunk))
        # Bounded memory: at most `window` chunks in flight.
        while len(self.pending) > self.window:
            self.results.append(self.pending.pop(0).result())

    def finish(self) -> list[_ChunkResult]:
        self._flush()
        try:
            self.results.extend(f.result() for f in self.pending)
        finally:
            self.close()
        return self.results

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


# --- checkpoints -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Verified:
    checkpoint: Checkpoint
    mark: _Mark


class _Roots:
    """Roots of every prefix of the leaves, in one pass (O(log n) per prefix asked)."""

    def __init__(self, leaves: list[bytes]) -> None:
        self.leaves = leaves
        self.size = 0
        self.frontier: list[tuple[int, bytes]] = []  # (height, root), largest first

    def root(self, size: int) -> bytes:
        """The Merkle root of the first `size` leaves; sizes must be asked in rising order."""
        while self.size < size:
            node, height = self.leaves[self.size], 0
            while self.frontier and self.frontier[-1][0] == height:
                node = node_hash(self.frontier.pop()[1], node)
                height += 1
            self.frontier.append((height, node))
            self.size += 1
        if size == 0:
            return EMPTY_ROOT
        root = self.frontier[-1][1]
        for _, left in reversed(self.frontier[:-1]):
            root = node_hash(left, root)
        return root


def _open_mark(mark: _Mark, header: _Header, directory: Directory) -> Checkpoint:
    """The checkpoint of `mark`, its signature checked by the routing key valid at its time."""
    prefix = f"{header.log_key}/"
    if not mark.key_name.startswith(prefix):
        raise CheckpointInvalid(
            f"signed under key name {mark.key_name!r}, not a key of the log {header.log_key!r}"
        )
    kid = mark.key_name[len(prefix) :]
    claimed = _claimed_time(mark.note)
    key = directory.signing_key(header.log_key, kid, used_at=claimed)
    checkpoint = open_checkpoint(mark.note, key=key, key_name=mark.key_name, origin=header.origin)
    if checkpoint.time != claimed:
        raise CheckpointInvalid("the checkpoint time could not be read consistently")
    return checkpoint


def _claimed_time(note: bytes) -> datetime:
    """The time a note states, read before its signature is checked (to pick the key)."""
    lines = note.split(b"\n")
    if len(lines) < 4 or not lines[3].startswith(b"time "):
        raise CheckpointInvalid("the note's fourth line is not 'time <RFC 3339 UTC>'")
    try:
        stamp = lines[3][5:].decode("ascii")
        moment = datetime.fromisoformat(stamp.removesuffix("Z"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointInvalid("the note's time is not RFC 3339") from e
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _check_checkpoints(
    scan: _Scan, directory: Directory, findings: _Findings
) -> tuple[list[_Verified], int]:
    """Signatures, placement, roots, forks and consistency; returns those verified and proven size.

    The proven size is that of the largest checkpoint whose root matched the
    entries, every entry below it being committed to by a signature.
    """
    count = len(scan.leaves)
    verified: list[_Verified] = []
    for mark in scan.marks:
        try:
            cp = _open_mark(mark, scan.header, directory)
        except TrmError as e:
            findings.add(max(mark.after - 1, 0), _CHECKPOINT, f"checkpoint: {e}")
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
    return verified, proven


def _check_roots(scan: _Scan, verified: list[_Verified], findings: _Findings) -> int:
    roots = _Roots(scan.leaves)
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
        if cp.size and cp.time < scan.times[last]:
            findings.add(
                last,
                _CHECKPOINT,
                f"the checkpoint of size {cp.size} is dated before this entry was received",
            )
        if roots.root(cp.size) != cp.root:
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
    tree = MerkleTree.from_leaves(scan.leaves)
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
    trusted: bytes | None,
    findings: _Findings,
) -> None:
    count = len(scan.leaves)
    covered = max((v.checkpoint.size for v in verified), default=0)
    if covered < count:
        findings.add(
            covered,
            _COVERAGE,
            f"entries after the last checkpoint are not covered: entries {covered}..{count - 1} "
            "carry no signature",
        )
    if trusted is None:
        return
    mark = _Mark(_trusted_key_name(trusted), trusted, count)
    try:
        cp = _open_mark(mark, scan.header, directory)
    except TrmError as e:
        raise AuditError(f"the trusted checkpoint does not verify: {e}") from e
    if cp.size > count:
        findings.add(
            count,
            _COVERAGE,
            f"missing: the trusted checkpoint signs {cp.size} entries, the export has {count}",
        )
    elif _Roots(scan.leaves).root(cp.size) != cp.root:
        findings.add(
            max(cp.size - 1, 0),
            _COVERAGE,
            f"the export is not consistent with the trusted checkpoint of size {cp.size}: "
            "entries up to this one differ from what it signed",
        )


def _trusted_key_name(note: bytes) -> str:
    """The key name of the first signature line of a note the auditor kept."""
    for line in note.decode("utf-8", "replace").split("\n"):
        if line.startswith("\u2014 "):
            return line[2:].split(" ")[0]
    raise AuditError("the trusted checkpoint has no signature line")


# --- the public functions ----------------------------------------------------------------


def verify_export(
    path: Path,
    directory: Directory,
    *,
    workers: int | None = None,
    trusted_checkpoint: bytes | None = None,
) -> VerifyReport:
    """Check an export offline; LogTampered naming the first bad entry, else a report.

    `directory` must list every key that signed (use the newest directory:
    it also carries revocations); `trusted_checkpoint` is a signed note the
    auditor kept from an earlier export, which this one must extend.
    """
    findings = _Findings()
    signatures = _Signatures(directory, workers or os.cpu_count() or 1)
    try:
        scan = _scan(path, signatures.add, findings)
        results = signatures.finish()
    finally:
        signatures.close()
    for result in results:
        if result.first is not None:
            findings.add(result.first[0], _ENVELOPE, result.first[1])
    broken = findings.best is not None and findings.best[1] == _STRUCTURE
    verified, proven = _check_checkpoints(scan, directory, findings)
    _check_chain(scan, proven, findings)
    if not broken:
        # Coverage is judged only on a whole export: a scan cut short by a
        # structural problem would make later checkpoints look absent.
        _check_coverage(scan, verified, directory, trusted_checkpoint, findings)
    findings.raise_first()
    return VerifyReport(
        entries=len(scan.leaves),
        checkpoints=len(verified),
        envelopes_ok=sum(r.ok for r in results),
        rejected_recorded=sum(r.rejected for r in results),
        rejected_confirmed=sum(r.confirmed for r in results),
        root=max(verified, key=lambda v: v.checkpoint.size).checkpoint.root.hex()
        if verified
        else EMPTY_ROOT.hex(),
        origin=scan.header.origin,
        log_key=scan.header.log_key,
    )


def replay_export(
    path: Path, roles_from: Directory | None = None, case: str | None = None
) -> dict[str, CaseState]:
    """Every case's state rebuilt from the export's ``ok`` entries, in log order.

    Roles come from `roles_from`, else from the directory embedded in the
    export's header. The export's structure and hash chain are checked on
    the way (LogTampered); signatures are `verify_export`'s job.
    """
    events: list[Event] = []

    def collect(entry: LogEntry, at: datetime) -> None:
        if entry.verification != VERIFIED:
            return
        try:
            header = read_header(entry.envelope)
        except TrmError as e:
            raise LogTampered(
                entry.index, f"recorded ok but the envelope does not parse: {e}"
            ) from e
        if case is None or header.case == case:
            events.append(Event.from_header(header, at))

    findings = _Findings()
    scan = _scan(path, collect, findings)
    _check_chain(scan, 0, findings)
    findings.raise_first()
    return replay(events, _roles(roles_from, scan.header))


def _roles(directory: Directory | None, header: _Header) -> Mapping[str, str]:
    if directory is not None:
        body = directory.body
    elif header.directory is not None:
        try:
            body = parse_unverified(header.directory)
        except TrmError as e:
            raise AuditError(f"the directory embedded in the export does not parse: {e}") from e
    else:
        return {}
    return {p.id: str(p.role) for p in body.participants}


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
