"""Running a grid: one session per cell, sequentially in this process (or detached), or with
`max_parallel` N in runner processes, at most N at once.

Cells not done are run with `engine.run.pipeline.run`; a cell that shares model, corpus,
calibration and evaluation settings with a measured one is seeded with its baseline
(results and metric events copied, the stage marked complete), and its calibration is a
hit in the calibration cache that every run shares (`engine.run.stages.calibration`). What it
downloads, it fetches up front (`prefetch`), so a missing network fails before any work.
SIGINT/SIGTERM stop the running cell at its next safe point and start no other.

With `max_parallel` (`minigpt grid --max-parallel N`) each cell runs in its own runner
process (`python -m engine.run.runner SESSION`, as `minigpt run` launches), at most N at
once; the grid waits for them. A cell whose group (model, corpus, calibration and
evaluation settings) has a cell still before the end of its calibration waits for it, so the
group's baseline is measured once and its calibration computed once (then a cache hit);
cells of other groups start meanwhile. Each cell's live progress is in its session
(`minigpt logs ID -f`). A stop request reaches every running cell.
`python -m engine.run.gridrun GRID.toml --folder DIR` is the detached runner's entry point.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from engine import atomic
from engine.run import record
from engine.run import session as session_mod
from engine.errors import MinigptError
from engine.run.grid import (LOG_FILE, LOCK_FILE, RESULTS_MD, Cell, GridSpec, _cell_session, _read_index, load_spec,
                   write_outputs)

def _donor(cell: Cell, sessions: dict, cells: list[Cell]) -> session_mod.Session | None:
    """A cell of the same group (model, corpus, calibration and evaluation settings) whose
    baseline is measured. Calibration needs no donor: the calibration cache serves it."""
    if not cell.cfg.evaluate.evaluate_base:
        return None
    for other in cells:
        s = sessions.get(other.key)
        if other is cell or s is None or other.group != cell.group:
            continue
        try:
            done = s.state().get("completed_stages", [])
        except MinigptError:
            continue
        if "baseline" in done and s.results().get("models", {}).get("base"):
            return s
    return None


def seed_from(donor: session_mod.Session, s: session_mod.Session) -> None:
    """Give a fresh session the donor's baseline: its base-model results and metric events."""
    res = s.results()
    res.setdefault("models", {})["base"] = donor.results()["models"]["base"]
    s.write_results(res)
    w = s.writer()
    try:
        w.emit("log", **record.event("log", {"level": "info", "message": f"baseline reused from session "
                                             f"{donor.id} (same model, corpus and evaluation settings)"}))
        for e in donor.events():
            if e.get("type") == "metric" and e.get("stage") == "baseline":
                fields = {k: v for k, v in e.items() if k not in ("t", "type", "reused_from")}
                w.emit("metric", **record.event("metric", {**fields, "reused_from": donor.id}))
    finally:
        w.close()
    s.update_state(completed_stages=["baseline"], reused_from=donor.id)


class _Stopper:
    """SIGINT/SIGTERM stop the grid: the running cell checkpoints and stops, no new cell starts."""

    def __init__(self):
        self.stopped = False
        self.current: Path | None = None
        self.running: set[Path] = set()  # cells in runner processes (max_parallel)
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on)
        if hasattr(signal, "SIGHUP"):
            self._old[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return self

    def _on(self, signum, frame):
        self.stopped = True
        for path in ([self.current] if self.current is not None else []) + sorted(self.running):
            try:
                atomic.write_text(path / session_mod.STOP_FILE, "stop\n")
            except OSError:
                pass

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def prefetch(spec: GridSpec, display: Callable | None = None, only: list[Cell] | None = None) -> None:
    """Download what the cells need (hub models, question sets, URL corpora) before the first cell
    runs, and pin the question sets to their local copies, so a network failure shows at once."""
    from engine.data import download

    def prog(label):
        if display is None:
            return None
        return lambda done, total, rate=0.0: display({"type": "progress", "stage": f"download {label}",
                                                     "done": done, "total": total, "unit": "bytes", "rate": rate})

    fetched: dict[str, Path] = {}
    for src in dict.fromkeys(c.cfg.model.source for c in only or spec.cells):
        if download.is_hub_id(src):
            download.model_snapshot(src, prog(src))
    for c in only or spec.cells:
        files = []
        for ref in c.cfg.evaluate.mcq_files:
            if download.is_url(ref):
                if ref not in fetched:
                    fetched[ref] = download.fetch(ref, "evaluate.mcq_files", prog(Path(ref).name))
                files.append(str(fetched[ref]))
            else:
                files.append(ref)
        c.cfg.evaluate.mcq_files = files
        src = c.cfg.data.source
        if download.is_url(src) and src not in fetched:
            fetched[src] = download.fetch(src, "data.source", prog(Path(src).name))
        elif c.cfg.data.files and download.is_hub_id(src) and src not in fetched:
            fetched[src] = download.hub_snapshot(src, "dataset", c.cfg.data.files, "data.source", prog(src))


def run_grid(spec: GridSpec, display_factory: Callable | None = None, echo: Callable = print,
             retry_failed: bool = True, cells: list[Cell] | None = None, max_parallel: int = 0,
             poll: float = 0.5) -> dict:
    """Run every cell not done yet; returns {"status": .., "done": n, "failed": n, ...}.

    `max_parallel` 0: one cell after another in this process; N >= 1: each cell in its own
    runner process, at most N at once."""
    if max_parallel < 0:
        raise MinigptError(f"--max-parallel {max_parallel} is negative", "give N >= 1 (or leave it out)")
    spec.folder.mkdir(parents=True, exist_ok=True)
    todo = cells or spec.cells
    with session_mod.RunnerLock(spec.folder / LOCK_FILE, f"grid {spec.folder} is already being run by another process",
                                f"wait for it, or follow it in {spec.folder / LOG_FILE}"), _Stopper() as stopper:
        index = _read_index(spec.folder)
        known = {c["key"]: c for c in index.get("cells", []) if isinstance(c, dict) and "key" in c}
        disp = display_factory() if display_factory else None
        try:
            prefetch(spec, disp, todo)
        finally:
            if disp is not None and hasattr(disp, "close"):
                disp.close()
        sessions = {c.key: _cell_session(spec, c, known) for c in spec.cells}
        write_outputs(spec, sessions)
        if max_parallel:
            _run_pool(spec, todo, sessions, max_parallel, stopper, echo, retry_failed, poll)
        for i, cell in enumerate([] if max_parallel else todo, 1):
            if stopper.stopped:
                break
            _run_cell(spec, cell, sessions, f"[{i}/{len(todo)}]", stopper, display_factory, echo, retry_failed)
        rows = write_outputs(spec, sessions)
    statuses = [r["status"] for r in rows]
    overall = ("stopped" if stopper.stopped else "done" if all(x == "done" for x in statuses)
               else "failed" if any(x == "failed" for x in statuses) else "partial")
    return {"status": overall, "cells": len(rows), "done": statuses.count("done"),
            "failed": statuses.count("failed"), "folder": str(spec.folder)}


def _prepare(spec: GridSpec, cell: Cell, sessions: dict, counter: str, echo: Callable,
             retry_failed: bool) -> str | None:
    """Whether to run (or resume) a cell: None if it is done, running elsewhere, or failed
    (with retry_failed off); else how it starts, its baseline seeded from a donor if it can be."""
    s = sessions[cell.key]
    status = s.status()
    head = _head(cell, s, counter)
    if status == "done":
        return None
    if status == "running":
        echo(f"{head}: already running in another process; skipped")
        return None
    if status == "failed" and not retry_failed:
        echo(f"{head}: failed before ({s.state().get('error')}); skipped (--no-retry-failed)")
        return None
    how = "resuming" if s.state().get("completed_stages") else "starting"
    if how == "starting":
        donor = _donor(cell, sessions, spec.cells)
        if donor is not None:
            seed_from(donor, s)
            how = f"starting (baseline reused from {donor.id})"
    return how


def _head(cell: Cell, s, counter: str) -> str:
    return f"{counter} {cell.model} · {cell.domain} · {cell.setting} · {cell.method} ({s.id})"


def _run_cell(spec: GridSpec, cell: Cell, sessions: dict, counter: str, stopper: _Stopper,
              display_factory: Callable | None, echo: Callable, retry_failed: bool) -> None:
    """Run (or resume) one cell's session in this process; a stopped cell stops the grid."""
    from engine.run import pipeline

    s = sessions[cell.key]
    head = _head(cell, s, counter)
    how = _prepare(spec, cell, sessions, counter, echo, retry_failed)
    if how is None:
        return
    echo(f"{head}: {how}")
    stopper.current = s.path
    disp = display_factory() if display_factory else None
    try:
        pipeline.run(s, display=disp, handle_signals=False)
    except MinigptError as e:
        echo(f"{head}: failed: {e.line()}")
    except Exception as e:  # a bug or OOM in one cell must not lose the others
        echo(f"{head}: failed: {type(e).__name__}: {e}")
    finally:
        stopper.current = None
        if disp is not None and hasattr(disp, "close"):
            disp.close()
    write_outputs(spec, sessions)
    if s.status() == "stopped":
        stopper.stopped = True


def _run_pool(spec: GridSpec, todo: list[Cell], sessions: dict, limit: int, stopper: _Stopper, echo: Callable,
              retry_failed: bool, poll: float) -> None:
    """Each cell in its own runner process, at most `limit` at once; returns when all have ended
    (or, after a stop, when the running ones have stopped)."""
    from engine.run import launch

    pending = list(enumerate(todo, 1))
    running: dict[int, tuple[Cell, str]] = {}  # pid -> (cell, head)

    def calibrating(group: str) -> bool:  # a running cell of this group has not finished calibrating
        for c, _ in running.values():
            if c.group == group:
                try:
                    if "calibrate" not in sessions[c.key].state().get("completed_stages", []):
                        return True
                except MinigptError:
                    return True
        return False

    while pending or running:
        for pid, (cell, head) in list(running.items()):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                del running[pid]
                stopper.running.discard(sessions[cell.key].path)
                s = sessions[cell.key]
                st = s.status()
                err = s.state().get("error") if st == "failed" else None
                echo(f"{head}: {st}" + (f": {err}" if err else "") + f" (runner {pid})")
                write_outputs(spec, sessions)
                if st == "stopped":
                    stopper.stopped = True
        if stopper.stopped:
            pending = []
        while pending and len(running) < limit and not stopper.stopped:
            pick = next((x for x in pending if not calibrating(x[1].group)), None)
            if pick is None:
                break  # every cell left waits for its group's calibration
            pending.remove(pick)
            i, cell = pick
            s = sessions[cell.key]
            head = _head(cell, s, f"[{i}/{len(todo)}]")
            how = _prepare(spec, cell, sessions, f"[{i}/{len(todo)}]", echo, retry_failed)
            if how is None:
                continue
            try:
                pid = launch.launch_detached(s.path)
            except MinigptError as e:
                echo(f"{head}: not started: {e.line()}")
                continue
            running[pid] = (cell, head)
            stopper.running.add(s.path)
            echo(f"{head}: {how} in runner {pid} ({len(running)} of at most {limit} running); "
                 f"follow it with: minigpt logs {s.path} -f")
        if pending or running:
            time.sleep(poll)


def launch_detached(spec_path: Path, folder: Path, overrides: list[str], max_parallel: int = 0) -> int:
    """Run the grid in its own process session (survives the terminal); log in the grid folder."""
    from engine.run import launch

    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "engine.run.gridrun", str(Path(spec_path).resolve()), "--folder", str(folder.resolve())]
    for o in overrides:
        cmd += ["--set", o]
    if max_parallel:
        cmd += ["--max-parallel", str(max_parallel)]
    return launch.spawn(cmd, folder / LOG_FILE)


# ---- python -m engine.run.gridrun (the detached runner) -----------------------------------------------
def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m engine.run.gridrun")
    ap.add_argument("spec")
    ap.add_argument("--folder", default=None)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--max-parallel", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.spec, args.set, Path(args.folder) if args.folder else None)
        out = run_grid(spec, echo=lambda m: print(m, flush=True), max_parallel=args.max_parallel)
    except MinigptError as e:
        print(f"error: {e.line()}", file=sys.stderr, flush=True)
        return 2
    print(f"grid {out['status']}: {out['done']}/{out['cells']} cells done, {out['failed']} failed; "
          f"table in {Path(out['folder']) / RESULTS_MD}", flush=True)
    return 0 if out["status"] in ("done", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
