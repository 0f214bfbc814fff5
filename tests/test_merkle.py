"""RFC 9162 Merkle tree hashing, inclusion and consistency proofs, and their verifiers."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import ProofInvalid, TreeRequestInvalid
from services.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    leaf_hash,
    node_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)

MAX = 300
LEAVES = [leaf_hash(f"entry {i}".encode()) for i in range(MAX)]

# The eight entries and tree heads of the Certificate Transparency reference
# tests (RFC 6962 section 2.1), root of size n at index n.
CT_ENTRIES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}


# --- a naive reference, straight from the RFC's recursive definitions ---------


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of RFC 9162 2.1.1, by the recursion."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = _k(n)
    return hashlib.sha256(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:])).digest()


def ref_path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 2.1.3.1, by the recursion."""
    n = len(leaves)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*ref_path(m, leaves[:k]), ref_mth(leaves[k:])]
    return [*ref_path(m - k, leaves[k:]), ref_mth(leaves[:k])]


def ref_subproof(m: int, leaves: Sequence[bytes], whole: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) of RFC 9162 2.1.4.1, by the recursion."""
    n = len(leaves)
    if m == n:
        return [] if whole else [ref_mth(leaves)]
    k = _k(n)
    if m <= k:
        return [*ref_subproof(m, leaves[:k], whole), ref_mth(leaves[k:])]
    return [*ref_subproof(m - k, leaves[k:], False), ref_mth(leaves[:k])]


# --- fixtures and corruption helpers ----------------------------------------------


@pytest.fixture(scope="module")
def tree() -> MerkleTree:
    """One tree of MAX leaves; proofs for every smaller size come from it."""
    return MerkleTree.from_leaves(LEAVES)


@pytest.fixture(scope="module")
def roots(tree: MerkleTree) -> list[bytes]:
    """The root of every size 0..MAX."""
    return [tree.root(n) for n in range(MAX + 1)]


def _flip(h: bytes, bit: int) -> bytes:
    b = bytearray(h)
    b[bit // 8 % len(b)] ^= 1 << (bit % 8)
    return bytes(b)


def corruptions(proof: list[bytes], rng: random.Random) -> Iterator[tuple[str, list[bytes]]]:
    """Every way the tests damage a proof: a flipped bit, a missing or an extra element."""
    for i in range(len(proof)):
        yield (
            f"bit flipped in element {i}",
            [*proof[:i], _flip(proof[i], rng.randrange(256)), *proof[i + 1 :]],
        )
        yield f"element {i} missing", proof[:i] + proof[i + 1 :]
    for i in range(len(proof) + 1):
        yield f"extra element at {i}", [*proof[:i], rng.randbytes(32), *proof[i:]]
    if proof:
        yield "element repeated", [*proof, proof[-1]]


def _inclusion_rejected(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes, why: str
) -> None:
    with pytest.raises(ProofInvalid) as info:
        verify_inclusion(leaf, index, size, proof, root)
    assert str(info.value), why


def _consistency_rejected(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes], why: str
) -> None:
    with pytest.raises(ProofInvalid) as info:
        verify_consistency(old, new, old_root, new_root, proof)
    assert str(info.value), why


def _sample_sizes() -> list[int]:
    """Every size up to 64, then powers of two and their neighbours, then some at random."""
    rng = random.Random(9162)
    sizes = set(range(1, 65))
    for p in (64, 128, 256):
        sizes |= {p - 1, p, p + 1}
    sizes |= {MAX - 1, MAX}
    sizes |= set(rng.sample(range(65, MAX + 1), 12))
    return sorted(s for s in sizes if s <= MAX)


# --- hashing --------------------------------------------------------------------------


def test_known_answers_by_hand() -> None:
    """The empty tree is SHA-256 of nothing and a one-leaf tree's root is that leaf's hash."""
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root_from_leaves([]) == EMPTY_ROOT
    assert MerkleTree().root() == EMPTY_ROOT
    one = leaf_hash(b"")
    assert one == hashlib.sha256(b"\x00").digest()
    assert root_from_leaves([one]) == one
    assert node_hash(one, one) == hashlib.sha256(b"\x01" + one + one).digest()


def test_ct_reference_roots() -> None:
    """Roots of the Certificate Transparency reference tree match for every size 0..8."""
    leaves = [leaf_hash(e) for e in CT_ENTRIES]
    tree = MerkleTree()
    assert tree.root().hex() == CT_ROOTS[0]
    for n, leaf in enumerate(leaves, start=1):
        tree.append(leaf)
        assert tree.root().hex() == CT_ROOTS[n]
        assert root_from_leaves(leaves[:n]).hex() == CT_ROOTS[n]
    for n in range(9):
        assert tree.root(n).hex() == CT_ROOTS[n]


def test_ct_reference_inclusion_proofs() -> None:
    """The tree produces the Certificate Transparency reference audit paths, which verify."""
    leaves = [leaf_hash(e) for e in CT_ENTRIES]
    tree = MerkleTree.from_leaves(leaves)
    for (index, size), expected in CT_INCLUSION.items():
        proof = tree.inclusion_proof(index, size)
        assert [p.hex() for p in proof] == expected
        verify_inclusion(leaves[index], index, size, proof, bytes.fromhex(CT_ROOTS[size]))


def test_roots_match_naive_reference(tree: MerkleTree, roots: list[bytes]) -> None:
    """The root of every size 0..300, current or past, equals the RFC's recursive MTH."""
    for n in range(MAX + 1):
        assert roots[n] == ref_mth(LEAVES[:n]), n
        assert MerkleTree.from_leaves(LEAVES[:n]).root() == roots[n], n


def test_append_returns_index_and_grows() -> None:
    """append returns consecutive indexes and size counts them; leaf() returns what went in."""
    tree = MerkleTree()
    assert [tree.append(h) for h in LEAVES[:20]] == list(range(20))
    assert tree.size == 20
    assert tree.leaf(7) == LEAVES[7]


def test_from_leaves_accepts_a_stream() -> None:
    """A tree rebuilds from any iterable, as rows streamed out of a table would be."""
    streamed = MerkleTree.from_leaves(h for h in LEAVES[:77])
    assert streamed.root() == ref_mth(LEAVES[:77])


# --- proofs match the reference and verify ------------------------------------------


def test_proofs_match_naive_reference(tree: MerkleTree) -> None:
    """Inclusion and consistency proofs equal the RFC's recursive PATH and SUBPROOF."""
    for n in _sample_sizes():
        for i in range(n) if n <= 64 else (0, n // 2, n - 1):
            assert tree.inclusion_proof(i, n) == ref_path(i, LEAVES[:n]), (i, n)
        for m in range(1, n + 1) if n <= 64 else (1, n // 3, n - 1, n):
            assert tree.consistency_proof(m, n) == ref_subproof(m, LEAVES[:n], True), (m, n)


def test_inclusion_every_index_small_sizes_and_sample_above(
    tree: MerkleTree, roots: list[bytes]
) -> None:
    """Every leaf's proof verifies for every size up to 64, and sampled leaves above."""
    rng = random.Random(1)
    for n in range(1, MAX + 1):
        indexes = range(n) if n <= 64 else {0, n - 1, *rng.sample(range(n), 8)}
        for i in indexes:
            verify_inclusion(LEAVES[i], i, n, tree.inclusion_proof(i, n), roots[n])


def test_consistency_dense(tree: MerkleTree, roots: list[bytes]) -> None:
    """Every (m, n) with 1 <= m <= n <= 128 verifies, and every m for sampled n up to 300."""
    pairs = {(m, n) for n in range(1, 129) for m in range(1, n + 1)}
    pairs |= {(m, n) for n in _sample_sizes() for m in range(1, n + 1)}
    for m, n in pairs:
        verify_consistency(m, n, roots[m], roots[n], tree.consistency_proof(m, n))


@pytest.mark.slow
def test_every_proof_up_to_300(tree: MerkleTree, roots: list[bytes]) -> None:
    """Every inclusion proof and every consistency proof for sizes 1..300 verifies."""
    for n in range(1, MAX + 1):
        for i in range(n):
            verify_inclusion(LEAVES[i], i, n, tree.inclusion_proof(i, n), roots[n])
        for m in range(1, n + 1):
            verify_consistency(m, n, roots[m], roots[n], tree.consistency_proof(m, n))


def test_consistency_from_empty_and_same_size(tree: MerkleTree, roots: list[bytes]) -> None:
    """From size 0 and to the same size the proof is empty and verifies on the right roots."""
    assert tree.consistency_proof(0, 10) == []
    verify_consistency(0, 10, EMPTY_ROOT, roots[10], [])
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert tree.consistency_proof(10, 10) == []
    verify_consistency(10, 10, roots[10], roots[10], [])
    _consistency_rejected(0, 10, roots[3], roots[10], [], "old root not empty")
    _consistency_rejected(0, 10, EMPTY_ROOT, roots[10], [roots[1]], "extra")
    _consistency_rejected(10, 10, roots[10], roots[9], [], "roots differ")
    _consistency_rejected(10, 10, roots[10], roots[10], [roots[1]], "extra")


# --- every corruption is rejected ---------------------------------------------------


def test_corrupted_inclusion_proofs_rejected(tree: MerkleTree, roots: list[bytes]) -> None:
    """Wrong index, a proof for another size, flipped bits, missing or extra elements: rejected."""
    rng = random.Random(2)
    for n in _sample_sizes():
        for i in range(n) if n <= 32 else {0, n - 1, *rng.sample(range(n), 3)}:
            proof = tree.inclusion_proof(i, n)
            for j in {(i + 1) % n, (i - 1) % n} - {i}:
                _inclusion_rejected(LEAVES[i], j, n, proof, roots[n], "index")
            for other in {n - 1, n + 1, 2 * n} - {n}:
                if i < other <= MAX:
                    _inclusion_rejected(LEAVES[i], i, other, proof, roots[other], "size")
            _inclusion_rejected(LEAVES[i], i, n, proof, _flip(roots[n], 5), "root")
            _inclusion_rejected(_flip(LEAVES[i], 9), i, n, proof, roots[n], "leaf")
            for why, bad in corruptions(proof, rng):
                _inclusion_rejected(LEAVES[i], i, n, bad, roots[n], why)


def test_corrupted_consistency_proofs_rejected(tree: MerkleTree, roots: list[bytes]) -> None:
    """Wrong sizes, wrong roots, flipped bits, missing or extra elements: rejected."""
    rng = random.Random(3)
    pairs = [(m, n) for n in range(2, 33) for m in range(1, n)]
    pairs += [(rng.randrange(1, n), n) for n in _sample_sizes() if n > 1 for _ in range(3)]
    for m, n in pairs:
        proof = tree.consistency_proof(m, n)
        for om in {m - 1, m + 1} - {0, n}:
            _consistency_rejected(om, n, roots[om], roots[n], proof, "old size")
        for on in {n - 1, n + 1} - {m}:
            if m < on <= MAX:
                _consistency_rejected(m, on, roots[m], roots[on], proof, "new size")
        _consistency_rejected(m, n, _flip(roots[m], 1), roots[n], proof, "old root")
        _consistency_rejected(m, n, roots[m], _flip(roots[n], 1), proof, "new root")
        for why, bad in corruptions(proof, rng):
            _consistency_rejected(m, n, roots[m], roots[n], bad, why)


def test_root_alone_does_not_bind_the_size(tree: MerkleTree, roots: list[bytes]) -> None:
    """A proof checks the path shape only, so size and root must come from one signed checkpoint.

    Leaf 0's path in a 3-leaf tree has the shape of its path in a 4-leaf
    tree: given the 3-leaf root, claiming size 4 cannot be told apart.
    """
    proof = tree.inclusion_proof(0, 3)
    verify_inclusion(LEAVES[0], 0, 4, proof, roots[3])
    _inclusion_rejected(LEAVES[0], 0, 4, proof, roots[4], "checkpointed root")


def test_rejections_say_what_did_not_match(tree: MerkleTree, roots: list[bytes]) -> None:
    """Each rejection's message names the mismatch: length, root, index or sizes."""
    proof = tree.inclusion_proof(3, 10)
    with pytest.raises(ProofInvalid, match="has 2 hashes; leaf 3 of a tree of 10 leaves needs 4"):
        verify_inclusion(LEAVES[3], 3, 10, proof[:2], roots[10])
    with pytest.raises(ProofInvalid, match="leads to root"):
        verify_inclusion(LEAVES[4], 3, 10, proof, roots[10])
    with pytest.raises(ProofInvalid, match="not below the tree size"):
        verify_inclusion(LEAVES[3], 10, 10, proof, roots[10])
    with pytest.raises(ProofInvalid, match="old size 11 exceeds the new size 10"):
        verify_consistency(11, 10, roots[11], roots[10], [])
    cproof = tree.consistency_proof(5, 10)
    with pytest.raises(ProofInvalid, match="leads to new root"):
        verify_consistency(5, 10, roots[5], roots[9], cproof)
    with pytest.raises(ProofInvalid, match="leads to old root"):
        verify_consistency(5, 10, roots[4], roots[10], cproof)


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: t.append(b"short"), "has 5 bytes"),
        (lambda t: t.append("not bytes"), "must be bytes"),
        (lambda t: t.root(11), "has 10 leaves, not 11"),
        (lambda t: t.root(-1), "cannot be negative"),
        (lambda t: t.inclusion_proof(10, 10), "not in a tree of 10"),
        (lambda t: t.inclusion_proof(0, 0), "not in a tree of 0"),
        (lambda t: t.inclusion_proof(-1, 5), "cannot be negative"),
        (lambda t: t.inclusion_proof(True, 5), "must be an int"),
        (lambda t: t.consistency_proof(6, 5), "exceeds the new size"),
        (lambda t: t.consistency_proof(1, 11), "has 10 leaves"),
        (lambda t: t.leaf(10), "does not exist"),
        (lambda t: leaf_hash("text"), "must be bytes"),
        (lambda t: node_hash(b"x" * 32, b"x" * 31), "has 31 bytes"),
    ],
)
def test_tree_bad_input(call: Callable[[MerkleTree], object], message: str) -> None:
    """Bad requests to the tree raise TreeRequestInvalid saying what was wrong, tree unchanged."""
    tree = MerkleTree.from_leaves(LEAVES[:10])
    before = tree.root()
    with pytest.raises(TreeRequestInvalid, match=message):
        call(tree)
    assert tree.size == 10
    assert tree.root() == before


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: verify_inclusion(b"x" * 31, 0, 1, [], b"x" * 32), "leaf hash has 31 bytes"),
        (lambda: verify_inclusion(b"x" * 32, 0, 1, [], b"x" * 33), "root hash has 33 bytes"),
        (lambda: verify_inclusion(b"x" * 32, -1, 1, [], b"x" * 32), "cannot be negative"),
        (lambda: verify_inclusion(b"x" * 32, 0, 0, [], b"x" * 32), "not below the tree size 0"),
        (lambda: verify_inclusion(b"x" * 32, 0, 2, [b"y"], b"x" * 32), "element 0 has 1 bytes"),
        (lambda: verify_inclusion(b"x" * 32, 0, 2, b"y" * 32, b"x" * 32), "sequence of hashes"),
        (lambda: verify_consistency(-1, 1, b"x" * 32, b"x" * 32, []), "cannot be negative"),
        (lambda: verify_consistency(1, 2, b"x" * 32, b"x", []), "new root hash has 1 bytes"),
        (lambda: verify_consistency(1, 2, b"x" * 32, b"x" * 32, None), "sequence of hashes"),
    ],
)
def test_verifier_bad_input(call: Callable[[], None], message: str) -> None:
    """Malformed arguments to a verifier raise ProofInvalid naming the bad argument."""
    with pytest.raises(ProofInvalid, match=message):
        call()


_ANY = st.one_of(
    st.binary(max_size=40),
    st.binary(min_size=32, max_size=32),
    st.integers(min_value=-5, max_value=2**70),
    st.none(),
    st.text(max_size=4),
)
_SIZE = st.one_of(st.integers(min_value=-3, max_value=MAX), st.integers(), _ANY)
_PROOF = st.one_of(st.lists(st.binary(min_size=30, max_size=33), max_size=12), _ANY)


@settings(max_examples=400, deadline=None)
@given(leaf=_ANY, index=_SIZE, size=_SIZE, proof=_PROOF, root=_ANY)
def test_fuzz_inclusion_only_proof_invalid(
    leaf: object, index: object, size: object, proof: object, root: object
) -> None:
    """Random arguments to verify_inclusion never let anything but ProofInvalid escape."""
    try:
        verify_inclusion(leaf, index, size, proof, root)  # type: ignore[arg-type]
    except ProofInvalid as e:
        assert str(e)


@settings(max_examples=400, deadline=None)
@given(
    old=_SIZE,
    new=_SIZE,
    old_root=_ANY,
    new_root=_ANY,
    proof=_PROOF,
)
def test_fuzz_consistency_only_proof_invalid(
    old: object, new: object, old_root: object, new_root: object, proof: object
) -> None:
    """Random arguments to verify_consistency never let anything but ProofInvalid escape."""
    try:
        verify_consistency(old, new, old_root, new_root, proof)  # type: ignore[arg-type]
    except ProofInvalid as e:
        assert str(e)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=MAX),
    data=st.data(),
)
def test_fuzz_real_proofs_with_random_damage(n: int, data: st.DataObject) -> None:
    """A real proof under a random claim or damage verifies only if undamaged, else ProofInvalid."""
    tree = MerkleTree.from_leaves(LEAVES[:n])
    i = data.draw(st.integers(min_value=0, max_value=n - 1))
    proof = tree.inclusion_proof(i, n)
    claimed_i = data.draw(st.integers(min_value=-2, max_value=n + 2))
    claimed_n = data.draw(st.integers(min_value=-2, max_value=MAX + 2))
    if data.draw(st.booleans()) and proof:
        proof[data.draw(st.integers(0, len(proof) - 1))] = data.draw(
            st.binary(min_size=32, max_size=32)
        )
    try:
        verify_inclusion(LEAVES[i], claimed_i, claimed_n, proof, tree.root())
    except ProofInvalid:
        return
    # Accepted: the proof is undamaged, and for the true size only the true index passes.
    assert proof == ref_path(i, LEAVES[:n])
    assert claimed_n != n or claimed_i == i
