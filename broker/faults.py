"""Fault injection for reliability campaigns: kill the own process at named points.

Disabled unless ``TRM_FAULTS`` is set, e.g.
``TRM_FAULTS=inbox.after_commit:0.05,relay.after_publish:0.3``: at each
`fault_point` whose name is listed, the process sends itself SIGKILL with that
probability, as a crash, power cut or OOM kill would end it. No cleanup runs:
that is the point. ``TRM_FAULT_SEED`` seeds the random choices, so a campaign
can be replayed; give each restart its own seed, or a process that dies at its
first point dies there every time.

The points placed in the code:

- ``inbox.before_commit``: the envelope is applied but its transaction is not
  committed (the redelivery applies it).
- ``inbox.after_commit``: committed, not yet acked (the redelivery is a duplicate).
- ``relay.after_publish``: the batch was handed to RabbitMQ, its confirms not
  yet awaited (the next relay sends the same envelopes again).
- ``relay.after_confirm``: confirmed by RabbitMQ, not yet marked sent (likewise).

The environment is read once, at the first call; with ``TRM_FAULTS`` unset a
fault point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import random
import signal
import threading

from broker.errors import ConfigError

ENV_FAULTS = "TRM_FAULTS"
ENV_SEED = "TRM_FAULT_SEED"
POINTS = frozenset(
    {"inbox.before_commit", "inbox.after_commit", "relay.after_publish", "relay.after_confirm"}
)

_lock = threading.Lock()
_probabilities: dict[str, float] | None = None
_rng = random.Random()  # noqa: S311 - picks crash moments, not secrets


def parse_faults(spec: str) -> dict[str, float]:
    """``name:probability,...`` as a mapping; ConfigError naming the bad entry."""
    found: dict[str, float] = {}
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, value = entry.rpartition(":")
        if not sep or name not in POINTS:
            raise ConfigError(
                f"{ENV_FAULTS} entry {entry!r} is not point:probability with a point among "
                f"{', '.join(sorted(POINTS))}"
            )
        try:
            probability = float(value)
        except ValueError as e:
            raise ConfigError(f"{ENV_FAULTS} entry {entry!r}: {value!r} is not a number") from e
        if not 0.0 <= probability <= 1.0:
            raise ConfigError(f"{ENV_FAULTS} entry {entry!r}: probability must be in [0, 1]")
        found[name] = probability
    return found


def _load() -> dict[str, float]:
    global _probabilities
    with _lock:
        if _probabilities is None:
            spec = os.environ.get(ENV_FAULTS, "")
            _probabilities = parse_faults(spec) if spec else {}
            seed = os.environ.get(ENV_SEED)
            if seed is not None:
                _rng.seed(seed)
        return _probabilities


def _configured() -> dict[str, float]:
    # Read without the lock once parsed: every fault point on a hot path asks.
    return _probabilities if _probabilities is not None else _load()


def armed(name: str) -> bool:
    """Whether ``TRM_FAULTS`` names fault point `name`: for work only a kill there needs."""
    return name in _configured()


def fault_point(name: str) -> None:
    """Maybe SIGKILL this process here, as configured by ``TRM_FAULTS``; else nothing."""
    probability = _configured().get(name)
    if probability is None:
        return
    with _lock:
        draw = _rng.random()
    if draw < probability:
        os.kill(os.getpid(), signal.SIGKILL)


def reset() -> None:
    """Forget the parsed environment, so the next fault point reads it again (for tests)."""
    global _probabilities
    with _lock:
        _probabilities = None
