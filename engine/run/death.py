"""The death record: a runner that died without ending its run gets one `runner_died` event.

A runner killed by SIGKILL (kill -9, the OOM killer) or a crash of the interpreter writes
nothing: its lock is dropped by the kernel, `state.json` still says running, and the event
log stops. The first reader that finds the session so (the CLI follower, `minigpt sessions`,
`minigpt status`, the app) calls `record_death`, which appends the run record's
`runner_died` once per run, saying in which stage and at which step it died, and how, when
the reader is the process that launched it (it sees the exit status). Torch-free.
"""

from __future__ import annotations

import fcntl
import signal
from pathlib import Path

from engine.run import record
from engine.run.events import EventWriter, read_events

DEATH_LOCK = ".death.lock"  # serialises readers that record a death at the same moment


def _last_run(events: list[dict]) -> list[dict]:
    """The events of the last run (from its run_start on; all of them if none started)."""
    starts = [i for i, e in enumerate(events) if e.get("type") == "run_start"]
    return events[starts[-1]:] if starts else events


def recorded(events: list[dict]) -> dict | None:
    """The last run's death record, if it has one."""
    return next((e for e in reversed(_last_run(events)) if e.get("type") == "runner_died"), None)


def describe(stage: str | None, step: int | None, sig: str | None, code: int | None) -> str:
    how = f" ({sig})" if sig else (f" (exit status {code})" if code is not None else "")
    where = f" during {stage}" if stage else ""
    at = f" at step {step}" if step is not None else ""
    tail = "" if (sig or code is not None) else " (no exit status seen: kill -9 and the OOM killer leave none)"
    return f"runner died{how}{where}{at}{tail}"


def record_death(session, exit_code: int | None = None) -> dict | None:
    """If `session` is disconnected (state says running, nobody holds the runner lock) and its
    last run has no `run_end` and no death record yet, append `runner_died`. Returns the
    death record (the new one, or the one already there), else None (alive, or it ended).

    `exit_code` is the runner's exit status when the caller knows it (negative: the signal,
    as subprocess reports it); by default the launcher's own record of the children this
    process spawned is asked."""
    from engine.run import launch

    state = session.state()
    if state.get("status") not in ("running", "stopping") or session.runner_alive():
        return None
    lock_path = Path(session.path) / DEATH_LOCK
    try:
        f = open(lock_path, "a+")
    except OSError:  # a read-only session: report it, write nothing
        return None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        # again, under the lock: another reader may have recorded it, or a resume started
        state = session.state()
        if state.get("status") not in ("running", "stopping") or session.runner_alive():
            return None
        run = _last_run(read_events(session.events_path))
        if any(e.get("type") == "run_end" for e in run):
            return None
        done = recorded(run)
        if done is not None:
            return done
        pid = state.get("pid")
        pid = int(pid) if isinstance(pid, (int, float)) or (isinstance(pid, str) and pid.isdigit()) else None
        if exit_code is None and pid is not None:
            exit_code = launch.exit_status(pid)
        sig = None
        if exit_code is not None and exit_code < 0:
            try:
                sig = signal.Signals(-exit_code).name
            except ValueError:
                sig = f"signal {-exit_code}"
        stage = state.get("stage")
        steps = [e.get("step") for e in run if e.get("type") == "train" and isinstance(e.get("step"), int)]
        step = steps[-1] if stage == "finetune" and steps else None
        fields = record.event("runner_died", {
            "pid": pid, "stage": stage, "step": step, "signal": sig,
            "exit_code": exit_code if sig is None else None,
            "message": describe(stage, step, sig, exit_code if sig is None else None)})
        w = EventWriter(session.events_path)  # starts on a fresh line after a torn one
        try:
            ev = w.emit("runner_died", **fields)
        finally:
            w.close()
        return ev
