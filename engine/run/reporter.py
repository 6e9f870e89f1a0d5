"""The pipeline's voice: events to `events.jsonl`, optionally mirrored to a live display.

Progress is coalesced (at most `max_rate` events per second per stage, plus the last
one), so per-batch callbacks stay cheap and readers never drown.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from engine.run.events import EventWriter

STOP_FILE = "stop.request"


class StopRequested(Exception):
    """Raised at a safe point after `minigpt stop` (or SIGTERM): checkpoint, then exit."""


class Reporter:
    def __init__(self, writer: EventWriter | None, display=None, stop_dir: Path | None = None,
                 max_rate: float = 4.0):
        self.writer = writer
        self.display = display
        self.stop_dir = stop_dir
        self.min_interval = 1.0 / max_rate
        self._last: dict[str, float] = {}
        self._signalled = False
        self.stage = None

    def emit(self, type: str, **fields) -> dict:
        event = self.writer.emit(type, **fields) if self.writer else {"t": time.time(), "type": type, **fields}
        if self.display:
            self.display(event)
        return event

    def progress(self, stage: str, done: float, total: float, unit: str, rate: float = 0.0, **extra) -> None:
        now = time.monotonic()
        if done < total and now - self._last.get(stage, 0.0) < self.min_interval:
            return
        self._last[stage] = now
        eta = (total - done) / rate if rate > 0 else None
        self.emit("progress", stage=stage, done=done, total=total, unit=unit, rate=round(rate, 2),
                  eta_s=None if eta is None else round(eta, 1), **extra)

    def progress_fn(self, stage: str, unit: str):
        return lambda done, total, rate=0.0: self.progress(stage, done, total, unit, rate)

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)

    def metric(self, stage: str, model: str, name: str, value, **extra) -> None:
        self.emit("metric", stage=stage, model=model, name=name, value=value, **extra)

    # ---- graceful stop -------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def on_term(signum, frame):
            self._signalled = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def stop_requested(self) -> bool:
        return self._signalled or bool(self.stop_dir and (self.stop_dir / STOP_FILE).exists())

    def check_stop(self) -> None:
        if self.stop_requested():
            raise StopRequested()


def clear_stop(folder: Path) -> None:
    try:
        os.unlink(folder / STOP_FILE)
    except FileNotFoundError:
        pass
