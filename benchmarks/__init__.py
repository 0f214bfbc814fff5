"""Throughput and latency measurements, each beside a raw baseline measured in the same run."""
