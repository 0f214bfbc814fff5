"""Merkle tree throughput against raw SHA-256, measured in the same run.

``python -m benchmarks.merkle [--leaves N]`` prints, for N leaves (default
100,000): the raw hashlib.sha256 rate over 65-byte inputs (one interior
node's worth), then the rate of each tree operation and its ratio to that
baseline. A ratio is operations per second divided by raw hashes per second.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import time
from collections.abc import Callable

from services.merkle import (
    MerkleTree,
    leaf_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)


def _rate(count: int, run: Callable[[], object]) -> float:
    """Operations per second of `run`, which performs `count` operations."""
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


def _raw_sha256(count: int) -> None:
    node = b"\x01" + bytes(64)
    sha256 = hashlib.sha256
    for _ in range(count):
        sha256(node).digest()


def main(argv: list[str] | None = None) -> None:
    """Run the measurements and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--leaves", type=int, default=100_000)
    parser.add_argument("--proofs", type=int, default=2_000)
    args = parser.parse_args(argv)
    n, proofs = args.leaves, args.proofs
    rng = random.Random(6962)
    entries = [rng.randbytes(64) for _ in range(n)]

    raw = _rate(n, lambda: _raw_sha256(n))
    print(f"raw hashlib.sha256 (65 B)        {raw:12,.0f}/s   1.00x  (baseline)")

    leaves: list[bytes] = []
    rows: list[tuple[str, float]] = []
    rows.append(("leaf_hash", _rate(n, lambda: leaves.extend(leaf_hash(e) for e in entries))))
    tree = MerkleTree()
    rows.append(("append (leaf hash given)", _rate(n, lambda: [tree.append(h) for h in leaves])))
    rows.append(("from_leaves (rebuild)", _rate(n, lambda: MerkleTree.from_leaves(leaves))))
    rows.append(("root_from_leaves, per leaf", _rate(n, lambda: root_from_leaves(leaves))))
    rows.append(
        ("root() current size", _rate(proofs, lambda: [tree.root() for _ in range(proofs)]))
    )
    sizes = [rng.randrange(1, n + 1) for _ in range(proofs)]
    rows.append(("root(size) past size", _rate(proofs, lambda: [tree.root(s) for s in sizes])))
    picks = [(rng.randrange(s), s) for s in sizes]
    incl = [tree.inclusion_proof(i, s) for i, s in picks]
    rows.append(
        ("inclusion_proof", _rate(proofs, lambda: [tree.inclusion_proof(i, s) for i, s in picks]))
    )
    roots = {s: tree.root(s) for s in sizes}

    def check_inclusions() -> None:
        for (i, s), p in zip(picks, incl, strict=True):
            verify_inclusion(leaves[i], i, s, p, roots[s])

    rows.append(("verify_inclusion", _rate(proofs, check_inclusions)))
    pairs = [(rng.randrange(1, s + 1), s) for s in sizes]
    for m, _ in pairs:
        roots.setdefault(m, tree.root(m))
    cons = [tree.consistency_proof(m, s) for m, s in pairs]
    rows.append(
        (
            "consistency_proof",
            _rate(proofs, lambda: [tree.consistency_proof(m, s) for m, s in pairs]),
        )
    )

    def check_consistency() -> None:
        for (m, s), p in zip(pairs, cons, strict=True):
            verify_consistency(m, s, roots[m], roots[s], p)

    rows.append(("verify_consistency", _rate(proofs, check_consistency)))
    for name, rate in rows:
        print(f"{name:32} {rate:12,.0f}/s  {rate / raw:5.2f}x")
    print(f"({n:,} leaves; proofs and past roots over {proofs:,} random sizes)")


if __name__ == "__main__":
    main()
