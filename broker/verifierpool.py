"""Envelope verification spread over worker processes, so that one Python thread is not the ceiling.

The routing service verifies the signature of every envelope it logs; in one
process that verification, Ed25519 and the header's strict parse, holds a
core while the same thread also has the log and the cases to write.
`VerifierPool.check_batch` gives exactly the `CheckedEnvelope` that
`EnvelopeVerifier.check` gives for each envelope of a batch, in order: the
batch is cut into one share per process, the workers each check one and the
calling process checks the first itself, so that it is never idle waiting.

A worker sends back, for each envelope of its share, its SHA-256 and its
header when it verified, and nothing more. An envelope a worker refused is
checked again in the calling process, so that its error is the very
exception `check` raises there (errors never cross a process boundary) and
a refusal costs what it always did. The workers hold the same directory as
the caller: when the caller's directory changes, the pool is started anew
with the new one before anything is checked against it. A pool that broke
(a worker killed) is replaced, and the batch in hand is checked in the
calling process.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timedelta

from broker.directory import Directory
from broker.envelope import MAX_AGE, CheckedEnvelope, EnvelopeVerifier
from schemas.header import EnvelopeHeader

MIN_SHARE = 16
"""Fewest envelopes worth sending to a worker; a smaller batch is checked in the caller."""

Arrival = tuple[bytes, datetime, str | None]
"""An envelope's exact bytes, the time to check it at and its AMQP user id."""

_WORKER: EnvelopeVerifier | None = None


def _start_worker(directory: Directory) -> None:
    global _WORKER  # one verifier (and key cache) per worker process, set once
    _WORKER = EnvelopeVerifier(directory)


def _check_share(
    share: Sequence[Arrival], max_age: timedelta | None
) -> list[tuple[bytes, EnvelopeHeader | None]]:
    """Each envelope's SHA-256, and its header if it verified (None if refused)."""
    assert _WORKER is not None, "set by _start_worker"
    out: list[tuple[bytes, EnvelopeHeader | None]] = []
    for raw, at, user_id in share:
        found = _WORKER.check(raw, at=at, amqp_user_id=user_id, max_age=max_age)
        out.append((found.sha256, found.header if found.error is None else None))
    return out


class VerifierPool:
    """`EnvelopeVerifier.check` for whole batches, on `workers` processes and the caller."""

    def __init__(self, workers: int) -> None:
        """Use `workers` worker processes (0: check everything in the calling process)."""
        self.workers = workers
        self._directory: Directory | None = None
        self._verifier: EnvelopeVerifier | None = None
        self._pool: ProcessPoolExecutor | None = None

    def check_batch(
        self,
        directory: Directory,
        arrivals: Sequence[Arrival],
        *,
        max_age: timedelta | None = MAX_AGE,
    ) -> list[CheckedEnvelope]:
        """What `EnvelopeVerifier(directory).check` says of each arrival, in order."""
        verifier = self._verifier_for(directory)
        shares = self._shares(arrivals)
        if len(shares) == 1:
            return [self._inline(verifier, a, max_age) for a in arrivals]
        pool = self._pool_for(directory)
        futures: list[Future[list[tuple[bytes, EnvelopeHeader | None]]]] = [
            pool.submit(_check_share, share, max_age) for share in shares[1:]
        ]
        checked = [self._inline(verifier, a, max_age) for a in shares[0]]
        for share, future in zip(shares[1:], futures, strict=True):
            try:
                answers = future.result()
            except BrokenProcessPool:
                self.close()
                answers = [(b"", None)] * len(share)
            for arrival, (sha256, header) in zip(share, answers, strict=True):
                if header is None:
                    checked.append(self._inline(verifier, arrival, max_age))
                else:
                    checked.append(CheckedEnvelope(arrival[0], sha256, header, None))
        return checked

    def close(self) -> None:
        """Stop the worker processes; the next batch that needs them starts new ones."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _shares(self, arrivals: Sequence[Arrival]) -> list[Sequence[Arrival]]:
        parts = min(self.workers + 1, len(arrivals) // MIN_SHARE)
        if parts <= 1:
            return [arrivals]
        size = -(-len(arrivals) // parts)
        return [arrivals[i : i + size] for i in range(0, len(arrivals), size)]

    def _verifier_for(self, directory: Directory) -> EnvelopeVerifier:
        if directory is not self._directory or self._verifier is None:
            self.close()
            self._directory, self._verifier = directory, EnvelopeVerifier(directory)
        return self._verifier

    def _pool_for(self, directory: Directory) -> ProcessPoolExecutor:
        if self._pool is None:
            # Spawned, not forked: the routing service runs several threads,
            # and a fork copies whatever locks they hold.
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(directory,),
            )
        return self._pool

    @staticmethod
    def _inline(
        verifier: EnvelopeVerifier, arrival: Arrival, max_age: timedelta | None
    ) -> CheckedEnvelope:
        raw, at, user_id = arrival
        return verifier.check(raw, at=at, amqp_user_id=user_id, max_age=max_age)
