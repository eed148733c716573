"""Progress: k/N with elapsed and ETA; a plain line at most every 30 s off a terminal; log lines above a tqdm bar."""
from __future__ import annotations

import io
import logging
import sys

from pipeline.progress import Progress, format_seconds


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_off_a_terminal_at_most_every_30_s(caplog):
    clock = Clock()
    with caplog.at_level("INFO", logger="ctseg"):
        with Progress(400, "predict", unit="case", terminal=False, clock=clock) as progress:
            for _ in range(400):
                clock.now += 1.0  # one case a second: 400 s in all
                progress.update()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("predict:")]
    assert len(lines) == 400 // 30 + 1  # one every 30 s, plus the final one
    assert lines[0] == "predict: 30/400 cases (8%), 30.0 s elapsed, ETA 6m10s"
    assert lines[-1].startswith("predict: 400/400 cases (100%), 6m40s elapsed") and "ETA" not in lines[-1]
    assert all("\r" not in line for line in lines)


def test_short_runs_off_a_terminal_print_nothing(caplog):
    clock = Clock()
    with caplog.at_level("INFO", logger="ctseg"):
        with Progress(5, "ingest: cases", terminal=False, clock=clock) as progress:
            for _ in range(5):
                clock.now += 2.0
                progress.update()
    assert not [r for r in caplog.records if "ingest: cases" in r.getMessage()]
    assert progress.prefix(3) == "[3/5]"


def test_log_lines_print_above_the_bar_not_into_it(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("ctseg: %(message)s"))
    root.addHandler(handler)
    logger = logging.getLogger("ctseg")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with Progress(10, "train fold 0", unit="step", terminal=True) as progress:
            for step in range(1, 11):
                progress.update()
                if step == 5:
                    logger.info("train fold 0 step 5: validation Dice liver 0.500")
    finally:
        root.removeHandler(handler)
        logger.setLevel(old_level)
    text = stream.getvalue()
    assert "5/10" in text or "10/10" in text
    lines = [line for line in text.split("\n") if "validation Dice" in line]
    assert len(lines) == 1
    assert lines[0].split("\r")[-1] == "ctseg: train fold 0 step 5: validation Dice liver 0.500"
    assert root.handlers.count(handler) == 0  # the redirect put the original handlers back


def test_format_seconds():
    assert format_seconds(7.46) == "7.5 s" and format_seconds(130) == "2m10s" and format_seconds(3900) == "1h05m"
