"""`broker.verifierpool`: a batch checked on worker processes says exactly what `check` says."""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from benchmarks.crypto import NOW, World, build_world, message_of_size
from broker.directory import DirectoryBody, load_directory, sign_directory
from broker.envelope import CheckedEnvelope, EnvelopeVerifier, seal
from broker.verifierpool import MIN_SHARE, Arrival, VerifierPool


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Participants' keys and a signed directory."""
    return build_world(tmp_path_factory.mktemp("pool"))


def _arrivals(world: World, count: int) -> list[Arrival]:
    """`count` envelopes from iom-kz, every fifth of them forged, mangled or misattributed."""
    sender = world.keys["iom-kz"].sender(NOW)
    message = message_of_size(600)
    out: list[Arrival] = []
    for i in range(count):
        raw = seal(
            message,
            case=f"iom-kz.KZ-2026-{i:04d}",
            sender=sender,
            recipients=["iom-uz"],
            directory=world.directory,
            seq=1,
            now=NOW,
        ).raw
        user_id: str | None = "iom-kz"
        if i % 5 == 1:
            raw = raw[:-1] + bytes([raw[-1] ^ 1])  # a bad signature
        elif i % 5 == 2:
            raw = raw[:20]  # malformed
        elif i % 5 == 3:
            user_id = "iom-uz"  # published by someone else
        out.append((raw, NOW + timedelta(seconds=1), user_id))
    return out


def _summary(found: list[CheckedEnvelope]) -> list[tuple[object, ...]]:
    return [
        (f.raw, f.sha256, f.header, None if f.error is None else (type(f.error), str(f.error)))
        for f in found
    ]


def _expected(world: World, arrivals: list[Arrival]) -> list[tuple[object, ...]]:
    verifier = EnvelopeVerifier(world.directory)
    return _summary([verifier.check(r, at=at, amqp_user_id=u) for r, at, u in arrivals])


def test_a_batch_on_workers_is_checked_exactly_as_in_process(world: World) -> None:
    """Verified, forged, malformed and misattributed envelopes: same header, digest and error."""
    arrivals = _arrivals(world, 6 * MIN_SHARE)
    pool = VerifierPool(2)
    try:
        found = pool.check_batch(world.directory, arrivals)
    finally:
        pool.close()
    assert _summary(found) == _expected(world, arrivals)
    assert sum(f.error is None for f in found) == sum(i % 5 in (0, 4) for i in range(len(found)))


def test_a_small_batch_never_starts_the_workers(world: World) -> None:
    """Fewer than two shares' worth of envelopes are checked in the calling process."""
    arrivals = _arrivals(world, MIN_SHARE)
    pool = VerifierPool(2)
    assert _summary(pool.check_batch(world.directory, arrivals)) == _expected(world, arrivals)
    assert pool._pool is None


def test_a_new_directory_restarts_the_workers_with_it(world: World, tmp_path: Path) -> None:
    """Once the sender is gone from the directory, the workers refuse what they accepted."""
    arrivals = [a for a in _arrivals(world, 4 * MIN_SHARE) if a[2] == "iom-kz"]
    pool = VerifierPool(1)
    try:
        first = pool.check_batch(world.directory, arrivals)
        assert any(f.error is None for f in first)
        authority = Ed25519PrivateKey.generate()
        others = tuple(p for p in world.directory.participants() if p.id != "iom-kz")
        body = DirectoryBody(serial=2, issued_at=NOW - timedelta(days=1), participants=others)
        smaller = load_directory(sign_directory(body, authority), authority=authority.public_key())
        second = pool.check_batch(smaller, arrivals)
    finally:
        pool.close()
    assert all(f.error is not None for f in second)
    verifier = EnvelopeVerifier(smaller)
    expected = [verifier.check(r, at=at, amqp_user_id=u) for r, at, u in arrivals]
    assert _summary(second) == _summary(expected)


def test_a_killed_worker_costs_nothing_but_time(world: World) -> None:
    """With its worker killed, the batch is still checked right, and the next starts a new pool."""
    arrivals = _arrivals(world, 4 * MIN_SHARE)
    pool = VerifierPool(1)
    try:
        pool.check_batch(world.directory, arrivals)
        assert pool._pool is not None
        for pid in list(pool._pool._processes):
            os.kill(pid, signal.SIGKILL)
        assert _summary(pool.check_batch(world.directory, arrivals)) == _expected(world, arrivals)
        assert _summary(pool.check_batch(world.directory, arrivals)) == _expected(world, arrivals)
    finally:
        pool.close()
