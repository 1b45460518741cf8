"""Progress lines ("[cell 3/12] attack seam lr=1e-3 ... (eta 4m10s)") and the ETA behind them."""
from __future__ import annotations

import sys
from collections import defaultdict
from typing import Optional


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Eta:
    """Remaining time: each pending cell costs the mean duration seen for its stage (this run or recorded
    by a previous one), else the mean for its kind (fit/test), else the mean of all cells; None before any."""

    def __init__(self):
        self.by_stage: dict[str, list[float]] = defaultdict(list)
        self.by_kind: dict[str, list[float]] = defaultdict(list)

    def observe(self, cell, seconds: Optional[float]) -> None:
        if seconds is not None:
            self.by_stage[cell.stage].append(seconds)
            self.by_kind[cell.kind].append(seconds)

    def estimate(self, cell) -> Optional[float]:
        for table, key in ((self.by_stage, cell.stage), (self.by_kind, cell.kind)):
            if table.get(key):
                return sum(table[key]) / len(table[key])
        every = [s for values in self.by_kind.values() for s in values]
        return sum(every) / len(every) if every else None

    def remaining(self, cells) -> Optional[float]:
        estimates = [self.estimate(c) for c in cells]
        return None if any(e is None for e in estimates) else sum(estimates)


class Printer:
    """Bench progress on stderr (stdout stays free for the subprocess passthrough)."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.quiet = total, quiet
        self.width = len(str(total))

    def tag(self, index: int) -> str:
        return f"[cell {index:>{self.width}}/{self.total}]"

    def line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def start(self, index: int, cell, eta: Optional[float]) -> None:
        self.line(f"{self.tag(index)} {cell.label} ... (eta {fmt_duration(eta)})")

    def cached(self, index: int, cell, where: str) -> None:
        self.line(f"{self.tag(index)} {cell.label}: done before, skipped ({where})")

    def finished(self, index: int, cell, seconds: float, summary: str) -> None:
        self.line(f"{self.tag(index)} done in {fmt_duration(seconds)}{': ' + summary if summary else ''}")
