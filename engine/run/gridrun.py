"""Running a grid: one session per cell, sequentially in this process (or detached).

Cells not done are run with `engine.run.pipeline.run`; a cell that shares model, corpus,
calibration and evaluation settings with a measured one is seeded with its baseline
(results and metric events copied, the stage marked complete), and its calibration is a
hit in the calibration cache that every run shares (`engine.run.stages.calibration`). What it
downloads, it fetches up front (`prefetch`), so a missing network fails before any work.
SIGINT/SIGTERM stop the running cell at its next safe point and start no other.
`python -m engine.run.gridrun GRID.toml --folder DIR` is the detached runner's entry point.
"""

from __future__ import annotations

import signal
import sys
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
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on)
        if hasattr(signal, "SIGHUP"):
            self._old[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return self

    def _on(self, signum, frame):
        self.stopped = True
        if self.current is not None:
            try:
                atomic.write_text(self.current / session_mod.STOP_FILE, "stop\n")
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
             retry_failed: bool = True, cells: list[Cell] | None = None) -> dict:
    """Run every cell not done yet; returns {"status": .., "done": n, "failed": n, ...}."""
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
        for i, cell in enumerate(todo, 1):
            if stopper.stopped:
                break
            _run_cell(spec, cell, sessions, f"[{i}/{len(todo)}]", stopper, display_factory, echo, retry_failed)
        rows = write_outputs(spec, sessions)
    statuses = [r["status"] for r in rows]
    overall = ("stopped" if stopper.stopped else "done" if all(x == "done" for x in statuses)
               else "failed" if any(x == "failed" for x in statuses) else "partial")
    return {"status": overall, "cells": len(rows), "done": statuses.count("done"),
            "failed": statuses.count("failed"), "folder": str(spec.folder)}


def _run_cell(spec: GridSpec, cell: Cell, sessions: dict, counter: str, stopper: _Stopper,
              display_factory: Callable | None, echo: Callable, retry_failed: bool) -> None:
    """Run (or resume) one cell's session unless it is done, running elsewhere, or failed
    (with retry_failed off); a stopped cell stops the grid."""
    from engine.run import pipeline

    s = sessions[cell.key]
    status = s.status()
    head = f"{counter} {cell.model} · {cell.domain} · {cell.setting} · {cell.method} ({s.id})"
    if status == "done":
        return
    if status == "running":
        echo(f"{head}: already running in another process; skipped")
        return
    if status == "failed" and not retry_failed:
        echo(f"{head}: failed before ({s.state().get('error')}); skipped (--no-retry-failed)")
        return
    how = "resuming" if s.state().get("completed_stages") else "starting"
    if how == "starting":
        donor = _donor(cell, sessions, spec.cells)
        if donor is not None:
            seed_from(donor, s)
            how = f"starting (baseline reused from {donor.id})"
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


def launch_detached(spec_path: Path, folder: Path, overrides: list[str]) -> int:
    """Run the grid in its own process session (survives the terminal); log in the grid folder."""
    from engine.run import launch

    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "engine.run.gridrun", str(Path(spec_path).resolve()), "--folder", str(folder.resolve())]
    for o in overrides:
        cmd += ["--set", o]
    return launch.spawn(cmd, folder / LOG_FILE)


# ---- python -m engine.run.gridrun (the detached runner) -----------------------------------------------
def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m engine.run.gridrun")
    ap.add_argument("spec")
    ap.add_argument("--folder", default=None)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.spec, args.set, Path(args.folder) if args.folder else None)
        out = run_grid(spec, echo=lambda m: print(m, flush=True))
    except MinigptError as e:
        print(f"error: {e.line()}", file=sys.stderr, flush=True)
        return 2
    print(f"grid {out['status']}: {out['done']}/{out['cells']} cells done, {out['failed']} failed; "
          f"table in {Path(out['folder']) / RESULTS_MD}", flush=True)
    return 0 if out["status"] in ("done", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
