"""Session store: one folder per run, holding config, events, state and artefacts.

Torch-free: the app lists and watches sessions without loading any ML library. The
runner holds an exclusive flock on `runner.lock` for as long as it runs; a session whose
state says "running" while nobody holds the lock is reported as "disconnected".
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import atomic
from engine import config as config_mod
from engine.errors import MinigptError
from engine.run import record
from engine.run.events import EVENTS_FILE, EventWriter, read_events

STAGES = record.STAGES
STATE_FILE = "state.json"
CONFIG_FILE = "config.toml"
LOCK_FILE = "runner.lock"
STOP_FILE = "stop.request"  # `minigpt stop` leaves it; the runner polls it at safe points
RESULTS_FILE = "results.json"


def default_root() -> Path:
    return Path(os.environ.get("MINIGPT_SESSIONS", "sessions"))


NAME_MAX = 24  # a session folder's name: derived parts are cut to this, a user's name must fit


def slug(text: str, limit: int | None = NAME_MAX) -> str:
    """A folder name from a name, model or corpus source: lower-case, dashes, at most `limit`."""
    text = text.rsplit("/", 1)[-1].replace("embedded:", "").replace("builtin:", "")
    text = re.sub(r"\.gguf$", "", text)
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:limit] or "run"


def user_name(name: str) -> str:
    """The folder name for a name the user gave (`--name`, the config's `name`, the form): its
    slug, never cut. One longer than NAME_MAX is an error, not a silent cut: two names that
    differ only after the cut would land in `<name>` and `<name>-2`, and a re-run asking for the
    name given would not find either."""
    folder = slug(name, limit=None)
    if len(folder) > NAME_MAX:
        raise MinigptError(f"session name {name!r} is {len(folder)} characters as a folder name ({folder}); "
                           f"the most is {NAME_MAX}",
                           f"pass --name with at most {NAME_MAX} letters, digits and dashes, or shorten `name` in the config")
    return folder


@dataclass
class Session:
    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    # ---- files ---------------------------------------------------------------
    @property
    def events_path(self) -> Path:
        return self.path / EVENTS_FILE

    @property
    def stats_dir(self) -> Path:
        return self.path / "stats"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    def export_path(self, quant: str, pad_uniform: bool = False, imatrix_tokens: int = 0) -> Path:
        """export/ID-QUANT[-uniform][-imN].gguf, the default of `minigpt export` and the workbench's
        export dialog alike: each choice its own file, none overwritten."""
        tag = ("-uniform" if pad_uniform else "") + (f"-im{imatrix_tokens}" if imatrix_tokens else "")
        return self.path / "export" / f"{self.id}-{quant}{tag}.gguf"

    def config(self) -> config_mod.RunConfig:
        try:
            return config_mod.load(self.path / CONFIG_FILE)
        except MinigptError as e:
            raise MinigptError(f"session {self.id} is corrupt: {e.problem}",
                               f"repair or delete {self.path / CONFIG_FILE}") from None

    def state(self) -> dict:
        path = self.path / STATE_FILE
        try:
            state = json.loads(path.read_text())
            if not isinstance(state, dict):
                raise ValueError
        except FileNotFoundError:
            return {"status": "new", "stage": None, "completed_stages": []}
        except (ValueError, UnicodeDecodeError):
            raise MinigptError(f"session {self.id} is corrupt: {STATE_FILE} is not valid JSON",
                               f"delete {path} to reset its state (stages will be redone)") from None
        state.setdefault("completed_stages", [])
        return state

    def update_state(self, **changes: Any) -> dict:
        state = self.state()
        state.update(changes, updated=time.time())
        atomic.write_json(self.path / STATE_FILE, state)
        return state

    def results(self) -> dict:
        try:
            return json.loads((self.path / RESULTS_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def write_results(self, results: dict) -> None:
        atomic.write_json(self.path / RESULTS_FILE, results)

    def events(self) -> list[dict]:
        return read_events(self.events_path)

    def writer(self) -> EventWriter:
        return EventWriter(self.events_path)

    # ---- liveness ------------------------------------------------------------
    def runner_alive(self) -> bool:
        """True while some process holds the runner lock.

        The probe opens the lock read-only and takes a shared lock: it needs no write access
        (a read-only copy of a session can be inspected) and two probes never block each other."""
        return lock_held(self.path / LOCK_FILE)

    def check_writable(self) -> None:
        """A one-line error when the session folder cannot be written (read-only file system,
        permissions): what resume, the stage commands and stop need."""
        problem = unwritable(self.path)
        if problem:
            raise MinigptError(f"session folder {self.path} is not writable ({problem})",
                               f"make it writable, or copy it (cp -a {self.path} DIR) and use --root on the copy's folder")

    def remove_orphans(self) -> list[Path]:
        """Remove the temporary files and folders (`.<name>.tmp<pid>…`) that dead writers left in
        the session, and put back a folder a kill left only as `.<name>.old` (the swap of
        `atomic.replace_dir` was cut between its two renames). Never while a runner holds the
        lock, never a live process's temp; a read-only session is left as it is."""
        if not self.path.is_dir() or self.runner_alive():
            return []
        gone: list[Path] = []
        for folder in (self.path, self.stats_dir, self.model_dir, self.checkpoints_dir,
                       *sorted(p for p in self.checkpoints_dir.glob("step-*") if p.is_dir())):
            try:
                gone += atomic.remove_orphans(folder)
            except OSError:  # read-only or vanished: nothing to clean here
                continue
        return gone

    def status(self) -> str:
        """new | running | stopped | failed | done | disconnected."""
        state = self.state()
        status = state.get("status", "new")
        if status in ("running", "stopping") and not self.runner_alive():
            return "disconnected"
        return status

    def acquire(self) -> "RunnerLock":
        return RunnerLock(self.path / LOCK_FILE, f"session {self.id} is already being run by another process",
                          f"wait for it, or stop it with: minigpt stop {self.id}")


class RunnerLock:
    """Exclusive, process-lifetime lock holding the runner's pid: the kernel drops it when
    the runner dies. `busy` is the (problem, fix) error raised when another process holds it."""

    def __init__(self, path: Path, *busy: str):
        self.path = path
        self.busy = busy
        self._f = None

    def __enter__(self) -> "RunnerLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a+")
        # a liveness probe holds a shared lock for microseconds: retry briefly before refusing
        deadline = time.monotonic() + 1.0
        while True:
            try:
                fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline or lock_held(self.path):  # a runner, not a probe
                    self._f.close()
                    raise MinigptError(*self.busy) from None
                time.sleep(0.02)
        self._f.seek(0)
        self._f.truncate()
        self._f.write(str(os.getpid()))
        self._f.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._f:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()


def create(cfg: config_mod.RunConfig, root: Path | None = None, name: str | None = None) -> Session:
    root = Path(root or default_root())
    check_root_writable(root)
    if name or cfg.name:
        base = user_name(name or cfg.name)
    else:
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug(cfg.model.source)}-{slug(cfg.data.source)}"
    path = root / base
    n = 1
    while path.exists():
        n += 1
        path = root / f"{base}-{n}"
    path.mkdir()
    atomic.write_text(path / CONFIG_FILE, cfg.to_toml())
    s = Session(path)
    s.update_state(status="new", stage=None, completed_stages=[], created=time.time())
    return s


def open_session(ref: str | Path, root: Path | None = None) -> Session:
    """Open by path or by id under the root."""
    p = Path(ref)
    if not (p / CONFIG_FILE).exists():
        p = Path(root or default_root()) / str(ref)
    if not p.is_dir():
        raise MinigptError(f"no session {ref!s}", "list them with: minigpt sessions")
    if not (p / CONFIG_FILE).exists():
        if not any((p / f).exists() for f in (STATE_FILE, EVENTS_FILE, LOCK_FILE)):
            # not a session at all (e.g. `minigpt resume /etc`): never suggest deleting it
            raise MinigptError(f"{ref!s} is not a minigpt session (no {CONFIG_FILE}, {STATE_FILE} or {EVENTS_FILE})",
                               "pass a session id or folder listed by: minigpt sessions")
        raise MinigptError(f"session {p.name} is corrupt: {CONFIG_FILE} is missing",
                           f"restore {p / CONFIG_FILE} from a copy, or delete the session folder {p}")
    s = Session(p)
    s.remove_orphans()
    return s


def lock_held(path: Path) -> bool:
    """Someone holds an exclusive lock on `path` (read-only probe; False if it does not exist)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return False
    except PermissionError:  # unreadable lock: assume its owner is alive rather than break in
        return True
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def unwritable(folder: Path) -> str:
    """Why `folder` (or, if missing, its nearest existing parent) cannot be written; "" if it can."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return "permission denied" if os.statvfs(probe).f_flag & os.ST_RDONLY == 0 else "read-only file system"
    if os.statvfs(probe).f_flag & os.ST_RDONLY:
        return "read-only file system"
    return ""


def check_root_writable(root: Path) -> None:
    """Create the sessions root, or a one-line error saying why it cannot be written."""
    problem = unwritable(root)
    if not problem:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            problem = e.strerror or str(e)
    if problem:
        raise MinigptError(f"sessions root {root} is not writable ({problem})",
                           "pass --root DIR (or set MINIGPT_SESSIONS) to a writable folder")


def list_sessions(root: Path | None = None) -> list[Session]:
    root = Path(root or default_root())
    if not root.is_dir():
        return []
    found = [Session(p) for p in root.iterdir() if p.is_dir() and (p / CONFIG_FILE).exists()]
    return sorted(found, key=lambda s: s.path.stat().st_mtime, reverse=True)


def delete(session: Session) -> None:
    if session.runner_alive():
        raise MinigptError(f"session {session.id} is running", f"stop it first: minigpt stop {session.id}")
    shutil.rmtree(session.path)


def summary(session: Session) -> dict:
    """One row for session lists: cheap, torch-free, tolerant of corrupt sessions."""
    row: dict[str, Any] = {"id": session.id, "path": str(session.path)}
    try:
        cfg = session.config()
        p = cfg.prune
        row.update(model=cfg.model.source, domain=cfg.data.source, mode=p.mode,
                   method=(f"{p.criterion} eps={p.activation_threshold:g}" if p.rule == "threshold"
                           else f"{p.criterion} {p.ratio:.0%} {p.allocation}"))
    except MinigptError as e:
        row.update(model="?", domain="?", mode="?", method="?", error=e.problem)
    try:
        state = session.state()
        row.update(status=session.status(), stage=state.get("stage"), updated=state.get("updated"),
                   completed=state.get("completed_stages", []), progress=state.get("progress"))
    except MinigptError as e:
        row.update(status="corrupt", stage=None, updated=None, completed=[], error=e.problem)
    return row
