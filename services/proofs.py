"""Proofs of the audit log an auditor checks alone: inclusion of an entry, consistency of two trees.

The routing service writes a proof from its database and the checkpoints it
has already signed (`inclusion_proof`, `consistency_proof`): nothing is
signed and no private key is needed. The auditor checks it offline with the
trust directory and nothing else (`check_proof`): every root must be one a
checkpoint signed by the log's routing participant commits to, the log
named by the auditor or by the checkpoint's origin, never by the proof. The
documents' fields and the checks are specified in ``docs/audit.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from broker.directory import Directory
from broker.envelope import read_header
from broker.errors import AuditError, ProofInvalid, TrmError
from services.audit import read_entry
from services.auditlog import AuditLog, LogEntry, parse_time
from services.checkpoint import Checkpoint, named_log, open_log_checkpoint, routing_participant
from services.merkle import EMPTY_ROOT, HASH_BYTES, verify_consistency, verify_inclusion

INCLUSION_TYPE = "trm-inclusion-proof"
CONSISTENCY_TYPE = "trm-consistency-proof"
PROOF_VERSION = 1

_INCLUSION_KEYS = frozenset(
    {"type", "version", "envelope_id", "index", "entry", "leaf_hash", "size", "proof", "root"}
    | {"checkpoint"}
)
_CONSISTENCY_KEYS = frozenset(
    {"type", "version", "old_size", "new_size", "old_root", "new_root", "proof"}
    | {"checkpoint", "old_checkpoint"}
)


@dataclass(frozen=True)
class ProofReport:
    """What a proof that holds shows."""

    kind: str
    """``inclusion`` or ``consistency``."""
    log_id: str
    """The routing participant whose signed checkpoints the proof was checked against."""
    size: int
    """The size of the newest signed tree the proof leads to."""
    root: str
    """Its hex root, as signed."""
    index: int | None = None
    """The entry proven included (inclusion)."""
    envelope_id: str | None = None
    old_size: int | None = None
    """The older tree shown extended (consistency)."""

    def summary(self) -> str:
        """One line for a terminal."""
        tree = f"the log of routing participant {self.log_id!r} at {self.size} entries"
        if self.kind == "inclusion":
            what = f"entry {self.index}" + (
                f" (envelope {self.envelope_id})" if self.envelope_id else ""
            )
            return f"proof holds: {what} is in {tree}, root {self.root} as signed"
        return (
            f"proof holds: {tree}, root {self.root} as signed, extends the tree of "
            f"{self.old_size} entries"
        )


# --- writing proofs (the routing side, read-only) -----------------------------------


def inclusion_proof(log: AuditLog, envelope_id: str) -> dict[str, Any]:
    """The inclusion proof of the entry holding `envelope_id` in the newest checkpoint's tree."""
    index = log.find(envelope_id)
    if index is None:
        raise AuditError(f"envelope {envelope_id} is not in the audit log")
    size, note = _newest(log)
    if index >= size:
        raise AuditError(
            f"entry {index} is not covered by a signed checkpoint yet (the newest covers {size}); "
            "ask again after the routing service signs the next one"
        )
    return {
        "type": INCLUSION_TYPE,
        "version": PROOF_VERSION,
        "envelope_id": envelope_id,
        "index": index,
        "entry": log.entry(index).to_json(),
        "leaf_hash": log.leaf(index).hex(),
        "size": size,
        "proof": [h.hex() for h in log.inclusion_proof(index, size)],
        "root": log.root(size).hex(),
        "checkpoint": note.decode(),
    }


def consistency_proof(log: AuditLog, old_size: int) -> dict[str, Any]:
    """The proof that the newest checkpoint's tree extends the tree of `old_size` entries."""
    size, note = _newest(log)
    if old_size > size:
        raise AuditError(f"the newest checkpoint covers {size} entries, fewer than {old_size}")
    old_note = log.checkpoint_note(old_size)
    return {
        "type": CONSISTENCY_TYPE,
        "version": PROOF_VERSION,
        "old_size": old_size,
        "new_size": size,
        "old_root": log.root(old_size).hex(),
        "new_root": log.root(size).hex(),
        "proof": [h.hex() for h in log.consistency_proof(old_size, size)],
        "checkpoint": note.decode(),
        "old_checkpoint": None if old_note is None else old_note.decode(),
    }


def _newest(log: AuditLog) -> tuple[int, bytes]:
    latest = log.latest_checkpoint()
    if latest is None:
        raise AuditError("the audit log has no signed checkpoint yet: there is nothing to prove")
    return latest[0], latest[2]


# --- checking proofs (the auditor, offline) --------------------------------------------


def check_proof(
    data: bytes, directory: Directory, *, log_id: str | None = None, kept: bytes | None = None
) -> ProofReport:
    """Check a proof document offline; ProofInvalid or CheckpointInvalid if it does not hold.

    `log_id` is the routing participant the auditor expects; without it, the
    one the proof's checkpoint's origin names, which `directory` must list
    with role routing. `kept`, for a consistency proof, is the older
    checkpoint the auditor kept, which the proof must start from.
    """
    doc = _document(data)
    if doc["type"] == INCLUSION_TYPE:
        if kept is not None:
            raise AuditError("a kept checkpoint is for consistency proofs, not inclusion proofs")
        return _check_inclusion(doc, directory, log_id)
    return _check_consistency(doc, directory, log_id, kept)


def _document(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ProofInvalid("the proof is not JSON") from e
    kinds = {INCLUSION_TYPE: _INCLUSION_KEYS, CONSISTENCY_TYPE: _CONSISTENCY_KEYS}
    if not isinstance(doc, dict) or doc.get("type") not in kinds:
        raise ProofInvalid(f"the file is not a {INCLUSION_TYPE} or {CONSISTENCY_TYPE} document")
    if doc.get("version") != PROOF_VERSION:
        raise ProofInvalid(f"the proof is not version {PROOF_VERSION}")
    expected = kinds[doc["type"]]
    if set(doc) != expected:
        raise ProofInvalid(f"the proof has fields {sorted(doc)}, not {sorted(expected)}")
    return doc


def _signed(note: object, directory: Directory, log_id: str | None) -> tuple[str, Checkpoint]:
    """The log's identity and the checkpoint `note`, its signature checked against it."""
    if not isinstance(note, str):
        raise ProofInvalid("the proof's checkpoint is not a signed note's text")
    raw = note.encode()
    log = named_log(raw, directory) if log_id is None else routing_participant(directory, log_id)
    return log, open_log_checkpoint(raw, directory, log_id=log)


def _check_inclusion(doc: dict[str, Any], directory: Directory, log_id: str | None) -> ProofReport:
    log, cp = _signed(doc["checkpoint"], directory, log_id)
    entry = _entry(doc["entry"])
    leaf = entry.leaf_hash()
    _claims(
        ("size", doc["size"], cp.size),
        ("root", doc["root"], cp.root.hex()),
        ("index", doc["index"], entry.index),
        ("leaf_hash", doc["leaf_hash"], leaf.hex()),
        ("envelope_id", doc["envelope_id"], _envelope_id(entry)),
    )
    if parse_time(entry.received_at) > cp.time:
        raise ProofInvalid("the entry was received after the checkpoint covering it was signed")
    verify_inclusion(leaf, entry.index, cp.size, _hashes(doc["proof"]), cp.root)
    return ProofReport(
        "inclusion",
        log,
        cp.size,
        cp.root.hex(),
        index=entry.index,
        envelope_id=doc["envelope_id"],
    )


def _check_consistency(
    doc: dict[str, Any], directory: Directory, log_id: str | None, kept: bytes | None
) -> ProofReport:
    log, new = _signed(doc["checkpoint"], directory, log_id)
    old = _old_tree(doc, directory, log, kept)
    _claims(
        ("new_size", doc["new_size"], new.size),
        ("new_root", doc["new_root"], new.root.hex()),
        ("old_size", doc["old_size"], old[0]),
        ("old_root", doc["old_root"], old[1].hex()),
    )
    verify_consistency(old[0], new.size, old[1], new.root, _hashes(doc["proof"]))
    return ProofReport("consistency", log, new.size, new.root.hex(), old_size=old[0])


def _old_tree(
    doc: dict[str, Any], directory: Directory, log: str, kept: bytes | None
) -> tuple[int, bytes]:
    """The older tree's (size, root), from a signed checkpoint: the auditor's, else the proof's.

    Only the empty tree needs no signature: its root is fixed.
    """
    notes = [n for n in (kept, _note(doc["old_checkpoint"])) if n is not None]
    opened = [open_log_checkpoint(n, directory, log_id=log) for n in notes]
    trees = {(cp.size, cp.root) for cp in opened}
    if len(trees) > 1:
        raise ProofInvalid("the checkpoint kept and the proof's old checkpoint differ")
    if trees:
        return trees.pop()
    if doc["old_size"] == 0:
        return 0, EMPTY_ROOT
    raise ProofInvalid(
        f"no signed checkpoint commits to the tree of {doc['old_size']} entries: pass the "
        "checkpoint you kept of it (--checkpoint)"
    )


def _note(value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProofInvalid("the proof's old checkpoint is not a signed note's text")
    return value.encode()


def _claims(*claims: tuple[str, object, object]) -> None:
    """Each field the proof states must be what its entry and signed checkpoints give."""
    for name, stated, actual in claims:
        if stated != actual or isinstance(stated, bool):
            raise ProofInvalid(f"the proof states {name} {stated!r}, but it is {actual!r}")


def _entry(data: object) -> LogEntry:
    try:
        return read_entry(data)
    except TrmError as e:
        raise ProofInvalid(f"the proof's entry: {e}") from e


def _envelope_id(entry: LogEntry) -> str | None:
    try:
        return str(read_header(entry.envelope).id)
    except TrmError:
        return None  # bytes that do not frame as an envelope are logged too


def _hashes(value: object) -> list[bytes]:
    if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
        raise ProofInvalid("the proof's hashes are not a list of hex strings")
    out = []
    for text in value:
        if len(text) != 2 * HASH_BYTES or text != text.lower():
            raise ProofInvalid("a proof hash is not 64 lowercase hex digits")
        try:
            out.append(bytes.fromhex(text))
        except ValueError as e:
            raise ProofInvalid("a proof hash is not 64 lowercase hex digits") from e
    return out
