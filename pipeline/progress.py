"""Progress of long loops, the same in every stage: ``k/N`` with elapsed time and ETA.

On a terminal (stderr is a TTY) a tqdm bar is drawn, and while it is open ctseg's log lines are
printed above it (through ``tqdm.write``), never into its middle. When stderr is not a terminal (a
batch log, ``nohup``, CI) no carriage returns are written: a plain line such as
``ingest: assembling 120/400 (30%), 2m10s elapsed, ETA 5m03s`` is logged at most every
``interval_s`` seconds (30 s by default), and once at the end when any was logged.

    with Progress(len(cases), "predict", unit="case") as progress:
        for case in cases:
            ...
            progress.update()
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time

log = logging.getLogger("ctseg")

INTERVAL_S = 30.0


def format_seconds(seconds: float) -> str:
    """``7.5 s``, ``2m10s`` or ``1h05m``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """A k/N progress display: a tqdm bar on a terminal, else a plain log line at most every ``interval_s``."""

    def __init__(self, total: int, description: str, unit: str = "case", initial: int = 0, enabled: bool = True,
                 interval_s: float = INTERVAL_S, terminal: bool | None = None, clock=time.monotonic):
        self.total = int(total)
        self.description = description
        self.unit = unit
        self.count = int(initial)
        self.initial = int(initial)
        self.interval_s = float(interval_s)
        self.clock = clock
        self.started = clock()
        self.last_line = self.started
        self.lines = 0
        self.bar = None
        self._redirect = None
        if not enabled or self.total <= 0:
            self.enabled = False
            return
        self.enabled = True
        terminal = _stderr_is_terminal() if terminal is None else terminal
        if terminal:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, desc=description, unit=unit, dynamic_ncols=True,
                            mininterval=1.0, file=sys.stderr)
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
            self._redirect.__enter__()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def prefix(self, position: int | None = None) -> str:
        """``[k/N]`` for per-item log lines (``position`` counts from 1; default the next item)."""
        position = self.count + 1 if position is None else position
        return f"[{position}/{self.total}]"

    def set_postfix(self, **values) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last_line >= self.interval_s and self.count < self.total:
            self.last_line = now
            self.lines += 1
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = now - self.started
        done = self.count - self.initial
        text = (f"{self.description}: {self.count}/{self.total} {self.unit}s "
                f"({100.0 * self.count / max(self.total, 1):.0f}%), {format_seconds(elapsed)} elapsed")
        if 0 < done and self.count < self.total:
            text += f", ETA {format_seconds(elapsed / done * (self.total - self.count))}"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            with contextlib.suppress(Exception):
                self._redirect.__exit__(None, None, None)
            self._redirect = None
        elif self.enabled and self.lines:
            log.info("%s", self.line())
        self.enabled = False


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
