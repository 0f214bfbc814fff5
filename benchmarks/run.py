"""Every benchmark in one run, on one RabbitMQ, printed as one table of figures and ratios.

Run: ``python -m benchmarks.run [--quick] [--messages N] [--json]``, or
``make bench`` / ``trm bench`` from the repository root.

In order, all in this process tree against the same broker, with the same
payload size, quorum queues, persistent messages, publisher confirms and
prefetch on both sides:

1. the raw pika baseline at full speed, one run per prefetch, keeping the best;
2. the durable raw baseline (`benchmarks.durable`): the same pika processes
   with a SQLite commit before each publish and before each ack and a file
   per message synced at the receiver, with an ``fsync`` per file and with
   one ``syncfs`` per batch;
3. trm end to end between two adapter processes (seal, outbox, relay,
   publish, consume, open, inbox, apply, ack, receipt);
4. latency at a fixed offered rate (half the measured trm throughput), trm,
   raw and durable raw alike;
5. routing ingest against raw Ed25519 verification of envelopes of the same
   size on every core (the service must verify each one) and against the
   raw drain rate of the same queue type; then again with every tenth
   envelope a 512 KiB junk one under a verified id (`benchmarks.routing`),
   the clean rate under that load against the clean run's;
6. audit verify and replay against raw Ed25519 verification, one core and all;
7. the raw cryptography one message costs in the design as built
   (`benchmarks.crypto.message_cost`), on one core and on every core at once;
8. the durable raw baseline (batched sync) doing that cryptography too, in
   its publisher and consumer processes: what durability and cryptography
   together leave of the cores RabbitMQ also runs on.

The design's ceiling is the lower of (7) and the faster of the durable raw
baselines (2): trm cannot beat either. (8) is printed beside them: trm
cannot beat it either, and it is no goal's baseline. The headline ratios
are the keys of `GOALS`; the goals are read against them in
docs/performance.md and are never asserted.
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

from benchmarks import durable, raw
from broker.transport import AmqpSettings
from trm.progress import Meter

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672/"
GOALS = {
    "throughput_over_ceiling": ">= 0.6",
    "latency_p99_over_durable_raw": "<= 2.0",
    "routing_ingest_over_verify_all_cores": ">= 0.5",
    "audit_verify_ratio_1_core": ">= 0.85",
    "audit_verify_ratio_all_cores": ">= 0.85",
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
    audit_repeats: int = 2
    """Runs of each audit verify, the best counting (`benchmarks.audit.run`)."""
    raw_verifies: int = 20_000
    """Signatures verified per core for the routing service's raw Ed25519 baseline."""
    ceiling_seconds: float = 1.0
    """Time each core spends measuring the per-message cryptography."""
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
                audit_repeats=1,
                raw_verifies=2_000,
                ceiling_seconds=0.2,
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
    from benchmarks import audit, crypto, e2e, routing

    say = progress or (lambda _text: None)
    cpus = os.cpu_count() or 1
    results: dict[str, Any] = {"machine": machine(), "config": asdict(config)}
    with (
        raw.scratch_vhost(config.management_url, config.amqp_url) as vhost,
        tempfile.TemporaryDirectory(prefix="trm-bench-") as scratch,
    ):
        folder = Path(scratch)
        broker = raw.Broker(config.amqp_url, vhost)
        results["machine"]["rabbitmq"] = e2e.rabbitmq_version(config.management_url)
        say(f"raw throughput: {config.messages} messages, prefetch {config.prefetches}")
        best, runs = raw.best_throughput(
            broker, config.messages, size=config.payload_bytes, prefetches=config.prefetches
        )
        # trm's adapters and routing service consume with AmqpSettings' prefetch;
        # the raw latency, durable and drain figures use the same one.
        prefetch = AmqpSettings.from_url(config.amqp_url).prefetch
        durables: dict[str, raw.Throughput] = {}
        for name, each in DURABLE_SYNCS.items():
            say(f"durable raw throughput ({name}): {config.messages} messages")
            durables[name] = durable.throughput(
                broker,
                folder / "durable",
                config.messages,
                size=config.payload_bytes,
                prefetch=prefetch,
                sync_each=each,
            )
        cost = crypto.message_cost(config.payload_bytes)
        say(f"durable raw with the cryptography: {config.messages} messages")
        secured = durable.throughput(
            broker,
            folder / "durable",
            config.messages,
            size=config.payload_bytes,
            prefetch=prefetch,
            sync_each=DURABLE_SYNCS[SECURED_SYNC],
            cryptography=(cost["sender_steps"], cost["recipient_steps"]),
        )
        say(f"trm end to end: {config.messages} messages, prefetch {prefetch}")
        trm = e2e.throughput(
            folder / "e2e",
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
            folder / "latency",
            config.amqp_url,
            config.management_url,
            messages=count,
            rate=rate,
            payload_bytes=config.payload_bytes,
            prefetch=prefetch,
        )
        raw_latency = raw.latency(broker, count, rate, size=config.payload_bytes, prefetch=prefetch)
        durable_latency = {
            name: durable.latency(
                broker,
                folder / "durable",
                count,
                rate,
                size=config.payload_bytes,
                prefetch=prefetch,
                sync_each=each,
            )
            for name, each in DURABLE_SYNCS.items()
        }
        say(f"routing ingest: {config.routing_messages} envelopes")
        ingest = routing.ingest(
            folder / "routing",
            config.amqp_url,
            config.management_url,
            messages=config.routing_messages,
            payload_bytes=config.payload_bytes,
            prefetch=prefetch,
        )
        say(f"raw Ed25519 verify of {ingest['envelope_bytes']} B envelopes on {cpus} cores")
        verify_one, verify_all = audit.raw_rates(
            ingest["envelope_bytes"], config.raw_verifies, cpus
        )
        say(f"routing ingest, 10 % hostile: {config.routing_messages} envelopes")
        hostile = routing.ingest(
            folder / "routing-hostile",
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
            audited = audit.run(
                config.audit_entries, cpus, rebuild=False, repeats=config.audit_repeats
            )
    results["raw"] = {
        "throughput_per_s": best.per_s,
        "prefetch": best.prefetch,
        "trm_prefetch": prefetch,
        "runs": [{**asdict(r), "per_s": r.per_s} for r in runs],
        "latency": asdict(raw_latency),
        "consume_per_s": drain.per_s,
    }
    results["durable_raw"] = {
        name: {"throughput_per_s": durables[name].per_s, "latency": asdict(durable_latency[name])}
        for name in DURABLE_SYNCS
    }
    results["durable_crypto"] = {"throughput_per_s": secured.per_s, "sync": SECURED_SYNC}
    results["trm"] = {**trm, "latency": trm_latency}
    results["routing"] = {
        **ingest,
        "raw_verify_1_core_per_s": verify_one,
        "raw_verify_all_cores_per_s": verify_all,
    }
    results["routing_hostile"] = hostile
    results["audit"] = audited
    say("raw cryptography: the ceiling per message, on every core")
    rates = crypto.ceiling(cost["steps"], cpus, config.ceiling_seconds)
    results["crypto"] = {
        "per_message": cost["per_message"],
        "envelope_bytes": cost["envelope_bytes"],
        "receipt_bytes": cost["receipt_bytes"],
        "cpus": cpus,
        "one_core_per_s": rates["one_core_per_s"],
        "ceiling_per_s": rates["all_cores_per_s"],
    }
    results.update(_ratios(results))
    results["goals"] = GOALS
    return results


STAGES = 11
"""The steps `run` reports as it goes: its calls of `progress`."""
DURABLE_SYNCS = {"fsync_each": True, "syncfs_batch": False}
"""The durable raw baseline's two ways of syncing the receiver's files (`benchmarks.durable`)."""
SECURED_SYNC = "syncfs_batch"
"""How the durable raw baseline with the cryptography syncs: as trm's case system does."""


def _ratios(r: dict[str, Any]) -> dict[str, Any]:
    """The headline figures and ratios of a run's detailed `r`."""
    applied = r["trm"]["applied_per_s"]
    durable_best = max(d["throughput_per_s"] for d in r["durable_raw"].values())
    durable_p99 = min(d["latency"]["p99"] for d in r["durable_raw"].values())
    crypto_ceiling = r["crypto"]["ceiling_per_s"]
    ceiling = min(crypto_ceiling, durable_best)
    ingest = r["routing"]["ingest_per_s"]
    return {
        "ceiling_per_s": ceiling,
        "ceiling_bound_by": "cryptography" if crypto_ceiling <= durable_best else "durable raw",
        "throughput_over_ceiling": _ratio(applied, ceiling),
        "throughput_over_crypto_ceiling": _ratio(applied, crypto_ceiling),
        "throughput_over_durable_raw": _ratio(applied, durable_best),
        "throughput_over_durable_crypto": _ratio(applied, r["durable_crypto"]["throughput_per_s"]),
        "throughput_ratio": _ratio(applied, r["raw"]["throughput_per_s"]),
        "latency_p99_over_durable_raw": _ratio(r["trm"]["latency"]["p99"], durable_p99),
        "latency_p99_ratio": _ratio(r["trm"]["latency"]["p99"], r["raw"]["latency"]["p99"]),
        "routing_ingest_over_verify_all_cores": _ratio(
            ingest, r["routing"]["raw_verify_all_cores_per_s"]
        ),
        "routing_ingest_ratio": _ratio(ingest, r["raw"]["consume_per_s"]),
        "routing_hostile_ratio": _ratio(
            r["routing_hostile"]["clean_per_s"], r["routing"]["clean_per_s"]
        ),
        # Per core: one verifying worker against raw Ed25519 on one core; all
        # cores: every worker against raw Ed25519 on every core at once.
        "audit_verify_ratio_1_core": r["audit"]["verify_ratio_1_core"],
        "audit_verify_ratio_all_cores": r["audit"]["verify_ratio_all_cores"],
        "audit_verify_ratio_per_core": r["audit"]["verify_ratio_1_core"],
        "raw_throughput_per_s": r["raw"]["throughput_per_s"],
        "durable_raw_throughput_per_s": durable_best,
        "durable_crypto_throughput_per_s": r["durable_crypto"]["throughput_per_s"],
        "raw_latency_p99_s": r["raw"]["latency"]["p99"],
        "durable_raw_latency_p99_s": durable_p99,
        "raw_ed25519_verify_per_s": r["audit"]["raw_ed25519_verify_1_core"],
        "raw_ed25519_verify_per_s_all_cores": r["audit"]["raw_ed25519_verify_all_cores"],
        "raw_consume_per_s": r["raw"]["consume_per_s"],
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _goal(r: dict[str, Any], key: str) -> str:
    return f"goal {r['goals'].get(key, GOALS[key])}"


def table(r: dict[str, Any]) -> str:
    """The figures and ratios as one readable table: trm, its baseline, and the goal."""
    trm, rawf, audited, ingest = r["trm"], r["raw"], r["audit"], r["routing"]
    tl, rl = trm["latency"], rawf["latency"]
    dur, cr = r["durable_raw"], r["crypto"]
    m, w = r["machine"], audited["workers"]
    ops = ", ".join(f"{n} {op}" for op, n in cr["per_message"].items() if n)
    rows = [
        ("throughput (msg/s)", f"{trm['applied_per_s']:.0f}", "", ""),
        ("  receipts back (msg/s)", f"{trm['receipts_per_s']:.0f}", "", ""),
        (f"  crypto ceiling, {cr['cpus']} cores", "", f"{cr['ceiling_per_s']:.0f}", ""),
        ("    one core", "", f"{cr['one_core_per_s']:.0f}", ""),
        ("  durable raw, fsync each", "", f"{dur['fsync_each']['throughput_per_s']:.0f}", ""),
        ("  durable raw, syncfs batch", "", f"{dur['syncfs_batch']['throughput_per_s']:.0f}", ""),
        (
            "  durable raw with the cryptography",
            "",
            f"{r['durable_crypto']['throughput_per_s']:.0f}",
            "",
        ),
        ("  plain raw pika", "", f"{rawf['throughput_per_s']:.0f}", ""),
        (f"  ceiling ({r['ceiling_bound_by']})", "", f"{r['ceiling_per_s']:.0f}", ""),
        (
            "ratio trm/ceiling",
            f"{r['throughput_over_ceiling']:.2f}",
            "",
            _goal(r, "throughput_over_ceiling"),
        ),
        ("  ratio trm/crypto ceiling", f"{r['throughput_over_crypto_ceiling']:.2f}", "", ""),
        ("  ratio trm/durable raw", f"{r['throughput_over_durable_raw']:.2f}", "", ""),
        (
            "  ratio trm/durable raw + crypto",
            f"{r['throughput_over_durable_crypto']:.2f}",
            "",
            "",
        ),
        ("  ratio trm/plain raw", f"{r['throughput_ratio']:.2f}", "", ""),
        (f"latency p50 @ {tl['offered_per_s']:.0f}/s", _ms(tl["p50"]), "", ""),
        ("latency p95", _ms(tl["p95"]), "", ""),
        ("latency p99", _ms(tl["p99"]), "", ""),
        ("  durable raw p99, fsync each", "", _ms(dur["fsync_each"]["latency"]["p99"]), ""),
        ("  durable raw p99, syncfs batch", "", _ms(dur["syncfs_batch"]["latency"]["p99"]), ""),
        ("  plain raw p50 / p99", "", f"{_ms(rl['p50'])} / {_ms(rl['p99'])}", ""),
        (
            "ratio trm/durable raw p99",
            f"{r['latency_p99_over_durable_raw']:.2f}",
            "",
            _goal(r, "latency_p99_over_durable_raw"),
        ),
        ("  ratio trm/plain raw p99", f"{r['latency_p99_ratio']:.2f}", "", ""),
        ("routing ingest (env/s)", f"{ingest['ingest_per_s']:.0f}", "", ""),
        (
            f"  raw Ed25519 verify, {w} cores",
            "",
            f"{ingest['raw_verify_all_cores_per_s']:.0f}",
            "",
        ),
        ("  raw drain of the queue", "", f"{rawf['consume_per_s']:.0f}", ""),
        (
            "ratio ingest/raw verify",
            f"{r['routing_ingest_over_verify_all_cores']:.2f}",
            "",
            _goal(r, "routing_ingest_over_verify_all_cores"),
        ),
        ("  ratio ingest/raw drain", f"{r['routing_ingest_ratio']:.2f}", "", ""),
        (
            "  clean env/s with 10 % hostile",
            f"{r['routing_hostile']['clean_per_s']:.0f}",
            f"{ingest['clean_per_s']:.0f} clean",
            "",
        ),
        ("  ratio hostile/clean", f"{r['routing_hostile_ratio']:.2f}", "", ""),
        (
            "audit verify, 1 core (entry/s)",
            f"{audited['verify_1_core']:.0f}",
            f"{audited['raw_ed25519_verify_1_core']:.0f}",
            "",
        ),
        (
            "ratio audit/raw, 1 core",
            f"{r['audit_verify_ratio_1_core']:.2f}",
            "",
            _goal(r, "audit_verify_ratio_1_core"),
        ),
        (
            f"audit verify, {w} cores",
            f"{audited['verify_all_cores']:.0f}",
            f"{audited['raw_ed25519_verify_all_cores']:.0f}",
            "",
        ),
        (
            f"ratio audit/raw, {w} cores",
            f"{r['audit_verify_ratio_all_cores']:.2f}",
            "",
            _goal(r, "audit_verify_ratio_all_cores"),
        ),
        ("audit replay (entry/s)", f"{audited['replay']:.0f}", "", ""),
    ]
    width = max(len(row[0]) for row in rows)
    lines = [
        f"trm bench: {r['config']['messages']} messages, payload {r['config']['payload_bytes']} B,"
        f" envelope {trm['envelope_bytes']} B, prefetch trm {rawf['trm_prefetch']}"
        f" / raw best {rawf['prefetch']}",
        f"machine: {m['cpus']} x {m['cpu_model']}, RabbitMQ {m.get('rabbitmq', '?')}, "
        f"Python {m['python']}",
        f"raw cryptography per message: {ops}",
        f"{'':<{width}}  {'trm':>10}  {'baseline':>18}  goal",
    ]
    lines += [f"{name:<{width}}  {a:>10}  {b:>18}  {g}".rstrip() for name, a, b, g in rows]
    return "\n".join(lines)


def main_with(config: Config, *, as_json: bool, echo: Callable[[str], None] = print) -> None:
    """Run with `config` and print the table, or the JSON object with `as_json`."""

    with Meter("bench", STAGES, unit="steps") as meter:

        def progress(text: str) -> None:
            meter.update(meter.done + (meter.note != ""), note=text)

        results = run(config, progress)
        meter.update(STAGES)
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
