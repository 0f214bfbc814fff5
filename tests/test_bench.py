"""`trm bench` at a tiny size, so the benchmark cannot rot; figures are checked, never timed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from trm.cli import cli

REPO = Path(__file__).resolve().parent.parent
RATIOS = (
    "throughput_over_ceiling",
    "throughput_over_crypto_ceiling",
    "throughput_over_durable_raw",
    "throughput_over_durable_crypto",
    "throughput_ratio",
    "latency_p99_over_durable_raw",
    "latency_p99_ratio",
    "routing_ingest_over_verify_all_cores",
    "routing_ingest_ratio",
    "audit_verify_ratio_1_core",
    "audit_verify_ratio_all_cores",
)
RAW_FIGURES = (
    "ceiling_per_s",
    "raw_throughput_per_s",
    "durable_raw_throughput_per_s",
    "durable_crypto_throughput_per_s",
    "raw_latency_p99_s",
    "durable_raw_latency_p99_s",
    "raw_ed25519_verify_per_s",
    "raw_consume_per_s",
)


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_bench_json_has_every_ratio_and_raw_figure(rabbitmq_urls, monkeypatch) -> None:
    """A tiny `trm bench --json` gives positive ratios and baselines; the table shows each goal."""
    amqp, management = rabbitmq_urls
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "--quick",
            "--messages",
            "40",
            "--json",
            "--amqp-url",
            amqp,
            "--management-url",
            management,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    for key in (*RATIOS, *RAW_FIGURES):
        assert _positive(figures[key]), (key, figures[key])
    assert figures["trm"]["messages"] == 40
    for key in ("applied_per_s", "receipts_per_s"):
        assert _positive(figures["trm"][key]), key
    for key in ("p50", "p95", "p99"):
        assert _positive(figures["trm"]["latency"][key]), key
        assert _positive(figures["raw"]["latency"][key]), key
    for sync in ("fsync_each", "syncfs_batch"):
        durable = figures["durable_raw"][sync]
        assert _positive(durable["throughput_per_s"]), sync
        assert durable["latency"]["messages"] == figures["trm"]["latency"]["messages"], sync
    assert _positive(figures["routing"]["ingest_per_s"])
    assert _positive(figures["routing"]["raw_verify_all_cores_per_s"])
    assert _positive(figures["crypto"]["ceiling_per_s"])
    assert figures["ceiling_per_s"] == min(
        figures["crypto"]["ceiling_per_s"], figures["durable_raw_throughput_per_s"]
    )
    # The design as built: a sealed envelope, opened; a signed receipt, verified.
    assert figures["crypto"]["per_message"] == {
        **dict.fromkeys(("sign", "verify"), 2),
        **dict.fromkeys(("wrap", "unwrap", "encrypt", "decrypt"), 1),
    }
    assert figures["machine"]["cpus"] >= 1
    from benchmarks.run import GOALS, table

    assert set(figures["goals"]) == set(GOALS) <= set(figures)
    text = table(figures)
    labels = ("ratio trm/ceiling", "ratio trm/crypto ceiling", "ratio trm/durable raw + crypto")
    labels += ("ratio trm/plain raw", "ratio trm/durable raw p99", "ratio ingest/raw verify")
    for label in (*labels, "ratio audit/raw, 1 core", "durable raw, fsync each"):
        assert label in text
    for goal in GOALS.values():
        assert f"goal {goal}" in text
    assert text.count("goal ") == len(GOALS)


def test_bench_outside_a_checkout_says_where_to_run(tmp_path: Path) -> None:
    """Outside a checkout `trm bench` exits non-zero, saying to run it from the repository."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "trm", "bench", "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "runs from a trm checkout" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_bench_scale_runs_every_part_tiny(rabbitmq_urls, monkeypatch) -> None:
    """A tiny `trm bench --scale --json`: the backlog drained, the log's memory and verify."""
    amqp, management = rabbitmq_urls
    monkeypatch.chdir(REPO)
    urls = ["--amqp-url", amqp, "--management-url", management]
    result = CliRunner().invoke(
        cli, ["bench", "--scale", "--quick", "--json", *urls], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    backlog, log = figures["backlog"], figures["log"]
    assert backlog["messages"] == 12 and backlog["participants"] == 3
    assert backlog["missions"] == 2 and backlog["ngos"] == 1
    assert _positive(backlog["applied_per_s"]) and _positive(figures["backlog_over_ceiling"])
    assert log["routing"]["log_entries"] == 1000 + 200
    assert log["routing"]["rss_bytes"] > 0
    assert log["export"]["entries"] == log["verify_all"]["entries"] >= 1000
    assert log["verify_early"]["entries"] == 1000
    for part in ("verify_early", "verify_all"):
        assert _positive(log[part]["microseconds_per_entry"]), part
        assert log[part]["peak_rss_bytes"] > 0, part
    assert _positive(log["verify_cost_growth"])
    from benchmarks.scale import table

    assert "routing service RSS" in table(figures)
