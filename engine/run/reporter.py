"""The stage layer's voice: events to `events.jsonl` (checked against `engine.run.record`),
mirrored to a live display, and the run's results.

Each measured number is written once, through `metric()`: the event and the matching
entry in results.json (`models[model][name]`) come from that one call. Progress is
coalesced (at most `max_rate` events per second per stage, plus the last), so per-batch
callbacks stay cheap and readers never drown; on CUDA each emitted progress also samples
GPU memory (a `gpu` event at most every `gpu_every` seconds).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from engine.run import record
from engine.run.events import EventWriter
from engine.run.session import STOP_FILE


class StopRequested(Exception):
    """Raised at a safe point after `minigpt stop` (or SIGTERM): checkpoint, then exit."""


class Reporter:
    def __init__(self, writer: EventWriter | None, display=None, stop_dir: Path | None = None,
                 max_rate: float = 4.0, results: dict | None = None, gpu_every: float = 5.0, dist=None):
        """`dist` (an `engine.distributed.Dist`, under torchrun): stop requests are agreed by
        every rank (`stop_requested` is then a collective); a rank > 0 passes no writer."""
        self.writer = writer
        self.dist = dist
        self.display = display
        self.stop_dir = stop_dir
        self.min_interval = 1.0 / max_rate
        self.results = results if results is not None else {}
        self.gpu_every = gpu_every
        self._last: dict[str, float] = {}
        self._last_gpu = 0.0
        self._signalled = False

    def emit(self, type: str, **fields) -> dict:
        record.event(type, fields)
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
        if now - self._last_gpu >= self.gpu_every:
            self._last_gpu = now
            self.gpu()

    def progress_fn(self, stage: str, unit: str):
        return lambda done, total, rate=0.0: self.progress(stage, done, total, unit, rate)

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)

    def metric(self, stage: str, model: str, name: str, value, protocol: dict | None = None, **extra) -> None:
        """One measured number: the `metric` event and results.json's models[model][name]."""
        if protocol is not None:
            extra["protocol"] = protocol
        self.emit("metric", stage=stage, model=model, name=name, value=value, **extra)
        entry = self.results.setdefault("models", {}).setdefault(model, {})
        entry[name] = value
        if protocol is not None:
            entry[f"{name}_protocol"] = protocol

    def section(self, name: str, values: dict) -> dict:
        """A results.json section of a stage (record.RESULTS), replaced whole."""
        if name not in record.RESULTS or name == "models":
            raise ValueError(f"unknown results section {name!r} (engine/run/record.py RESULTS)")
        self.results[name] = values
        return values

    def model_entry(self, model: str) -> dict:
        """results.json's models[model], for what is not a metric (per-set MCQ tables, nonzero counts)."""
        if model not in record.MODELS:
            raise ValueError(f"unknown model label {model!r}")
        return self.results.setdefault("models", {}).setdefault(model, {})

    def gpu(self) -> None:
        """A `gpu` event when this process uses CUDA (memory from torch; utilisation via nvidia-ml-py)."""
        from engine.run import gpu

        sample = gpu.sample()
        if sample is not None:
            self.emit("gpu", **sample)

    def gpu_all(self) -> None:
        """Every rank's GPU sample as one `gpu` event each (written by rank 0; the monitor shows
        them per rank). Under torchrun a collective: call it where every rank does."""
        from engine.run import gpu

        mine = gpu.sample()
        for sample in (self.dist.gather(mine) if self.dist is not None and self.dist.on else [mine]):
            if sample is not None:
                self.emit("gpu", **sample)

    # ---- graceful stop -------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def on_term(signum, frame):
            self._signalled = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _local_stop(self) -> bool:
        return self._signalled or bool(self.stop_dir and (self.stop_dir / STOP_FILE).exists())

    def stop_requested(self) -> bool:
        """A stop was requested (SIGTERM, `stop.request`). Under torchrun a collective: true on
        every rank when any rank saw it, so all stop at the same safe point; call it only where
        every rank does, the same number of times (stage ends, training steps, calibration rounds)."""
        local = self._local_stop()
        return self.dist.all_max(local) if self.dist is not None and self.dist.on else local

    def check_stop(self) -> None:
        if self.stop_requested():
            raise StopRequested()

    def poll_stop(self) -> None:
        """`check_stop` at a point the ranks may reach unevenly (a batch of this rank's share of
        an evaluation): alone, the same; under torchrun nothing, and the stage's end stops."""
        if self.dist is None or not self.dist.on:
            self.check_stop()


def clear_stop(folder: Path) -> None:
    try:
        os.unlink(folder / STOP_FILE)
    except FileNotFoundError:
        pass
