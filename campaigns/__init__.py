"""Reliability and security campaigns: faults, hostile input, replays, fuzzing.

Run from the repository root with ``python -m campaigns`` (``make chaos`` runs
the full version). Each campaign returns a `campaigns.report.Row` with its
figures and the musts it checked; `campaigns.checker` classifies every message
from the databases and delivered files alone, independently of the code under
test.
"""
