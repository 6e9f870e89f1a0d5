"""Detached runs: one process per session, in its own process session (setsid).

`launch_detached` returns at once; the child survives the terminal closing, SIGHUP and
the app exiting. `request_stop` asks it to stop at its next safe point (it checkpoints
first). `python -m engine.run.runner SESSION` is the child's entry point.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from engine.errors import MinigptError
from engine.run.reporter import STOP_FILE
from engine.run.session import LOCK_FILE as LOCK_NAME

LOG_FILE = "runner.log"


def launch_detached(session_path: str | os.PathLike, redo_from: str | None = None) -> int:
    from engine.run.session import open_session

    s = open_session(session_path)
    s.config()  # a corrupt session fails here, in the caller, with its one-line message
    if s.runner_alive():
        raise MinigptError(f"session {s.id} is already running", f"follow it with: minigpt logs {s.id} -f")
    cmd = [sys.executable, "-m", "engine.run.runner", str(s.path.resolve())]
    if redo_from:
        cmd += ["--redo-from", redo_from]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # written before the child exists: it rewrites state.json itself once it holds the lock
    s.update_state(status="starting", pid=None, error=None)
    with open(s.path / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True, env=env)
    if s.state().get("pid") is None:
        s.update_state(pid=proc.pid)
    return proc.pid


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
    pid = session.state().get("pid")
    if not pid or session.state().get("status") != "starting":
        return False
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # an unreaped child is dead too
    except FileNotFoundError:
        return False
    except OSError:  # no procfs
        try:
            os.kill(int(pid), 0)
            return True
        except OSError:
            return False


def request_stop(session_path: str | os.PathLike) -> bool:
    """Ask the runner to stop gracefully. Returns False if nothing was running."""
    from engine.run.session import open_session

    s = open_session(session_path)
    if not s.runner_alive():
        return False
    (s.path / STOP_FILE).write_text("stop\n")
    pid = runner_pid(s)
    if pid:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    return True


def main(argv: list[str] | None = None) -> int:
    import argparse

    # until the pipeline installs its handlers (after importing torch: seconds), a hangup
    # must not kill us either; the own process session already shields us from the terminal's
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from engine.run import pipeline
    from engine.run.session import open_session

    ap = argparse.ArgumentParser(prog="python -m engine.run.runner")
    ap.add_argument("session")
    ap.add_argument("--redo-from", default=None, help="redo this stage and the ones after it")
    args = ap.parse_args(argv)
    rank = _init_distributed()
    try:
        s = open_session(args.session)
        if not rank:  # single process (None) or rank 0
            try:
                pipeline.run(s, handle_signals=True, redo_from=args.redo_from)
            finally:
                if rank is not None:
                    from engine.train import finetune

                    finetune.release_followers()
        else:
            from engine.train import finetune

            finetune.follow(s)
    except MinigptError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return 2
    finally:
        if rank is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _init_distributed() -> int | None:
    """Under `torchrun --nproc_per_node N -m engine.run.runner SESSION`: join the process group.

    Returns this process's rank, or None when not distributed. Rank 0 runs the pipeline as
    usual (it holds the lock, writes every file); the other ranks wait for its fine-tuning
    stage and train alongside it with DistributedDataParallel (gloo on CPU, NCCL on CUDA).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # followers wait in a collective through rank 0's calibration and pruning: allow hours
    dist.init_process_group(backend, timeout=timedelta(hours=12))
    return dist.get_rank()


if __name__ == "__main__":
    sys.exit(main())
