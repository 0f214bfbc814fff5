"""Fuzzing the envelope parser and the directory loader: only TrmError may escape.

The full run drives atheris (libFuzzer, coverage-guided) in a subprocess per
target, seeded with valid envelopes and directories, for a fixed number of
executions; any other exception ends the subprocess with a crash report and
fails the campaign. The short run uses hypothesis in-process with a few
hundred examples, so the test suite does not need atheris.

Targets:

- ``envelope``: raw bytes into `read_header`, `verify_envelope` (live and
  auditor windows) and `open_envelope`;
- ``resigned``: bytes taken as a header and a payload, framed, encrypted and
  correctly signed by a real sender, then opened, to reach the checks past
  the signature (time, recipients, decryption, schema);
- ``directory``: raw bytes into `load_directory` and `parse_unverified`.

Run one target by hand: ``python -m campaigns.fuzz envelope -atheris_runs=10000``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from campaigns.report import Row

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TARGETS = ("envelope", "resigned", "directory")
FULL_RUNS = {"envelope": 700_000, "resigned": 100_000, "directory": 250_000}
"""Executions per target in the full run: 1,050,000 in all."""
_DONE = re.compile(r"Done (\d+) (?:runs )?in (\d+) second")


@dataclass(frozen=True)
class Harness:
    """Callables that feed one input to the code under test; only TrmError may escape."""

    envelope: Callable[[bytes], None]
    resigned: Callable[[bytes], None]
    directory: Callable[[bytes], None]
    seeds: dict[str, list[bytes]]


def build_harness(root: Path) -> Harness:
    """Real keys and a signed directory under `root`, and the three fuzz entry points."""
    from broker import _crypto
    from broker.directory import (
        DirectoryBody,
        Role,
        load_directory,
        parse_unverified,
        sign_directory,
    )
    from broker.envelope import (
        Recipient,
        open_envelope,
        read_header,
        seal,
        sign,
        verify_envelope,
    )
    from broker.errors import TrmError
    from broker.keys import init_participant, load_keys
    from campaigns.hostile import forge
    from schemas.base import MessageKind
    from schemas.examples import example

    start = NOW - timedelta(days=1)
    cards = [
        init_participant(root / "kz", participant_id="iom-kz", role=Role.MISSION, country="KZ",
                         suite=_crypto.Suite.X25519, now=start),
        init_participant(root / "uz", participant_id="iom-uz", role=Role.MISSION, country="UZ",
                         suite=_crypto.Suite.X25519, now=start),
        init_participant(root / "ngo", participant_id="ngo-uz-a", role=Role.NGO, country="UZ",
                         parent="iom-uz", now=start),
    ]  # fmt: skip
    authority = _crypto.new_signing_key()
    public = authority.public_key()
    body = DirectoryBody(serial=3, issued_at=start, participants=tuple(cards))
    signed_directory = sign_directory(body, authority)
    directory = load_directory(signed_directory, authority=public)
    sender = load_keys(root / "kz").sender(NOW)
    recipient = Recipient("iom-uz", load_keys(root / "uz").decryption)
    envelopes = [
        seal(
            example(kind),
            case="iom-kz.KZ-2026-0042",
            sender=sender,
            recipients=recipients,
            directory=directory,
            seq=i + 1,
            now=NOW,
            allow_classical=True,  # both suites' key entries are what the fuzzer mutates
        ).raw
        for i, (kind, recipients) in enumerate(
            [
                (MessageKind.RETURN_REQUEST, ("iom-uz", "ngo-uz-a")),
                (MessageKind.RETURN_ACCEPTED, ("iom-uz",)),
                (MessageKind.CASE_CLOSED, ("iom-uz",)),
            ]
        )
    ]
    envelopes.append(
        sign(
            example(MessageKind.DELIVERY_RECEIPT),
            case="iom-kz.KZ-2026-0042",
            sender=sender,
            recipients=("iom-uz",),
            directory=directory,
            seq=len(envelopes) + 1,
            now=NOW,
        ).raw
    )

    def fuzz_envelope(data: bytes) -> None:
        for attempt in (
            lambda: read_header(data),
            lambda: verify_envelope(data, directory, at=NOW),
            lambda: verify_envelope(data, directory, at=NOW, max_age=None),
            lambda: open_envelope(data, recipient=recipient, directory=directory, now=NOW),
        ):
            try:
                attempt()
            except TrmError:
                continue

    def fuzz_resigned(data: bytes) -> None:
        if len(data) < 2:
            return
        split = 2 + int.from_bytes(data[:2], "big") % max(1, len(data) - 1)
        header, payload = data[2:split], data[split:]
        try:
            raw = forge(
                directory,
                header,
                payload,
                signer=sender.key,
                now=NOW,
                wrap_for=[("iom-uz", "iom-uz")],
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
            return  # not a header the forger can address; the parser is not reached
        except TrmError:
            return
        try:
            open_envelope(raw, recipient=recipient, directory=directory, now=NOW)
        except TrmError:
            return

    def fuzz_directory(data: bytes) -> None:
        for attempt in (
            lambda: load_directory(data, authority=public),
            lambda: load_directory(data, authority=public, min_serial=2),
            lambda: parse_unverified(data),
        ):
            try:
                attempt()
            except TrmError:
                continue

    headers = [raw[8 : 8 + int.from_bytes(raw[4:8], "big")] for raw in envelopes]
    resigned_seeds = [len(h).to_bytes(2, "big") + h + b"{}" for h in headers]
    return Harness(
        envelope=fuzz_envelope,
        resigned=fuzz_resigned,
        directory=fuzz_directory,
        seeds={
            "envelope": envelopes,
            "resigned": resigned_seeds,
            "directory": [signed_directory],
        },
    )


# --- atheris, in a subprocess ----------------------------------------------------------


def _atheris_main(target: str, argv: list[str]) -> None:
    """The subprocess: instrument trm's modules, build the harness, run libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=["broker", "schemas"]):
        import broker.directory
        import broker.envelope  # noqa: F401
    with tempfile.TemporaryDirectory() as keys:
        harness = build_harness(Path(keys))
        function: Callable[[bytes], None] = getattr(harness, target)
        atheris.Setup([sys.argv[0], *argv], function)
        atheris.Fuzz()


@dataclass(frozen=True)
class FuzzRun:
    """What one atheris subprocess did."""

    target: str
    runs: int
    seconds: float
    crashed: bool
    tail: str


def run_atheris(target: str, runs: int, work: Path, *, timeout: float = 1800) -> FuzzRun:
    """Fuzz `target` for `runs` executions in a subprocess seeded with valid inputs."""
    corpus = work / f"corpus-{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as keys:
        for i, seed in enumerate(build_harness(Path(keys)).seeds[target]):
            (corpus / f"seed-{i}").write_bytes(seed)
    command = [
        sys.executable,
        "-m",
        "campaigns.fuzz",
        target,
        f"-atheris_runs={runs}",
        "-max_len=16384",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={work}/crash-{target}-",
        str(corpus),
    ]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    seconds = time.monotonic() - started
    found = _DONE.findall(done.stderr)
    executed = int(found[-1][0]) if found else 0
    tail = "\n".join(done.stderr.strip().splitlines()[-15:])
    return FuzzRun(target, executed, seconds, done.returncode != 0, tail)


def atheris_available() -> bool:
    """Whether atheris (the ``fuzz`` extra) is installed."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def run_fuzz_full(work: Path, runs: dict[str, int] | None = None) -> Row:
    """The full fuzz campaign with atheris: at least 1,000,000 executions in all."""
    row = Row("fuzz")
    plan = runs or FULL_RUNS
    if not atheris_available():
        row.must("atheris is installed (pip install -e '.[fuzz]')", False)
        return row
    total = 0
    for target, count in plan.items():
        result = run_atheris(target, count, work)
        total += result.runs
        row.figures[f"{target}_runs"] = result.runs
        row.figures[f"{target}_seconds"] = round(result.seconds, 1)
        row.figures[f"{target}_per_second"] = round(result.runs / max(result.seconds, 1e-9))
        row.must(f"nothing but TrmError escapes the {target} target", not result.crashed)
        if result.crashed:
            row.figures[f"{target}_crash"] = result.tail
        row.must(f"the {target} target ran its {count} executions", result.runs >= count)
    row.messages = total
    row.ok = total if row.passed else 0
    row.figures["engine"] = "atheris"
    return row


# --- hypothesis, in-process (the short run) ----------------------------------------------


def run_fuzz_short(work: Path, examples: int = 300) -> Row:
    """The short fuzz campaign with hypothesis: `examples` inputs per target."""
    from hypothesis import HealthCheck, settings

    harness = build_harness(work)
    row = Row("fuzz")
    executed = dict.fromkeys(TARGETS, 0)
    escaped: dict[str, str] = {}
    budget = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    for target in TARGETS:
        property_ = _property(getattr(harness, target), harness.seeds[target], executed, target)
        property_ = budget(property_)
        try:
            property_()
        except Exception as e:  # the property found an escape: record it, do not crash the run
            escaped[target] = f"{type(e).__name__}: {e}"[:500]
        row.must(f"nothing but TrmError escapes the {target} target", target not in escaped)
        row.figures[f"{target}_runs"] = executed[target]
    row.messages = sum(executed.values())
    row.ok = row.messages if not escaped else 0
    row.figures["engine"] = "hypothesis"
    row.figures.update({f"{t}_escape": e for t, e in escaped.items()})
    return row


def _property(
    function: Callable[[bytes], None], seeds: list[bytes], executed: dict[str, int], target: str
) -> Callable[[], None]:
    """A hypothesis test feeding mutated seeds to `function`, counting executions."""
    from hypothesis import given
    from hypothesis import strategies as st

    @given(data=st.data())
    def property_(data: Any) -> None:
        seed = data.draw(st.sampled_from(seeds))
        mutated = data.draw(_mutations(seed))
        executed[target] += 1
        function(mutated)

    return property_


def _mutations(seed: bytes) -> Any:
    from hypothesis import strategies as st

    @st.composite
    def mutate(draw: Any) -> bytes:
        data = bytearray(seed)
        for _ in range(draw(st.integers(0, 4))):
            how = draw(st.sampled_from(["flip", "truncate", "insert", "splice", "random"]))
            if not data:
                break
            at = draw(st.integers(0, len(data) - 1))
            if how == "flip":
                data[at] ^= 1 << draw(st.integers(0, 7))
            elif how == "truncate":
                del data[at:]
            elif how == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=16))
            elif how == "splice":
                end = draw(st.integers(at, len(data)))
                data[at:end] = draw(st.binary(max_size=64))
            else:
                return bytes(draw(st.binary(max_size=512)))
        return bytes(data)

    return mutate()


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m campaigns.fuzz {{{','.join(TARGETS)}}} [libFuzzer flags]")
    _atheris_main(sys.argv[1], sys.argv[2:])
