"""Live progress of one pass at a time (a training epoch, an evaluation, a list of files).

On a terminal it is a rich bar (step / total, clips/s, running loss, LR, data-wait share,
ETA) that disappears when the pass ends; anywhere else (logs, CI: `console.is_terminal` is
False) it is one plain line every `every` steps and one at the last step, so logs stay
readable. The figures are computed here, the same for both forms (`figures_text`).
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn


def fmt_duration(seconds: float) -> str:
    """12:34, or 1:02:03 from an hour on (rich's style); '-:--' when unknown."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "-:--"
    s = int(round(seconds))
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def figures_text(done: int, total: int, elapsed: float, steps: int, items: int,
                 unit: str = "clips", loss: float | None = None, lr: float | None = None,
                 wait: float | None = None) -> str:
    """The figures of a pass: rate, running loss, LR, data-wait share, ETA.

    `steps` and `items` are what this pass has done since it (re)started, over `elapsed`
    seconds (a resumed epoch starts at `done` > 0 and its rate counts only what it ran)."""
    rate = items / elapsed if elapsed > 0 else 0.0
    parts = [f"{rate:.1f} {unit}/s"]
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    if wait is not None:
        parts.append(f"wait {wait:.0%}")
    eta = (total - done) * elapsed / steps if steps > 0 else float("nan")
    parts.append(f"eta {fmt_duration(eta)}")
    return "  ".join(parts)


class PassProgress:
    """One pass at a time: `start(label, total)`, `update(done, items, ...)` per step,
    `stop()`. Starting a pass ends the one before. Disabled (no console, or not the main
    rank): every call does nothing."""

    LIVE_REFRESH_S = 1.0  # a live bar reads the (device-side) loss at most this often

    def __init__(self, console: Console | None, every: int = 50, enabled: bool = True):
        self.console, self.every = console, max(int(every), 1)
        self.enabled = enabled and console is not None
        self.bar: Progress | None = None
        self.task = None
        self.label, self.total, self.unit = "", 0, "clips"
        self.t0, self.done0, self.items0 = 0.0, 0, None
        self.last = ""  # the latest figures (tests, and the plain form)
        self._read_t = -float("inf")  # when due() last asked for fresh figures

    @property
    def live(self) -> bool:
        return self.bar is not None

    def start(self, label: str, total: int, done: int = 0, items: int | None = None,
              unit: str = "clips") -> None:
        self.stop()
        if not self.enabled:
            return
        self.label, self.total, self.unit = label, max(int(total), 0), unit
        self.t0, self.done0, self.items0 = time.perf_counter(), done, items
        self._read_t = -float("inf")
        if self.console.is_terminal:
            width = max(3, min(20, self.console.width - 77))  # the figures fit 80 columns
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=width),
                                MofNCompleteColumn(), TextColumn("{task.fields[figures]}"),
                                console=self.console, transient=True,
                                redirect_stdout=False)  # stdout may carry results (JSON)
            self.task = self.bar.add_task(label, total=self.total or None, completed=done,
                                          figures="")
            self.bar.start()

    def due(self, done: int) -> bool:
        """Whether the figures shown after step `done` need fresh values (a live bar: at
        most every `LIVE_REFRESH_S`; plain lines: every `every` steps and the last)."""
        if not self.enabled:
            return False
        if self.bar is not None:
            now = time.perf_counter()
            if now - self._read_t >= self.LIVE_REFRESH_S or done == self.total:
                self._read_t = now
                return True
            return False
        return done % self.every == 0 or done == self.total

    def update(self, done: int, items: int, loss: float | None = None,
               lr: float | None = None, wait: float | None = None) -> None:
        """`done` steps of `total`, `items` (clips, files) so far in this pass."""
        if not self.enabled:
            return
        if self.items0 is None:  # the first step's items are counted in the rate
            self.items0 = 0
        elapsed = time.perf_counter() - self.t0
        self.last = figures_text(done, self.total, elapsed, done - self.done0,
                                 items - self.items0, self.unit, loss, lr, wait)
        if self.bar is not None:
            self.bar.update(self.task, completed=done, figures=self.last)
        elif done % self.every == 0 or done == self.total:
            pct = f" {done / self.total:4.0%}" if self.total else ""
            self.console.print(f"{self.label} {done}/{self.total}{pct}  {self.last}",
                               highlight=False, soft_wrap=True, markup=False)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        self.bar = self.task = None


def iterate(items, progress: PassProgress | None, label: str, unit: str = "files"):
    """Yield from `items` (a sized sequence) with one progress step per item."""
    items = list(items)
    if progress is None:
        yield from items
        return
    progress.start(label, len(items), items=0, unit=unit)
    try:
        for i, item in enumerate(items, 1):
            yield item
            progress.update(i, i)
    finally:
        progress.stop()
