"""A long command's progress on a terminal: how much is done, the rate, the time left.

One line on standard error, rewritten in place, only when standard error is
a terminal: piped or redirected output (a script, a log file, a test) stays
exactly as it was. The line is drawn at the first update, then at most every
`Meter.every` seconds, and once more, whole, when the work ends, so that
even a short run leaves its totals on the screen.

Counts are whatever the work counts (entries, messages, steps); a count in
bytes (``unit="bytes"``) is shown in megabytes. The time left assumes the
rate so far holds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

REDRAW_SECONDS = 0.5
"""Least time between two redraws of the line."""
MEASURABLE_SECONDS = 0.001
"""Below this much time since the start no rate is shown: it would mean nothing."""


def shown(stream: TextIO) -> bool:
    """Whether progress goes to `stream`: only a terminal gets it."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def duration(seconds: float) -> str:
    """`seconds` as ``42 s``, ``3 min 05 s`` or ``2 h 07 min``."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Meter:
    """The progress line of one piece of work; does nothing unless its stream is a terminal."""

    def __init__(
        self,
        what: str,
        total: int | None = None,
        *,
        unit: str = "entries",
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        every: float = REDRAW_SECONDS,
    ) -> None:
        """Count `unit`s of `what` towards `total` (None: unknown), drawn on `stream` (stderr)."""
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = shown(self.stream)
        self.clock, self.every = clock, every
        self.started = clock()
        self.done = 0
        self.note = ""
        self._drawn_at: float | None = None
        self._width = 0

    def update(self, done: int, total: int | None = None, *, note: str = "") -> None:
        """`done` of `total` (or of the total already known) are done; `note` says on what."""
        self.done = done
        if total is not None:
            self.total = total
        if note:
            self.note = note
        if not self.enabled:
            return
        now = self.clock()
        if self._drawn_at is None or now - self._drawn_at >= self.every:
            self._draw(now)

    def advance(self, count: int = 1, *, note: str = "") -> None:
        """`count` more are done."""
        self.update(self.done + count, note=note)

    def echo(self, text: str) -> None:
        """Print `text` as a line of its own on the stream, above the meter if it is drawn."""
        if self.enabled and self._drawn_at is not None:
            self.stream.write(f"\r{text:<{self._width}}\n")
            self._draw(self.clock())
        else:
            self.stream.write(f"{text}\n")
        self.stream.flush()

    def finish(self) -> None:
        """Draw the final line and end it, leaving it on the terminal."""
        if not self.enabled:
            return
        self._draw(self.clock())
        self.stream.write("\n")
        self.stream.flush()
        self.enabled = False

    def __enter__(self) -> Meter:
        """The meter, drawn until the block ends."""
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        """End the line, whether the work finished or failed."""
        self.finish()

    def line(self, now: float) -> str:
        """The progress line at time `now`."""
        elapsed = now - self.started
        parts = [f"{self.what}: {self._amount(self.done)}"]
        if self.total:
            percent = 100 * self.done / self.total
            parts[0] += f" of {self._amount(self.total)} {self._unit()} ({percent:.0f} %)"
        else:
            parts[0] += f" {self._unit()}"
        if elapsed < MEASURABLE_SECONDS:
            return parts[0]
        rate = self.done / elapsed
        parts.append(f"{self._amount(rate)} {self._unit()}/s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"{duration((self.total - self.done) / rate)} left")
        else:
            parts.append(f"{duration(elapsed)} taken")
        text = ", ".join(parts)
        return f"{text} [{self.note}]" if self.note else text

    def _draw(self, now: float) -> None:
        text = self.line(now)
        pad = max(0, self._width - len(text))
        self.stream.write(f"\r{text}{' ' * pad}")
        self.stream.flush()
        self._width = len(text)
        self._drawn_at = now

    def _unit(self) -> str:
        return "MB" if self.unit == "bytes" else self.unit

    def _amount(self, value: float) -> str:
        if self.unit == "bytes":
            return f"{value / 1e6:,.1f}"
        return f"{value:,.0f}"
