"""Detached runs: one process per session, in its own process session (setsid).

`launch_detached` returns at once; the child survives the terminal closing, SIGHUP and
the app exiting. `request_stop` asks it to stop at its next safe point (it checkpoints
first). `python -m engine.runner SESSION` is the child's entry point.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .errors import MinigptError
from .reporter import STOP_FILE

LOG_FILE = "runner.log"


def launch_detached(session_path: str | os.PathLike, stages: list[str] | None = None) -> int:
    from .session import open_session

    s = open_session(session_path)
    s.config()  # a corrupt session fails here, in the caller, with its one-line message
    if s.runner_alive():
        raise MinigptError(f"session {s.id} is already running", f"follow it with: minigpt logs {s.id} -f")
    cmd = [sys.executable, "-m", "engine.runner", str(s.path.resolve())]
    if stages:
        cmd += ["--stages", ",".join(stages)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(s.path / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True, env=env)
    s.update_state(status="starting", pid=proc.pid)
    return proc.pid


def request_stop(session_path: str | os.PathLike) -> bool:
    """Ask the runner to stop gracefully. Returns False if nothing was running."""
    from .session import open_session

    s = open_session(session_path)
    if not s.runner_alive():
        return False
    (s.path / STOP_FILE).write_text("stop\n")
    pid = s.state().get("pid")
    if pid:
        try:
            os.kill(int(pid), signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    return True


def main(argv: list[str] | None = None) -> int:
    import argparse

    from . import pipeline
    from .session import open_session

    ap = argparse.ArgumentParser(prog="python -m engine.runner")
    ap.add_argument("session")
    ap.add_argument("--stages", default="")
    args = ap.parse_args(argv)
    try:
        s = open_session(args.session)
        pipeline.run(s, stages=[x for x in args.stages.split(",") if x] or None, handle_signals=True)
    except MinigptError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
