"""Messages that workers post to the UI. Workers only read files and post these; the
handlers on screens are the only code that changes widgets (harlequin's rule)."""

from __future__ import annotations

from dataclasses import dataclass, field

from textual.message import Message


@dataclass
class SessionsLoaded(Message):
    """A fresh listing of the session root (rows from `data.session_rows`)."""

    rows: list[dict]
    error: str | None = None
    generation: int = 0  # the order the listings were asked for (worker threads may finish out of order)

    def can_replace(self, message: Message) -> bool:
        # Textual asks the queued-earlier message whether the one behind it may supersede it:
        # only a listing asked for no earlier may (one asked earlier is stale, and dropped on arrival).
        return isinstance(message, SessionsLoaded) and message.generation >= self.generation


@dataclass
class SessionDeleted(Message):
    session_id: str
    error: str | None = None


@dataclass
class RunEvents(Message):
    """New complete events read from a session's events.jsonl (never coalesced: each batch is new)."""

    events: list[dict]


@dataclass
class RunStatus(Message):
    """The session's liveness (`Session.status()`) and state.json, when it changed."""

    status: str
    state: dict
    error: str | None = None

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, RunStatus)


@dataclass
class CompareLoaded(Message):
    rows: list[dict]
    errors: list[str]
    curves: dict = field(default_factory=dict)  # session id -> data.session_curves(...)


@dataclass
class RunEnded(Message):
    """The app's watcher saw a session leave the live states (starting/running): done, failed,
    stopped, or disconnected (its runner died; `message` is then the death record's)."""

    session_id: str
    status: str
    message: str


@dataclass
class Alert(Message):
    """Something the user should hear about while looking elsewhere: NaN loss, a held-out
    perplexity rising N evaluations in a row, low disk."""

    title: str
    message: str
    severity: str = "warning"


@dataclass
class SystemSample(Message):
    """The machine as the monitor's worker saw it: CPU % (all cores), the runner's CPU % and RSS
    (None when no runner lives), the session folder's size and the free disk under it."""

    cpu_pct: float
    cpus: int
    runner_rss: int | None
    runner_cpu_pct: float
    session_bytes: int
    disk_free: int | None

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SystemSample)


@dataclass
class CheckpointsDropped(Message):
    session_id: str
    freed: int
    error: str | None = None


@dataclass
class ExportProgress(Message):
    """The export worker's progress: `done` of `total` blocks written, or a log line."""

    done: int = 0
    total: int = 0
    line: str = ""


@dataclass
class ExportFinished(Message):
    """The export ended: the file and its size, or the one-line engine error."""

    path: str | None
    bytes: int = 0
    summary: str = ""
    error: str | None = None
