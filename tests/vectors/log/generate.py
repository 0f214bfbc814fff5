"""Write the audit log test vectors in this folder.

Run from the repository root: ``.venv/bin/python tests/vectors/log/generate.py``.

Every input is fixed (keys derived from labels, fixed times, fixed entry
bytes) and Ed25519 signatures are deterministic, so every file comes out the
same on every run. The values are computed here a second time, from the
definitions in ``docs/audit.md`` and RFC 9162: leaf inputs assembled byte by
byte, roots and proofs by the RFC's recursions, signed notes written line by
line; trm's own code is only asked to agree before anything is written.

Files: ``keys.json`` and ``directory.json`` (the trust the vectors need),
``entries.json`` (leaf inputs and hashes), ``trees.json`` (the root of every
size), ``inclusion.json`` and ``consistency.json`` (every proof of the tree,
and tampered ones), ``checkpoints.json`` (signed checkpoints, valid and not),
``witness-directory.json`` and ``cosignatures.json`` (the same directory
naming the mission a witness with a quorum of 1; witness cosignatures, valid
and not).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import _crypto
from broker.directory import (
    DirectoryBody,
    KeyUse,
    Participant,
    PublicKey,
    Role,
    load_directory,
    sign_directory,
)
from broker.errors import TrmError
from services.auditlog import LogEntry
from services.checkpoint import named_log, open_log_checkpoint, routing_participant
from services.cosignature import check_cosignatures, cosign, require_quorum
from services.merkle import MerkleTree

HERE = Path(__file__).parent
ROUTING, UZ, NGO = "routing", "iom-uz", "ngo-uz-istiqbolli-avlod"
YEAR_START, YEAR_END = datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
REVOKED_AT = datetime(2026, 2, 1, tzinfo=UTC)
T0 = datetime(2026, 3, 1, 8, 0, 2, 123, tzinfo=UTC)
"""The receive time of entry 0; entry i is received i minutes and i microseconds later."""
ENTRIES = 11
ZERO = bytes(32)


def _seed(label: str) -> bytes:
    return hashlib.sha256(f"trm/v1 log test vector {label}".encode()).digest()


def _signing(label: str) -> Ed25519PrivateKey:
    return _crypto.signing_key_from_raw(_seed(label))


# (participant, kid) -> (key, not_before, not_after, revoked_at)
SIGNING: dict[tuple[str, str], tuple[Ed25519PrivateKey, datetime, datetime, datetime | None]] = {
    (ROUTING, "routing-s-1"): (_signing("routing-s-1"), YEAR_START, YEAR_END, None),
    (ROUTING, "routing-s-2025"): (
        _signing("routing-s-2025"),
        datetime(2025, 1, 1, tzinfo=UTC),
        YEAR_START,
        None,
    ),
    (ROUTING, "routing-s-revoked"): (
        _signing("routing-s-revoked"),
        YEAR_START,
        YEAR_END,
        REVOKED_AT,
    ),
    (UZ, "iom-uz-s-1"): (_signing("uz-s-1"), YEAR_START, YEAR_END, None),
    (NGO, "ngo-uz-ia-s-1"): (_signing("ngo-s-1"), YEAR_START, YEAR_END, None),
}
AUTHORITY = _signing("authority")
WITNESS = _signing("witness")
ROLES: dict[str, tuple[Role, str, str | None]] = {
    ROUTING: (Role.ROUTING, "KZ", None),
    UZ: (Role.MISSION, "UZ", None),
    NGO: (Role.NGO, "UZ", UZ),
}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _card(pid: str) -> Participant:
    role, country, parent = ROLES[pid]
    keys = [
        PublicKey(
            kid=kid,
            use=KeyUse.SIGN,
            alg="ed25519",
            public=_b64(_crypto.raw_public(key.public_key())),
            not_before=start,
            not_after=end,
            revoked_at=revoked,
        )
        for (owner, kid), (key, start, end, revoked) in SIGNING.items()
        if owner == pid
    ]
    encryption = _crypto.DecryptionKey(_crypto.Suite.X25519, _seed(f"{pid}-e-1"))
    keys.append(
        PublicKey(
            kid=f"{pid}-e-1",
            use=KeyUse.ENCRYPT,
            alg=_crypto.Suite.X25519.value,
            public=_b64(encryption.public().raw),
            not_before=YEAR_START,
            not_after=YEAR_END,
        )
    )
    return Participant(id=pid, role=role, country=country, parent=parent, keys=tuple(keys))


def directory_body() -> DirectoryBody:
    """The routing service (a current, a 2025 and a revoked key), a mission and its NGO."""
    cards = tuple(_card(pid) for pid in ROLES)
    return DirectoryBody(serial=1, issued_at=datetime(2025, 1, 1, tzinfo=UTC), participants=cards)


def keys_document() -> dict[str, Any]:
    """The authority's public key and every signing key, hex encoded."""
    signing: dict[str, Any] = {pid: {} for pid in ROLES}
    for (pid, kid), (key, *_) in SIGNING.items():
        signing[pid][kid] = {
            "private": _crypto.raw_private(key).hex(),
            "public": _crypto.raw_public(key.public_key()).hex(),
        }
    return {
        "authority": {"public": _crypto.raw_public(AUTHORITY.public_key()).hex()},
        "signing": signing,
        "witness": {"private": _crypto.raw_private(WITNESS).hex()},
    }


# --- entries and their leaves, byte by byte ---------------------------------------------


def entry_fields(index: int) -> tuple[str, str, bytes]:
    """(received_at, verification, envelope bytes) of entry `index`."""
    at = T0 + timedelta(minutes=index, microseconds=index)
    when = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if index == 4:
        return when, "rejected:malformed", b""
    if index == 7:
        return when, "rejected:bad_signature", b"TRM1" + _seed("bad")[:20]
    body = b"".join(_seed(f"envelope {index} {i}") for i in range(index % 3 + 1))
    return when, "ok", b"TRM1" + body[: 40 + 17 * index]


def leaf_input(index: int, when: str, verification: str, prev: bytes, envelope: bytes) -> bytes:
    """The leaf input of docs/audit.md, assembled field by field."""
    return (
        b"trm/v1 audit entry\x00"
        + struct.pack(">Q", index)
        + struct.pack(">H", len(when))
        + when.encode("ascii")
        + struct.pack(">H", len(verification))
        + verification.encode("ascii")
        + prev
        + struct.pack(">I", len(envelope))
        + envelope
    )


def entries() -> list[dict[str, Any]]:
    """Every entry of the vector log, with its leaf input and leaf hash."""
    out, prev = [], ZERO
    for index in range(ENTRIES):
        when, verification, envelope = entry_fields(index)
        data = leaf_input(index, when, verification, prev, envelope)
        leaf = hashlib.sha256(b"\x00" + data).digest()
        assert LogEntry(index, when, verification, prev, envelope).leaf_input() == data
        out.append(
            {
                "index": index,
                "received_at": when,
                "verification": verification,
                "prev": prev.hex(),
                "envelope": _b64(envelope),
                "leaf_input": data.hex(),
                "leaf_hash": leaf.hex(),
            }
        )
        prev = leaf
    return out


# --- RFC 9162 by its recursions -----------------------------------------------------------


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(leaves: list[bytes]) -> bytes:
    """MTH(D[n]), RFC 9162 2.1.1."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = _k(len(leaves))
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]), RFC 9162 2.1.3.1."""
    if len(leaves) == 1:
        return []
    k = _k(len(leaves))
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b), RFC 9162 2.1.4.1."""
    n = len(leaves)
    if m == n:
        return [] if whole else [mth(leaves)]
    k = _k(n)
    if m <= k:
        return [*subproof(m, leaves[:k], whole), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def proof(m: int, leaves: list[bytes]) -> list[bytes]:
    """PROOF(m, D[n]); empty for m = 0 and m = n, as trm and RFC 9162 take them."""
    return [] if m in (0, len(leaves)) else subproof(m, leaves, True)


def _hex(hashes: list[bytes]) -> list[str]:
    return [h.hex() for h in hashes]


def _flip(value: str) -> str:
    raw = bytearray(bytes.fromhex(value))
    raw[0] ^= 0x01
    return raw.hex()


def inclusion_document(leaves: list[bytes]) -> dict[str, Any]:
    """Every audit path of every tree size, and paths that must be refused."""
    tree = MerkleTree.from_leaves(leaves)
    valid = []
    for size in range(1, len(leaves) + 1):
        for index in range(size):
            p = path(index, leaves[:size])
            assert tree.inclusion_proof(index, size) == p
            valid.append(
                {
                    "index": index,
                    "size": size,
                    "leaf_hash": leaves[index].hex(),
                    "path": _hex(p),
                    "root": mth(leaves[:size]).hex(),
                }
            )
    base = next(v for v in valid if (v["index"], v["size"]) == (5, 11))
    return {"valid": valid, "invalid": _tampered(base, INCLUSION_TAMPERING)}


def consistency_document(leaves: list[bytes]) -> dict[str, Any]:
    """Every consistency proof between two sizes, and proofs that must be refused."""
    tree = MerkleTree.from_leaves(leaves)
    valid = []
    for new in range(len(leaves) + 1):
        for old in range(new + 1):
            p = proof(old, leaves[:new])
            assert tree.consistency_proof(old, new) == p
            valid.append(
                {
                    "old_size": old,
                    "new_size": new,
                    "old_root": mth(leaves[:old]).hex(),
                    "new_root": mth(leaves[:new]).hex(),
                    "proof": _hex(p),
                }
            )
    pick = {(v["old_size"], v["new_size"]): v for v in valid}
    invalid = _tampered(pick[(3, 7)], CONSISTENCY_TAMPERING)
    invalid += _tampered(pick[(0, 5)], {"empty tree, proof not empty": _with_proof(pick[(3, 7)])})
    invalid += _tampered(pick[(6, 6)], {"same size, other root": _other_new_root})
    return {"valid": valid, "invalid": invalid}


_Edit = Callable[[dict[str, Any]], None]


def _tampered(base: dict[str, Any], edits: dict[str, _Edit]) -> list[dict[str, Any]]:
    out = []
    for description, edit in edits.items():
        vector = json.loads(json.dumps(base))
        edit(vector)
        out.append({"description": description, **vector, "error": "ProofInvalid"})
    return out


def _set(key: str, value: Any) -> _Edit:
    return lambda v: v.__setitem__(key, value)


def _first_hash_flipped(key: str) -> _Edit:
    return lambda v: v[key].__setitem__(0, _flip(v[key][0]))


def _with_proof(other: dict[str, Any]) -> _Edit:
    return lambda v: v.__setitem__("proof", other["proof"])


def _other_new_root(v: dict[str, Any]) -> None:
    v["new_root"] = _flip(v["new_root"])


INCLUSION_TAMPERING: dict[str, _Edit] = {
    "a path hash flipped": _first_hash_flipped("path"),
    "another leaf": lambda v: v.__setitem__("leaf_hash", _flip(v["leaf_hash"])),
    "another index": _set("index", 4),
    "another size": _set("size", 6),
    "index not below size": _set("index", 11),
    "path one hash short": lambda v: v["path"].pop(),
    "path one hash long": lambda v: v["path"].append(v["path"][0]),
    "another root": lambda v: v.__setitem__("root", _flip(v["root"])),
}
CONSISTENCY_TAMPERING: dict[str, _Edit] = {
    "a proof hash flipped": _first_hash_flipped("proof"),
    "another old root": lambda v: v.__setitem__("old_root", _flip(v["old_root"])),
    "another new root": lambda v: v.__setitem__("new_root", _flip(v["new_root"])),
    "sizes swapped": lambda v: v.update(old_size=7, new_size=3),
    "another old size": _set("old_size", 4),
    "proof one hash short": lambda v: v["proof"].pop(),
    "proof one hash long": lambda v: v["proof"].append(v["proof"][0]),
}


# --- signed checkpoints, line by line -----------------------------------------------------


def _time_line(at: datetime) -> str:
    pattern = "%Y-%m-%dT%H:%M:%S.%fZ" if at.microsecond else "%Y-%m-%dT%H:%M:%SZ"
    return "time " + at.astimezone(UTC).strftime(pattern)


def body(origin: str, size: int, root: bytes, at: datetime) -> bytes:
    """The four-line checkpoint body."""
    return f"{origin}\n{size}\n{_b64(root)}\n{_time_line(at)}\n".encode()


def signature_line(text: bytes, key: Ed25519PrivateKey, name: str) -> bytes:
    """A c2sp.org signed-note signature line by `key` under `name`."""
    public = _crypto.raw_public(key.public_key())
    key_id = hashlib.sha256(name.encode() + b"\n\x01" + public).digest()[:4]
    return f"\u2014 {name} {_b64(key_id + key.sign(text))}\n".encode()


def note(text: bytes, *signers: tuple[Ed25519PrivateKey, str]) -> bytes:
    return text + b"\n" + b"".join(signature_line(text, k, n) for k, n in signers)


def _key(pid: str, kid: str) -> tuple[Ed25519PrivateKey, str]:
    return SIGNING[(pid, kid)][0], f"{pid}/{kid}"


def checkpoint_document(leaves: list[bytes], directory: Any) -> dict[str, Any]:
    """Checkpoints of the vector log that open, and ones that must be refused, with why."""
    origin = f"trm.routing/{ROUTING}"
    current = _key(ROUTING, "routing-s-1")
    at = T0 + timedelta(hours=1)
    valid_notes = [
        ("the first four entries", note(body(origin, 4, mth(leaves[:4]), at), current), None),
        (
            "the whole log, microsecond time, cosigned by a witness",
            note(
                body(origin, 11, mth(leaves), at.replace(microsecond=250)),
                current,
                (WITNESS, "witness.example/w1"),
            ),
            ROUTING,
        ),
        (
            "the empty log in 2025, by the key valid then",
            note(
                body(origin, 0, mth([]), datetime(2025, 6, 1, tzinfo=UTC)),
                _key(ROUTING, "routing-s-2025"),
            ),
            None,
        ),
        (
            "eight entries, before the revoked key's revocation",
            note(
                body(origin, 8, mth(leaves[:8]), REVOKED_AT - timedelta(days=1)),
                _key(ROUTING, "routing-s-revoked"),
            ),
            None,
        ),
    ]
    valid = []
    for description, signed, log_id in valid_notes:
        cp = _open(signed, directory, log_id)
        valid.append(
            {
                "description": description,
                "note": signed.decode(),
                "log_id": log_id,
                "expected": {
                    "log_id": ROUTING,
                    "origin": cp.origin,
                    "size": cp.size,
                    "root": cp.root.hex(),
                    "time": cp.time.isoformat().replace("+00:00", "Z"),
                },
            }
        )
    return {"valid": valid, "invalid": _invalid_checkpoints(leaves, directory)}


def _invalid_checkpoints(leaves: list[bytes], directory: Any) -> list[dict[str, Any]]:
    origin = f"trm.routing/{ROUTING}"
    at = T0 + timedelta(hours=1)
    good = body(origin, 4, mth(leaves[:4]), at)
    current = _key(ROUTING, "routing-s-1")
    ngo_key = SIGNING[(NGO, "ngo-uz-ia-s-1")][0]
    signed = note(good, current)
    flipped = bytearray(signed)
    flipped[-10] = ord("A") if flipped[-10] != ord("A") else ord("B")
    skewed_root = _b64(mth(leaves[:4]))[:-2] + chr(ord(_b64(mth(leaves[:4]))[-2]) + 1) + "="
    cases: list[tuple[str, bytes, str | None]] = [
        ("signature changed", bytes(flipped), None),
        ("body changed after signing", signed.replace(b"\n4\n", b"\n5\n", 1), None),
        ("unsigned", good, None),
        (
            "signed by the NGO under its own key name, origin the routing log",
            note(good, (ngo_key, f"{NGO}/ngo-uz-ia-s-1")),
            None,
        ),
        (
            "signed by the NGO, origin naming the NGO as the log",
            note(
                body(f"trm.routing/{NGO}", 4, mth(leaves[:4]), at),
                (ngo_key, f"{NGO}/ngo-uz-ia-s-1"),
            ),
            None,
        ),
        (
            "the NGO's key under the routing key's name",
            note(good, (ngo_key, f"{ROUTING}/routing-s-1")),
            None,
        ),
        ("a genuine checkpoint, the auditor naming a mission as the log", signed, UZ),
        (
            "origin naming a participant the directory lacks",
            note(body("trm.routing/elsewhere", 4, mth(leaves[:4]), at), current),
            None,
        ),
        (
            "origin outside trm.routing/",
            note(body("example.org/log", 4, mth(leaves[:4]), at), current),
            None,
        ),
        (
            "signed by a key revoked before its time",
            note(good, _key(ROUTING, "routing-s-revoked")),
            None,
        ),
        (
            "signed by a key expired before its time",
            note(good, _key(ROUTING, "routing-s-2025")),
            None,
        ),
        ("a key id the directory lacks", note(good, (current[0], f"{ROUTING}/routing-s-9")), None),
        (
            "root in non-canonical base64",
            note(good.replace(_b64(mth(leaves[:4])).encode(), skewed_root.encode()), current),
            None,
        ),
    ]
    out = []
    for description, signed_note, log_id in cases:
        try:
            _open(signed_note, directory, log_id)
        except TrmError as e:
            out.append(
                {
                    "description": description,
                    "note": signed_note.decode(),
                    "log_id": log_id,
                    "error": type(e).__name__,
                    "reason": e.reason,
                }
            )
        else:
            raise AssertionError(f"{description}: opened")
    return out


def _open(signed: bytes, directory: Any, log_id: str | None) -> Any:
    """As an auditor opens a checkpoint: the log named, else the one its origin names."""
    log = named_log(signed, directory) if log_id is None else routing_participant(directory, log_id)
    return open_log_checkpoint(signed, directory, log_id=log)


# --- witness cosignatures, byte by byte -----------------------------------------------------

WITNESS_NAME = f"trm.witness/{UZ}/iom-uz-s-1"
COSIGNED_AT = 1772355600  # 2026-03-01T09:00:00Z


def cosignature_line(
    text: bytes, key: Ed25519PrivateKey, name: str, timestamp: int, algorithm: bytes = b"\x04"
) -> bytes:
    """A c2sp.org/tlog-cosignature Ed25519 line over the checkpoint body `text`."""
    public = _crypto.raw_public(key.public_key())
    key_id = hashlib.sha256(name.encode() + b"\n" + algorithm + public).digest()[:4]
    message = b"cosignature/v1\ntime %d\n" % timestamp + text
    blob = key_id + struct.pack(">Q", timestamp) + key.sign(message)
    return f"\u2014 {name} {_b64(blob)}\n".encode()


def _altered(line: bytes, position: int) -> bytes:
    name, blob = line.decode().rstrip("\n").split(" ")[1:]
    raw = bytearray(base64.b64decode(blob))
    raw[position] ^= 0x01
    return f"\u2014 {name} {_b64(bytes(raw))}\n".encode()


def cosignature_document(leaves: list[bytes], directory: Any) -> dict[str, Any]:
    """Checkpoints with witness cosignatures: those that count, and those refused, with why."""
    text = body(f"trm.routing/{ROUTING}", 11, mth(leaves), T0 + timedelta(hours=1))
    signed = note(text, _key(ROUTING, "routing-s-1"))
    uz = SIGNING[(UZ, "iom-uz-s-1")][0]
    line = cosignature_line(text, uz, WITNESS_NAME, COSIGNED_AT)
    assert line == cosign(signed, uz, WITNESS_NAME, at=datetime.fromtimestamp(COSIGNED_AT, UTC))
    foreign = cosignature_line(text, WITNESS, "witness.example/w1", COSIGNED_AT)
    valid = [
        ("cosigned by the witness iom-uz", signed + line, [UZ]),
        ("and by a witness the directory does not list, which counts for nothing",
         signed + foreign + line, [UZ]),
        ("by no witness: valid, but short of the quorum", signed, []),
    ]  # fmt: skip
    ngo = SIGNING[(NGO, "ngo-uz-ia-s-1")][0]
    invalid = [
        ("the signature altered", signed + _altered(line, 20)),
        ("the timestamp altered", signed + _altered(line, 11)),
        ("the key id altered", signed + _altered(line, 0)),
        ("a key id computed as for a note signature (0x01)",
         signed + cosignature_line(text, uz, WITNESS_NAME, COSIGNED_AT, b"\x01")),
        ("signed by the NGO's key under the witness's name",
         signed + cosignature_line(text, ngo, WITNESS_NAME, COSIGNED_AT)),
        ("under a key id the witness does not have",
         signed + cosignature_line(text, uz, f"trm.witness/{UZ}/iom-uz-s-9", COSIGNED_AT)),
        ("over another body (size 10)",
         signed + cosignature_line(text.replace(b"\n11\n", b"\n10\n"), uz, WITNESS_NAME,
                                   COSIGNED_AT)),
    ]  # fmt: skip
    return {
        "quorum": directory.body.quorum,
        "valid": [_counted(d, n, w, directory) for d, n, w in valid],
        "invalid": [_refused_cosignature(d, n, directory) for d, n in invalid],
    }


def _counted(description: str, signed: bytes, witnesses: list[str], directory: Any) -> Any:
    assert sorted({c.witness for c in check_cosignatures(signed, directory)}) == witnesses
    return {"description": description, "note": signed.decode(), "witnesses": witnesses}


def _refused_cosignature(description: str, signed: bytes, directory: Any) -> dict[str, Any]:
    try:
        require_quorum(signed, directory, directory.body.quorum)
    except TrmError as e:
        return {
            "description": description,
            "note": signed.decode(),
            "error": type(e).__name__,
            "reason": e.reason,
        }
    raise AssertionError(f"{description}: counted")


def _write(name: str, document: Any) -> None:
    (HERE / name).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    """Write every file of the folder."""
    raw = sign_directory(directory_body(), AUTHORITY)
    (HERE / "directory.json").write_bytes(raw)
    directory = load_directory(raw, authority=AUTHORITY.public_key())
    listed = entries()
    leaves = [bytes.fromhex(e["leaf_hash"]) for e in listed]
    tree = MerkleTree.from_leaves(leaves)
    roots = [mth(leaves[:n]).hex() for n in range(ENTRIES + 1)]
    assert roots == [tree.root(n).hex() for n in range(ENTRIES + 1)]
    _write("keys.json", keys_document())
    _write("entries.json", {"entries": listed})
    _write("trees.json", {"roots": roots})
    _write("inclusion.json", inclusion_document(leaves))
    _write("consistency.json", consistency_document(leaves))
    _write("checkpoints.json", checkpoint_document(leaves, directory))
    witnessed = directory_body().model_copy(update={"witnesses": (UZ,), "quorum": 1})
    raw = sign_directory(witnessed, AUTHORITY)
    (HERE / "witness-directory.json").write_bytes(raw)
    with_witness = load_directory(raw, authority=AUTHORITY.public_key())
    _write("cosignatures.json", cosignature_document(leaves, with_witness))


if __name__ == "__main__":
    main()
