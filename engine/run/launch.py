"""Launching detached runs, torch-free: spawn, stop and liveness.

`launch_detached` returns at once; the child (`python -m engine.run.runner SESSION`, see
`engine.run.runner`) runs in its own process session (setsid), so it survives the terminal
closing, SIGHUP and the app exiting. `wait_started` tells a launcher whether its own child
got the session's lock or was refused (a concurrent resume won). `request_stop` asks the
runner to stop at its next safe point (it checkpoints first), in any state: a request made
while the runner is still starting (importing torch, before it holds the lock) stays in
`stop.request` and the runner honours it at its first safe point. Nothing here imports
torch: the app and the CLI import it plainly.
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


_CHILDREN: dict[int, subprocess.Popen] = {}  # what this process spawned: wait_started reaps them


def spawn(cmd: list[str], log_path: Path) -> int:
    """Start `cmd` in its own process session, stdin closed, output appended to `log_path`.

    The repository root leads the child's PYTHONPATH. Returns the child's pid."""
    env = dict(os.environ)
    env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True, env=env)
    _CHILDREN[proc.pid] = proc
    return proc.pid


def runner_command(session_path: str | os.PathLike, nproc: int = 1) -> list[str]:
    """The runner's command line: `python -m engine.run.runner SESSION`, or with `nproc` > 1
    `python -m torch.distributed.run --standalone --nproc_per_node N -m engine.run.runner SESSION`
    (torchrun: one process per GPU on this machine, the same pipeline on every rank)."""
    if nproc < 1:
        raise MinigptError(f"--nproc {nproc} is not a number of processes", "use --nproc 1 or more (one per GPU)")
    runner = ["-m", "engine.run.runner", str(Path(session_path).resolve()), "--keep-stop"]
    if nproc == 1:
        return [sys.executable, *runner]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *runner]


def launch_detached(session_path: str | os.PathLike, redo_from: str | None = None, nproc: int = 1) -> int:
    """Start the session's runner detached (`nproc` > 1: under torchrun); returns the launched pid
    (torchrun's own with `nproc` > 1: rank 0, its child, holds the lock)."""
    s = open_session(session_path)
    s.config()  # a corrupt session fails here, in the caller, with its one-line message
    if s.runner_alive():
        raise MinigptError(f"session {s.id} is already running", f"follow it with: minigpt logs {s.id} -f")
    s.check_writable()  # a read-only session: one line here, not a traceback from the first write
    cmd = runner_command(s.path, nproc)
    if redo_from:
        cmd += ["--redo-from", redo_from]
    # a stop request left by an earlier run is not for this one; one made from now on is
    # (the runner keeps it: `--keep-stop`)
    try:
        os.unlink(s.path / STOP_FILE)
    except FileNotFoundError:
        pass
    # written before the child exists: it rewrites state.json itself once it holds the lock
    s.update_state(status="starting", pid=None, error=None)
    pid = spawn(cmd, s.path / LOG_FILE)
    if s.state().get("pid") is None:
        s.update_state(pid=pid)
    return pid


def refusal(session, pid: int) -> str:
    """The one-line error runner `pid` wrote to the session's runner.log, if any."""
    mark = f"runner {pid}: error: "
    try:
        lines = (session.path / LOG_FILE).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((l[len(mark):] for l in reversed(lines) if l.startswith(mark)), "")


def wait_started(session, pid: int, timeout: float | None = None, poll: float = 0.1) -> tuple[bool, str]:
    """Wait until runner `pid` (spawned by this process) holds the session's lock, or exits.

    Returns (True, "") once it runs (or has run and ended: a fast run), (False, message)
    when it exited without running: another runner got the lock first (two concurrent
    resumes), or the session failed to open. `timeout` None waits as long as it lives."""
    import time

    proc = _CHILDREN.get(pid)
    t0 = time.monotonic()
    while True:
        if session.runner_alive() and _launched_by(runner_pid(session), pid):
            return True, ""
        code = proc.poll() if proc is not None else (None if alive(pid) else 0)
        if code is not None:
            if code == 0:
                return True, ""  # ran and ended between two polls
            msg = refusal(session, pid)
            return False, msg or f"the runner exited with status {code} before starting; see {session.path / LOG_FILE}"
        if timeout is not None and time.monotonic() - t0 > timeout:
            return True, ""  # still starting: the follower keeps watching
        time.sleep(poll)


def _launched_by(holder: int | None, pid: int) -> bool:
    """The lock holder is `pid`, or its descendant (torchrun's rank 0)."""
    if holder is None:
        return False
    if holder == pid:
        return True
    try:
        return any(p.pid == pid for p in psutil.Process(holder).parents())
    except psutil.Error:
        return False


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
    """Ask the runner to stop gracefully, whether it runs or is still starting. Returns False
    if nothing was running or starting.

    The request is `stop.request` in the session, which the runner polls at every safe point;
    a running runner is also sent SIGTERM (a starting one ignores it: the file carries the
    request until the runner's first safe point)."""
    s = open_session(session_path)
    running = s.runner_alive()
    if not running and not _launching(s):
        return False
    try:
        atomic.write_text(s.path / STOP_FILE, "stop\n")
    except OSError as e:
        raise MinigptError(f"cannot write the stop request {s.path / STOP_FILE} ({e.strerror or e})",
                           f"stop the runner with: kill {runner_pid(s) or 'PID'} (it checkpoints first)") from None
    pid = runner_pid(s) if running else None
    if pid:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    return True


def _launching(session) -> bool:
    """Started and not yet holding the lock: the launcher has written "starting" (its pid may
    not be recorded yet) and the child, if recorded, lives."""
    state = session.state()
    if state.get("status") != "starting":
        return False
    pid = state.get("pid")
    if not pid:  # the launcher is between writing "starting" and recording the pid
        import time

        return time.time() - float(state.get("updated") or 0) < 30
    return alive(pid)


def exit_status(pid: int) -> int | None:
    """The exit status of a child this process spawned, once it has ended (negative: killed by
    that signal); None while it runs, or for a process this one did not spawn. Reaps it."""
    proc = _CHILDREN.get(int(pid))
    return proc.poll() if proc is not None else None


def reap() -> list[int]:
    """Collect every ended child this process spawned, so none stays `<defunct>` (the app calls
    it on a timer). Returns the pids that had ended; their exit statuses stay readable."""
    return [pid for pid, proc in list(_CHILDREN.items()) if proc.poll() is not None]
