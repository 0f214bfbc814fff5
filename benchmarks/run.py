"""Every benchmark in one run, on one RabbitMQ, printed as one table of figures and ratios.

Run: ``python -m benchmarks.run [--quick] [--messages N] [--json]``, or
``make bench`` / ``trm bench`` from the repository root.

In order, all in this process tree against the same broker, with the same
payload size, quorum queues, persistent messages, publisher confirms and
prefetch on both sides:

1. the raw pika baseline at full speed, one run per prefetch, keeping the best;
2. trm end to end between two adapter processes (seal, outbox, relay,
   publish, consume, open, inbox, apply, ack, receipt);
3. latency at a fixed offered rate (half the measured trm throughput), trm
   and raw alike;
4. routing ingest against the raw drain rate of the same queue type, then
   again with every tenth envelope a 512 KiB junk one under a verified id
   (`benchmarks.routing`), the clean rate under that load against the clean
   run's;
5. audit verify and replay against raw Ed25519 verification, one core and all.

The four ratios (`throughput_ratio`, `latency_p99_ratio`,
`audit_verify_ratio_per_core`, `routing_ingest_ratio`) are the headline; the
goals they are read against are in docs/performance.md and are never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from benchmarks import raw
from broker.transport import AmqpSettings

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672/"
GOALS = {
    "throughput_ratio": ">= 0.7",
    "latency_p99_ratio": "<= 2.0",
    "audit_verify_ratio_per_core": ">= 0.8",
    "routing_ingest_ratio": ">= 0.5",
}


@dataclass(frozen=True)
class Config:
    """The sizes of one run and where it runs."""

    messages: int = 20_000
    payload_bytes: int = raw.PAYLOAD_BYTES
    latency_seconds: float = 20.0
    latency_fraction: float = 0.5
    """Offered rate for the latency figures, as a fraction of the trm throughput."""
    routing_messages: int = 10_000
    audit_entries: int = 100_000
    prefetches: tuple[int, ...] = raw.PREFETCHES
    amqp_url: str = DEFAULT_AMQP_URL
    management_url: str = DEFAULT_MANAGEMENT_URL

    @classmethod
    def sized(
        cls,
        *,
        quick: bool = False,
        messages: int | None = None,
        **settings: Any,
    ) -> Config:
        """The full run, or with `quick` a small one; `messages` overrides either."""
        base = cls(**settings)
        if quick:
            base = replace(
                base,
                messages=300,
                latency_seconds=2.0,
                routing_messages=300,
                audit_entries=2_000,
                prefetches=(200,),
            )
        if messages is not None:
            base = replace(base, messages=messages, routing_messages=messages)
        return base


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count() or 1,
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def run(config: Config, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every figure and ratio of one run, as a JSON-ready dict."""
    from benchmarks import audit, e2e, routing

    say = progress or (lambda _text: None)
    results: dict[str, Any] = {"machine": machine(), "config": asdict(config)}
    with raw.scratch_vhost(config.management_url, config.amqp_url) as vhost:
        broker = raw.Broker(config.amqp_url, vhost)
        results["machine"]["rabbitmq"] = e2e.rabbitmq_version(config.management_url)
        say(f"raw throughput: {config.messages} messages, prefetch {config.prefetches}")
        best, runs = raw.best_throughput(
            broker, config.messages, size=config.payload_bytes, prefetches=config.prefetches
        )
        # trm's adapters and routing service consume with AmqpSettings' prefetch;
        # the raw latency and drain figures use the same one.
        prefetch = AmqpSettings.from_url(config.amqp_url).prefetch
        with tempfile.TemporaryDirectory(prefix="trm-bench-") as folder:
            say(f"trm end to end: {config.messages} messages, prefetch {prefetch}")
            trm = e2e.throughput(
                Path(folder) / "e2e",
                config.amqp_url,
                config.management_url,
                messages=config.messages,
                payload_bytes=config.payload_bytes,
                prefetch=prefetch,
            )
            rate = max(1.0, round(trm["applied_per_s"] * config.latency_fraction))
            count = max(20, int(rate * config.latency_seconds))
            say(f"latency at {rate:.0f}/s: {count} messages each")
            trm_latency = e2e.latency(
                Path(folder) / "latency",
                config.amqp_url,
                config.management_url,
                messages=count,
                rate=rate,
                payload_bytes=config.payload_bytes,
                prefetch=prefetch,
            )
            raw_latency = raw.latency(
                broker, count, rate, size=config.payload_bytes, prefetch=prefetch
            )
            say(f"routing ingest: {config.routing_messages} envelopes")
            ingest = routing.ingest(
                Path(folder) / "routing",
                config.amqp_url,
                config.management_url,
                messages=config.routing_messages,
                payload_bytes=config.payload_bytes,
                prefetch=prefetch,
            )
            say(f"routing ingest, 10 % hostile: {config.routing_messages} envelopes")
            hostile = routing.ingest(
                Path(folder) / "routing-hostile",
                config.amqp_url,
                config.management_url,
                messages=config.routing_messages,
                payload_bytes=config.payload_bytes,
                prefetch=prefetch,
                hostile_every=10,
            )
            drain = raw.consume_rate(
                broker, config.routing_messages, size=config.payload_bytes, prefetch=prefetch
            )
            say(f"audit: {config.audit_entries} entries")
            # benchmarks.audit reports building its cached export on stdout.
            with contextlib.redirect_stdout(sys.stderr):
                audited = audit.run(config.audit_entries, os.cpu_count() or 1, rebuild=False)
    results["raw"] = {
        "throughput_per_s": best.per_s,
        "prefetch": best.prefetch,
        "trm_prefetch": prefetch,
        "runs": [{**asdict(r), "per_s": r.per_s} for r in runs],
        "latency": asdict(raw_latency),
        "consume_per_s": drain.per_s,
    }
    results["trm"] = {**trm, "latency": trm_latency}
    results["routing"] = ingest
    results["routing_hostile"] = hostile
    results["audit"] = audited
    results["throughput_ratio"] = _ratio(trm["applied_per_s"], best.per_s)
    results["latency_p99_ratio"] = _ratio(trm_latency["p99"], raw_latency.p99)
    # Per core: one verifying worker against raw Ed25519 on one core. The
    # all-cores ratio (each side on every core) shows the scaling beside it.
    results["audit_verify_ratio_per_core"] = audited["verify_ratio_1_core"]
    results["audit_verify_ratio_all_cores"] = audited["verify_ratio_all_cores"]
    results["routing_ingest_ratio"] = _ratio(ingest["ingest_per_s"], drain.per_s)
    results["routing_hostile_ratio"] = _ratio(hostile["clean_per_s"], ingest["clean_per_s"])
    results["raw_throughput_per_s"] = best.per_s
    results["raw_latency_p99_s"] = raw_latency.p99
    results["raw_ed25519_verify_per_s"] = audited["raw_ed25519_verify_1_core"]
    results["raw_ed25519_verify_per_s_all_cores"] = audited["raw_ed25519_verify_all_cores"]
    results["raw_consume_per_s"] = drain.per_s
    say("raw cryptography: the ceiling per message")
    results["crypto"] = crypto_ceiling(results["machine"]["cpus"])
    results["throughput_over_crypto_ceiling"] = _ratio(
        trm["applied_per_s"], results["crypto"]["ceiling_per_s"]
    )
    results["goals"] = GOALS
    return results


def crypto_ceiling(cpus: int) -> dict[str, Any]:
    """The most messages per second trm's per-message cryptography alone allows here.

    Each message costs a seal (one Ed25519 signature, one hybrid HPKE wrap,
    one AES-256-GCM encryption) and an open (verify, unwrap, decrypt), and so
    does its delivery receipt: two raw seals and two raw opens, spread over
    every core, with RabbitMQ, the databases and Python taking nothing.
    """
    from benchmarks import crypto

    figures = crypto.run(seconds=0.5)
    hybrid = figures["envelopes"]["hybrid-1"]
    seconds_per_message = 2 / hybrid["raw_seal_per_s"] + 2 / hybrid["raw_open_per_s"]
    return {
        "raw_seal_per_s": hybrid["raw_seal_per_s"],
        "raw_open_per_s": hybrid["raw_open_per_s"],
        "seal_per_s": hybrid["seal_per_s"],
        "open_per_s": hybrid["open_per_s"],
        "cpus": cpus,
        "ceiling_per_s": cpus / seconds_per_message,
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def table(r: dict[str, Any]) -> str:
    """The figures and ratios as one readable table."""
    trm, rawf, audited, ingest = r["trm"], r["raw"], r["audit"], r["routing"]
    tl, rl = trm["latency"], rawf["latency"]
    m = r["machine"]
    rows = [
        ("throughput (msg/s)", f"{trm['applied_per_s']:.0f}", f"{rawf['throughput_per_s']:.0f}"),
        (
            "ratio trm/raw",
            f"{r['throughput_ratio']:.2f}",
            f"goal {GOALS['throughput_ratio']}",
        ),
        ("  receipts back (msg/s)", f"{trm['receipts_per_s']:.0f}", ""),
        (
            f"  crypto ceiling, {r['crypto']['cpus']} cores (msg/s)",
            "",
            f"{r['crypto']['ceiling_per_s']:.0f}",
        ),
        ("  ratio trm/crypto ceiling", f"{r['throughput_over_crypto_ceiling']:.2f}", ""),
        (f"latency p50 @ {tl['offered_per_s']:.0f}/s", _ms(tl["p50"]), _ms(rl["p50"])),
        ("latency p95", _ms(tl["p95"]), _ms(rl["p95"])),
        ("latency p99", _ms(tl["p99"]), _ms(rl["p99"])),
        (
            "ratio trm/raw p99",
            f"{r['latency_p99_ratio']:.2f}",
            f"goal {GOALS['latency_p99_ratio']}",
        ),
        (
            "routing ingest (env/s)",
            f"{ingest['ingest_per_s']:.0f}",
            f"{rawf['consume_per_s']:.0f}",
        ),
        (
            "ratio ingest/raw consume",
            f"{r['routing_ingest_ratio']:.2f}",
            f"goal {GOALS['routing_ingest_ratio']}",
        ),
        (
            "  clean env/s with 10 % hostile",
            f"{r['routing_hostile']['clean_per_s']:.0f}",
            f"{ingest['clean_per_s']:.0f} clean",
        ),
        ("  ratio hostile/clean", f"{r['routing_hostile_ratio']:.2f}", ""),
        (
            "audit verify, 1 core (entry/s)",
            f"{audited['verify_1_core']:.0f}",
            f"{audited['raw_ed25519_verify_1_core']:.0f}",
        ),
        (
            f"audit verify, {audited['workers']} cores",
            f"{audited['verify_all_cores']:.0f}",
            f"{audited['raw_ed25519_verify_all_cores']:.0f}",
        ),
        (
            f"ratio audit/raw, {audited['workers']} cores",
            f"{r['audit_verify_ratio_all_cores']:.2f}",
            "",
        ),
        (
            "ratio audit/raw per core",
            f"{r['audit_verify_ratio_per_core']:.2f}",
            f"goal {GOALS['audit_verify_ratio_per_core']}",
        ),
        ("audit replay (entry/s)", f"{audited['replay']:.0f}", ""),
    ]
    width = max(len(name) for name, _, _ in rows)
    lines = [
        f"trm bench: {r['config']['messages']} messages, payload {r['config']['payload_bytes']} B,"
        f" envelope {trm['envelope_bytes']} B, prefetch trm {rawf['trm_prefetch']}"
        f" / raw best {rawf['prefetch']}",
        f"machine: {m['cpus']} x {m['cpu_model']}, RabbitMQ {m.get('rabbitmq', '?')}, "
        f"Python {m['python']}",
        f"{'':<{width}}  {'trm':>12}  {'raw':>14}",
    ]
    lines += [f"{name:<{width}}  {a:>12}  {b:>14}" for name, a, b in rows]
    return "\n".join(lines)


def main_with(config: Config, *, as_json: bool, echo: Callable[[str], None] = print) -> None:
    """Run with `config` and print the table, or the JSON object with `as_json`."""

    def progress(text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    results = run(config, progress)
    echo(json.dumps(results, indent=2) if as_json else table(results))


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and run."""
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--payload-bytes", type=int, default=raw.PAYLOAD_BYTES)
    parser.add_argument("--amqp-url", default=os.environ.get("TRM_AMQP_URL", DEFAULT_AMQP_URL))
    parser.add_argument(
        "--management-url",
        default=os.environ.get("TRM_AMQP_MANAGEMENT_URL", DEFAULT_MANAGEMENT_URL),
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    # Logs go to stderr so that stdout carries only the table or the JSON.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    config = Config.sized(
        quick=args.quick,
        messages=args.messages,
        payload_bytes=args.payload_bytes,
        amqp_url=args.amqp_url,
        management_url=args.management_url,
    )
    main_with(config, as_json=args.json)


if __name__ == "__main__":
    main()
