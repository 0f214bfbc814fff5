"""Merkle tree hashing and proofs of the audit log, as in RFC 9162 (and RFC 6962).

SHA-256 throughout: a leaf is ``H(0x00 || entry)``, an interior node
``H(0x01 || left || right)``, the empty tree ``H("")``. `MerkleTree` is
append-only; it keeps every leaf hash (32 bytes a leaf, enough to rebuild it
from the routing database's table of leaf hashes), the frontier of perfect
subtrees the current size decomposes into (so the current root costs
O(log n) hashes) and the hashes of completed perfect subtrees of
``2**_STORED_HEIGHT`` leaves and more (one node per 8 leaves at most), so a
root of any older size or any proof costs O(log n) lookups plus fewer than
``2 * 2**_STORED_HEIGHT`` hashes per proof element, without every interior
node held in memory.

The verifiers follow RFC 9162 sections 2.1.3.2 and 2.1.4.2 and raise
`ProofInvalid` naming what did not match. Consistency with the empty tree
(``old_size == 0``) needs an empty proof and the empty root as ``old_root``;
equal sizes need an empty proof and equal roots.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from broker.errors import ProofInvalid, TreeRequestInvalid, TrmError

HASH_BYTES = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
# Perfect subtrees of 16 leaves and more are kept once complete; smaller ones
# are rehashed from the leaves on demand (at most 15 hashes each).
_STORED_HEIGHT = 4


# --- hashing -------------------------------------------------------------------


def leaf_hash(entry: bytes) -> bytes:
    """The RFC 9162 hash of one log entry: SHA-256(0x00 || entry)."""
    if not isinstance(entry, bytes):
        raise TreeRequestInvalid(f"a log entry must be bytes, not {type(entry).__name__}")
    return hashlib.sha256(_LEAF_PREFIX + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 9162 hash of an interior node: SHA-256(0x01 || left || right)."""
    _check_hash(left, "left child hash", TreeRequestInvalid)
    _check_hash(right, "right child hash", TreeRequestInvalid)
    return _node(left, right)


def root_from_leaves(leaf_hashes: Iterable[bytes]) -> bytes:
    """The Merkle tree hash (RFC 9162 2.1.1) of these leaf hashes, in order."""
    return MerkleTree.from_leaves(leaf_hashes).root()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _check_hash(value: object, what: str, error: type[TrmError]) -> None:
    if not isinstance(value, bytes):
        raise error(f"the {what} must be bytes, not {type(value).__name__}")
    if len(value) != HASH_BYTES:
        raise error(f"the {what} has {len(value)} bytes; a SHA-256 hash has {HASH_BYTES}")


def _check_count(value: object, what: str, error: type[TrmError]) -> int:
    # bool is an int subclass; a True leaf index is a caller's bug, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise error(f"the {what} must be an int, not {type(value).__name__}")
    if value < 0:
        raise error(f"the {what} is {value}; it cannot be negative")
    return value


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2): where RFC 9162 splits D[n]."""
    return 1 << ((n - 1).bit_length() - 1)


# --- the tree --------------------------------------------------------------------


class MerkleTree:
    """An append-only RFC 9162 Merkle tree over leaf hashes, with proofs for any past size."""

    def __init__(self) -> None:
        """An empty tree."""
        self._leaves: list[bytes] = []
        # Roots of the perfect subtrees the size decomposes into, largest first.
        self._frontier: list[bytes] = []
        # _stored[h - _STORED_HEIGHT][i] is the root of leaves [i * 2**h, (i + 1) * 2**h).
        self._stored: list[list[bytes]] = []

    @classmethod
    def from_leaves(cls, leaf_hashes: Iterable[bytes]) -> MerkleTree:
        """A tree holding these leaf hashes in order (a list, or rows streamed from a table)."""
        tree = cls()
        for leaf in leaf_hashes:
            tree.append(leaf)
        return tree

    @property
    def size(self) -> int:
        """The number of leaves."""
        return len(self._leaves)

    def leaf(self, index: int) -> bytes:
        """The leaf hash at `index`."""
        _check_count(index, "leaf index", TreeRequestInvalid)
        if index >= self.size:
            raise TreeRequestInvalid(f"leaf {index} does not exist; the tree has {self.size}")
        return self._leaves[index]

    def append(self, leaf_hash: bytes) -> int:
        """Add a leaf hash (see `leaf_hash`) and return its index."""
        _check_hash(leaf_hash, "leaf hash", TreeRequestInvalid)
        index = len(self._leaves)
        self._leaves.append(leaf_hash)
        node, height, carry = leaf_hash, 0, index
        # Each trailing 1 bit of the old size is a perfect subtree the new leaf completes.
        while carry & 1:
            node = _node(self._frontier.pop(), node)
            height += 1
            carry >>= 1
            if height >= _STORED_HEIGHT:
                self._store(height, node)
        self._frontier.append(node)
        return index

    def root(self, size: int | None = None) -> bytes:
        """The tree hash of the first `size` leaves (default: all of them)."""
        if size is None or size == self.size:
            return self._frontier_root()
        self._check_size(size)
        return EMPTY_ROOT if size == 0 else self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """The audit path PATH(index, D[size]) of RFC 9162 2.1.3.1, from the leaf upward."""
        self._check_size(size)
        _check_count(index, "leaf index", TreeRequestInvalid)
        if index >= size:
            raise TreeRequestInvalid(f"leaf {index} is not in a tree of {size} leaves")
        proof: list[bytes] = []
        start, end = 0, size
        while end - start > 1:
            k = _split(end - start)
            if index < start + k:
                proof.append(self._subtree(start + k, end))
                end = start + k
            else:
                proof.append(self._subtree(start, start + k))
                start += k
        proof.reverse()
        return proof

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """The proof PROOF(old_size, D[new_size]) of RFC 9162 2.1.4.1, from the bottom upward."""
        self._check_size(new_size)
        _check_count(old_size, "old tree size", TreeRequestInvalid)
        if old_size > new_size:
            raise TreeRequestInvalid(
                f"the old size {old_size} exceeds the new size {new_size}; swap them"
            )
        if old_size in (0, new_size):
            return []
        proof: list[bytes] = []
        start, end, m, whole = 0, new_size, old_size, True
        while m != end - start:
            k = _split(end - start)
            if m <= k:
                proof.append(self._subtree(start + k, end))
                end = start + k
            else:
                proof.append(self._subtree(start, start + k))
                start, m, whole = start + k, m - k, False
        if not whole:
            proof.append(self._subtree(start, end))
        proof.reverse()
        return proof

    def _check_size(self, size: int) -> None:
        _check_count(size, "tree size", TreeRequestInvalid)
        if size > self.size:
            raise TreeRequestInvalid(f"the tree has {self.size} leaves, not {size}")

    def _store(self, height: int, node: bytes) -> None:
        level = height - _STORED_HEIGHT
        if level == len(self._stored):
            self._stored.append([])
        self._stored[level].append(node)

    def _frontier_root(self) -> bytes:
        if not self._frontier:
            return EMPTY_ROOT
        root = self._frontier[-1]
        for left in reversed(self._frontier[:-1]):
            root = _node(left, root)
        return root

    def _subtree(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a node of the RFC 9162 tree (start aligned to its size)."""
        n = end - start
        if n == 1:
            return self._leaves[start]
        if n & (n - 1) == 0:
            height = n.bit_length() - 1
            if height >= _STORED_HEIGHT and start & (n - 1) == 0:
                return self._stored[height - _STORED_HEIGHT][start >> height]
        k = _split(n)
        return _node(self._subtree(start, start + k), self._subtree(start + k, end))


# --- verification ------------------------------------------------------------------


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Return if `proof` shows leaf `index` of a `size`-leaf tree with `root` is `leaf_hash`.

    RFC 9162 2.1.3.2; raises ProofInvalid saying what did not match.
    """
    _check_hash(leaf_hash, "leaf hash", ProofInvalid)
    _check_hash(root, "root hash", ProofInvalid)
    _check_count(index, "leaf index", ProofInvalid)
    _check_count(size, "tree size", ProofInvalid)
    if index >= size:
        raise ProofInvalid(f"leaf index {index} is not below the tree size {size}")
    path = _checked_proof(proof)
    inner = (index ^ (size - 1)).bit_length()
    expected = inner + (index >> inner).bit_count()
    if len(path) != expected:
        raise ProofInvalid(
            f"the inclusion proof has {len(path)} hashes; leaf {index} of a tree of "
            f"{size} leaves needs {expected}"
        )
    fn, sn, r = index, size - 1, leaf_hash
    for p in path:
        if sn == 0:
            raise ProofInvalid("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = _node(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = _node(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofInvalid("the inclusion proof is shorter than the tree is deep")
    if r != root:
        raise ProofInvalid(
            f"the inclusion proof for leaf {index} of {size} leads to root {r.hex()[:16]}..., "
            f"not the expected {root.hex()[:16]}...: wrong leaf, index, size, proof or root"
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Return if `proof` shows the `new_size` tree extends the `old_size` tree.

    RFC 9162 2.1.4.2; raises ProofInvalid saying what did not match.
    """
    _check_count(old_size, "old tree size", ProofInvalid)
    _check_count(new_size, "new tree size", ProofInvalid)
    _check_hash(old_root, "old root hash", ProofInvalid)
    _check_hash(new_root, "new root hash", ProofInvalid)
    path = _checked_proof(proof)
    if old_size > new_size:
        raise ProofInvalid(f"the old size {old_size} exceeds the new size {new_size}")
    if old_size == 0 or old_size == new_size:
        _verify_trivial_consistency(old_size, old_root, new_root, path)
        return
    shift = (old_size & -old_size).bit_length() - 1
    inner = ((old_size - 1) ^ (new_size - 1)).bit_length()
    border = ((old_size - 1) >> inner).bit_count()
    seeded = old_size != 1 << shift
    expected = int(seeded) + inner - shift + border
    if len(path) != expected:
        raise ProofInvalid(
            f"the consistency proof has {len(path)} hashes; from {old_size} to {new_size} "
            f"leaves needs {expected}"
        )
    fr, sr = _consistency_roots(old_size, new_size, old_root, path)
    if fr != old_root:
        raise ProofInvalid(
            f"the consistency proof leads to old root {fr.hex()[:16]}..., not the expected "
            f"{old_root.hex()[:16]}... of {old_size} leaves"
        )
    if sr != new_root:
        raise ProofInvalid(
            f"the consistency proof leads to new root {sr.hex()[:16]}..., not the expected "
            f"{new_root.hex()[:16]}... of {new_size} leaves"
        )


def _verify_trivial_consistency(
    old_size: int, old_root: bytes, new_root: bytes, path: list[bytes]
) -> None:
    if path:
        raise ProofInvalid(
            f"the consistency proof has {len(path)} hashes; from size {old_size} it must be empty"
        )
    if old_size == 0 and old_root != EMPTY_ROOT:
        raise ProofInvalid("the old root of an empty tree must be SHA-256 of the empty string")
    if old_size != 0 and old_root != new_root:
        raise ProofInvalid(f"two trees of {old_size} leaves have different roots")


def _consistency_roots(
    old_size: int, new_size: int, old_root: bytes, path: list[bytes]
) -> tuple[bytes, bytes]:
    """Steps 2 to 6 of RFC 9162 2.1.4.2: the old and new roots the proof leads to."""
    if old_size & (old_size - 1) == 0:
        path = [old_root, *path]
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofInvalid("the consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr, sr = _node(c, fr), _node(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = _node(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofInvalid("the consistency proof is shorter than the tree is deep")
    return fr, sr


def _checked_proof(proof: object) -> list[bytes]:
    if isinstance(proof, bytes | str) or not isinstance(proof, Sequence):
        raise ProofInvalid(f"a proof must be a sequence of hashes, not {type(proof).__name__}")
    for i, element in enumerate(proof):
        _check_hash(element, f"proof element {i}", ProofInvalid)
    return list(proof)
