"""Seal and open rates next to the raw primitives they are made of, measured in one run.

Run: ``.venv/bin/python -m benchmarks.crypto [--seconds S] [--json]``.

The raw baseline of a seal is one Ed25519 signature, one AES-256-GCM
encryption and one HPKE wrap per recipient; of an open, one Ed25519
verification, one HPKE unwrap and one AES-256-GCM decryption. Their times are
summed into a raw rate, so the ratio says how much the envelope's framing,
JSON, directory lookups and checks cost on top of the cryptography.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import _crypto
from broker.directory import Directory, DirectoryBody, Role, load_directory, sign_directory
from broker.envelope import Recipient, open_envelope, seal, sign
from broker.keys import ParticipantKeys, init_participant, load_keys
from schemas.base import Message, MessageKind
from schemas.examples import example
from schemas.registry import encode_payload

PAYLOAD_BYTES = 2048
NOW = datetime.now(UTC).replace(microsecond=0)
Suite = _crypto.Suite

# id -> (role, country, parent, suite)
PARTICIPANTS: dict[str, tuple[Role, str, str | None, Suite]] = {
    "iom-kz": (Role.MISSION, "KZ", None, Suite.MLKEM768_X25519),
    "iom-uz": (Role.MISSION, "UZ", None, Suite.MLKEM768_X25519),
    "iom-kg": (Role.MISSION, "KG", None, Suite.MLKEM768_X25519),
    "ngo-uz-a": (Role.NGO, "UZ", "iom-uz", Suite.X25519),
    "ngo-uz-b": (Role.NGO, "UZ", "iom-uz", Suite.X25519),
}
SCENARIOS: dict[str, tuple[Suite, list[str]]] = {
    "hybrid-1": (Suite.MLKEM768_X25519, ["iom-uz"]),
    "hybrid-2": (Suite.MLKEM768_X25519, ["iom-uz", "iom-kg"]),
    "x25519-1": (Suite.X25519, ["ngo-uz-a"]),
    "x25519-2": (Suite.X25519, ["ngo-uz-a", "ngo-uz-b"]),
}


@dataclass(frozen=True)
class World:
    """The participants' keys and the signed directory the benchmark seals against."""

    keys: dict[str, ParticipantKeys]
    directory: Directory


def build_world(root: Path) -> World:
    """Key folders for every participant and a directory signed by a fresh authority."""
    start = NOW - timedelta(days=1)
    cards = [
        init_participant(
            root / pid,
            participant_id=pid,
            role=role,
            country=country,
            parent=parent,
            suite=suite,
            now=start,
        )
        for pid, (role, country, parent, suite) in PARTICIPANTS.items()
    ]
    authority = Ed25519PrivateKey.generate()
    body = DirectoryBody(serial=1, issued_at=start, participants=tuple(cards))
    directory = load_directory(sign_directory(body, authority), authority=authority.public_key())
    return World({pid: load_keys(root / pid) for pid in PARTICIPANTS}, directory)


def message_of_size(size: int, base: Message | None = None) -> Message:
    """`base` (default: the example return request) padded to an encoded payload of `size` bytes.

    The padding goes into the free-text ``notes``, so `base` must be a kind that has them.
    """
    base = example(MessageKind.RETURN_REQUEST) if base is None else base
    notes = getattr(base, "notes", None) or ""
    missing = size - len(encode_payload(base))
    return base.model_copy(update={"notes": notes + " " * max(missing, 0)})


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Operations per second of `fn`, run in growing batches for about `seconds`."""
    fn()
    batch, done, elapsed = 1, 0, 0.0
    while elapsed < seconds:
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        elapsed += time.perf_counter() - start
        done += batch
        batch = min(batch * 2, 1024)
    return done / elapsed


def primitive_rates(world: World, seconds: float, envelope_bytes: int) -> dict[str, float]:
    """Rates of the raw primitives on the same sizes the envelopes use."""
    signer = world.keys["iom-kz"].sender(NOW).key
    public = signer.public_key()
    signed = bytes(envelope_bytes)
    signature = _crypto.sign(signer, signed)
    content_key = _crypto.new_content_key()
    payload = bytes(PAYLOAD_BYTES)
    aad = bytes(300)
    sealed = _crypto.encrypt(content_key, payload, aad)
    rates = {
        "ed25519_sign": rate(lambda: _crypto.sign(signer, signed), seconds),
        "ed25519_verify": rate(lambda: _crypto.verify(public, signature, signed), seconds),
        "aes256gcm_encrypt": rate(lambda: _crypto.encrypt(content_key, payload, aad), seconds),
        "aes256gcm_decrypt": rate(lambda: _crypto.decrypt(content_key, sealed, aad), seconds),
    }
    for suite, pid in ((Suite.MLKEM768_X25519, "iom-uz"), (Suite.X25519, "ngo-uz-a")):
        private = next(iter(world.keys[pid].decryption.values()))
        encryption = private.public()
        wrapped = _crypto.wrap(encryption, content_key, b"info")
        rates[f"hpke_wrap_{suite.name.lower()}"] = rate(
            partial(_crypto.wrap, encryption, content_key, b"info"), seconds
        )
        rates[f"hpke_unwrap_{suite.name.lower()}"] = rate(
            partial(_crypto.unwrap, private, wrapped, b"info"), seconds
        )
    return rates


def _combined(*rates: float) -> float:
    """The rate of doing each operation once in a row."""
    return 1 / sum(1 / r for r in rates)


def envelope_rates(world: World, seconds: float, raw: dict[str, float]) -> dict[str, Any]:
    """Seal and open rates per scenario, with the raw rates and the ratios."""
    message = message_of_size(PAYLOAD_BYTES)
    sender = world.keys["iom-kz"].sender(NOW)
    results: dict[str, Any] = {}
    for name, (suite, recipients) in SCENARIOS.items():
        wrap, unwrap = (
            raw[f"hpke_wrap_{suite.name.lower()}"],
            raw[f"hpke_unwrap_{suite.name.lower()}"],
        )

        def do_seal(recipients: list[str] = recipients) -> bytes:
            return seal(
                message,
                case="iom-kz.KZ-2026-0042",
                sender=sender,
                recipients=recipients,
                directory=world.directory,
                seq=1,
                now=NOW,
            ).raw

        envelope = do_seal()
        opener = Recipient(recipients[0], world.keys[recipients[0]].decryption)
        seal_rate = rate(do_seal, seconds)
        open_rate = rate(
            partial(open_envelope, envelope, recipient=opener, directory=world.directory, now=NOW),
            seconds,
        )
        raw_seal = _combined(
            raw["ed25519_sign"], raw["aes256gcm_encrypt"], *[wrap] * len(recipients)
        )
        raw_open = _combined(raw["ed25519_verify"], unwrap, raw["aes256gcm_decrypt"])
        results[name] = {
            "recipients": len(recipients),
            "envelope_bytes": len(envelope),
            "seal_per_s": seal_rate,
            "raw_seal_per_s": raw_seal,
            "seal_over_raw": seal_rate / raw_seal,
            "open_per_s": open_rate,
            "raw_open_per_s": raw_open,
            "open_over_raw": open_rate / raw_open,
        }
    return results


# --- the ceiling: a message's raw cryptography on every core --------------------------------

Step = tuple[str, int]
"""One raw primitive a message costs (`PRIMITIVES`) and the bytes it covers."""
PRIMITIVES = ("sign", "verify", "wrap", "unwrap", "encrypt", "decrypt")


def seal_steps(envelope_bytes: int, payload_bytes: int, recipients: int = 1) -> list[Step]:
    """What sealing costs: the signature, one wrap per recipient, the payload's encryption."""
    return [("sign", envelope_bytes), *[("wrap", 32)] * recipients, ("encrypt", payload_bytes)]


def open_steps(envelope_bytes: int, payload_bytes: int) -> list[Step]:
    """What opening costs: the verification, one unwrap, the payload's decryption."""
    return [("verify", envelope_bytes), ("unwrap", 32), ("decrypt", payload_bytes)]


def message_cost(payload_bytes: int = PAYLOAD_BYTES) -> dict[str, Any]:
    """The raw cryptography of one message end to end, in the design as built.

    The sender seals the envelope for its one recipient and the recipient
    opens it; the recipient signs a delivery receipt for the sender (signed,
    not sealed: no wrap, no encryption), who verifies it. Both are hybrid
    (ML-KEM-768 + X25519) recipients, as in `benchmarks.e2e`. The sizes are
    those of a real envelope and receipt made here.
    """
    with tempfile.TemporaryDirectory() as folder:
        world = build_world(Path(folder))
        message = message_of_size(payload_bytes)
        sender = world.keys["iom-kz"].sender(NOW)
        envelope = seal(
            message,
            case="iom-kz.KZ-2026-0042",
            sender=sender,
            recipients=["iom-uz"],
            directory=world.directory,
            seq=1,
            now=NOW,
        )
        receipt = sign(
            example(MessageKind.DELIVERY_RECEIPT),
            case="iom-kz.KZ-2026-0042",
            sender=world.keys["iom-uz"].sender(NOW),
            recipients=["iom-kz"],
            directory=world.directory,
            seq=1,
            reply_to=envelope.id,
            now=NOW,
        )
    sender_steps = [*seal_steps(len(envelope.raw), payload_bytes), ("verify", len(receipt.raw))]
    recipient_steps = [*open_steps(len(envelope.raw), payload_bytes), ("sign", len(receipt.raw))]
    steps = [*sender_steps, *recipient_steps]
    counts = {name: sum(1 for op, _ in steps if op == name) for name in PRIMITIVES}
    return {
        "steps": steps,
        "sender_steps": sender_steps,
        "recipient_steps": recipient_steps,
        "per_message": counts,
        "envelope_bytes": len(envelope.raw),
        "receipt_bytes": len(receipt.raw),
    }


def _steps_rate(steps: Sequence[Step], seconds: float, start_at: float) -> float:
    """Messages per second of doing every step in a row, on this process's core.

    Keys and inputs are made first; the loop starts at wall-clock `start_at`,
    so that workers started together measure at the same time.
    """
    calls = step_calls(steps)
    for call in calls:
        call()
    wait = start_at - time.time()
    if wait > 0:
        time.sleep(wait)
    done, began = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - began) < seconds:
        for call in calls:
            call()
        done += 1
    return done / elapsed


def step_calls(steps: Sequence[Step]) -> list[Callable[[], object]]:
    """One call per step, each doing that primitive on inputs and keys made here."""
    signer = _crypto.new_signing_key()
    public = signer.public_key()
    private = _crypto.new_decryption_key(Suite.MLKEM768_X25519)
    encryption = private.public()
    content_key = _crypto.new_content_key()
    aad = bytes(300)
    calls: list[Callable[[], object]] = []
    for op, size in steps:
        data = os.urandom(size)
        if op == "sign":
            calls.append(partial(_crypto.sign, signer, data))
        elif op == "verify":
            calls.append(partial(_crypto.verify, public, _crypto.sign(signer, data), data))
        elif op == "wrap":
            calls.append(partial(_crypto.wrap, encryption, content_key, b"info"))
        elif op == "unwrap":
            wrapped = _crypto.wrap(encryption, content_key, b"info")
            calls.append(partial(_crypto.unwrap, private, wrapped, b"info"))
        elif op == "encrypt":
            calls.append(partial(_crypto.encrypt, content_key, data, aad))
        else:
            sealed = _crypto.encrypt(content_key, data, aad)
            calls.append(partial(_crypto.decrypt, content_key, sealed, aad))
    return calls


def ceiling(steps: Sequence[Step], workers: int, seconds: float = 1.0) -> dict[str, float]:
    """Messages per second `steps` allow on one core, and on `workers` cores at once."""
    one = _steps_rate(steps, seconds, 0.0)
    with ProcessPoolExecutor(workers) as pool:
        start_at = time.time() + 1.5
        rates = list(
            pool.map(_steps_rate, [steps] * workers, [seconds] * workers, [start_at] * workers)
        )
    return {"one_core_per_s": one, "all_cores_per_s": sum(rates), "workers": workers}


def run(seconds: float = 0.5) -> dict[str, Any]:
    """Every figure of the benchmark, as a JSON-ready dict."""
    with tempfile.TemporaryDirectory() as folder:
        world = build_world(Path(folder))
        raw = primitive_rates(world, seconds, envelope_bytes=PAYLOAD_BYTES + 1500)
        envelopes = envelope_rates(world, seconds, raw)
    return {
        "payload_bytes": PAYLOAD_BYTES,
        "seconds_per_figure": seconds,
        "primitives_per_s": raw,
        "envelopes": envelopes,
    }


def report(results: dict[str, Any]) -> str:
    """The figures as a readable table."""
    lines = [f"raw primitives (payload {results['payload_bytes']} bytes)"]
    for name, value in results["primitives_per_s"].items():
        lines.append(f"  {name:<32} {value:>10.0f} /s  {1e6 / value:>8.1f} us")
    lines.append("envelopes: rate /s (raw /s, ratio)")
    for name, r in results["envelopes"].items():
        lines.append(
            f"  {name:<10} {r['envelope_bytes']:>6} B  "
            f"seal {r['seal_per_s']:>7.0f} ({r['raw_seal_per_s']:>7.0f}, "
            f"{r['seal_over_raw']:.2f})  open {r['open_per_s']:>7.0f} "
            f"({r['raw_open_per_s']:>7.0f}, {r['open_over_raw']:.2f})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, run, print."""
    parser = argparse.ArgumentParser(prog="benchmarks.crypto", description=__doc__)
    parser.add_argument("--seconds", type=float, default=0.5, help="time spent per figure")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    results = run(args.seconds)
    print(json.dumps(results, indent=2) if args.json else report(results))


if __name__ == "__main__":
    main()
