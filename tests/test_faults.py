"""Fault points read from TRM_FAULTS: which are armed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker import faults


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    faults.reset()
    yield monkeypatch
    monkeypatch.undo()
    faults.reset()


def test_a_point_is_armed_only_when_trm_faults_names_it(environment: pytest.MonkeyPatch) -> None:
    """`armed` is true for a point TRM_FAULTS names (even at probability 0), false otherwise
    and when TRM_FAULTS is unset."""
    environment.setenv(faults.ENV_FAULTS, "relay.after_publish:0")
    assert faults.armed("relay.after_publish")
    assert not faults.armed("inbox.after_commit")
    faults.reset()
    environment.delenv(faults.ENV_FAULTS)
    assert not faults.armed("relay.after_publish")
