"""Launching detached runs, torch-free: spawn, stop and liveness.

`launch_detached` returns at once; the child (`python -m engine.run.runner SESSION`, see
`engine.run.runner`) runs in its own process session (setsid), so it survives the terminal
closing, SIGHUP and the app exiting. `request_stop` asks it to stop at its next safe point
(it checkpoints first). Nothing here imports torch: the app and the CLI import it plainly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from engine import atomic
from engine.errors import MinigptError
from engine.run.session import LOCK_FILE as LOCK_NAME
from engine.run.session import STOP_FILE, open_session

LOG_FILE = "runner.log"
# the folder holding the `engine` package: the child must import this very copy
_ROOT = str(Path(__file__).resolve().parents[2])


def spawn(cmd: list[str], log_path: Path) -> int:
    """Start `cmd` in its own process session, stdin closed, output appended to `log_path`.

    The repository root leads the child's PYTHONPATH. Returns the child's pid."""
    env = dict(os.environ)
    env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True, env=env)
    return proc.pid


def launch_detached(session_path: str | os.PathLike, redo_from: str | None = None) -> int:
    s = open_session(session_path)
    s.config()  # a corrupt session fails here, in the caller, with its one-line message
    if s.runner_alive():
        raise MinigptError(f"session {s.id} is already running", f"follow it with: minigpt logs {s.id} -f")
    cmd = [sys.executable, "-m", "engine.run.runner", str(s.path.resolve())]
    if redo_from:
        cmd += ["--redo-from", redo_from]
    # written before the child exists: it rewrites state.json itself once it holds the lock
    s.update_state(status="starting", pid=None, error=None)
    pid = spawn(cmd, s.path / LOG_FILE)
    if s.state().get("pid") is None:
        s.update_state(pid=pid)
    return pid


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an unreaped child is dead too)."""
    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess is one
        return False
    except psutil.AccessDenied:  # it exists; we may not look inside
        return True


def runner_pid(session) -> int | None:
    """The pid of the process holding the session's lock (it writes it there), else state.json's."""
    try:
        return int((session.path / LOCK_NAME).read_text().strip())
    except (OSError, ValueError):
        pid = session.state().get("pid")
        return int(pid) if pid else None


def starting(session) -> bool:
    """The launched runner process lives but holds no lock yet (it imports torch first: seconds,
    more on a loaded machine). False once it has died, zombie included."""
    state = session.state()
    pid = state.get("pid")
    if not pid or state.get("status") != "starting":
        return False
    return alive(pid)


def request_stop(session_path: str | os.PathLike) -> bool:
    """Ask the runner to stop gracefully. Returns False if nothing was running."""
    s = open_session(session_path)
    if not s.runner_alive():
        return False
    atomic.write_text(s.path / STOP_FILE, "stop\n")
    pid = runner_pid(s)
    if pid:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    return True
