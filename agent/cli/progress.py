"""Show an install's progress truthfully: its phase, installed bytes of installed bytes, rate and ETA.

The updater reports installed bytes against the manifest's installed total (never a
download's Content-Length, which counts compressed bytes and the bundle's head) and the
phase it is in (``agent.device.updater.PhasedProgress``): "verify", "write", "sync", "done".
On a terminal one bar line is redrawn in place and replaced by a clean summary line at the
end; anywhere else (a pipe, journald) plain lines come at most every ``interval`` seconds
and at each phase change, with no carriage returns. The line formats are pure functions
below, tested with a table (tests/test_progress.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

MIB = 1 << 20
PHASES = {"verify": "checking the signature", "write": "writing the inactive slot, block by block verified",
          "sync": "flushing the slot to disk", "done": "written"}
BAR_WIDTH = 30


@dataclass(frozen=True)
class Snapshot:
    phase: str
    done: int  # installed bytes written so far
    total: int  # installed bytes of the whole bundle
    elapsed: float  # seconds since the write phase began


def fraction(s: Snapshot) -> float:
    if s.total <= 0:
        return 0.0
    return min(1.0, max(0.0, s.done / s.total))


def rate(s: Snapshot) -> float | None:
    """Bytes per second so far; None until there is enough to say (a quarter second)."""
    if s.elapsed < 0.25 or s.done <= 0:
        return None
    return s.done / s.elapsed


def eta(s: Snapshot) -> float | None:
    r = rate(s)
    if r is None or s.phase != "write":
        return None
    return max(0.0, (s.total - s.done) / r)


def clock_text(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}" if whole >= 3600 \
        else f"{whole // 60}:{whole % 60:02d}"


def _rate_eta(s: Snapshot) -> str:
    r, left = rate(s), eta(s)
    parts = [f"{r / MIB:.1f} MiB/s" if r is not None else "-- MiB/s"]
    if s.phase == "write":
        parts.append(f"ETA {clock_text(left)}" if left is not None else "ETA --:--")
    return "  ".join(parts)


def bar_line(s: Snapshot, width: int = BAR_WIDTH) -> str:
    """The terminal line: phase, bar, percent, MiB of MiB, rate, ETA (no line end)."""
    if s.phase == "verify":
        return f"  verify  {PHASES['verify']} ..."
    f = fraction(s)
    fill = int(f * width)
    return (f"  {s.phase:<6}  [{'#' * fill}{'.' * (width - fill)}] {f:6.1%}  "
            f"{s.done / MIB:.1f}/{s.total / MIB:.1f} MiB  {_rate_eta(s)}")


def plain_line(s: Snapshot) -> str:
    """A line for a log (journald, a pipe): one complete sentence, nothing redrawn."""
    if s.phase in ("verify", "sync"):
        return f"install: {s.phase}: {PHASES[s.phase]}"
    return (f"install: {s.phase}: {fraction(s):.0%}, {s.done / MIB:.1f} of {s.total / MIB:.1f} MiB, "
            f"{_rate_eta(s).replace('  ', ', ')}")


def final_line(s: Snapshot) -> str:
    r = s.done / s.elapsed if s.elapsed > 0 else 0.0
    return f"  wrote {s.done / MIB:.1f} MiB in {s.elapsed:.1f} s ({r / MIB:.1f} MiB/s), verified and synced"


class Display:
    """The callable the updater reports to (``PhasedProgress``), writing to ``out``."""

    def __init__(self, out: TextIO, *, tty: bool, interval: float = 5.0, redraw: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out, self.tty, self.interval, self.redraw, self.clock = out, tty, interval, redraw, clock
        self.state = "verify"
        self.done = self.total = 0
        self.started: float | None = None
        self.shown_at: float | None = None
        self.open_line = False  # a bar is drawn and the cursor sits at its end

    def snapshot(self) -> Snapshot:
        now = self.clock()
        return Snapshot(self.state, self.done, self.total, now - self.started if self.started else 0.0)

    def phase(self, name: str) -> None:
        if name == "write" and self.started is None:
            self.started = self.clock()
        self.state = name
        if name == "done":
            self._finish()
        else:
            self._show(force=True)

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self.started is None:
            self.started = self.clock()
        self._show(force=False)

    def close(self) -> None:
        """End an open bar line (an install that failed half-way), so what follows starts clean."""
        if self.open_line:
            self.out.write("\n")
            self.out.flush()
            self.open_line = False

    def _show(self, *, force: bool) -> None:
        now = self.clock()
        wait = self.redraw if self.tty else self.interval
        if not force and self.shown_at is not None and now - self.shown_at < wait:
            return
        self.shown_at = now
        s = self.snapshot()
        if self.tty:
            self.out.write(f"\r\033[K{bar_line(s)}")  # ECMA-48 EL: erase the rest of the old bar
            self.open_line = True
        else:
            self.out.write(plain_line(s) + "\n")
        self.out.flush()

    def _finish(self) -> None:
        s = self.snapshot()
        if self.tty:
            self.out.write(f"\r\033[K{final_line(s)}\n")
            self.open_line = False
        else:
            self.out.write(f"install: done: {final_line(s).strip()}\n")
        self.out.flush()
