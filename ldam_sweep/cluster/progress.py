"""Sweep progress: a live bar on a terminal, periodic log lines elsewhere (ray job logs, CI)."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def eta_text(left: int, rate: float) -> str:
    """Time left at ``rate`` units/s as '95s', or 'unknown' before the first unit is done."""
    if left <= 0:
        return "0s"
    if not rate > 0 or not math.isfinite(left / rate):
        return "unknown"
    return f"{left / rate:.0f}s"


class SweepProgress:
    def __init__(self, total_units: int, console: Console, every_s: float = 10.0) -> None:
        self.total, self.done, self.failed = total_units, 0, 0
        self.console, self.every_s = console, every_s
        self.t0 = self.last = time.perf_counter()
        self.live = console.is_terminal
        self.bar: Progress | None = None
        if self.live:
            self.bar = Progress(
                TextColumn("[bold]units"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.2f} units/s"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), TextColumn("[red]{task.fields[failed]} failed"), console=console,
            )
            self.task = self.bar.add_task("sweep", total=total_units, rate=0.0, failed=0)
            self.bar.start()

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.done / dt if dt > 0 else 0.0

    def update(self, done: int = 0, failed: int = 0) -> None:
        self.done += done
        self.failed += failed
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done + self.failed, rate=self.rate, failed=self.failed)
        elif time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            self.log_line()

    def log_line(self) -> None:
        left = self.total - self.done - self.failed
        self.console.print(f"progress: {self.done + self.failed}/{self.total} units, {self.rate:.2f} units/s, "
                           f"ETA {eta_text(left, self.rate)}, {self.failed} failed", highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        else:
            self.log_line()
