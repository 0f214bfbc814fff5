"""Replay the committed audit log vectors in tests/vectors/log/ (see docs/audit.md)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from broker import _crypto, errors
from broker.directory import Directory, load_directory
from broker.errors import ProofInvalid, TrmError
from services.auditlog import LogEntry
from services.checkpoint import Checkpoint, named_log, open_log_checkpoint, routing_participant
from services.cosignature import CosignatureInvalid, check_cosignatures, require_quorum
from services.merkle import MerkleTree, verify_consistency, verify_inclusion

VECTORS = Path(__file__).parent / "vectors" / "log"


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


ENTRIES = _load("entries.json")["entries"]
ROOTS = _load("trees.json")["roots"]
INCLUSION = _load("inclusion.json")
CONSISTENCY = _load("consistency.json")
CHECKPOINTS = _load("checkpoints.json")


@pytest.fixture(scope="module")
def directory() -> Directory:
    """The vectors' directory, verified against the vectors' authority key."""
    public = bytes.fromhex(_load("keys.json")["authority"]["public"])
    authority = _crypto.verify_key_from_raw(public)
    return load_directory((VECTORS / "directory.json").read_bytes(), authority=authority)


def _hashes(values: list[str]) -> list[bytes]:
    return [bytes.fromhex(v) for v in values]


def _open(note: str, directory: Directory, log_id: str | None) -> Checkpoint:
    raw = note.encode()
    log = named_log(raw, directory) if log_id is None else routing_participant(directory, log_id)
    return open_log_checkpoint(raw, directory, log_id=log)


def test_there_are_enough_vectors() -> None:
    """Every proof of an 11-entry log, and negative cases of each kind, are in the folder."""
    assert len(ENTRIES) == 11 and len(ROOTS) == 12
    assert len(INCLUSION["valid"]) == 66 and len(CONSISTENCY["valid"]) == 78
    assert len(INCLUSION["invalid"]) >= 8 and len(CONSISTENCY["invalid"]) >= 9
    assert len(CHECKPOINTS["valid"]) >= 4 and len(CHECKPOINTS["invalid"]) >= 12


@pytest.mark.parametrize("vector", ENTRIES, ids=lambda v: f"entry-{v['index']}")
def test_leaf_input_and_hash(vector: dict[str, Any]) -> None:
    """Each entry encodes to the stored leaf input and hashes to the stored leaf hash."""
    entry = LogEntry(
        vector["index"],
        vector["received_at"],
        vector["verification"],
        bytes.fromhex(vector["prev"]),
        base64.b64decode(vector["envelope"]),
    )
    assert entry.leaf_input().hex() == vector["leaf_input"]
    assert entry.leaf_hash().hex() == vector["leaf_hash"]


def test_entries_chain() -> None:
    """Entry 0 links to 32 zero bytes, every later entry to the leaf hash before it."""
    prevs = [v["prev"] for v in ENTRIES]
    assert prevs == ["00" * 32] + [v["leaf_hash"] for v in ENTRIES[:-1]]


def test_roots_of_every_size() -> None:
    """The tree of the first n leaves has the stored root, for n = 0 .. 11."""
    tree = MerkleTree.from_leaves(bytes.fromhex(v["leaf_hash"]) for v in ENTRIES)
    assert [tree.root(n).hex() for n in range(len(ROOTS))] == ROOTS


def test_inclusion_proofs() -> None:
    """Every stored audit path is the one trm computes, and it verifies to the stored root."""
    tree = MerkleTree.from_leaves(bytes.fromhex(v["leaf_hash"]) for v in ENTRIES)
    for v in INCLUSION["valid"]:
        assert ROOTS[v["size"]] == v["root"]
        assert [h.hex() for h in tree.inclusion_proof(v["index"], v["size"])] == v["path"]
        verify_inclusion(
            bytes.fromhex(v["leaf_hash"]),
            v["index"],
            v["size"],
            _hashes(v["path"]),
            bytes.fromhex(v["root"]),
        )


@pytest.mark.parametrize("v", INCLUSION["invalid"], ids=lambda v: v["description"])
def test_tampered_inclusion_proof_is_refused(v: dict[str, Any]) -> None:
    """Each tampered inclusion proof raises ProofInvalid."""
    assert v["error"] == "ProofInvalid"
    with pytest.raises(ProofInvalid):
        verify_inclusion(
            bytes.fromhex(v["leaf_hash"]),
            v["index"],
            v["size"],
            _hashes(v["path"]),
            bytes.fromhex(v["root"]),
        )


def test_consistency_proofs() -> None:
    """Every stored consistency proof is the one trm computes, and it verifies both roots."""
    tree = MerkleTree.from_leaves(bytes.fromhex(v["leaf_hash"]) for v in ENTRIES)
    for v in CONSISTENCY["valid"]:
        old, new = v["old_size"], v["new_size"]
        assert (ROOTS[old], ROOTS[new]) == (v["old_root"], v["new_root"])
        assert [h.hex() for h in tree.consistency_proof(old, new)] == v["proof"]
        verify_consistency(
            old,
            new,
            bytes.fromhex(v["old_root"]),
            bytes.fromhex(v["new_root"]),
            _hashes(v["proof"]),
        )


@pytest.mark.parametrize("v", CONSISTENCY["invalid"], ids=lambda v: v["description"])
def test_tampered_consistency_proof_is_refused(v: dict[str, Any]) -> None:
    """Each tampered consistency proof raises ProofInvalid."""
    assert v["error"] == "ProofInvalid"
    with pytest.raises(ProofInvalid):
        verify_consistency(
            v["old_size"],
            v["new_size"],
            bytes.fromhex(v["old_root"]),
            bytes.fromhex(v["new_root"]),
            _hashes(v["proof"]),
        )


@pytest.mark.parametrize("v", CHECKPOINTS["valid"], ids=lambda v: v["description"])
def test_valid_checkpoint_opens(v: dict[str, Any], directory: Directory) -> None:
    """Each valid checkpoint opens, against the log it names, to the stored fields."""
    cp = _open(v["note"], directory, v["log_id"])
    expected = v["expected"]
    assert expected["log_id"] == "routing" and cp.origin == expected["origin"]
    assert (cp.size, cp.root.hex()) == (expected["size"], expected["root"])
    assert cp.root.hex() == ROOTS[cp.size]
    assert cp.time.isoformat().replace("+00:00", "Z") == expected["time"]


@pytest.mark.parametrize("v", CHECKPOINTS["invalid"], ids=lambda v: v["description"])
def test_invalid_checkpoint_is_refused(v: dict[str, Any], directory: Directory) -> None:
    """Each invalid checkpoint raises exactly the error class and reason it names."""
    error = getattr(errors, v["error"])
    assert issubclass(error, TrmError)
    with pytest.raises(TrmError) as info:
        _open(v["note"], directory, v["log_id"])
    assert type(info.value) is error
    assert info.value.reason == v["reason"]


COSIGNATURES = _load("cosignatures.json")


@pytest.fixture(scope="module")
def witness_directory() -> Directory:
    """The vectors' directory naming iom-uz a witness, quorum 1."""
    public = bytes.fromhex(_load("keys.json")["authority"]["public"])
    authority = _crypto.verify_key_from_raw(public)
    return load_directory((VECTORS / "witness-directory.json").read_bytes(), authority=authority)


@pytest.mark.parametrize("vector", COSIGNATURES["valid"], ids=lambda v: v["description"])
def test_cosignature_vector_counts(vector: dict[str, Any], witness_directory: Directory) -> None:
    """A valid cosignature vector counts exactly the witnesses listed; the note still opens."""
    note = vector["note"].encode()
    found = sorted({c.witness for c in check_cosignatures(note, witness_directory)})
    assert found == vector["witnesses"]
    assert _open(vector["note"], witness_directory, None).size == 11
    if len(found) >= COSIGNATURES["quorum"]:
        assert require_quorum(note, witness_directory, COSIGNATURES["quorum"]) == found


@pytest.mark.parametrize("vector", COSIGNATURES["invalid"], ids=lambda v: v["description"])
def test_cosignature_vector_refused(vector: dict[str, Any], witness_directory: Directory) -> None:
    """An invalid cosignature vector is refused with the named error and reason."""
    with pytest.raises(CosignatureInvalid) as caught:
        require_quorum(vector["note"].encode(), witness_directory, COSIGNATURES["quorum"])
    assert (type(caught.value).__name__, caught.value.reason) == (vector["error"], vector["reason"])


def test_quorum_vector_needs_a_witness(witness_directory: Directory) -> None:
    """The note cosigned by no witness is short of the directory's quorum of 1."""
    [bare] = [v for v in COSIGNATURES["valid"] if not v["witnesses"]]
    with pytest.raises(CosignatureInvalid, match="0 of the 1 witnesses"):
        require_quorum(bare["note"].encode(), witness_directory, COSIGNATURES["quorum"])
