"""A dependency-free progress line with rate and ETA for the command-line tools."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    """`Progress(total, "ingest")`; call `advance(n, note)` as work completes and `close()` at the end.

    On a terminal the line is redrawn in place; in a log file (CI, nohup) one line per update is written, at
    most every `min_interval` seconds, so logs stay short.
    """

    def __init__(self, total: int, label: str, stream: TextIO | None = None, min_interval: float = 2.0):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self._last_print = -float("inf")
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_interval = 0.1 if self._tty else min_interval

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last_print >= self.min_interval or self.done >= self.total:
            self._last_print = now
            self._draw(note)

    def line(self, note: str = "") -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_s = format_duration(eta) if eta == eta else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = (f"{self.label}: {self.done}/{self.total} ({pct:5.1f}%) "
                f"elapsed {format_duration(elapsed)} ETA {eta_s}")
        return f"{text} {note}".rstrip()

    def _draw(self, note: str) -> None:
        if self._tty:
            self.stream.write("\r\033[K" + self.line(note))
        else:
            self.stream.write(self.line(note) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
