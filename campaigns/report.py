"""One result row per campaign run, and the summary table printed from the rows."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Row:
    """What one campaign tried, what happened, and which musts held."""

    campaign: str
    database: str = "-"
    messages: int = 0
    faults: int = 0
    ok: int = 0
    lost: int = 0
    duplicated: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    musts: dict[str, bool] = field(default_factory=dict)
    """Each must, stated as a sentence, and whether it held."""
    figures: dict[str, Any] = field(default_factory=dict)
    """Further measured figures: redeliveries absorbed, resends, executions, seconds."""

    def must(self, statement: str, held: bool) -> None:
        """Record whether `statement` held; a must recorded twice holds only if both held."""
        self.musts[statement] = self.musts.get(statement, True) and bool(held)

    def add_reasons(self, reasons: Iterable[str] | Mapping[str, int]) -> None:
        """Count reasons (an iterable of reasons or a mapping of reason to count)."""
        counts = Counter(self.reasons)
        counts.update(reasons)
        self.reasons = dict(sorted(counts.items()))

    @property
    def passed(self) -> bool:
        """True when every must held and at least one must was checked."""
        return bool(self.musts) and all(self.musts.values())

    def failed_musts(self) -> list[str]:
        """The statements that did not hold."""
        return [statement for statement, held in self.musts.items() if not held]


_COLUMNS = (
    ("campaign", "campaign"),
    ("database", "database"),
    ("messages", "messages"),
    ("faults", "faults"),
    ("ok", "ok"),
    ("lost", "lost"),
    ("duplicated", "dup"),
    ("quarantined", "quarantined"),
)


def _reasons(row: Row) -> str:
    return " ".join(f"{reason}={count}" for reason, count in row.reasons.items()) or "-"


def render_table(rows: Sequence[Row]) -> str:
    """The summary table: one line per row, then each row's figures and failed musts."""
    header = [title for _, title in _COLUMNS] + ["result", "reasons"]
    lines = [
        [str(getattr(row, name)) for name, _ in _COLUMNS]
        + ["PASS" if row.passed else "FAIL", _reasons(row)]
        for row in rows
    ]
    widths = [max([len(header[i]), *(len(line[i]) for line in lines)]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(cells)).rstrip()

    out = [fmt(header), fmt(["-" * w for w in widths])]
    out += [fmt(line) for line in lines]
    details = []
    for row in rows:
        label = f"{row.campaign} [{row.database}]"
        if row.figures:
            figures = ", ".join(f"{k}={v}" for k, v in row.figures.items())
            details.append(f"{label}: {figures}")
        details += [f"{label}: MUST FAILED: {statement}" for statement in row.failed_musts()]
    if details:
        out += ["", *details]
    return "\n".join(out)


def to_json(rows: Sequence[Row]) -> str:
    """The rows as a JSON array, each with its `passed` flag."""
    return json.dumps([{**asdict(row), "passed": row.passed} for row in rows], indent=2)
