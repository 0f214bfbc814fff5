"""How every trm process logs: structlog, JSON lines for services, readable in a terminal.

Lines carry the envelope id, case reference and participant where the caller
binds them; payload contents are never logged (the code never passes them).
Logs go to standard error or a file, so that standard output carries only a
command's answer (and `--json` output stays parseable).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Protocol, TextIO

import structlog

from broker.errors import ConfigError

FORMAT_ENV = "TRM_LOG_FORMAT"
"""``json`` or ``console``; unset means JSON unless writing to a terminal."""


class Sink(Protocol):
    """Where log lines are written."""

    def write(self, text: str, /) -> object: ...

    def flush(self) -> object: ...


def configure(out: Sink | None = None, *, level: int = logging.INFO) -> None:
    """Send this process's structlog lines to `out` (default standard error)."""
    sink = out if out is not None else sys.stderr
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            _renderer(sink),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(sink),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def open_log_file(path: Path | None) -> TextIO | None:
    """`path` opened for appending (None for standard error); a clear error if it cannot be."""
    if path is None:
        return None
    try:
        return path.open("a", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot open --log-file {path}: {e.strerror}") from e


def _renderer(sink: Sink) -> structlog.types.Processor:
    chosen = os.environ.get(FORMAT_ENV, "").strip().lower()
    if chosen not in ("", "json", "console"):
        raise ConfigError(f"{FORMAT_ENV} must be json or console, not {chosen!r}")
    is_terminal = bool(getattr(sink, "isatty", lambda: False)())
    if chosen == "console" or (chosen == "" and is_terminal):
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer(sort_keys=True)
