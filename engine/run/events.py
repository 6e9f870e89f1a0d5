"""The session's append-only event log, `events.jsonl`.

One JSON object per line; the schema is in docs/EVENTS.md. Writers append and flush a
line per event (cheap enough per training step); readers poll from a byte offset and
ignore a torn last line until its newline arrives. No torch here: the app imports it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

EVENTS_FILE = "events.jsonl"


class EventWriter:
    """Appends events to a session's log. One writer per session (the runner holds the lock)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self._repair_torn_tail()

    def _repair_torn_tail(self) -> None:
        # A killed writer may leave a line without "\n"; start ours on a fresh line so
        # the torn fragment stays one (skipped) line instead of corrupting the next.
        size = self.path.stat().st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    self._f.write("\n")
                    self._f.flush()

    def emit(self, type: str, **fields: Any) -> dict:
        event = {"t": round(time.time(), 3), "type": type, **fields}
        self._f.write(json.dumps(event, default=_jsonable) + "\n")
        self._f.flush()
        return event

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@dataclass
class EventReader:
    """Incremental reader: `poll()` returns the complete events appended since the last call."""

    path: Path
    offset: int = 0
    bad_lines: int = 0
    _pending: bytes = field(default=b"", repr=False)

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        if not chunk:
            return []
        self.offset += len(chunk)
        data = self._pending + chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()  # "" when data ends with a newline, else a torn line
        out = []
        for line in lines:
            event = _parse(line)
            if event is None:
                if line.strip():
                    self.bad_lines += 1
                continue
            out.append(event)
        return out


def _parse(line: bytes) -> dict | None:
    line = line.strip()
    if not line:
        return None
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) and "type" in obj else None


def read_events(path: str | os.PathLike) -> list[dict]:
    """All complete events in a log (a torn last line is ignored)."""
    return EventReader(Path(path)).poll()


def iter_type(events: list[dict], type: str) -> Iterator[dict]:
    return (e for e in events if e.get("type") == type)
