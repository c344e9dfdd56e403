"""The one progress reporter of the commands."""
from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    """Items done, items/s and ETA: a tqdm bar on a terminal, else one line every ``interval`` s
    (logs, pipes), also when tqdm is not installed. One look for every command."""

    def __init__(self, total: int, enabled: bool, desc: str = "sed-fast eval", interval: float = 30.0,
                 stream=None, unit: str = "image"):
        self.total = total
        self.done = 0
        self.enabled = enabled and total > 0
        self.stream = stream or sys.stderr
        self.interval = interval
        self.desc = desc
        self.unit = unit
        self.start = time.perf_counter()
        self.last = self.start
        self.bar = None
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, count: int) -> None:
        self.done += count
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.perf_counter()
        if now - self.last >= self.interval or self.done == self.total:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: Optional[float] = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = _clock(left) if left == left else "?"
        return (f"{self.desc}: {self.done}/{self.total} {self.unit}s ({100 * self.done / self.total:.1f}%), "
                f"{rate:.2f} {self.unit}s/s, elapsed {_clock(elapsed)}, ETA {eta}")

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


